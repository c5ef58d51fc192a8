"""Exponential moving average of a network's weights (as in DiT's `update_ema`)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    # a LoRA student's frozen base (networks/lora.py) is shared, not copied: it never changes, and the copy was a
    # second UNet in memory
    ema = copy.deepcopy(model, {id(p): p for p in model.parameters() if getattr(p, "frozen_base", False)})
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


class EMA:
    """`ema <- decay * ema + (1 - decay) * model` after each generator update. The parameter lists are taken once:
    walking both module trees on every update was a visible share of a gmm step."""

    def __init__(self, ema: nn.Module, model: nn.Module):
        # a LoRA student's frozen base is left out: 99% of its tensors' elements, rewritten with themselves
        pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if not getattr(p, "frozen_base", False)]
        self.ema_params = [e for e, _ in pairs]
        self.params = [p.detach() for _, p in pairs]   # views: the optimizer updates them in place
        self.buffers = list(zip(ema.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self, decay: float) -> None:
        params = [p if p.dtype == e.dtype else p.to(e.dtype) for e, p in zip(self.ema_params, self.params)]
        torch._foreach_lerp_(self.ema_params, params, 1.0 - decay)  # one fused call instead of one per tensor
        for e, b in self.buffers:
            e.copy_(b)


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    EMA(ema, model).update(decay)
