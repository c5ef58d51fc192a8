"""The analytic Gaussian-mixture teacher: the exact posterior mean E[x0 | x_t] of a noised isotropic mixture.

For p0 = sum_k w_k N(mu_k, s_k^2 I) and x_t = a x0 + s eps, each component stays Gaussian:
  x_t | k ~ N(a mu_k, v_k I),  v_k = a^2 s_k^2 + s^2,
  E[x0 | x_t, k] = mu_k + (a s_k^2 / v_k) (x_t - a mu_k),
and the responsibilities r_k(x_t) are the softmax of log w_k + log N(x_t; a mu_k, v_k I). Summing gives the exact
x0 (hence exact score) under any schedule: the ground truth every method is tested against.
"""
from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ..schedules import NoiseSchedule


def circle_means(n_modes: int = 8, radius: float = 4.0) -> list[list[float]]:
    ang = [2 * math.pi * k / n_modes for k in range(n_modes)]
    return [[radius * math.cos(a), radius * math.sin(a)] for a in ang]


class GaussianMixture:
    """Means (K, D), per-component isotropic stds (K,), weights (K,) normalised to sum to 1."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (w <= 0).any():
            raise ValueError("GMM weights must all be positive")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.stds[k, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (x.float(), k) if return_labels else x.float()

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means, stds, weights) on `device`, copied once per device: the teacher may train on a GPU while the
        benchmark samples and evaluates on the CPU with the same mixture."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.means, self.stds, self.weights
        cache = self.__dict__.setdefault("_device_copies", {})
        if device not in cache:
            cache[device] = (self.means.to(device), self.stds.to(device), self.weights.to(device))
        return cache[device]

    def component_log_probs(self, x: torch.Tensor, a=1.0, s=0.0) -> torch.Tensor:
        """log w_k + log N(x; a mu_k, (a^2 s_k^2 + s^2) I), shape (N, K), float64."""
        x = x.double()
        means, stds, weights = self.on(x.device)
        a = torch.as_tensor(a, dtype=torch.float64, device=x.device).reshape(-1, 1)
        s = torch.as_tensor(s, dtype=torch.float64, device=x.device).reshape(-1, 1)
        var = a**2 * stds[None] ** 2 + s**2  # (N or 1, K)
        d2 = ((x[:, None, :] - a[..., None] * means[None]) ** 2).sum(-1)  # (N, K)
        return weights.log()[None] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, x: torch.Tensor, a=1.0, s=0.0) -> torch.Tensor:
        return torch.logsumexp(self.component_log_probs(x, a, s), dim=1)

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Exact E[x0 | x_t] for per-sample a, s of shape (N,)."""
        x = x_t.double()
        a64, s64 = a.double().reshape(-1, 1), s.double().reshape(-1, 1)
        means, stds, _ = self.on(x.device)
        r = torch.softmax(self.component_log_probs(x, a64, s64), dim=1)  # (N, K)
        var = a64**2 * stds[None] ** 2 + s64**2  # (N, K)
        gain = a64 * stds[None] ** 2 / var  # (N, K)
        resid = x[:, None, :] - a64[..., None] * means[None]  # (N, K, D)
        x0_k = means[None] + gain[..., None] * resid
        return (r[..., None] * x0_k).sum(1).to(x_t.dtype)

    def to_config(self) -> dict:
        return dict(means=self.means.tolist(), stds=self.stds.tolist(), weights=self.weights.tolist())


class GMMDenoiser(Denoiser):
    """Exact-score teacher. Unconditional: guidance must stay 1."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device

    def _x0_single(self, x_t, t, cond, alpha_sigma=None):
        a, s = alpha_sigma if alpha_sigma is not None else self.schedule.alpha_sigma(t)
        return self.mixture.posterior_mean(x_t, a, s)
