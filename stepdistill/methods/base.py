"""The method interface (DESIGN §3): a method turns a batch into a loss for the phase the schedule asks for.

A method never touches optimizers, devices, precision, logging or checkpoints; the trainer never knows which
method it runs. ``phases`` maps each phase name to the roles its optimizer updates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import at_least, non_negative
from ..roles import Roles
from .kept_samples import KeptSamples


def check_t_range(cfg, key: str = "method") -> tuple[float, float]:
    """`{key}.t_min`, `t_max` as fractions of the noise range, with a clear error when they are not one."""
    lo, hi = float(cfg.t_min), float(cfg.t_max)
    if not (0 <= lo < hi <= 1):
        raise ValueError(f"{key}.t_min={cfg.t_min}, {key}.t_max={cfg.t_max}: need 0 <= t_min < t_max <= 1 "
                         "(fractions of the noise range)")
    return lo, hi


@dataclass
class LossOut:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Method:
    name: str = "base"
    roles: tuple[str, ...] = ("teacher", "fake_score", "generator")
    phases: dict[str, tuple[str, ...]] = {"generator": ("generator",), "critic": ("fake_score",)}
    batch_keys: tuple[str, ...] = ("noise", "cond")  # what the trainer's data source must provide
    uses_fake_score: bool = True   # False: the run builds no fake-score critic (known before the method is)
    reuses_generator_samples: bool = False  # True: its critic phase can train on the generator phase's samples
    trains_unconditional_fake: bool = False  # True: its critic learns the unconditional branch (SiD's LSG dropout)

    def __init__(self, models: Roles, cfg):
        missing = models.missing(self.roles)
        if missing:
            raise ValueError(f"method {self.name!r} needs the roles {missing}, which this run did not build")
        self.models = models
        self.cfg = cfg
        if "t_min" in cfg and "t_max" in cfg:
            check_t_range(cfg)
        gan = cfg.get("gan")
        if gan is not None and "t_min" in gan and "t_max" in gan:
            check_t_range(gan, "method.gan")
        if "critic" in self.phases:   # TTUR: a critic that never updates would leave its gradient meaningless
            at_least("method.critic_steps", cfg.get("critic_steps", 1))
            at_least("method.critic_warmup_steps", cfg.get("critic_warmup_steps", 0) or 0, 0)
        if "dm_draws" in cfg:
            at_least("method.dm_draws", cfg.dm_draws)
        for weight in ("generator_weight", "critic_weight"):   # 0 switches a GAN term off; < 0 would reverse it
            if gan is not None and weight in gan:
                non_negative(f"method.gan.{weight}", gan[weight])
        if float(cfg.get("fake_guidance", 1.0)) != 1.0 and not self.trains_unconditional_fake:
            # its critic trains on conditional rows only: CFG would mix in a null branch that never followed the
            # generator (the teacher's, where the critic starts from it)
            raise ValueError(f"method.fake_guidance={cfg.fake_guidance}: method {self.name!r} trains its fake score "
                             "on conditional rows only, so CFG on it mixes in an untrained unconditional branch; "
                             "keep 1.0 (method=sid trains both branches, method.fake_cond_dropout)")
        reuse = bool(cfg.get("reuse_generator_samples", False))
        if reuse and not self.reuses_generator_samples:
            raise ValueError(f"method.reuse_generator_samples: method {self.name!r} draws its critic's samples itself; "
                             "drop the switch (dmd, dmd2 and fdistill have it)")
        self.kept_samples = KeptSamples(reuse)

    @classmethod
    def check_benchmark(cls, cfg, benchmark) -> None:
        """Refuse a benchmark this method's settings (`cfg`, the method's config) cannot run, before any network is
        built; a ValueError naming what to change. Most methods run on every benchmark."""

    def batch_statistic(self) -> str | None:
        """What this loss takes over the whole batch (under gradient accumulation, over each micro-batch), named
        as a setting, or None: DMD's, SiD's and SIM's `method.normalizer=batch`."""
        return "method.normalizer=batch" if self.cfg.get("normalizer") == "batch" else None

    def phase(self, step: int) -> str:
        """Two-time-scale update rule (DMD2 §4.2): `critic_steps` critic updates per generator update,
        after `critic_warmup_steps` critic-only steps (used when the critic starts from scratch)."""
        warm = int(self.cfg.get("critic_warmup_steps", 0) or 0)
        if step < warm:
            return "critic"
        period = int(self.cfg.get("critic_steps", 1)) + 1
        return "generator" if (step - warm) % period == period - 1 else "critic"

    def discard_step(self, step: int) -> None:
        """The trainer skipped trainer step `step`'s update (a non-finite loss or gradient, an fp16 overflow): what
        the method gathered from it for later steps is dropped, as the weights were not moved (f-distill's ratio
        bins). Most methods gather nothing."""

    def state_dict(self) -> dict:
        """What the method carries from one step to the next (checkpointed with the trainer's state). Collective
        under several processes: every process calls it."""
        return {"kept_samples": self.kept_samples.state_dict()}

    def load_state_dict(self, state: dict, device) -> None:
        self.kept_samples.load_state_dict(state.get("kept_samples", {}), device)

    def loss(self, phase: str, batch: dict, step: int) -> LossOut:
        return self.generator_loss(batch, step) if phase == "generator" else self.critic_loss(batch, step)

    def generator_loss(self, batch: dict, step: int) -> LossOut:
        raise NotImplementedError

    def critic_loss(self, batch: dict, step: int) -> LossOut | None:
        return None
