"""`flash_attention(q, k, v, scale, backend)`: one entry point over the Triton kernels, xformers and SDPA.

backend="auto" picks xformers (installed, CUDA), then Triton (CUDA), then PyTorch SDPA. Forward-mode AD
(torch.func.jvp) changes the pick: neither SDPA nor xformers has a JVP, so auto then takes Triton on CUDA
and the explicit "math" attention elsewhere.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from .triton_attention_dims import head_dim_supported, triton_interpreted

BACKENDS = ("auto", "triton", "sdpa", "xformers", "math")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def forward_ad_active(t: torch.Tensor) -> bool:
    """True inside torch.func transforms or a torch.autograd.forward_ad dual level."""
    from torch.autograd import forward_ad
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(is_functorch_wrapped_tensor(t))


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention takes (batch, heads, seq, head_dim) tensors; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and heads must "
                         "match, and k and v must have the same length")
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"q, k and v must share head_dim; got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _check_triton(q: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton), or pick "
                           "backend='sdpa'")
    if q.is_cuda:
        return
    if q.device.type == "cpu" and triton_interpreted():
        return
    raise RuntimeError(f"backend='triton' cannot run on {q.device} tensors: it needs a CUDA GPU, or "
                       "TRITON_INTERPRET=1 set before triton is imported to run the kernels on CPU (slow, for "
                       "tests); use backend='sdpa' or 'auto' otherwise")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if forward_ad_active(q):
        return "triton" if q.is_cuda and triton_available() and head_dim_supported(q.shape[-1]) else "math"
    if q.is_cuda and xformers_available():
        return "xformers"
    if q.is_cuda and triton_available() and head_dim_supported(q.shape[-1]):
        return "triton"
    return "sdpa"


def math_attention(q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale·QKᵀ + mask)V with plain ops: O(L²) memory, but every autograd mode works through it. q is
    scaled before the product, as SDPA does, and half-precision logits are computed in fp32: fp16 logits of
    unscaled q·k overflowed (65504) to NaN. `mask`: an additive float mask or a boolean keep-mask, broadcast to
    (batch, heads, q_len, k_len)."""
    low = q.dtype in (torch.float16, torch.bfloat16)   # logits in fp32: fp16's 3 digits lost whole units of them
    s = torch.matmul((q.float() if low else q) * scale, (k.float() if low else k).transpose(-1, -2)).float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return torch.matmul(s.softmax(-1).to(v.dtype), v)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention on (batch, heads, seq, head_dim) tensors; k, v may be longer or shorter than q.

    `scale` defaults to 1/sqrt(head_dim). Returns (batch, heads, q_len, head_dim) in q's dtype.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = resolve_backend(backend, q)
    if backend == "triton":
        if not head_dim_supported(q.shape[-1]):
            raise ValueError(f"backend='triton' supports head_dim up to 256; got {q.shape[-1]}: use "
                             "backend='sdpa'")
        _check_triton(q)
        from .autograd import triton_flash_attention
        return triton_flash_attention(q, k, v, scale)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "xformers":
        if not xformers_available():
            raise RuntimeError("backend='xformers' needs xformers installed (pip install 'stepdistill[xformers]')")
        import xformers.ops as xops
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=scale)
        return out.transpose(1, 2)
    return math_attention(q, k, v, scale)
