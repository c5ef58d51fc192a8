"""The critic trains on the generator phase's own samples (`method.reuse_generator_samples`, DMD and DMD2).

DMD2's reference code generates once per iteration: the generator turn backpropagates through those images, and
the guidance turn then fits the fake score (and the GAN classifier) to the same images, detached. By default
stepdistill's critic phase draws fresh samples instead, one more generator pass (a whole backward simulation for
a multi-step student) per critic update. With the switch on, a generator phase keeps its detached samples and the
next critic phase trains on them, as the reference does; critic phases with no kept samples (the warm-up, the
extra updates of `critic_steps` > 1) draw fresh ones. The kept samples come from the generator before its update.

The kept samples are part of the training state: a checkpoint taken between a generator phase and the critic
phase after it holds them (the whole global batch, gathered from every process), so a resumed run is exact.
"""
from __future__ import annotations

import torch

from .. import batch_split


def _map(fn, obj):
    """`fn` on every tensor in a condition (None, a tensor, or a dict / list of them, e.g. prompt embeddings)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, v) for v in obj)
    return obj


def _cat(parts: list):
    """Concatenate along rows, field by field, conditions with the same structure (the inverse of splitting)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat(list(col)) for col in zip(*parts))
    return first


class KeptSamples:
    """Under gradient accumulation a generator phase keeps one entry per micro-batch, and the critic phase's
    micro-batch i takes entry i: the samples of the same rows of the global batch."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.kept: list = []        # (samples, cond, exit steps) per micro-batch, this process's rows
        self.resumed: tuple | None = None   # the global batch from a checkpoint, split as the micro-batches ask

    def keep(self, x: torch.Tensor, cond, steps: torch.Tensor | None) -> None:
        """A generator phase's samples, detached, for the next critic phase (when the switch is on)."""
        if not self.enabled:
            return
        index, _ = batch_split.micro()
        if index == 0:   # a new generator phase replaces what an earlier one kept
            self.kept, self.resumed = [], None
        self.kept.append((x.detach(), _map(torch.Tensor.detach, cond), steps))

    def take(self, generator, batch: dict):
        """(samples, cond, exit steps) for a critic phase: the kept ones, once, else fresh ones without gradient
        from the batch's noise and condition."""
        if self.resumed is not None:   # this micro-batch's rows of this process
            part = tuple(_map(batch_split.local_rows, t) for t in self.resumed)
            index, count = batch_split.micro()
            if index == count - 1:
                self.resumed = None
            return part
        if self.kept:
            return self.kept.pop(0)
        with torch.no_grad():
            x, steps = generator(batch["noise"], batch["cond"], return_steps=True)
        return x, batch["cond"], steps

    def state_dict(self) -> dict:
        """Collective under several processes (each holds its rows): every process must call it. The checkpoint
        holds the whole global batch in its row order (micro-batch by micro-batch, each in rank order), so it
        does not depend on how the batch was split."""
        if not self.enabled:
            return {}
        if self.resumed is not None:   # saved again before the critic phase ran: already the global batch
            x, cond, steps = (_map(torch.Tensor.cpu, t) for t in self.resumed)
            return {"kept": {"x": x, "cond": cond, "steps": steps}}
        if not self.kept:   # every process kept samples at the same step, or none did
            return {"kept": None}
        gathered = [[_map(lambda t: batch_split.gather_rows(t).cpu(), part) for part in entry] for entry in self.kept]
        x, cond, steps = (_cat(list(field)) for field in zip(*gathered))
        return {"kept": {"x": x, "cond": cond, "steps": steps}}

    def load_state_dict(self, state: dict, device) -> None:
        kept = state.get("kept") if self.enabled else None
        self.kept = []
        self.resumed = None if kept is None else tuple(_map(lambda t: t.to(device), kept[k])
                                                       for k in ("x", "cond", "steps"))
