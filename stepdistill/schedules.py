"""Noise schedules: x_t = alpha(t) * x0 + sigma(t) * eps, in each teacher's native time t.

Three families cover the teachers we distil (DESIGN §2):
  * ``VPSchedule``   DDPM / Stable Diffusion: discrete t in {0..T-1}, alpha = sqrt(alphas_cumprod[t]).
  * ``EDMSchedule``  Karras et al. (2022): t is sigma itself, alpha = 1.
  * ``FlowSchedule`` rectified flow: t in [0, 1], alpha = 1 - t, sigma = t.

Methods never compute alpha/sigma themselves: they draw noise levels as a *fraction* u in [0, 1] of the
schedule's range (u=0 cleanest, u=1 noisiest) through ``t_from_fraction`` so the same DMD code works for all.
"""
from __future__ import annotations

import inspect
import math

import torch

from . import batch_split


def _bcast(v: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reshape a per-sample vector (N,) to broadcast against a batch (N, ...), in `dtype` (default: like's)."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(dtype or like.dtype)


class NoiseSchedule:
    kind: str = "base"
    discrete: bool = False

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) together: a discrete schedule looks both up with one index."""
        return self.alpha(t), self.sigma(t)

    def t_from_fraction(self, u: torch.Tensor) -> torch.Tensor:
        """Map u in [0, 1] (0 = least noise, 1 = most) to native time."""
        raise NotImplementedError

    def fraction_of(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `t_from_fraction`, elementwise (a discrete schedule's integer t: its grid point)."""
        raise NotImplementedError

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value fed to the backbone network (its embedding's convention)."""
        return t

    @property
    def t_max(self) -> float:
        return float(self.t_from_fraction(torch.ones(1))[0])

    def sample_t(self, n: int, lo: float = 0.0, hi: float = 1.0, device=None) -> torch.Tensor:
        """Noise levels drawn uniformly in fraction-of-range [lo, hi] (DMD uses [0.02, 0.98])."""
        u = lo + (hi - lo) * batch_split.rand(n, device=device)
        return self.t_from_fraction(u)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, x0) * noise

    def ode_timesteps(self, steps: int) -> torch.Tensor:
        """Descending times for a `steps`-step ODE sampler, from the noisiest level towards clean data."""
        return self.t_from_fraction(torch.linspace(1.0, 0.0, steps + 1)[:-1])

    def fraction_at(self, t: float) -> float:
        """The fraction of the range (0 = least noise, 1 = most) at which the schedule reaches time t: the inverse
        of `t_from_fraction`, read off a fine grid. A discrete schedule reaches t on an interval of fractions
        (they are rounded to integer timesteps); its middle is returned."""
        u = torch.linspace(0.0, 1.0, 100001, dtype=torch.float64)
        dist = (self.t_from_fraction(u) - float(t)).abs()
        return float(u[dist <= dist.min() + 1e-9].mean())

    def t_at_noise_ratio(self, ratio: float) -> float:
        """The time whose noise-to-signal ratio sigma/alpha is closest to `ratio`: the same noise level across
        parameterisations. SiD starts its generator at EDM sigma 2.5: t 0.714 for flow, 755 for cosine VP and
        625 for SD's scaled-linear VP (SiD-LSG's t_init). Discrete schedules return one of their integer timesteps."""
        if ratio <= 0:
            raise ValueError(f"noise ratio {ratio} must be > 0")
        t = self.t_from_fraction(torch.linspace(0.0, 1.0, 20001, dtype=torch.float64)).unique()
        log_r = (self.sigma(t).double() / self.alpha(t).double()).log()
        return float(t[(log_r - torch.tensor(float(ratio)).log()).abs().argmin()])

    def final_t(self) -> torch.Tensor:
        """Where a sampler ends: x at this time is treated as clean data."""
        return self.t_from_fraction(torch.zeros(1))[0]

    def to_config(self) -> dict:
        raise NotImplementedError


def betas_for(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The betas of diffusers' DDPMScheduler for the schedules we support (same formulas, float64)."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal (2021) cosine, betas capped at 0.999
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}: use one of linear, scaled_linear, squaredcos_cap_v2 "
        "(or give the betas themselves as trained_betas)"
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """diffusers' `rescale_zero_terminal_snr` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1), step for step, in the betas' dtype (float64 here): sqrt(alphas_cumprod) shifted so
    the last is 0 and scaled so the first is unchanged. The last beta becomes 1, so alphas_cumprod[-1] = 0 exactly:
    alpha(T-1) = 0, sigma(T-1) = 1, pure noise (zero terminal SNR)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _trained_betas(trained_betas, num_train_timesteps: int) -> torch.Tensor:
    """Explicit betas (diffusers' `trained_betas`) as float64, checked: one per training timestep, each in (0, 1],
    and only the last may be 1 (a zero-terminal-SNR schedule written out as betas)."""
    betas = torch.as_tensor(trained_betas, dtype=torch.float64).reshape(-1)
    if betas.numel() != num_train_timesteps:
        raise ValueError(f"trained_betas has {betas.numel()} entries but num_train_timesteps is "
                         f"{num_train_timesteps}: give one beta per training timestep")
    bad = ~(torch.isfinite(betas) & (betas > 0) & (betas <= 1))
    bad[:-1] |= betas[:-1] == 1
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"trained_betas[{i}] = {float(betas[i])}: each beta must lie in (0, 1), the last in (0, 1]")
    return betas


class VPSchedule(NoiseSchedule):
    """Variance-preserving discrete schedule (DDPM). t is an integer index in [0, T-1] stored as float."""

    kind = "vp"
    discrete = True

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                 beta_start: float = 0.0001, beta_end: float = 0.02, trained_betas=None,
                 rescale_betas_zero_snr: bool = False):
        """As diffusers' DDPMScheduler / DDIMScheduler / LCMScheduler build alphas_cumprod: `trained_betas` (T
        floats) replaces the named `beta_schedule` (then ignored, as diffusers does); `rescale_betas_zero_snr`
        rescales the betas to zero terminal SNR (`rescale_zero_terminal_snr`) before the cumulative product."""
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start, self.beta_end = beta_start, beta_end
        if trained_betas is not None:
            betas = _trained_betas(trained_betas, num_train_timesteps)
            self.trained_betas = [float(b) for b in betas]   # plain floats: to_config goes into YAML / JSON
        else:
            betas = betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end)
            self.trained_betas = None
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float64
        # alpha and sigma per timestep (columns of one (T, 2) table), computed in float64 once and looked up per
        # call: the same values as sqrt-then-cast on every call, in one indexing op instead of five per value
        # (a gmm step makes ~30 such lookups, and its small ops are a visible share of it)
        table = torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()], dim=1).float()
        self._tables = {"cpu": table}

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """The integer timestep (a long tensor) of each (float) t: the row of any per-timestep table."""
        return t.detach().round().long().clamp(0, self.num_train_timesteps - 1)

    def table(self, device) -> torch.Tensor:
        """(alpha, sigma) per timestep, shape (T, 2), on `device` (copied once per device)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self._tables["cpu"].to(device)
        return self._tables[key]

    def alpha(self, t):
        return self.table(t.device)[self.index(t), 0]

    def sigma(self, t):
        return self.table(t.device)[self.index(t), 1]

    def alpha_sigma(self, t):
        return self.table(t.device)[self.index(t)].unbind(-1)

    def t_from_fraction(self, u):
        return (u * (self.num_train_timesteps - 1)).round()

    def fraction_of(self, t):
        return t.float() / (self.num_train_timesteps - 1)

    @property
    def zero_terminal_snr(self) -> bool:
        """alphas_cumprod[-1] == 0: at the noisiest timestep alpha = 0 (pure noise), so nothing may divide by it
        there (an epsilon-prediction x0 = (x_t - sigma eps) / alpha cannot be formed)."""
        return bool(self.alphas_cumprod[-1] == 0)

    def to_config(self):
        cfg = dict(kind="vp", num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                   beta_start=self.beta_start, beta_end=self.beta_end)
        if self.trained_betas is not None:   # only where set: the configs of other schedules stay as they were
            cfg["trained_betas"] = list(self.trained_betas)
        if self.rescale_betas_zero_snr:
            cfg["rescale_betas_zero_snr"] = True
        return cfg


class EDMSchedule(NoiseSchedule):
    """Karras et al. (2022): alpha = 1, sigma = t; fractions follow the rho-ramp between sigma_min and sigma_max."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def alpha(self, t):
        return torch.ones_like(t, dtype=torch.float32)

    def sigma(self, t):
        return t.float()

    def t_from_fraction(self, u):
        r = 1.0 / self.rho
        return (self.sigma_min**r + u * (self.sigma_max**r - self.sigma_min**r)) ** self.rho

    def fraction_of(self, t):
        r = 1.0 / self.rho
        return (t.float() ** r - self.sigma_min**r) / (self.sigma_max**r - self.sigma_min**r)

    def net_time(self, t):
        return t.float().log() / 4  # EDM's c_noise

    def to_config(self):
        return dict(kind="edm", sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)


class FlowSchedule(NoiseSchedule):
    """Rectified flow: x_t = (1 - t) x0 + t eps, t in [t_min, 1]."""

    kind = "flow"

    def __init__(self, t_min: float = 1e-3, time_scale: float = 1000.0):
        self.t_min, self.time_scale = t_min, time_scale

    def alpha(self, t):
        return (1.0 - t).float()

    def sigma(self, t):
        return t.float()

    def t_from_fraction(self, u):
        return self.t_min + u * (1.0 - self.t_min)

    def fraction_of(self, t):
        return (t.float() - self.t_min) / (1.0 - self.t_min)

    def net_time(self, t):
        return t.float() * self.time_scale

    def to_config(self):
        return dict(kind="flow", t_min=self.t_min, time_scale=self.time_scale)


SCHEDULES = {"vp": VPSchedule, "edm": EDMSchedule, "flow": FlowSchedule}


def make_schedule(kind: str = "vp", **kwargs) -> NoiseSchedule:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}: use one of {sorted(SCHEDULES)}")
    # another kind's settings left in (`benchmark.schedule={kind: edm}` merges into the VP defaults): one line
    accepted = list(inspect.signature(SCHEDULES[kind]).parameters)
    extra = sorted(set(kwargs) - set(accepted))
    if extra:
        raise ValueError(f"schedule kind {kind!r} has no setting {', '.join(extra)} (its settings: "
                         f"{', '.join(accepted)}): drop them, e.g. '~benchmark.schedule.{extra[0]}'")
    return SCHEDULES[kind](**kwargs)
