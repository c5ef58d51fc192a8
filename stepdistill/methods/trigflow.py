"""TrigFlow (Lu & Song 2024, sCM §3) on top of any teacher's native schedule.

TrigFlow noises data as  x_t = cos(t) x0 + sin(t) z,  z ~ N(0, sigma_d^2 I),  t in [0, pi/2],
and writes a denoiser (and a consistency function) as
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t),
whose PF-ODE is  dx_t/dt = sigma_d F_teacher  = (cos(t) x_t - x0_hat) / sin(t)  with x0_hat = E[x0 | x_t].

A teacher's native x = a x0 + s eps at the same signal-to-noise ratio is a rescaling of x_t:
    s / a = sigma_d tan(t)                (the EDM sigma: sigma = sigma_d tan t)
    a = k cos(t),  s = k sigma_d sin(t),  x = k x_t,  with
    k = 1 / sqrt(cos^2 + sigma_d^2 sin^2)     VP (a^2 + s^2 = 1)
    k = 1 / cos                              EDM (a = 1)
    k = 1 / (cos + sigma_d sin)              rectified flow (a + s = 1)
so every prediction is taken from the Denoiser at the native (a, s) and its time input, never re-derived here.
For a discrete VP schedule the native time between grid points is the fractional index at which the
grid's log(s/a) interpolates linearly to the wanted value: continuous and differentiable in t (for the JVP), and
equal to the grid index (with the grid's a, s) at the grid's own noise levels, so the generator's fixed
timesteps evaluate exactly this function.
"""
from __future__ import annotations

import math

import torch

