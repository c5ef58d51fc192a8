"""sCM / sCD: continuous-time consistency distillation (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv 2410.11081).

In TrigFlow (methods/trigflow.py) the student's consistency function is
    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t),     f_theta(x, 0) = x,
read off the generator's own denoiser, so the few-step generator evaluates exactly f_theta at its timesteps.
One training step (sCD, §4.2 with the tangent of §3):
    x0 ~ data, z ~ N(0, sigma_d^2 I), t from the proposal tan t = e^tau / sigma_d, x_t = cos t x0 + sin t z
    dx_t/dt  = sigma_d F_teacher(x_t, t)                                   teacher PF-ODE (CFG on its x0)
    F-, dF-/dt = jvp(F_theta, (x_t, t), (dx_t/dt, 1))                       forward mode, no gradient
    g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt)   (= cos t df-/dt at r = 1)
    g <- g / (||g|| + c)                                                     tangent normalisation, c = 0.1
    loss = ||F_theta - F- - g||^2 / D      or, adaptive,  e^{-w(t)} ||F_theta - F- - g||^2 / D + w(t)
with r rising linearly 0 -> 1 over `warmup_steps` (tangent warm-up). theta- = stopgrad(theta): no EMA target.
The paper writes the adaptive weighting as e^{w}/D ||.||^2 - w; this is the same with w -> -w.
Early in the warm-up (r ~ 0) the loss pulls F_theta to F_teacher: a student that does not start from the
teacher's weights (the analytic GMM teacher has none) first learns the teacher's denoiser.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..checks import at_least
from ..denoiser import NetworkDenoiser
from .base import LossOut, Method
from .trigflow import TrigFlow, _b

WEIGHTINGS = ("adaptive", "uniform")
# prediction types whose x0 equals x_t at zero noise, so f_theta(x, 0) = x holds through the denoiser
BOUNDARY_OK = ("epsilon", "v_prediction", "flow_velocity", "edm")


class AdaptiveWeighting(nn.Module):
    """w_phi(t) (sCM §4.2), as EDM2's uncertainty head: random Fourier features of log(tan t) = log(sigma / sigma_d)
    -> MLP -> one scalar per sample, zero at initialisation (the loss starts unweighted)."""

    def __init__(self, width: int = 64, num_features: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(num_features, generator=g))
        self.register_buffer("phases", torch.rand(num_features, generator=g))
        self.mlp = nn.Sequential(nn.Linear(num_features, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c_noise = torch.log(torch.tan(t.double())).float()[:, None] / 4
        return self.mlp(torch.cos(2 * math.pi * (c_noise * self.freqs + self.phases)))[:, 0]


class SCM(Method):
    name = "scm"
    batch_keys = ("noise", "real", "real_cond")
    uses_fake_score = False
    critic_roles: tuple[str, ...] = ()   # a subclass with a critic (rCM) names its roles here

    def __init__(self, models, cfg):
        self.weighting = str(cfg.get("weighting", "adaptive"))
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown method.weighting {self.weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        extra = ("weighting",) if self.weighting == "adaptive" else ()
        self.roles = ("teacher", "generator") + extra + self.critic_roles
        self.phases = {"generator": ("generator",) + extra}
        if self.critic_roles:
            self.phases["critic"] = self.critic_roles
        if extra and "weighting" not in models:
            models["weighting"] = AdaptiveWeighting(at_least("method.weighting_width", cfg.get("weighting_width", 64)))
        super().__init__(models, cfg)
        if models["generator"].step_experts:
            raise ValueError("method=scm trains one consistency function over all times: set "
                             "generator.step_experts=false")
        student = models["generator"].denoiser
        if not isinstance(student, NetworkDenoiser) or student.prediction_type not in BOUNDARY_OK:
            kind = getattr(student, "prediction_type", type(student).__name__)
            raise ValueError(f"method=scm needs a student whose x0 equals x_t at zero noise (prediction types "
                             f"{', '.join(BOUNDARY_OK)}), not {kind!r}: f(x, 0) = x would not hold")
        sigma_data = cfg.get("sigma_data")
        self.trig = TrigFlow(student.schedule, float(sigma_data if sigma_data is not None else student.sigma_data))
        for key in ("warmup_steps", "p_std", "tangent_norm_c"):
            if float(cfg[key]) < 0:
                raise ValueError(f"method.{key} must be >= 0, got {cfg[key]}")

    def phase(self, step: int) -> str:
        return "generator"  # one network, one loss: no critic, no TTUR

    def batch_statistic(self) -> str | None:
        return None   # a per-sample loss; a benchmark's method.normalizer (gmm sets one for every method) goes unread

    # --- the student's consistency function ----------------------------------------------------------------
    def F_student(self, x_t, t, cond=None):
        return self.trig.F(self.models["generator"].denoiser, x_t, t, cond)

    def consistency(self, x_t, t, cond=None):
        """f_theta(x_t, t): the generator's x0 at TrigFlow time t (what FewStepGenerator samples with)."""
        return self.trig.x0(self.models["generator"].denoiser, x_t, t, cond)

    def tangent(self, fn, x_t, t, dxdt):
        """(fn(x_t, t), d fn / dt) along the teacher's ODE: forward-mode JVP with tangents (dx_t/dt, 1).

        PyTorch's fused SDPA kernels have no forward-mode derivative; its math kernel (plain matmuls) does, so
        diffusers' default attention runs through it here. attention.backend=auto|triton takes the project's
        Triton JVP kernel instead on CUDA (stepdistill.kernels). Under CPU autocast, forward-mode AD gives
        GroupNorm and LayerNorm a bfloat16 primal with a float32 tangent, which the next convolution refuses: the JVP
        runs in float32 there (CUDA's autocast keeps those norms in float32)."""
        off_on_cpu = torch.autocast("cpu", enabled=False) if x_t.device.type == "cpu" else contextlib.nullcontext()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), off_on_cpu:
            return torch.func.jvp(fn, (x_t, t), (dxdt, torch.ones_like(t)))

    def warmup_ratio(self, step: int) -> float:
        warm = int(self.cfg.warmup_steps)
        return 1.0 if warm <= 0 else min(1.0, step / warm)

    def generator_loss(self, batch, step):
        m, c, tf = self.models, self.cfg, self.trig
        x0, cond = batch["real"].float(), batch["real_cond"]
        t = tf.sample_t(x0.shape[0], float(c.p_mean), float(c.p_std), device=x0.device)
        z = tf.sigma_data * batch["noise"].float()
        x_t = tf.add_noise(x0, z, t)
        with torch.no_grad():
            dxdt = tf.velocity(m["teacher"], x_t, t, cond, float(c.guidance))
        _, dF_dt = self.tangent(lambda x, s: self.F_student(x, s, cond), x_t, t, dxdt)
        F_theta = self.F_student(x_t, t, cond)
        # F_theta^- is F_theta with its gradient stopped (sCM Alg. 1), not the JVP's primal: that is another pass
        # (the math attention kernel, float32 on the CPU), whose rounding would enter F_theta - F_theta^-
        F_minus = F_theta.detach()
        cos, sin, sd, r = _b(torch.cos(t), x_t), _b(torch.sin(t), x_t), tf.sigma_data, self.warmup_ratio(step)
        g = -cos**2 * (sd * F_minus - dxdt) - r * cos * sin * (x_t + sd * dF_dt)
        g_norm = g.flatten(1).norm(dim=1)
        g = g / _b(g_norm + float(c.tangent_norm_c), g)
        per_sample = ((F_theta - F_minus - g) ** 2).flatten(1).mean(1)  # ||.||^2 / D
        logs = {"loss_scm": per_sample.mean().item(), "tangent_norm": g_norm.mean().item(), "tangent_warmup": r}
        if self.weighting == "adaptive":
            w = m["weighting"](t)
            loss = (torch.exp(-w) * per_sample + w).mean()
            logs["weight_logvar"] = w.mean().item()
        else:
            loss = per_sample.mean()
        return LossOut(loss, logs)

