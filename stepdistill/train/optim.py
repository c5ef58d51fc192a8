"""Optimizer pieces of the trainer: AdamW, the learning-rate schedule and gradient clipping."""
from __future__ import annotations

import math

import torch

from .distributed import is_sharded


def lr_lambda(warmup: int, total: int, kind: str, drop_at: int | None = None, drop_factor: float = 1.0):
    """The lr multiplier at a phase's update `step`: linear warm-up, then constant or a cosine to 0 over the
    `total - warmup` updates after it (the usual cosine-with-warm-up: it starts at the full rate where the warm-up
    ends), times `drop_factor` from update `drop_at` on (DMD2's second stage runs at a quarter of the lr)."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown optim.schedule {kind!r}: use constant or cosine")

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if drop_at is not None and step >= drop_at:
            w *= drop_factor
        if kind == "cosine":
            done = max(step - warmup, 0) / max(total - warmup, 1)
            return w * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
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


class OptimisticAdamW(torch.optim.AdamW):
    """AdamW with optimism (Daskalakis et al. 2018, "Training GANs with Optimism", Optimistic Adam): with Δ_t the
    AdamW step of update t (learning rate, moments and weight decay included), the parameters move by
    θ ← θ − (1 + η)·Δ_t + η·Δ_{t−1}. η = 1 is Optimistic Adam; η = 0 is AdamW.

    Why: the generator and the critic play a game, and simultaneous gradient play on a game rotates around its
    equilibrium instead of descending to it. The correction −η(Δ_t − Δ_{t−1}) follows the change of the
    opponent's response, which damps that rotation. Summed over a run the corrections telescope
    (Σ = −η·Δ_last), so unlike lookahead's averaging it does not slow progress. The previous step is optimizer
    state (`optimism_prev`, one tensor per parameter), so it is checkpointed and resume stays exact."""

    def __init__(self, params, optimism: float, **kw):
        super().__init__(params, **kw)
        self.optimism = float(optimism)

    @torch.no_grad()
    def step(self, closure=None):
        # per group: the _foreach ops take a list of DTensors (trainer=fsdp's sharded roles) or of tensors, not both
        groups = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        deltas = [[p.clone() for p in params] for params in groups]   # θ_before ...
        loss = super().step(closure)
        for params, delta in zip(groups, deltas):
            if not params:
                continue
            torch._foreach_sub_(delta, params)           # ... minus θ_after: Δ_t, in place
            torch._foreach_add_(params, delta, alpha=-self.optimism)
            with_prev = [(p, self.state[p]["optimism_prev"]) for p in params if "optimism_prev" in self.state[p]]
            if with_prev:
                torch._foreach_add_([p for p, _ in with_prev], [d for _, d in with_prev], alpha=self.optimism)
            for p, d in zip(params, delta):
                self.state[p]["optimism_prev"] = d
        return loss


def make_adamw(params, optimism: float = 0.0, **kw) -> torch.optim.AdamW:
    """AdamW, or `OptimisticAdamW` for `optimism` > 0 (`optim.<role>.optimism`)."""
    if not optimism >= 0:
        raise ValueError(f"optim.<role>.optimism must be >= 0 (0 = AdamW, 1 = Optimistic Adam); got {optimism}")
    cls, extra = (OptimisticAdamW, {"optimism": optimism}) if optimism > 0 else (torch.optim.AdamW, {})
    params = list(params)
    sharded = [p for p in params if is_sharded(p)]
    if sharded and len(sharded) < len(params):
        # trainer=fsdp shards the networks, not a phase's small extra roles (sCM's weighting, the step embedding):
        # one group each, since the fused kernel takes DTensors or tensors, not a mix of both
        params = [{"params": sharded}, {"params": [p for p in params if not is_sharded(p)]}]
    # the fused kernel (CPU and CUDA) updates every tensor in one call; the default per-tensor Python loop
    # was ~5% of a digits iteration on CPU. Fall back where a dtype/device has no fused kernel.
    try:
        return cls(params, fused=True, **extra, **kw)
    except (RuntimeError, ValueError):
        return cls(params, **extra, **kw)


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
