"""Diffusion-GAN term of DMD2 (§4.3): a classifier on the fake score's bottleneck features of *noised* samples.

Real and generated samples are noised with the same forward process at t in the configured range, the fake
score network's encoder gives features, and a small head gives a logit. Non-saturating losses:
    generator      L_G = E softplus(-D(G(z)))
    discriminator  L_D = E softplus(D(G(z))) + E softplus(-D(x_real))
The encoder is the critic's own, so L_D also trains the fake score network (as in DMD2), never the generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import batch_split
from ..denoiser import NetworkDenoiser
from ..networks.heads import ClassifierHead, features_of, find_feature_module, tap_features


class DiffusionGAN:
    def __init__(self, fake: NetworkDenoiser, head: ClassifierHead, feature_module: str | None = None,
                 t_range=(0.0, 1.0)):
        self.fake, self.head = fake, head
        self.module = find_feature_module(fake.net, feature_module)
        self.t_range = tuple(t_range)

    def logits(self, x: torch.Tensor, cond=None, t=None) -> torch.Tensor:
        sched = self.fake.schedule
        if t is None:
            t = sched.sample_t(x.shape[0], *self.t_range, device=x.device)
        return self.logits_noised(sched.add_noise(x, batch_split.randn_like(x), t), t, cond)

    def logits_noised(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The logit of an already-noised x_t at time t (no noise drawn). Near the optimum of L_D it estimates
        log p_t(x_t) / q_t(x_t), real over generated, for t in the range the discriminator was trained on."""
        return self.head(features_of(self.module, self.fake.net, self.fake.raw, x_t, t, cond))

    @staticmethod
    def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-logits_fake).mean()

    @staticmethod
    def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def probe_feature_shape(fake: NetworkDenoiser, example: torch.Tensor, cond=None, feature_module=None):
    """Run the critic once to learn its bottleneck feature shape (to size the head)."""
    module = find_feature_module(fake.net, feature_module)
    t = fake.schedule.sample_t(example.shape[0], 0.5, 0.5, device=example.device)
    with torch.no_grad(), tap_features(module) as tap:
        feats = tap["run"](fake.raw, example, t, cond)
    return tuple(feats.shape[1:])
