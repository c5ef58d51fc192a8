"""rCM: score-regularised continuous-time consistency distillation (Zheng et al. 2025, "Large Scale Diffusion
Distillation via Score-Regularized Continuous-Time Consistency", arXiv 2510.08431).

sCM's consistency loss is a forward divergence: it covers every mode but blurs. rCM adds DMD's reverse divergence
on the student's own few-step samples as a "long-skip" regulariser, with a fake score trained on those samples:
    generator:  L = L_sCM(x_t from data)  +  dmd_weight * L_DMD(G(z))          (after the tangent warm-up)
    critic:     the fake score's denoising loss on detached G(z)               (critic_steps per generator step)
Schedule, as in the reference code: during sCM's tangent warm-up (`warmup_steps`) the student trains on L_sCM
alone and the fake score waits; then `critic_warmup_steps` critic-only steps (for a fake score trained from
scratch; 0 when it starts from the teacher, as in rCM) and the two-time-scale cycle.

Weights: rCM sums both losses over the elements, sCM's scaled by 100 and DMD's by 1, with no learned weighting
(`method.weighting=uniform`: sCM's adaptive e^-w scaling would rescale the sCM term against the DMD term). sCM here is the mean over
the elements and DMD is 0.5 mean|x - sg(x - grad)|^2, so the same balance is `dmd_weight` = 2 / 100 = 0.02.
Our adaptations, each a switch elsewhere in the framework: the student's DMD samples come from the few-step
generator's backward simulation at its own timesteps (rCM draws 0-3 intermediate times at random), the DMD noise
levels are DMD's uniform [t_min, t_max] of the teacher's range, and the fake score is trained with the teacher's
own denoising loss.
"""
from __future__ import annotations

from .. import batch_split
from .base import LossOut, Method
from .distribution_matching import check_normalizer, dmd_loss, fake_score_phase
from .scm import SCM


class RCM(SCM):
    name = "rcm"
    batch_keys = ("noise", "cond", "real", "real_cond")
    uses_fake_score = True
    critic_roles = ("fake_score",)
    batch_statistic = Method.batch_statistic   # its DM term reads method.normalizer (sCM's loss has none)

    def __init__(self, models, cfg):
        super().__init__(models, cfg)   # sCM's roles and phases, with the critic's
        self.dmd_weight = float(cfg.dmd_weight)
        if self.dmd_weight < 0:
            raise ValueError(f"method.dmd_weight must be >= 0, got {cfg.dmd_weight}")
        self.normalizer = check_normalizer(cfg.get("normalizer", "sample"))

    def dmd_active(self, step: int) -> bool:
        return step >= int(self.cfg.warmup_steps)

    def phase(self, step: int) -> str:
        warm = int(self.cfg.warmup_steps)
        if step < warm:
            return "generator"   # sCM alone through the tangent warm-up
        return super(SCM, self).phase(step - warm)   # then Method's critic warm-up and two-time-scale cycle

    def generator_loss(self, batch, step):
        out = super().generator_loss(batch, step)
        if not self.dmd_active(step) or self.dmd_weight == 0:
            return out
        m, c = self.models, self.cfg
        # the student's own samples from fresh noise (the sCM term used the batch's noise on real data)
        x = m["generator"](batch_split.randn_like(batch["noise"]), batch["cond"])
        loss_dm, logs = dmd_loss(x, m["teacher"], m["fake_score"], batch["cond"], float(c.guidance),
                                 float(c.fake_guidance), (float(c.t_min), float(c.t_max)), self.normalizer)
        return LossOut(out.loss + self.dmd_weight * loss_dm, {**out.logs, **logs, "loss_dm": loss_dm.item()})

    def critic_loss(self, batch, step):
        return fake_score_phase(self.models, batch, self.kept_samples)
