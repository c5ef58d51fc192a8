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


class KeptSamples:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.kept: tuple | None = None   # (samples, cond, exit steps), this process's rows

    def keep(self, x: torch.Tensor, cond, steps: torch.Tensor | None) -> None:
        """A generator phase's samples, detached, for the next critic phase (when the switch is on)."""
        if self.enabled:
            self.kept = (x.detach(), _map(torch.Tensor.detach, cond), steps)

    def take(self, generator, batch: dict):
        """(samples, cond, exit steps) for a critic phase: the kept ones, once, else fresh ones without gradient
        from the batch's noise and condition."""
        if self.kept is not None:
            kept, self.kept = self.kept, None
            return kept
        with torch.no_grad():
            x, steps = generator(batch["noise"], batch["cond"], return_steps=True)
        return x, batch["cond"], steps

    def state_dict(self) -> dict:
        """Collective under several processes (each holds its rows): every process must call it."""
        if not self.enabled:
            return {}
        if self.kept is None:   # every process kept samples at the same step, or none did
            return {"kept": None}
        x, cond, steps = (_map(lambda t: batch_split.gather_rows(t).cpu(), part) for part in self.kept)
        return {"kept": {"x": x, "cond": cond, "steps": steps}}

    def load_state_dict(self, state: dict, device) -> None:
        kept = state.get("kept") if self.enabled else None
        if kept is None:
            self.kept = None
            return
        self.kept = tuple(_map(lambda t: batch_split.local_rows(t).to(device), kept[k]) for k in ("x", "cond", "steps"))
