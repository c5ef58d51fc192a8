"""Exact-teacher metrics for the Gaussian-mixture benchmarks.

  modes_covered          components holding >= max(1, 0.2 * expected count) of the high-quality samples
  high_quality_fraction  share of samples within 3 std (of the nearest component, in its own std) of a mean
  sliced_w2              sliced Wasserstein-2 to exact mixture samples (random unit directions, sorted 1-D
                         projections: W2 in 1-D is the L2 distance between sorted samples)
  mmd                    unbiased MMD^2 with a sum of RBF kernels at bandwidths {0.5, 1, 2, 4} x the median distance
  log_likelihood         mean log-density of the samples under the clean mixture
"""
from __future__ import annotations

import torch


def _nearest(samples, mixture):
    d = (samples.double()[:, None, :] - mixture.means[None]).norm(dim=-1) / mixture.stds[None]
    dist, idx = d.min(dim=1)
    return dist, idx


def mode_histogram(samples, mixture) -> torch.Tensor:
    """Per-component counts of high-quality samples (within 3 std of that component's mean)."""
    dist, idx = _nearest(samples, mixture)
    return torch.bincount(idx[dist <= 3.0], minlength=mixture.means.shape[0])


def sliced_wasserstein(x, y, num_projections: int = 128, generator: torch.Generator | None = None) -> float:
    n = min(x.shape[0], y.shape[0])
    x, y = x[:n].double(), y[:n].double()
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mmd_rbf(x, y, max_samples: int = 2000) -> float:
    x, y = x[:max_samples].double(), y[:max_samples].double()
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy) ** 2
    med = d2[d2 > 0].median()
    k = sum(torch.exp(-d2 / (2 * (s**2) * med)) for s in (0.5, 1.0, 2.0, 4.0))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def gmm_metrics(samples, mixture, reference=None, num_projections: int = 128, seed: int = 0) -> dict:
    samples = samples.detach().cpu()
    n = samples.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if reference is None:
        reference = mixture.sample(n, generator=gen)
    counts = mode_histogram(samples, mixture)
    expected = mixture.weights * counts.sum()
    covered = int((counts.double() >= torch.clamp(0.2 * expected, min=1.0)).sum())
    dist, _ = _nearest(samples, mixture)
    return {"modes_covered": covered, "num_modes": int(mixture.means.shape[0]),
            "high_quality_fraction": float((dist <= 3.0).double().mean()),
            "sliced_w2": sliced_wasserstein(samples, reference, num_projections, gen),
            "mmd": mmd_rbf(samples, reference),
            "log_likelihood": float(mixture.log_prob(samples).mean()),
            "num_samples": int(n), "num_reference": int(reference.shape[0])}
