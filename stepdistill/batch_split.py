"""How the global batch is split over processes, so that a run on W processes computes what one process does.

Every process keeps the same RNG state. Each per-sample random tensor (noise, timesteps, labels, data indices) is
drawn for the whole global batch of W·n rows on every process, and process r keeps rows [r·n, (r+1)·n). Process
r therefore sees exactly the rows a single process drawing the global batch gets, the RNG states stay equal
across processes, and a checkpoint's one RNG state resumes every process.

Batch-wide statistics inside a loss (DMD's batch normaliser, f-distill's weight normaliser) are taken over the
global batch with `batch_mean`. Per-process losses are means over equal shards, so their average is the global
mean, and the averaged gradients are the single-process gradients up to float summation order.

Gradient accumulation (`trainer.grad_accum_steps` = K) splits each process's rows again, into K micro-batches run
one after another. Micro-batch i on process r is shard i·W + r of W·K: each draw is made for the whole global
batch and the shard keeps its rows. The trainer replays the step's RNG state before every micro-batch, so each one
makes the same draws and K micro-batches on W processes compute what one process does with the whole batch.
Batch-wide statistics are then over the micro-batch on every process (the rows that exist at that moment), not
over the whole global batch.

With one process and one micro-batch every function here is the plain torch draw (the same numbers as before
this module existed).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

_rank, _world = 0, 1
_micro, _micros = 0, 1   # set only while the trainer runs a step's micro-batches


def set_split(rank: int, world: int) -> None:
    """Set by the trainer: this process holds rows [rank·n, (rank+1)·n) of every global batch."""
    global _rank, _world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    _rank, _world = int(rank), int(world)


@contextmanager
def micro_batch(index: int, count: int):
    """Within the block, this process holds micro-batch `index` of `count` (gradient accumulation)."""
    global _micro, _micros
    if not 0 <= index < count:
        raise ValueError(f"micro-batch {index} is not in 0..{count - 1}")
    previous = _micro, _micros
    _micro, _micros = int(index), int(count)
    try:
        yield
    finally:
        _micro, _micros = previous


def micro() -> tuple[int, int]:
    """(index, count) of the micro-batch being computed; (0, 1) outside gradient accumulation."""
    return _micro, _micros


def _shards() -> int:
    return _world * _micros


def global_rows(n: int) -> int:
    """The global batch size for a local batch of n rows (one micro-batch on one process)."""
    return n * _shards()


def local_rows(t: torch.Tensor | None, n: int | None = None) -> torch.Tensor | None:
    """This process's rows of a tensor drawn for the global batch, for the current micro-batch (n: local rows;
    default len(t) / (W·K))."""
    shards = _shards()
    if t is None or shards == 1:
        return t
    n = t.shape[0] // shards if n is None else n
    shard = _micro * _world + _rank
    return t[shard * n:(shard + 1) * n]


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """torch.randn_like(x) for x's rows of the global batch."""
    if _shards() == 1:
        return torch.randn_like(x)
    full = torch.randn((global_rows(x.shape[0]), *x.shape[1:]), dtype=x.dtype, device=x.device)
    return local_rows(full, x.shape[0])


def randn(n: int, *shape: int, device=None, dtype=None) -> torch.Tensor:
    return local_rows(torch.randn(global_rows(n), *shape, device=device, dtype=dtype), n)


def rand(n: int, device=None, dtype=None) -> torch.Tensor:
    return local_rows(torch.rand(global_rows(n), device=device, dtype=dtype), n)


def randint(low: int, high: int, n: int, device=None) -> torch.Tensor:
    return local_rows(torch.randint(low, high, (global_rows(n),), device=device), n)


def batch_mean(t: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:
    """Mean over `dims` (default all) where dim 0 is the batch: over the global batch when several processes
    hold equal shards of it (over the current micro-batch of every process under gradient accumulation). Not
    differentiable across processes: for normalisers computed without gradient."""
    dims = tuple(range(t.ndim)) if dims is None else tuple(dims)
    m = t.mean(dim=dims, keepdim=keepdim)
    if _world == 1 or 0 not in dims or not (dist.is_available() and dist.is_initialized()):
        return m
    m = m.detach().clone()
    dist.all_reduce(m)
    return m / _world


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The global batch from every process's rows of it, in rank order (the inverse of `local_rows`; under
    gradient accumulation, the current micro-batch's rows of every process). Collective: every process must call
    it."""
    if _world == 1 or not (dist.is_available() and dist.is_initialized()):
        return t
    parts = [torch.empty_like(t) for _ in range(_world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