from .. import batch_split
from ..denoiser import Denoiser
from ..schedules import NoiseSchedule


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class TrigFlow:
    def __init__(self, schedule: NoiseSchedule, sigma_data: float):
        if schedule.kind not in ("vp", "edm", "flow"):
            raise ValueError(f"TrigFlow has no conversion for a {schedule.kind!r} schedule: use vp, edm or flow")
        if not sigma_data > 0:
            raise ValueError(f"method.sigma_data must be positive, got {sigma_data}")
        self.schedule, self.sigma_data = schedule, float(sigma_data)
        if schedule.kind == "vp":
            ac = schedule.alphas_cumprod.double()
            self.log_ratio = 0.5 * torch.log((1 - ac) / ac)  # log(s / a) on the grid, increasing in the index
            if not bool((self.log_ratio.diff() > 0).all()):
                raise ValueError("the VP schedule's noise levels must increase strictly with the timestep")
            self.log_ratio_range = (float(self.log_ratio[0]), float(self.log_ratio[-1]))
            # zero terminal SNR (alphas_cumprod[-1] = 0): the last grid point's log(s / a) is +inf, TrigFlow time
            # pi / 2; the last interval is interpolated linearly in a / s instead (see _vp_index)
            self.open_top = bool(torch.isinf(self.log_ratio[-1]))
        t_lo = schedule.final_t().reshape(1).double()
        t_hi = schedule.t_from_fraction(torch.ones(1)).double()
        self.t_min, self.t_max = float(self.from_native(t_lo)), float(self.from_native(t_hi))
        self.t_max = min(self.t_max, math.pi / 2 - 1e-4)  # tan(t) must stay finite for the native time

    # --- TrigFlow time <-> the schedule's native time ---------------------------------------------------------
    def from_native(self, t_native: torch.Tensor) -> torch.Tensor:
        """The TrigFlow time at the same signal-to-noise ratio: atan(s / (a sigma_d))."""
        t_native = torch.as_tensor(t_native, dtype=torch.float64)
        if self.schedule.kind == "vp":  # from the float64 grid, so a grid index maps back to itself exactly
            idx = t_native.round().long().clamp(0, len(self.log_ratio) - 1)
            return torch.atan(self.log_ratio.to(idx.device)[idx].exp() / self.sigma_data)
        a, s = self.schedule.alpha(t_native).double(), self.schedule.sigma(t_native).double()
        return torch.atan2(s, a * self.sigma_data)

    def native(self, t: torch.Tensor):
        """(native time, a, s, k) at TrigFlow time t (N,), in float64: x_native = k x_t."""
        t = t.double()
        c, sn, sd = torch.cos(t), torch.sin(t), self.sigma_data
        kind = self.schedule.kind
        if kind == "vp":
            k = torch.rsqrt(c**2 + (sd * sn) ** 2)
        elif kind == "edm":
            k = 1 / c
        else:
            k = 1 / (c + sd * sn)
        a, s = k * c, k * sd * sn
        if kind == "vp":
            t_native = self._vp_index(torch.log(sd * torch.tan(t)))
        else:  # EDM's time is sigma itself; flow's is s (a + s = 1)
            t_native = s
        return t_native, a, s, k

    def _vp_index(self, log_ratio: torch.Tensor) -> torch.Tensor:
        grid = self.log_ratio.to(log_ratio.device)
        lr = log_ratio.clamp(self.log_ratio_range[0], self.log_ratio_range[1])
        hi = torch.searchsorted(grid, lr.detach()).clamp(1, len(grid) - 1)
        lo = hi - 1
        if self.open_top:   # the last interval reaches log(s / a) = inf: linear in a / s = exp(-log_ratio) there,
            # 0 at its top; (lr - g) / (inf - g) would be 0 throughout, so index T-1 and its slope never reached
            last = hi == len(grid) - 1
            frac = torch.where(last, -torch.expm1(grid[lo] - lr), (lr - grid[lo]) / (grid[hi] - grid[lo]))
            return lo.double() + frac
        return lo.double() + (lr - grid[lo]) / (grid[hi] - grid[lo])

    def sample_t(self, n: int, p_mean: float, p_std: float, device=None) -> torch.Tensor:
        """The proposal of sCM §4 (EDM's log-normal): tan(t) = e^tau / sigma_d, tau ~ N(p_mean, p_std^2),
        clamped to the teacher's range of noise levels. Float64: near pi/2, cos(t) needs the digits."""
        tau = p_mean + p_std * batch_split.randn(n, device=device, dtype=torch.float64)
        return torch.atan(tau.exp() / self.sigma_data).clamp(self.t_min, self.t_max)

    # --- predictions in TrigFlow space ------------------------------------------------------------------------
    def x0(self, denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond=None, guidance: float = 1.0):
        """The denoiser's x0 at TrigFlow (x_t, t), through its native time and input scaling."""
        t_native, a, s, k = self.native(t)
        dtype = x_t.dtype
        return denoiser.x0(_b(k, x_t) * x_t, t_native.to(dtype), cond, guidance,
                           alpha_sigma=(a.to(dtype), s.to(dtype))).to(dtype)

    def F_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert f = cos(t) x_t - sin(t) sigma_d F for F."""
        c, s = _b(torch.cos(t), x_t), _b(torch.sin(t), x_t)
        return (c * x_t - x0) / (s * self.sigma_data)

    def F(self, denoiser: Denoiser, x_t, t, cond=None, guidance: float = 1.0) -> torch.Tensor:
        """F(x_t / sigma_d, t) of a denoiser read as a TrigFlow model."""
        return self.F_from_x0(x_t, t, self.x0(denoiser, x_t, t, cond, guidance))

    def velocity(self, teacher: Denoiser, x_t, t, cond=None, guidance: float = 1.0) -> torch.Tensor:
        """The teacher's PF-ODE tangent dx_t/dt = sigma_d F_teacher (CFG applied on its x0)."""
        return self.sigma_data * self.F(teacher, x_t, t, cond, guidance)

    def add_noise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = cos(t) x0 + sin(t) z, with z ~ N(0, sigma_d^2 I)."""
        return _b(torch.cos(t), x0) * x0 + _b(torch.sin(t), x0) * z
