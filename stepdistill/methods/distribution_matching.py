"""Pieces shared by the distribution-matching family (DMD, DMD2, and later f-distill / Phased DMD).

``dmd_loss``: the distribution-matching gradient of Yin et al. (2023), Eq. 7-8, applied through a stop-gradient
surrogate. For a generated sample x, noise level t and x_t = a x + s eps:
    grad = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|      (per-sample normaliser, DMD §3.2)
    loss = 0.5 * mean((x - sg(x - grad))^2)    so    d loss / d x = grad / numel(x).
Since x0 = (x_t + s^2 score) / a, grad is proportional to s_fake - s_real: the KL gradient of DMD Eq. 7.
``normalizer="batch"`` divides by the batch mean of |x - x0_real| instead: one scalar, so the per-sample weights are
the raw x0 differences (= sigma^2/alpha times the score difference). The per-sample L1 mean is a stable function of
the noise level when it runs over C x H x W elements; with the 2 elements of a 2-D benchmark it is a noisy
per-sample quantity that hands samples already on a mode gradients as large as those between modes.
``weight_fn`` (optional, default None = the plain DMD gradient): a per-sample weight w(x_t, t) of shape (N,),
computed without gradient at the very x_t and t the scores are evaluated at, multiplies each sample's gradient
(f-distill's h(r) / mean h, methods/fdistill.py). It must draw no random numbers, so the draws of t and noise are
those of the unweighted loss.
``draws`` > 1 averages the gradient over several independent (t, noise) draws for the same generated sample:
less variance per generator update, for the price of that many teacher and critic evaluations. One draw per
sample is the papers' choice; images average over their many pixels, a 2-D sample over only two.
``fake_score_loss``: the critic tracks the generator's distribution with the teacher's own denoising loss on
detached generator samples over the full noise range (DMD §3.2, Eq. 6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import batch_split
from ..denoiser import Denoiser, NetworkDenoiser
from .base import LossOut


NORMALIZERS = ("sample", "batch")


def check_normalizer(normalizer: str) -> str:
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown method.normalizer {normalizer!r}: use one of {', '.join(NORMALIZERS)}")
    return normalizer


def denoising_error(x: torch.Tensor, x0_real: torch.Tensor, normalizer: str = "sample") -> torch.Tensor:
    """mean|x - x0_real|, per sample ("sample", shape (N, 1, ...)) or over the whole batch ("batch", one value):
    the scale DMD, SiD and SIM divide their generator gradients by."""
    dims = tuple(range(1, x.ndim)) if check_normalizer(normalizer) == "sample" else tuple(range(x.ndim))
    return batch_split.batch_mean((x - x0_real).abs(), dims, keepdim=True)  # the global batch's, if split


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                 normalizer: str = "sample") -> torch.Tensor:
    """The normalised score difference, (x0_fake - x0_real) / mean|x - x0_real|, the mean taken per sample
    (DMD Eq. 8) or over the whole batch."""
    return torch.nan_to_num((x0_fake - x0_real) / denoising_error(x, x0_real, normalizer))


def dmd_loss(x: torch.Tensor, teacher: Denoiser, fake: Denoiser, cond=None, guidance: float = 1.0,
             fake_guidance: float = 1.0, t_range=(0.02, 0.98), normalizer: str = "sample",
             weight_fn=None, draws: int = 1) -> tuple[torch.Tensor, dict]:
    """`t_range`: the fractions of the noise range the noise level is drawn from; either bound may be a tensor
    of shape (N,), one range per sample. `draws`: independent (t, noise) draws per sample whose gradients are
    averaged (1 in DMD / DMD2)."""
    if int(draws) < 1:
        raise ValueError(f"method.dm_draws must be >= 1, got {draws}")
    sched = teacher.schedule
    grads = []
    with torch.no_grad():
        for _ in range(int(draws)):
            t = sched.sample_t(x.shape[0], *t_range, device=x.device)
            x_t = sched.add_noise(x.detach(), batch_split.randn_like(x), t)
            x0_real = teacher.x0(x_t, t, cond, guidance)  # CFG on the real score only (DMD2 §4.4)
            x0_fake = fake.x0(x_t, t, cond, fake_guidance)
            grad = dmd_gradient(x.detach().float(), x0_real.float(), x0_fake.float(), normalizer)
            if weight_fn is not None:
                w = weight_fn(x_t, t)
                grad = grad * w.to(grad.dtype).reshape(-1, *([1] * (grad.ndim - 1)))
            grads.append(grad)
        grad = grads[0] if len(grads) == 1 else torch.stack(grads).mean(0)
    loss = 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad), reduction="mean")
    return loss, {"dmd_grad_norm": grad.flatten(1).norm(dim=1).mean().item()}


def fake_score_loss(fake: NetworkDenoiser, x_fake: torch.Tensor, cond=None) -> torch.Tensor:
    """Denoising loss of the critic on detached generator samples, t over the whole range."""
    t = fake.schedule.sample_t(x_fake.shape[0], 0.0, 1.0, device=x_fake.device)
    return fake.denoising_loss(x_fake.detach(), t, cond).mean()


def fake_score_phase(models, batch, kept_samples) -> LossOut:
    """The critic phase of DMD, SIM and rCM: the method's kept generator samples where it has some
    (`method.reuse_generator_samples`), else fresh ones without gradient; then fake_score_loss."""
    x, cond, _ = kept_samples.take(models["generator"], batch)
    loss = fake_score_loss(models["fake_score"], x, cond)
    return LossOut(loss, {"loss_fake_score": loss.item()})
