"""Data parallelism without wrapping modules: every process holds all roles, draws its share of the global
batch, and gradients are averaged across processes before each update (one all-reduce of a flat buffer).

Wrapping roles in DDP would not fit the trainer: roles are called in different phases, the GAN cuts the
critic's forward short on purpose, and the teacher is shared. With identical initial weights (every rank seeds
the same before building roles) and identical averaged gradients, the ranks' weights stay identical.
`accelerate launch --num_processes N [--cpu] -m stepdistill.train ...` starts it (gloo on CPU, NCCL on GPUs).
"""
from __future__ import annotations

import functools
import gc

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each parameter's gradient over the processes (a gradient missing on some processes counts as zero
    there). A parameter with no gradient on any process keeps none: AdamW skips it, as it does on one process (a
    zero gradient would still move it by weight decay and momentum). Sharded parameters (trainer=fsdp) are skipped:
    FSDP's reduce-scatter has averaged them already."""
    params = [p for p in params if not is_sharded(p)]
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # one buffer: the gradients, then one "has a gradient" flag per parameter (summed: > 0 where any process had one)
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), has])
    dist.all_reduce(flat)
    flat[:-len(params)] /= dist.get_world_size()
    anywhere = flat[-len(params):].tolist()
    offset = 0
    for p, g, had in zip(params, grads, anywhere):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype) if had > 0 else None
        offset += n


def _combine_flags(flag: bool, device, op) -> bool:
    if not is_distributed():
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=op)
    return bool(t.item() > 0)


def all_finite(flag: bool, device) -> bool:
    """True only if every process saw a finite loss (all skip the update together otherwise)."""
    return _combine_flags(flag, device, dist.ReduceOp.MIN)


def any_process(flag: bool, device) -> bool:
    """True if any process's flag is set (a stop request that reached some processes only)."""
    return _combine_flags(flag, device, dist.ReduceOp.MAX)


def leave_together() -> None:
    """Every process frees the run's networks, waits for the others, then leaves the process group; at the end
    of every run. A process that exits with its process group still up can abort on the way out (gloo's threads:
    "terminate called without an active exception", seen in two-process tests), and the launcher kills the
    remaining processes as soon as one exits with a failure status (an abort, or a stop signal's status).

    The collection comes first because FSDP's hooks tie every sharded network into reference cycles that outlive
    `train()` (measured: ~80 modules and ~4000 objects per process at this point), and they hold the process group
    and its gloo work. Left to the interpreter's shutdown, they are torn down after the group is destroyed, in
    whatever order finalisation takes, which is where gloo's worker threads can abort the process."""
    if is_distributed():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def mean_over_processes(values: dict[str, float], device) -> dict[str, float]:
    """The global-batch value of per-process logs (equal shard sizes): what a single process would log. Means
    average; a log named `*_max` is a maximum over samples, so its maximum over processes is taken."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    is_max = torch.tensor([k.endswith("_max") for k in keys], device=device)
    highest = t.clone()
    dist.all_reduce(t)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    t = torch.where(is_max, highest, t / dist.get_world_size())
    return dict(zip(keys, t.tolist()))


def weight_spread(params: list[torch.nn.Parameter]) -> float:
    """max over elements of (max - min across processes): 0 when the ranks hold identical weights. Sharded
    parameters have one copy, so only replicated ones are compared."""
    params = [p for p in params if not is_sharded(p)]
    if not is_distributed() or not params:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def is_sharded(t: torch.Tensor) -> bool:
    """A parameter or gradient sharded by FSDP (trainer=fsdp): a DTensor."""
    return isinstance(t, _dtensor_type())


@functools.cache
def _dtensor_type() -> type:
    # imported on first use (not with this module) and looked up once: is_sharded runs per parameter per update
    from torch.distributed.tensor import DTensor
    return DTensor
