"""The Triton kernels as one differentiable op: reverse mode (backward) and forward mode (jvp).

Written in the `setup_context` style so torch.func transforms (torch.func.jvp, torch.func.grad) can use it.
The jvp's tangent is not itself differentiable: continuous-time consistency training uses the tangent as a
stop-gradient target, which is all the kernels support.

Where q, k or v carry a forward-mode tangent, the output and its tangent come from one fused kernel: forward()
then only allocates O and the log-sum-exp, and jvp() (which autograd calls before `apply` returns, because an
input has a tangent) fills them while computing the tangent. Otherwise forward() runs the forward kernel and
a later jvp() would run the tangent-only kernel from the saved log-sum-exp.
"""
from __future__ import annotations

import torch

from . import triton_attention
from .triton_attention_dims import padded_head_dim


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


FUSE_JVP = True     # bench.py turns this off to time the two-kernel path on the same inputs


def has_tangent(t: torch.Tensor) -> bool:
    """t carries a forward-mode tangent at the current level (torch.func.jvp or torch.autograd.forward_ad)."""
    from torch.autograd import forward_ad
    if getattr(forward_ad, "_current_level", -1) < 0:
        return False
    return forward_ad.unpack_dual(t).tangent is not None


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, scale, fused_jvp):   # q, k, v have a unit stride on head_dim (see triton_flash_attention)
        if fused_jvp:   # filled by jvp(), which runs before apply() returns
            B, H, LQ, D = q.shape
            return (torch.empty(B, H, LQ, D, dtype=q.dtype, device=q.device),
                    torch.empty(B * H, LQ, dtype=torch.float32, device=q.device))
        return triton_attention.forward(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, fused_jvp = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.fused_jvp = fused_jvp

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = triton_attention.backward(_unit_stride(do), q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale, _tfused):
        q, k, v, o, lse = ctx.saved_tensors
        tq, tk, tv = (_unit_stride(t) for t in (tq, tk, tv))
        if ctx.fused_jvp:
            return triton_attention.forward_jvp(q, k, v, tq, tk, tv, ctx.scale, o=o, lse=lse)[2], None
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
    fused_jvp = FUSE_JVP and any(has_tangent(t) for t in (q, k, v))
    o, _ = FlashAttentionFunction.apply(q, k, v, scale, fused_jvp)
    return o[..., :d] if padded != d else o
