"""f-distill: one-step diffusion models with f-divergence distribution matching (Xu et al. 2025, arXiv 2502.15681).

DMD2 with the distribution-matching gradient of an f-divergence D_f(p || q) instead of reverse KL. For a noised
generated sample x_t (teacher p_t, student q_t, density ratio r = p_t(x_t) / q_t(x_t)) the gradient of D_f is DMD's
score difference weighted per sample by
    h(r) = r^2 f''(r)                                                        (f-distill, Eq. 8 / Table 1)
    rkl (reverse KL, = DMD):  h = 1          kl (forward KL):  h = r          js (Jensen-Shannon):  h = r / (1 + r)
    sh (squared Hellinger):   h = sqrt(r)    jf (Jeffreys):    h = 1 + r      (constant factors dropped)
so kl/js/sh/jf weight samples where the teacher is denser than the student (r > 1) more: mode-covering.
The ratio comes from DMD2's GAN discriminator (which is trained here exactly as in DMD2): at the optimum of the
non-saturating BCE loss its logit is log(p_t / q_t) with p_t the noised distribution of the discriminator's *real*
samples (the benchmark's data: the exact mixture on the gmm, the real digits, which stand in for the teacher's
distribution as in the paper), so r = exp(logit), read at the *same* x_t and t at which the scores are evaluated
(`DiffusionGAN.logits_noised`). Without gradient, the logit is clipped to
`log_ratio_clip` = [lo, hi] and the weights are normalised by their batch mean:
    w_i = h(exp(clip(logit_i, lo, hi))) / mean_j h(exp(clip(logit_j, lo, hi)))
so rkl gives w = 1 exactly, i.e. DMD2 bit for bit. The DM loss draws t in [t_min, t_max] and the discriminator is
trained on t in [gan.t_min, gan.t_max]: the ratio is only an estimate where the two overlap (a warning says when
[t_min, t_max] is not inside the discriminator's range; the defaults, [0.02, 0.98] in [0, 1], are).
Everything else — TTUR, normaliser, guidance / fake_guidance, the GAN terms of both losses, step_aware_critic — is
DMD2's (subclassed); the GAN is required (`gan.enabled=true`).
"""
from __future__ import annotations

import warnings

import torch

from .. import batch_split
from .dmd2 import DMD2

# h(r) = r^2 f''(r), written in the log-ratio l = log r (stable for large |l|)
DIVERGENCES = {
    "rkl": lambda l: torch.ones_like(l),     # f = -log r
    "kl": lambda l: l.exp(),                  # f = r log r
    "js": lambda l: torch.sigmoid(l),         # f = r log r - (1 + r) log((1 + r) / 2): h = r / (1 + r)
    "sh": lambda l: (0.5 * l).exp(),          # f = (sqrt(r) - 1)^2: h = sqrt(r) / 2
    "jf": lambda l: 1 + l.exp(),              # f = (r - 1) log r
}


def check_divergence(name: str) -> str:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown method.divergence {name!r}: use one of {', '.join(DIVERGENCES)}")
    return name


def f_weights(log_ratio: torch.Tensor, divergence: str, clip=(-3.0, 3.0)) -> torch.Tensor:
    """Per-sample weights h(r) / mean h(r), r = exp(clip(log_ratio)), computed in at least fp32."""
    lo, hi = clip
    l = log_ratio.detach().to(torch.promote_types(log_ratio.dtype, torch.float32)).clamp(lo, hi)
    h = DIVERGENCES[check_divergence(divergence)](l)
    return h / batch_split.batch_mean(h)  # over the global batch, if split over processes


class FDistill(DMD2):
    name = "fdistill"

    def __init__(self, models, cfg):
        gan = cfg.get("gan")
        if gan is None or not bool(gan.get("enabled", False)):
            raise ValueError("method=fdistill estimates the density ratio with the GAN discriminator: "
                             "set method.gan.enabled=true")
        self.divergence = check_divergence(str(cfg.get("divergence", "js")))
        lo, hi = (float(v) for v in cfg.get("log_ratio_clip", (-3.0, 3.0)))
        if not lo < hi:
            raise ValueError(f"method.log_ratio_clip must be [lo, hi] with lo < hi, got {[lo, hi]}")
        self.clip = (lo, hi)
        if not (gan.t_min <= cfg.t_min and cfg.t_max <= gan.t_max):
            warnings.warn(f"fdistill: the DM loss draws t in [{cfg.t_min}, {cfg.t_max}] but the discriminator is "
                          f"trained on [{gan.t_min}, {gan.t_max}]; outside it the density ratio is extrapolated")
        super().__init__(models, cfg)
        if self.gan_start != 0:
            raise ValueError("method=fdistill weights the DM gradient by the discriminator's density ratio from the "
                             "first step: method.gan.start_step must be 0")

    def dm_weight_fn(self, batch, logs: dict, steps=None):
        def weight_fn(x_t, t):   # no grad (inside dmd_loss), no random draws
            with self._gan_sees_steps(steps):   # with gan.step_aware: each exit step's own density ratio
                logit = self.gan.logits_noised(x_t, t, batch["cond"]).float()
            w = f_weights(logit, self.divergence, self.clip)
            logs.update(fd_log_ratio=logit.mean().item(), fd_weight_max=w.max().item(),
                        fd_clipped=((logit < self.clip[0]) | (logit > self.clip[1])).float().mean().item())
            return w
        return weight_fn


__all__ = ["DIVERGENCES", "FDistill", "check_divergence", "f_weights"]
