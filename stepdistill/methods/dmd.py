"""DMD: One-step Diffusion with Distribution Matching Distillation (Yin et al., CVPR 2024, arXiv 2311.18828).

Generator loss (§3.3, Eq. 9):  L = L_KL (distribution matching, Eq. 7-8) + lambda_reg * L_reg,
with L_reg the distance between G(z) and the teacher's deterministic ODE output for the same noise z
(precomputed noise -> sample pairs, Eq. 9; lambda_reg = 0.25, LPIPS in the paper, L2 here by default).
Critic: the fake score's denoising loss on detached generator samples (Eq. 6); alternated 1:1.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..checks import at_least, non_negative
from .base import LossOut, Method
from .distribution_matching import check_normalizer, dmd_loss, fake_score_phase


class DMD(Method):
    name = "dmd"
    roles = ("teacher", "fake_score", "generator")
    phases = {"generator": ("generator",), "critic": ("fake_score",)}
    batch_keys = ("noise", "cond", "reg_noise", "reg_cond", "reg_target")
    reuses_generator_samples = True

    def __init__(self, models, cfg):
        super().__init__(models, cfg)
        self.normalizer = check_normalizer(cfg.get("normalizer", "sample"))
        at_least("method.regression.num_pairs", cfg.regression.num_pairs)
        non_negative("method.regression.weight", cfg.regression.weight)
        kind = cfg.regression.get("distance", "l2")
        if kind not in ("l2", "lpips"):
            raise ValueError(f"unknown method.regression.distance {kind!r}: use l2 or lpips")
        self.distance = None  # None = mean squared error
        if kind == "lpips":
            from .lpips_distance import LPIPSDistance
            self.distance = LPIPSDistance(cfg.regression.get("lpips_weights"), cfg.regression.get("lpips_resize", 224))

    @classmethod
    def check_benchmark(cls, cfg, benchmark) -> None:
        shape = tuple(benchmark.data_shape)
        if cfg.regression.get("distance", "l2") == "lpips" and not (len(shape) == 3 and shape[0] in (1, 3)):
            raise ValueError(f"method.regression.distance=lpips compares images of 1 or 3 channels; the "
                             f"{benchmark.name} benchmark's samples have shape {shape} (points or latents): use "
                             "method.regression.distance=l2")

    def regression_loss(self, pred, target):
        if self.distance is not None:
            # the trainer moves the roles to the training device, not what a method holds: LPIPS follows the samples
            return self.distance.to(pred.device)(pred, target).mean()
        return F.mse_loss(pred.float(), target.float())

    def generator_loss(self, batch, step):
        m, c = self.models, self.cfg
        x, steps = m["generator"](batch["noise"], batch["cond"], return_steps=True)
        self.kept_samples.keep(x, batch["cond"], steps)
        l_dm, logs = dmd_loss(x, m["teacher"], m["fake_score"], batch["cond"], c.guidance, c.fake_guidance,
                              (c.t_min, c.t_max), self.normalizer,
                              draws=int(c.get("dm_draws", 1)))
        pred = m["generator"](batch["reg_noise"], batch["reg_cond"], step=1)  # pairs start from pure noise
        l_reg = self.regression_loss(pred, batch["reg_target"])
        loss = l_dm + c.regression.weight * l_reg
        return LossOut(loss, {"loss_dm": l_dm.item(), "loss_reg": l_reg.item(), **logs})

    def critic_loss(self, batch, step):
        return fake_score_phase(self.models, batch, self.kept_samples)
