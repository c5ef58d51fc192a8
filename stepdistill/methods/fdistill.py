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
`log_ratio_clip` = [lo, hi] and the weights are normalised twice, as in the reference code (NVIDIA FastGen's
`ratio_normalization`, on by default there):
    1. r_i = exp(clip(logit_i, lo, hi)) / (the mean r of the batch's samples in t_i's noise-level bin)
       (`ratio_bins` equal bins of the range's fraction; their means kept with `ratio_ema`, 0 = this batch's,
       moved once per trainer step by all its rows, whatever the micro-batches and `dm_draws`):
       the discriminator is surer at some noise levels than at others, and without it the weights would
       reweight noise levels rather than samples;
    2. w_i = h(r_i) / mean_j h(r_j)
so rkl gives w = 1 exactly, i.e. DMD2 bit for bit. `ratio_bins=0` skips the first. The DM loss draws t in [t_min, t_max] and the discriminator is
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


def f_weights(log_ratio: torch.Tensor, divergence: str, clip=(-3.0, 3.0), binned=None) -> torch.Tensor:
    """Per-sample weights h(r) / mean h(r), r = exp(clip(log_ratio)), computed in at least fp32. `binned`:
    (each sample's bin index, the bins' mean ratios): r is divided by its bin's mean first."""
    lo, hi = clip
    l = log_ratio.detach().to(torch.promote_types(log_ratio.dtype, torch.float32)).clamp(lo, hi)
    if binned is not None:   # log(r / bin mean), so h stays written in the log-ratio
        index, means = binned
        l = l - means.to(l.dtype)[index].log()
    h = DIVERGENCES[check_divergence(divergence)](l)
    return h / batch_split.batch_mean(h)  # over the global batch, if split over processes


