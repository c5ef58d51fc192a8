"""SiDA: adversarial Score identity Distillation (Zhou et al., ICLR 2025, arXiv 2410.14919).

SiD plus a diffusion-GAN term whose discriminator is the fake score network's own encoder, with no extra
parameters: D(x_t) is the mean of the encoder's (bottleneck) output over all its elements. Real data are noised
with the same t and the same noise as the generated samples, so the discriminator compares like with like, and
the features come from forward passes the SiD losses make anyway:
  generator  L = L_SiD + λ_G · E softplus(-D(x_t^fake))                 (D from the fake score's call in L_SiD)
  critic     L = L_denoise + λ_D · [E softplus(D(x_t^fake)) + E softplus(-D(x_t^real))]
with x_t^fake = a G(z) + s eps in both phases (the critic's denoising loss is taken at that same x_t) and
x_t^real = a x_real + s eps. λ's are `adv.generator_weight` and `adv.critic_weight`; the generator's GAN gradient
flows through the (frozen) critic's encoder into x_g, the critic's trains the whole fake score network.
Guidance strategies and everything else are SiD's (methods/sid.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import batch_split
from ..networks.heads import features_of, find_feature_module, tap_features
from .base import LossOut
from .sid import SiD


def encoder_logit(features: torch.Tensor, n: int) -> torch.Tensor:
    """One logit per sample: the mean of the encoder features of the first n rows (a CFG call stacks cond and
    uncond rows; the conditional half comes first)."""
    return features[:n].float().flatten(1).mean(1)


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

    def _noised(self, x):
        sched = self.models["teacher"].schedule
        return sched.sample_t(x.shape[0], *self.t_range, device=x.device), batch_split.randn_like(x)

    def generator_loss(self, batch, step):
        x = self.models["generator"](batch["noise"], batch["cond"])
        t, noise = self._noised(x)
        with tap_features(self.encoder, stop=False) as tap:
            loss_sid, logs = self.sid_term(x, batch["cond"], t=t, noise=noise)
        loss_adv = F.softplus(-encoder_logit(tap["features"], x.shape[0])).mean()
        logs.update(loss_sid=loss_sid.item(), loss_adv_g=loss_adv.item())
        return LossOut(loss_sid + self.weights[0] * loss_adv, logs)

    def critic_loss(self, batch, step):
        m = self.models
        with torch.no_grad():
            x = m["generator"](batch["noise"], batch["cond"])
        real = batch["real"]
        if real.shape[0] != x.shape[0]:
            raise ValueError(f"sida needs as many real samples as generated ones per batch ({real.shape[0]} vs {x.shape[0]})")
        t, noise = self._noised(x)
        with tap_features(self.encoder, stop=False) as tap:
            loss_score = self.fake_score_loss(x, batch["cond"], t, noise)
        logit_fake = encoder_logit(tap["features"], x.shape[0])
        fake = m["fake_score"]
        x_t_real = fake.schedule.add_noise(real, noise, t)
        # the encoder alone: the decoder half is never run; real rows get the generated rows' condition dropout
        feats = features_of(self.encoder, fake.net, fake.raw, x_t_real, t, self.fake_train_cond(batch["real_cond"]))
        logit_real = encoder_logit(feats, real.shape[0])
        loss_adv = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
        logs = {"loss_fake_score": loss_score.item(), "loss_adv_d": loss_adv.item(),
                "d_real": logit_real.mean().item(), "d_fake": logit_fake.mean().item()}
        return LossOut(loss_score + self.weights[1] * loss_adv, logs)
