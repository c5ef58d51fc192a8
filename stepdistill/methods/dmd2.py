"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

Changes from DMD, each a switch here:
  * no regression loss (§4.1);
  * two time-scale update rule: `critic_steps` fake-score updates per generator update (§4.2);
  * a GAN classifier on the fake score's bottleneck with diffusion-GAN noising (§4.3), non-saturating losses,
    weights `gan.generator_weight` (~3e-3) in the generator loss and `gan.critic_weight` (~1e-2) in the critic's;
  * backward simulation for multi-step students (§4.5, in FewStepGenerator.forward);
  * CFG on the real score only (`guidance`); the fake score is evaluated at `fake_guidance` (1 = none).
Not in DMD2, off by default: `step_aware_critic` conditions the fake score on the exit step of multi-step
students (methods/step_critic.py explains why), `gan.step_aware` does the same for the GAN discriminator, and
`dm_below_step_input` draws the DM noise level of a sample that exits at step k no higher than step k's own
input noise level t_k. What the noise levels above t_k measure (the layout, the class) was settled by the steps
before k, from whose output step k starts: their gradient can only make step k override its input. Phased DMD
(Fan et al. 2025) restricts each phase's score matching to its own noise subinterval for a like reason. On digits
it made the last step worse (docs/results.md). `dm_above_next_input` is the other half of Phased DMD's
subinterval: a sample that exits at step k < K is scored at DM noise levels no lower than step k+1's input level,
since the chain re-noises step k's output to that level before step k+1 reads it. What lies below it never
reaches the sample, and without the bound the early steps' gradients there train the shared network on detail
the last step alone should shape. The last step keeps the whole range. Both switches together give each step k
< K Phased DMD's [t_{k+1}, t_k].
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .base import LossOut, Method
from .distribution_matching import check_normalizer, dmd_loss, fake_score_loss
from .gan import DiffusionGAN


class _InContext:
    """A denoiser whose x0 calls run inside `context()` (the step-aware critic's exit-step embedding): only the
    fake score's own calls see it, not other calls on the same network inside the DM loss (f-distill's
    discriminator), which stay as they are when the discriminator is trained."""

    def __init__(self, denoiser, context):
        self.denoiser, self.context = denoiser, context

    def x0(self, *args, **kwargs):
        with self.context():
            return self.denoiser.x0(*args, **kwargs)


