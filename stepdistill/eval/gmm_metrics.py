"""Exact-teacher metrics for the Gaussian-mixture benchmarks (DESIGN §6 `gmm`).

The teacher's data distribution is known in closed form, so a student's samples can be scored against the truth:

  modes_covered          components that received at least max(1, 0.2 x expected count) high-quality samples
  high_quality_fraction  share of samples within 3 std of some component mean (distance in that component's std)
  sliced_w2              sliced Wasserstein-2 distance to exact mixture samples (Bonneel et al. 2015)
  mmd                    unbiased MMD^2 with a sum of RBF kernels (Gretton et al. 2012, eq. 3)
  log_likelihood         mean log-density of the samples under the clean mixture
  mode_mass_error        L1 distance between the student's mode masses and the mixture weights
  mode_std_ratio         width of the modes the samples form, in units of the components' std (1 = exact;
                         < 1 = narrower modes, what DMD's mode-seeking reverse KL does)

Every function works in float64 on the CPU (the sample counts here are small) and accepts samples on any device.
"""
from __future__ import annotations

import math

import torch

HQ_RADIUS = 3.0  # "high quality" = within 3 std of a component mean
COVER_FRACTION = 0.2  # a mode is covered once it holds 20% of the high-quality samples it should hold
MMD_SCALES = (0.5, 1.0, 2.0, 4.0)


