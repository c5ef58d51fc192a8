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


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters())]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one fused call instead of one per tensor
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
