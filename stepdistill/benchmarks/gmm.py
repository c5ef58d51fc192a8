"""`gmm` / `gmm_unbalanced`: the analytic 2-D Gaussian-mixture teacher (exact score), MLP students from scratch."""
from __future__ import annotations

import math

from ..checks import at_least
from ..denoiser import NetworkDenoiser
from ..networks.gmm import GaussianMixture, GMMDenoiser, circle_means
from ..networks.mlp import TimeMLP
from ..samplers import ddim_sample
from ..schedules import make_schedule
from .base import Benchmark


class GMMBenchmark(Benchmark):
    kind = "points"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.name
        if not cfg.get("means") and int(cfg.num_modes) < 1:
            raise ValueError(f"benchmark.num_modes={cfg.num_modes}: a mixture needs at least one mode")
        means = cfg.get("means") or circle_means(int(cfg.num_modes), float(cfg.radius))
        at_least("benchmark.network.width", cfg.network.width)
        at_least("benchmark.network.depth", cfg.network.depth, 0)
        self.teacher_steps = at_least("benchmark.teacher_steps", cfg.teacher_steps)
        for key in ("fourier_scale", "generator_fourier_scale"):
            if cfg.network.get(key) is not None and not float(cfg.network[key]) > 0:
                raise ValueError(f"benchmark.network.{key}={cfg.network[key]}: the input features' frequency scale "
                                 "must be > 0 (fourier_features=0 turns the features off)")
        if float(cfg.std) <= 0:
            raise ValueError(f"benchmark.std={cfg.std}: each mode's standard deviation must be > 0")
        weights = cfg.get("weights")
        if weights is not None and (len(weights) != len(means) or min(weights) <= 0):
            raise ValueError(f"benchmark.weights={list(weights)}: give {len(means)} positive weights, one per mode "
                             "(null = equal)")
        self.mixture = GaussianMixture(means, float(cfg.std), weights)
        self.schedule = make_schedule(**cfg.schedule)
        self.teacher = GMMDenoiser(self.mixture, self.schedule)
        self.data_shape = (self.mixture.dim,)
        # the data's per-coordinate root mean square (its std about 0, as EDM's sigma_data is for zero-mean data):
        # the EDM preconditioning of the MLP students
        if cfg.get("sigma_data") is not None and not float(cfg.sigma_data) > 0:
            raise ValueError(f"benchmark.sigma_data={cfg.sigma_data}: need a data scale > 0 (null = the mixture's "
                             "root mean square)")
        self.sigma_data = float(cfg.get("sigma_data") or math.sqrt(
            float((self.mixture.weights[:, None] * self.mixture.means**2).sum(0).mean()) + float(cfg.std) ** 2))

    def make_student_denoiser(self, fourier_scale: float | None = None):
        nc = self.cfg.network
        scale = nc.get("fourier_scale", 1.0) if fourier_scale is None else fourier_scale
        net = TimeMLP(self.mixture.dim, int(nc.width), int(nc.depth), fourier_features=int(nc.get("fourier_features", 0)),
                      fourier_scale=float(scale), time_scale=float(nc.get("time_scale", 1.0)))
        return NetworkDenoiser(net, self.schedule, "edm", sigma_data=self.sigma_data)

    def make_generator_denoiser(self):
        # `generator_fourier_scale`: the generator's input features at their own frequency (null: the critic's).
        # A generator maps noise to 8 modes through 8 angular sectors; lower input frequencies split the noise into
        # fewer pieces, so fewer boundaries leave samples on bridges between modes (docs/results.md, gmm)
        return self.make_student_denoiser(self.cfg.network.get("generator_fourier_scale"))

    def as_fake_score(self, den):
        # `fake_score_from_teacher`: the critic starts as the exact teacher and learns a residual (DMD's
        # teacher initialisation, for a teacher without weights); otherwise it is a plain MLP from scratch
        if not self.cfg.get("fake_score_from_teacher", False):
            return den
        from ..networks.teacher_residual import TeacherResidualDenoiser
        return TeacherResidualDenoiser(den.net, self.teacher, self.sigma_data)

    def sample_real(self, n):
        return self.mixture.sample(n), None

    def teacher_sample(self, noise, cond=None, steps=None, guidance=None):   # unconditional: no CFG
        return ddim_sample(self.teacher, noise, int(steps or self.teacher_steps))

    def evaluate(self, samples, labels=None):
        from ..eval.gmm_metrics import gmm_metrics
        return gmm_metrics(samples, self.mixture)

    def save_figure(self, samples, labels, path, teacher_samples=None):
        from ..eval.grids import save_gmm_scatter
        return save_gmm_scatter(path, samples, self.mixture, teacher=teacher_samples, title=self.name)

    def config_record(self):
        return {"mixture": self.mixture.to_config()}
