"""Fréchet distance between the Gaussians fitted to two sets of vectors, computed directly (no feature network):
‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½), in float64 through symmetric eigendecompositions."""
from __future__ import annotations

import torch


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def gaussian_frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """`a`, `b`: (N, ...) samples, flattened per sample; at least 2 rows each."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