def bin_sums(ratio: torch.Tensor, index: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the ratios, count) per noise-level bin, float64, over the global batch's rows (every process
    gathers them, so all hold the same sums)."""
    ratio, index = batch_split.gather_rows(ratio.detach()), batch_split.gather_rows(index)
    count = torch.bincount(index, minlength=bins).to(torch.float64)
    return torch.bincount(index, weights=ratio.to(torch.float64), minlength=bins), count


def update_bin_means(means: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor], ema: float) -> torch.Tensor:
    """The mean ratio per bin: ema · old + (1 - ema) · the mean of these rows, for the bins they have samples in
    (the others keep theirs). Returns a new tensor."""
    total, count = sums
    seen = (count > 0) & torch.isfinite(total)   # a non-finite ratio (its step is skipped) must not stick in a bin
    means = means.clone()
    means[seen] = ema * means[seen] + (1 - ema) * total[seen] / count[seen]
    return means


class FDistill(DMD2):
    name = "fdistill"

    def __init__(self, models, cfg):
        gan = cfg.get("gan")
        if gan is None or not bool(gan.get("enabled", False)):
            raise ValueError("method=fdistill estimates the density ratio with the GAN discriminator: "
                             "set method.gan.enabled=true")
        if not float(gan.get("critic_weight", 1.0)) > 0:   # 0 switches the term off: the head would never train
            raise ValueError(f"method.gan.critic_weight={gan.critic_weight}: method=fdistill reads the density ratio "
                             "off the discriminator, which this weight trains; set it > 0 (1e-2 by default)")
        self.divergence = check_divergence(str(cfg.get("divergence", "js")))
        lo, hi = (float(v) for v in cfg.get("log_ratio_clip", (-3.0, 3.0)))
        if not lo < hi:
            raise ValueError(f"method.log_ratio_clip must be [lo, hi] with lo < hi, got {[lo, hi]}")
        self.clip = (lo, hi)
        bins, self.ratio_ema = int(cfg.get("ratio_bins", 10)), float(cfg.get("ratio_ema", 0.0))
        if bins < 0 or not 0.0 <= self.ratio_ema < 1.0:
            raise ValueError(f"method.ratio_bins must be >= 0 (0 = no per-noise-level normalisation) and "
                             f"method.ratio_ema in [0, 1), got {cfg.get('ratio_bins')} and {cfg.get('ratio_ema')}")
        self.bin_means = torch.ones(bins, dtype=torch.float64) if bins else None
        # the sums of this trainer step's rows, folded into bin_means once per step (at the next step, or when
        # the state is saved): under gradient accumulation and with dm_draws > 1 the weight function runs several
        # times per step, and ratio_ema is a decay per step, not per call
        self._pending: tuple | None = None
        self._pending_step: int | None = None
        if not (gan.t_min <= cfg.t_min and cfg.t_max <= gan.t_max):
            warnings.warn(f"fdistill: the DM loss draws t in [{cfg.t_min}, {cfg.t_max}] but the discriminator is "
                          f"trained on [{gan.t_min}, {gan.t_max}]; outside it the density ratio is extrapolated")
        super().__init__(models, cfg)
        if self.gan_start != 0:
            raise ValueError("method=fdistill weights the DM gradient by the discriminator's density ratio from the "
                             "first step: method.gan.start_step must be 0")

    def batch_statistic(self) -> str | None:
        return "f-distill's weight normaliser"   # mean h over the batch, whatever the DM normaliser

    def dm_weight_fn(self, batch, logs: dict, steps=None, *, step: int):
        def weight_fn(x_t, t):   # no grad (inside dmd_loss), no random draws
            with self._gan_sees_steps(steps):   # with gan.step_aware: each exit step's own density ratio
                logit = self.gan.logits_noised(x_t, t, batch["cond"]).float()
            binned = None
            if self.bin_means is not None:
                bins = self.bin_means.numel()
                index = (self.schedule.fraction_of(t) * bins).floor().long().clamp(0, bins - 1)
                if self.bin_means.device != index.device:   # kept on the networks' device (a checkpoint: CPU)
                    self.bin_means = self.bin_means.to(index.device)
                sums = bin_sums(logit.clamp(*self.clip).double().exp(), index, bins)
                self._add_to_step(sums, step)
                # these rows' weights: the kept means moved by these rows (a batch statistic, like mean h below)
                binned = (index, update_bin_means(self.bin_means, sums, self.ratio_ema))
            w = f_weights(logit, self.divergence, self.clip, binned)
            logs.update(fd_log_ratio=logit.mean().item(), fd_weight_max=w.max().item(),
                        fd_clipped=((logit < self.clip[0]) | (logit > self.clip[1])).float().mean().item())
            return w
        return weight_fn

    def _add_to_step(self, sums: tuple, step: int) -> None:
        if step != self._pending_step:   # a new step: the last one's rows go into the kept means first
            self._fold_pending()
            self._pending_step = step
        self._pending = sums if self._pending is None else tuple(a + b for a, b in zip(self._pending, sums))

    def _fold_pending(self) -> None:
        if self._pending is not None:
            self.bin_means = update_bin_means(self.bin_means, self._pending, self.ratio_ema)
            self._pending = None

    def discard_step(self, step: int) -> None:
        if step == self._pending_step:   # a skipped update's ratios do not enter the kept means
            self._pending = None

    @property
    def schedule(self):
        return self.models["teacher"].schedule

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.bin_means is not None:   # carried between steps where ratio_ema > 0
            self._fold_pending()   # the same means the next step would fold them into
            state["ratio_bin_means"] = self.bin_means.cpu().clone()
        return state

    def load_state_dict(self, state: dict, device) -> None:
        super().load_state_dict(state, device)
        if self.bin_means is not None and "ratio_bin_means" in state:
            saved = state["ratio_bin_means"].numel()
            if saved != self.bin_means.numel():
                raise ValueError(f"method.ratio_bins={self.bin_means.numel()}, but the checkpoint kept the means of "
                                 f"{saved} noise-level bins: resume with method.ratio_bins={saved}")
            self.bin_means.copy_(state["ratio_bin_means"])
            self._pending = None


__all__ = ["DIVERGENCES", "FDistill", "bin_sums", "check_divergence", "f_weights", "update_bin_means"]
