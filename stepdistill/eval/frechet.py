"""Fréchet distance between the Gaussians fitted to two sets of vectors, computed directly (no feature network):
‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½), in float64 through symmetric eigendecompositions (or, where the
dimension exceeds the sample counts, the singular values of the samples' cross product); and its bootstrap spread
over the generated set."""
from __future__ import annotations

import torch


def nonfinite_rows(samples: torch.Tensor) -> int:
    """How many samples (rows of an N x ... tensor) hold a nan or inf: a diverged student's, which no Fréchet
    distance can take (the covariance's eigh fails on them)."""
    return int((~torch.isfinite(samples.reshape(samples.shape[0], -1))).any(1).sum())


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def gaussian_frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """`a`, `b`: (N, ...) samples, flattened per sample; at least 2 rows each."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    if a.shape[1] > max(a.shape[0], b.shape[0]):
        return _frechet_in_sample_space(a - mu_a, b - mu_b, float((mu_a - mu_b).square().sum()))
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def _frechet_in_sample_space(a: torch.Tensor, b: torch.Tensor, mean_term: float) -> float:
    """The same distance from the centred samples when the dimension D exceeds the sample counts (latents at SD's
    sizes: D = 16384 at 512 px, where two D x D covariances and their eigendecompositions would take ~52 minutes).
    With A = a / sqrt(na - 1) and B = b / sqrt(nb - 1), Σa = AᵀA and Σb = BᵀB, so tr Σa = ‖A‖²_F, and the nonzero
    eigenvalues of ΣaΣb are those of (ABᵀ)(ABᵀ)ᵀ: tr (ΣaΣb)^½ is the sum of the singular values of the na x nb
    matrix ABᵀ. Exact, not an approximation."""
    a, b = a / (a.shape[0] - 1) ** 0.5, b / (b.shape[0] - 1) ** 0.5
    cross = torch.linalg.svdvals(a @ b.T).sum()
    return float(mean_term + a.square().sum() + b.square().sum() - 2 * cross)


def bootstrap_std(real: torch.Tensor, fake: torch.Tensor, resamples: int = 50, seed: int = 0) -> float:
    """Standard deviation of the Fréchet distance over `resamples` bootstrap resamples of the generated set (the
    real set held fixed): how far the distance would move with another set of generated samples of the same
    size. NaN if any feature is."""
    real, fake = real.reshape(real.shape[0], -1).double(), fake.reshape(fake.shape[0], -1).double()
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        return float("nan")
    if resamples < 2:
        raise ValueError(f"a bootstrap spread needs at least 2 resamples, got {resamples}")
    g = torch.Generator().manual_seed(int(seed))
    n = fake.shape[0]
    values = [gaussian_frechet_distance(real, fake[torch.randint(0, n, (n,), generator=g)]) for _ in range(resamples)]
    return float(torch.tensor(values, dtype=torch.float64).std())
