"""The Triton kernels as one differentiable op: reverse mode (backward) and forward mode (jvp).

Written in the `setup_context` style so torch.func transforms (torch.func.jvp, torch.func.grad) can use it.
The jvp's tangent is not itself differentiable: continuous-time consistency training uses the tangent as a
stop-gradient target, which is all the kernels support.
"""
from __future__ import annotations

import torch

from . import triton_attention
from .triton_attention_dims import padded_head_dim


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, scale):   # q, k, v have a unit stride on head_dim (triton_flash_attention sees to it)
        return triton_attention.forward(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = triton_attention.backward(_unit_stride(do), q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale):
        q, k, v, o, lse = ctx.saved_tensors
        tq, tk, tv = (_unit_stride(t) for t in (tq, tk, tv))
        return triton_attention.jvp(q, k, v, o, lse, tq, tk, tv, ctx.scale), None


def triton_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, L, D) attention through the Triton kernels, D padded with zeros to a supported power of two."""
    d = q.shape[-1]
    padded = padded_head_dim(d)
    if padded != d:   # the padded copies have a unit stride already
        pad = (0, padded - d)
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
    else:
        q, k, v = (_unit_stride(t) for t in (q, k, v))
    o, _ = FlashAttentionFunction.apply(q, k, v, scale)
    return o[..., :d] if padded != d else o
