"""Exponential moving average of a network's weights (as in DiT's `update_ema`)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


class EMA:
    """`ema <- decay * ema + (1 - decay) * model` after each generator update. The parameter lists are taken once:
    walking both module trees on every update was a visible share of a gmm step."""

    def __init__(self, ema: nn.Module, model: nn.Module):
        self.ema_params = list(ema.parameters())
        self.params = [p.detach() for p in model.parameters()]   # views: the optimizer updates them in place
        self.buffers = list(zip(ema.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self, decay: float) -> None:
        params = [p if p.dtype == e.dtype else p.to(e.dtype) for e, p in zip(self.ema_params, self.params)]
        torch._foreach_lerp_(self.ema_params, params, 1.0 - decay)  # one fused call instead of one per tensor
        for e, b in self.buffers:
            e.copy_(b)


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    EMA(ema, model).update(decay)
