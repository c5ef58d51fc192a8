"""Optimizer pieces of the trainer: AdamW, the learning-rate schedule and gradient clipping."""
from __future__ import annotations

import math

import torch

from .distributed import is_sharded


def lr_lambda(warmup: int, total: int, kind: str, drop_at: int | None = None, drop_factor: float = 1.0):
    """The lr multiplier at a phase's update `step`: linear warm-up, then constant or a cosine to 0 over `total`
    updates, times `drop_factor` from update `drop_at` on (DMD2's second stage runs at a quarter of the lr)."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown optim.schedule {kind!r}: use constant or cosine")

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if drop_at is not None and step >= drop_at:
            w *= drop_factor
        if kind == "cosine":
            return w * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
        return w
    return f


def phase_update_counts(method, max_steps: int) -> dict[str, int]:
    """How many updates each phase makes in `max_steps` trainer steps. A phase's schedule steps once per update of
    that phase, so its cosine must run over this count: over `max_steps` it would stop part-way (a generator
    with 2 critic updates each would end at 0.75 of its lr, the critic at 0.25)."""
    counts = dict.fromkeys(method.phases, 0)
    for step in range(max_steps):
        counts[method.phase(step)] += 1
    return counts


def make_adamw(params, **kw) -> torch.optim.AdamW:
    # the fused kernel (CPU and CUDA) updates every tensor in one call; the default per-tensor Python loop
    # was ~5% of a digits iteration on CPU. Fall back where a dtype/device has no fused kernel.
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all the tensors together (fp32 at least), one fused per-tensor norm pass."""
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` (same norm, same scaling), returning the norm as a float. It scales only
    when the norm exceeds `max_norm`: torch's version always multiplies, by exactly 1 when not clipping, which is
    a full pass over the gradients for nothing (~1 ms of a 30 ms gmm step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if is_sharded(g)]
    if sharded:   # trainer=fsdp: one reduction for the sharded norms, replicated gradients counted once
        plain = [g for g in grads if not is_sharded(g)]
        sq = float(torch.nn.utils.get_total_norm(sharded).full_tensor()) ** 2
        if plain:
            sq += float(_total_norm(plain)) ** 2
        total = math.sqrt(sq)
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for group in (sharded, plain):
                if group:
                    torch._foreach_mul_(group, coef)
        return total
    total = _total_norm(grads)
    coef = max_norm / (total + 1e-6)
    if math.isfinite(max_norm) and float(coef) < 1.0:
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return float(total)