class DMD2(Method):
    name = "dmd2"
    reuses_generator_samples = True

    def __init__(self, models, cfg):
        self.use_gan = bool(cfg.gan.enabled)
        self.gan_start = int(cfg.gan.get("start_step", 0) or 0) if self.use_gan else 0
        if self.gan_start < 0:
            raise ValueError(f"method.gan.start_step must be a trainer step >= 0, got {self.gan_start}")
        self.step_aware = bool(cfg.get("step_aware_critic", False))
        self.gan_step_aware = self.use_gan and bool(cfg.gan.get("step_aware", False))
        if self.gan_step_aware and not self.step_aware:
            raise ValueError("method.gan.step_aware conditions the discriminator through the step-aware critic's "
                             "exit-step embedding (the discriminator is the critic's encoder): set "
                             "method.step_aware_critic=true")
        extra = (("gan_head",) if self.use_gan else ()) + (("critic_step_embedding",) if self.step_aware else ())
        self.roles = ("teacher", "fake_score", "generator") + extra
        self.phases = {"generator": ("generator",), "critic": ("fake_score",) + extra}
        self.batch_keys = ("noise", "cond") + (("real", "real_cond") if self.use_gan else ())
        super().__init__(models, cfg)
        self.normalizer = check_normalizer(cfg.get("normalizer", "sample"))
        self.dm_t_ranges = self._dm_noise_ranges(models["generator"], cfg)
        self.gan = DiffusionGAN(models["fake_score"], models["gan_head"], cfg.gan.feature_module,
                                (cfg.gan.t_min, cfg.gan.t_max)) if self.use_gan else None

    @staticmethod
    def _dm_noise_ranges(gen, cfg):
        """Per exit step k, the (lowest, highest) DM noise level as fractions of the range, shape (K, 2); None
        when every step draws from the whole [t_min, t_max]."""
        below, above = bool(cfg.get("dm_below_step_input", False)), bool(cfg.get("dm_above_next_input", False))
        if not (below or above):
            return None
        t_min, t_max = float(cfg.t_min), float(cfg.t_max)
        levels = [gen.schedule.fraction_at(t) for t in gen.timesteps]   # each step's input level
        his = [min(t_max, lv) for lv in levels] if below else [t_max] * len(levels)
        # step k's output is re-noised to step k+1's input level before anything reads it; the last step's is the
        # sample, scored over the whole range
        los = [max(t_min, lv) for lv in levels[1:]] + [t_min] if above else [t_min] * len(levels)
        for k, (lo, hi) in enumerate(zip(los, his), 1):
            if k in gen.train_steps and not lo < hi:   # a step that is never an exit step needs no range
                names = " and ".join(n for n, on in (("dm_below_step_input", below), ("dm_above_next_input", above))
                                     if on)
                hint = "lower t_min" if below and not above else "space the generator's timesteps further apart"
                raise ValueError(f"method.{names}: exit step {k}'s DM noise range [{lo:.3f}, {hi:.3f}] of the "
                                 f"range is empty: {hint}")
        return torch.tensor(list(zip(los, his)))

    def _fake_sees_steps(self, steps):
        """The context in which the fake score sees each sample's exit step (a no-op unless step-aware)."""
        return self.models["critic_step_embedding"].condition(steps) if self.step_aware else nullcontext()

    def _gan_sees_steps(self, steps):
        """The context of the GAN's calls: with `gan.step_aware` the discriminator tells real from step k's outputs
        for each exit step k, D(x, k) ~ log p_data / p_k, rather than real from the mixture of all steps' outputs,
        whose optimum the steps can reach together while each is wrong (the mixture problem of the critic)."""
        return self._fake_sees_steps(steps) if self.gan_step_aware else nullcontext()

    def gan_on(self, step: int) -> bool:
        """The GAN terms (generator and discriminator) run from trainer step `gan.start_step` on: before it the
        generator follows the DM gradient alone and the classifier head is not trained."""
        return self.use_gan and step >= self.gan_start

    def dm_weight_fn(self, batch, logs: dict, steps=None, *, step: int):
        """Per-sample weights of the DM gradient, w(x_t, t) (None: DMD2's unweighted gradient; f-distill's h(r)).
        `steps`: each sample's exit step; `step`: the trainer step."""
        return None

    def generator_loss(self, batch, step):
        m, c = self.models, self.cfg
        x, steps = m["generator"](batch["noise"], batch["cond"], return_steps=True)
        self.kept_samples.keep(x, batch["cond"], steps)
        fake = _InContext(m["fake_score"], lambda: self._fake_sees_steps(steps)) if self.step_aware else m["fake_score"]
        stats: dict = {}
        ranges = self.dm_t_ranges
        t_range = (c.t_min, c.t_max) if ranges is None else ranges.to(x.device)[steps - 1].unbind(1)
        loss, logs = dmd_loss(x, m["teacher"], fake, batch["cond"], c.guidance, c.fake_guidance,
                              t_range, self.normalizer, weight_fn=self.dm_weight_fn(batch, stats, steps, step=step),
                              draws=int(c.get("dm_draws", 1)))
        logs.update(stats)
        logs["loss_dm"] = loss.item()
        if self.gan_on(step):
            with self._gan_sees_steps(steps):
                l_g = DiffusionGAN.generator_loss(self.gan.logits(x, batch["cond"]))
            loss = loss + c.gan.generator_weight * l_g
            logs["loss_gan_g"] = l_g.item()
        return LossOut(loss, logs)

    def critic_loss(self, batch, step):
        m, c = self.models, self.cfg
        x, cond, steps = self.kept_samples.take(m["generator"], batch)
        with self._fake_sees_steps(steps):
            loss = fake_score_loss(m["fake_score"], x, cond)
        logs = {"loss_fake_score": loss.item()}
        if self.gan_on(step):
            # with gan.step_aware, real row i is shown under fake row i's exit step: the data is every step's
            # target, and each step label then sees real and generated samples in equal numbers
            with self._gan_sees_steps(steps):
                l_d = DiffusionGAN.discriminator_loss(self.gan.logits(batch["real"], batch["real_cond"]),
                                                      self.gan.logits(x, cond))
            loss = loss + c.gan.critic_weight * l_d
            logs["loss_gan_d"] = l_d.item()
        return LossOut(loss, logs)