def _as64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def _nearest(samples: torch.Tensor, mixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the smallest std-normalised distance ||x - mu_k|| / s_k over components, and that k."""
    d = torch.cdist(_as64(samples), mixture.means) / mixture.stds[None]  # (N, K)
    return d.min(dim=1)


def mode_histogram(samples: torch.Tensor, mixture, radius: float = HQ_RADIUS) -> torch.Tensor:
    """Per-component counts (int64, shape (K,)) of the high-quality samples.

    Each sample is assigned to the component k minimising ||x - mu_k|| / s_k and counted only if that distance is
    at most `radius` (3 std). The counts are a partition: they sum to the number of high-quality samples.
    Non-finite samples are never counted.
    """
    dist, idx = _nearest(samples, mixture)
    return torch.bincount(idx[dist <= radius], minlength=mixture.means.shape[0])


def mode_masses(samples: torch.Tensor, mixture) -> torch.Tensor:
    """Share of the finite samples nearest (in std units) to each component, float64 (K,), summing to 1."""
    samples = _as64(samples)
    samples = samples[torch.isfinite(samples).all(dim=1)]
    if samples.shape[0] == 0:
        return torch.full((mixture.means.shape[0],), float("nan"), dtype=torch.float64)
    _, idx = _nearest(samples, mixture)
    return torch.bincount(idx, minlength=mixture.means.shape[0]).double() / samples.shape[0]


def expected_high_quality_counts(mixture, n: int, radius: float = HQ_RADIUS) -> torch.Tensor:
    """Expected per-component high-quality counts for n exact mixture samples: n w_k P(chi^2_D <= radius^2).

    For an isotropic Gaussian in D dims, ||x - mu||^2 / s^2 ~ chi^2_D, whose CDF is the regularised lower
    incomplete gamma P(D/2, r^2/2). (D=2, r=3: 1 - e^{-4.5} = 0.9889.) Neighbouring components are assumed not to
    steal each other's samples, which holds for well-separated mixtures like the benchmarks'.
    """
    return n * mixture.weights * _chi2_cdf(mixture.means.shape[1], radius**2)


def _chi2_cdf(dim: int, x: float) -> float:
    """P(chi^2_dim <= x): the regularised lower incomplete gamma P(dim/2, x/2)."""
    return float(torch.special.gammainc(torch.tensor(dim / 2, dtype=torch.float64),
                                        torch.tensor(x / 2, dtype=torch.float64)))


def _chi2_quantile(dim: int, p: float) -> float:
    """x with P(chi^2_dim <= x) = p, by bisection on `_chi2_cdf` (torch has no inverse)."""
    lo, hi = 0.0, 1.0
    while _chi2_cdf(dim, hi) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if _chi2_cdf(dim, mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mode_std_ratio(samples: torch.Tensor, mixture, radius: float = HQ_RADIUS) -> float:
    """How wide the modes the samples form are, relative to the mixture's: the median std-normalised distance
    ||x - mu_k|| / s_k of the high-quality samples (within `radius` std of their nearest component) divided by the
    same median for exact mixture samples, sqrt(F^-1_{chi^2_D}(F_{chi^2_D}(radius^2) / 2)).

    1 (up to sampling noise) for exact samples. Samples forming isotropic modes of std a s_k read a: within 2%
    for 0.3 <= a <= 1 in 2-D, since the reference median is that of a Gaussian cut at `radius` and a narrower mode
    is hardly cut; wider modes are cut, so a > 1 reads low (1.2 reads ~1.16). It tells a student whose modes are
    too narrow (reverse KL's mode seeking) or too wide from one that gets their shape right, which the sliced W2
    mixes with the mode masses and, at a few thousand samples, with its own estimator noise. The median keeps
    the few samples on the bridges between modes from moving it. nan if no sample is within `radius` of a mode."""
    dist, _ = _nearest(samples, mixture)
    inside = dist[dist <= radius]   # nan distances (non-finite samples) fail the test and drop out
    if inside.numel() == 0:
        return float("nan")
    d = mixture.means.shape[1]
    return float(inside.median()) / _chi2_quantile(d, _chi2_cdf(d, radius**2) / 2) ** 0.5


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 128,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance SW2(x, y) = (E_theta W2^2(theta.x, theta.y))^{1/2}.

    theta runs over `num_projections` random unit directions (normalised Gaussian draws from `generator`). In 1-D,
    W2 between two equal-size empirical measures is the root-mean-square difference of the sorted samples, so each
    projection costs one sort. If the sets differ in size, a random subset (without replacement) of the larger
    one is used so both have min(len(x), len(y)) points. Returns nan if either set has a non-finite value.
    """
    x, y = _as64(x), _as64(y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein needs (N, D) and (M, D) tensors, got {tuple(x.shape)}, {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("nan")
    n = min(x.shape[0], y.shape[0])
    if x.shape[0] > n:
        x = x[torch.randperm(x.shape[0], generator=generator)[:n]]
    if y.shape[0] > n:
        y = y[torch.randperm(y.shape[0], generator=generator)[:n]]
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = torch.sort(x @ dirs, dim=0).values  # (n, P): sorted 1-D projections
    py = torch.sort(y @ dirs, dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


def _squarings(ratio: float) -> int | None:
    """k where `ratio` == 2**k for an integer k >= 1 (to 1e-9), else None."""
    k = round(math.log2(ratio)) if ratio > 1 else 0
    return k if k >= 1 and abs(ratio / 2.0 ** k - 1) < 1e-9 else None


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, inv_two_bw2: torch.Tensor, block: int = 256) -> torch.Tensor:
    """sum_{i,j} sum_s exp(-||a_i - b_j||^2 / (2 bw_s^2)), in row blocks so memory stays O(block x len(b)).

    Scales a power of two apart (the default {0.5, 1, 2, 4}: each coefficient 4x the next) take one exp per
    entry: exp(-4c d2) = exp(-c d2)^4 is two in-place squarings, a third of an exp's time. The squarings' relative
    rounding grows with the power (64x eps at the default's widest gap), far below the metric's sampling noise.
    Blocks of 256 rows keep the 8 MB block of a 4000-point kernel in the cache."""
    cs = sorted(inv_two_bw2.tolist())
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, a.shape[0], block):
        d2 = torch.cdist(a[i:i + block], b).square_()
        e = torch.empty_like(d2)
        for k, c in enumerate(cs):
            n = _squarings(c / cs[k - 1]) if k else None
            if n is None:
                torch.mul(d2, -c, out=e).exp_()
            else:
                for _ in range(n):
                    e.square_()
            total += e.sum()
    return total


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, scales=MMD_SCALES, bandwidth: float | None = None) -> float:
    """Unbiased estimate of MMD^2 between the distributions of x (N, D) and y (M, D).

    Kernel: k(a, b) = sum_s exp(-||a - b||^2 / (2 (s * h)^2)) over s in `scales` (default {0.5, 1, 2, 4}); h is
    `bandwidth` if given, else the median heuristic: the median pairwise distance of the pooled samples (estimated
    on at most 1000 evenly spaced pooled points, so it is deterministic and cheap). The estimator (Gretton et al.
    2012, eq. 3) drops the i == j terms, so it is 0 in expectation for equal distributions and can be slightly
    negative. Cost O((N + M)^2) time, O(N + M) memory per 1024-row block. nan on non-finite input.
    """
    x, y = _as64(x), _as64(y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 samples on each side")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("nan")
    if bandwidth is None:
        pooled = torch.cat([x, y])
        pooled = pooled[torch.linspace(0, pooled.shape[0] - 1, min(1000, pooled.shape[0])).long()]
        d = torch.pdist(pooled)
        bandwidth = float(d[d > 0].median()) if (d > 0).any() else 1.0  # all-identical points: any h works
    inv_two_bw2 = 1.0 / (2.0 * (torch.tensor(scales, dtype=torch.float64) * bandwidth) ** 2)
    n_kernels = len(scales)
    # The diagonal of k(x, x) is exactly n_kernels per point (exp(0) for each scale): subtract it.
    kxx = (_kernel_sum(x, x, inv_two_bw2) - n * n_kernels) / (n * (n - 1))
    kyy = (_kernel_sum(y, y, inv_two_bw2) - m * n_kernels) / (m * (m - 1))
    kxy = _kernel_sum(x, y, inv_two_bw2) / (n * m)
    return float(kxx + kyy - 2 * kxy)


def gmm_metrics(samples: torch.Tensor, mixture, reference: torch.Tensor | None = None, num_projections: int = 128,
                seed: int = 0) -> dict:
    """Score samples (N, D) against a `stepdistill.networks.gmm.GaussianMixture`. Returns a flat dict:

    - ``modes_covered``: number of components k whose high-quality count (see `mode_histogram`: samples assigned to
      their std-nearest component, at most 3 of its stds from its mean) is at least
      ``max(1, 0.2 * E_k)``, where ``E_k = N w_k P(chi^2_D <= 9)`` is the count exact mixture samples would give
      (`expected_high_quality_counts`). So a mode holding a fifth of its due mass counts; a stray sample does not.
    - ``num_modes``: K.
    - ``high_quality_fraction``: share of all N samples within 3 std of some component mean, distance measured in
      that component's std (exact samples in 2-D: 0.989; this is a low-dimensional notion, since in D dims exact
      samples give P(chi^2_D <= 9)).
    - ``sliced_w2``: `sliced_wasserstein` to ``reference`` with ``num_projections`` directions. Default reference:
      N exact mixture samples drawn with ``torch.Generator().manual_seed(seed)``; uses min(N, len(reference))
      points per side.
    - ``mmd``: `mmd_rbf` (unbiased MMD^2, RBF kernels at {0.5, 1, 2, 4} x median pooled distance) to the reference.
    - ``log_likelihood``: mean of ``mixture.log_prob`` over the samples (nats).
    - ``mode_mass_error``: sum_k |m_k - w_k| (in [0, 2]), m_k the share of samples nearest (in std units) to
      component k (`mode_masses`; every finite sample counts, on a mode or between modes), w_k its weight.
      It is what separates a student that drops the light modes of an unbalanced mixture from one that does not.
    - ``mode_std_ratio``: `mode_std_ratio`, the width of the sampled modes over the components' (1 = exact).
    - ``num_samples`` (N), ``num_reference``, ``num_nonfinite`` (samples with a nan/inf coordinate: they count as
      not high-quality and make sliced_w2, mmd and log_likelihood nan).
    """
    samples = _as64(samples)
    if samples.dim() != 2 or samples.shape[1] != mixture.means.shape[1]:
        raise ValueError(f"samples must be (N, {mixture.means.shape[1]}), got {tuple(samples.shape)}")
    n = samples.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    if reference is None:
        reference = mixture.sample(n, generator=gen)
    reference = _as64(reference)

    counts = mode_histogram(samples, mixture)
    threshold = (COVER_FRACTION * expected_high_quality_counts(mixture, n)).clamp(min=1.0)
    dist, _ = _nearest(samples, mixture)
    finite = torch.isfinite(samples).all(dim=1)
    return {
        "modes_covered": int((counts.double() >= threshold).sum()),
        "num_modes": int(mixture.means.shape[0]),
        "high_quality_fraction": float((dist <= HQ_RADIUS).double().mean()) if n else float("nan"),
        "sliced_w2": sliced_wasserstein(samples, reference, num_projections, gen),
        "mmd": mmd_rbf(samples, reference),
        "log_likelihood": float(mixture.log_prob(samples).mean()) if bool(finite.all()) else float("nan"),
        "mode_mass_error": float((mode_masses(samples, mixture) - mixture.weights).abs().sum()),
        "mode_std_ratio": mode_std_ratio(samples, mixture),
        "num_samples": int(n),
        "num_reference": int(reference.shape[0]),
        "num_nonfinite": int((~finite).sum()),
    }


__all__ = ["gmm_metrics", "mode_histogram", "mode_masses", "mode_std_ratio", "expected_high_quality_counts",
           "sliced_wasserstein", "mmd_rbf"]
