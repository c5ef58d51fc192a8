"""SiD: Score identity Distillation (Zhou et al., ICML 2024, arXiv 2404.04057), one-step.

For a generated sample x_g = G(z), noise level t and x_t = a x_g + s eps, with f_real / f_fake the teacher's and
the fake score's x0-predictions at x_t, the generator minimises (per sample, elements averaged)
    L = w · mean( (f_real - f_fake) ∘ ((f_real - x_g) - α (f_real - f_fake)) ),   α = 1.2,
    w = 1 / mean|x_g - f_real|   (per sample, no gradient through it).
Unlike DMD's surrogate, the gradient flows through x_t into the teacher's and the critic's *inputs* (their
parameters stay frozen in this phase): that is SiD's score-identity estimator. Noise levels: t uniform over
[t_min, t_max] of the schedule's range (SiD: [0, 0.8]); the generator starts from its own timesteps (set
generator.timesteps to SiD's t_init, e.g. [625] for SD-style VP teachers). The critic is trained as in DMD, with
the teacher's denoising loss on detached samples, alternating 1:1 by default.
"""
from __future__ import annotations

import torch

from .base import LossOut, Method
from .distribution_matching import check_normalizer, fake_score_phase


def sid_loss(x: torch.Tensor, teacher, fake, cond=None, guidance: float = 1.0, fake_guidance: float = 1.0,
             alpha: float = 1.2, t_range=(0.0, 0.8), t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, normalizer: str = "sample") -> tuple[torch.Tensor, dict]:
    """SiD's generator loss on samples `x` (requiring grad); `t` and `noise` may be given (tests).
    `normalizer="batch"` takes the weight's mean|x_g - f_real| over the whole batch (one scalar), as
    `method.normalizer` does for DMD on low-dimensional data."""
    sched = teacher.schedule
    if t is None:
        t = sched.sample_t(x.shape[0], *t_range, device=x.device)
    noise = torch.randn_like(x) if noise is None else noise
    x_t = sched.add_noise(x, noise, t)              # no detach: the gradient reaches x through both networks
    dt = torch.promote_types(x.dtype, torch.float32)   # at least fp32; float64 stays float64
    f_real = teacher.x0(x_t, t, cond, guidance).to(dt)
    f_fake = fake.x0(x_t, t, cond, fake_guidance).to(dt)
    xf = x.to(dt)
    dims = tuple(range(1, x.ndim))
    weight_dims = dims if check_normalizer(normalizer) == "sample" else tuple(range(x.ndim))
    with torch.no_grad():
        weight = torch.nan_to_num(1.0 / (xf - f_real).abs().mean(dim=weight_dims, keepdim=True))
    diff = f_real - f_fake
    per_sample = (weight * diff * ((f_real - xf) - alpha * diff)).mean(dim=dims)
    return per_sample.mean(), {"score_gap": diff.flatten(1).norm(dim=1).mean().item()}


class SiD(Method):
    name = "sid"
    roles = ("teacher", "fake_score", "generator")
    phases = {"generator": ("generator",), "critic": ("fake_score",)}

    def __init__(self, models, cfg):
        super().__init__(models, cfg)
        self.normalizer = check_normalizer(cfg.get("normalizer", "sample"))
        if not float(cfg.t_min) >= 0 or not float(cfg.t_max) <= 1 or float(cfg.t_min) >= float(cfg.t_max):
            raise ValueError(f"method.t_min={cfg.t_min}, t_max={cfg.t_max}: need 0 <= t_min < t_max <= 1 "
                             "(fractions of the noise range)")

    def generator_loss(self, batch, step):
        m, c = self.models, self.cfg
        x = m["generator"](batch["noise"], batch["cond"])
        loss, logs = sid_loss(x, m["teacher"], m["fake_score"], batch["cond"], float(c.guidance),
                              float(c.fake_guidance), float(c.alpha), (float(c.t_min), float(c.t_max)),
                              normalizer=self.normalizer)
        logs["loss_sid"] = loss.item()
        return LossOut(loss, logs)

    def critic_loss(self, batch, step):
        return fake_score_phase(self.models, batch)


class SiDFewStep(SiD):
    name = "sid_fewstep"
