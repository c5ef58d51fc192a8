"""SiDA: adversarial Score identity Distillation (Zhou et al., ICLR 2025, arXiv 2410.14919).

SiD plus a diffusion-GAN term whose discriminator is the fake score network's own encoder, with no extra
parameters: D(x_t) is the encoder's (bottleneck) output averaged over its channels, one logit per position (one per
sample for an MLP's features), as in SiDA's reference code. Real data are noised with the same t and the same noise
as the generated samples, so the discriminator compares like with like, and the features come from forward passes
the SiD losses make anyway:
  generator  L = L_SiD + λ_G · E_i [ w_i · mean_pos softplus(-clip(D(x_t^fake)_i, -10, 10)) ]
  critic     L = L_denoise + λ_D · [E softplus(D(x_t^fake)) + E softplus(-D(x_t^real))]   (means over positions too)
with w_i SiD's own per-sample weight 1 / mean|x_g - f_real|, so the two terms' balance does not depend on how far a
sample is from the teacher's prediction (the reference divides its batch-mean GAN loss by each sample's weight
factor and sums, which gives every sample's GAN gradient the batch's mean w instead of its own), x_t^fake = a G(z) + s eps in
both phases (the critic's denoising loss is taken at that same x_t) and x_t^real = a x_real + s eps. λ's are
`adv.generator_weight` and `adv.critic_weight`; the generator's GAN gradient flows through the (frozen) critic's
encoder into x_g, the critic's trains the whole fake score network. The critic phase's noise levels are SiD's
(`method.critic_noise`; by default the reference's: log-normal EDM sigma on an EDM teacher, SiD's [t_min, t_max]
on VP and flow), and the discriminator reads the same x_t. Left out from the reference: its EDM weight λ(σ) / 2 on
the discriminator loss. There it multiplies the batch-mean BCE, a scalar, so it is not a per-sample weight. It
scales the whole discriminator loss by the batch's summed λ(σ_i) / 2, which the small sigmas of the log-normal
dominate (λ = 4 + 1/σ² at σ_data 0.5). Here λ_D is a constant. Its start schedule (critic updates alone for the
first 100k images, the generator's GAN term from 200k; the discriminator term trains with the fake score from the
first image) is `method.critic_warmup_steps` and `method.adv.start_step` (trainer steps; both 0 by default). Its λ_G, 0.01 on
the summed GAN loss against 100 on the summed SiD loss, is 1e-4 in our mean-based losses; the default here is tuned
on digits (conf/method/sida.yaml). Guidance strategies and everything else are SiD's (methods/sid.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import batch_split
from ..checks import at_least
from ..networks.heads import features_of, find_feature_module, tap_features
from .base import LossOut
from .sid import SiD


def encoder_logit(features: torch.Tensor, n: int) -> torch.Tensor:
    """The discriminator's logits: the encoder features of the first n rows (a CFG call stacks cond and uncond rows;
    the conditional half comes first) averaged over channels, one logit per position: (n, H, W) for a feature map,
    (n,) for an MLP's (n, C) features."""
    return features[:n].float().mean(1)


def per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1) if t.dim() > 1 else t


class SiDA(SiD):
    name = "sida"
    batch_keys = ("noise", "cond", "real", "real_cond")

    def __init__(self, models, cfg):
        super().__init__(models, cfg)
        adv = cfg.adv
        self.weights = (float(adv.generator_weight), float(adv.critic_weight))
        if min(self.weights) < 0:
            raise ValueError(f"method.adv weights must be >= 0, got generator {self.weights[0]}, critic {self.weights[1]}")
        self.encoder = find_feature_module(models["fake_score"].net, adv.get("feature_module"))
        self.adv_start = at_least("method.adv.start_step", adv.get("start_step", 0) or 0, 0)

    def adv_on(self, step: int) -> bool:
        """The generator's adversarial term runs from trainer step `adv.start_step` on; before it, plain SiD. The
        discriminator's trains from the first step, as in SiDA's code: the generator then reads a trained one."""
        return step >= self.adv_start

    def _noised(self, x):
        sched = self.models["teacher"].schedule
        return sched.sample_t(x.shape[0], *self.t_range, device=x.device), batch_split.randn_like(x)

    def generator_loss(self, batch, step):
        if not self.adv_on(step):
            return super().generator_loss(batch, step)
        x = self.models["generator"](batch["noise"], batch["cond"])
        t, noise = self._noised(x)
        with tap_features(self.encoder, stop=False) as tap:
            loss_sid, logs, weight = self.sid_term(x, batch["cond"], t=t, noise=noise, with_weight=True)
        per_sample = per_sample_mean(F.softplus(-encoder_logit(tap["features"], x.shape[0]).clamp(-10.0, 10.0)))
        loss_adv = (weight.flatten() * per_sample).mean()
        logs.update(loss_sid=loss_sid.item(), loss_adv_g=loss_adv.item())
        return LossOut(loss_sid + self.weights[0] * loss_adv, logs)

    def critic_loss(self, batch, step):
        m = self.models
        with torch.no_grad():
            x = m["generator"](batch["noise"], batch["cond"])
        real = batch["real"]
        if real.shape[0] != x.shape[0]:
            raise ValueError(f"sida needs as many real samples as generated ones per batch ({real.shape[0]} vs {x.shape[0]})")
        # the critic's noise levels (method.critic_noise); the discriminator reads the same x_t
        t, noise = self.critic_t(x.shape[0], x.device), batch_split.randn_like(x)
        with tap_features(self.encoder, stop=False) as tap:
            loss_score = self.fake_score_loss(x, batch["cond"], t, noise)
        logit_fake = encoder_logit(tap["features"], x.shape[0])
        fake = m["fake_score"]
        x_t_real = fake.schedule.add_noise(real, noise, t)
        # the encoder alone: the decoder half is never run; real rows get the generated rows' condition dropout
        real_cond = self.fake_train_cond(batch["real_cond"])
        feats = features_of(self.encoder, fake.net, fake.raw, x_t_real, t, real_cond)
        logit_real = encoder_logit(feats, real.shape[0])
        loss_adv = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
        logs = {"loss_fake_score": loss_score.item(), "loss_adv_d": loss_adv.item(),
                "d_real": logit_real.mean().item(), "d_fake": logit_fake.mean().item()}
        return LossOut(loss_score + self.weights[1] * loss_adv, logs)
