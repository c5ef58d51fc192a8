"""Improved precision and recall (Kynkäänniemi et al. 2019) against closed forms and a brute-force count; the FD's
bootstrap spread against the spread over independent sample sets."""
import math

import pytest
import torch

from stepdistill.eval.precision_recall import knn_radii, precision_recall


def _brute(real, fake, k):
    """Loop-by-loop: the k-th smallest distance to the *other* points of the same set, then ball membership."""
    def radius(points, i):
        return sorted(math.dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    def share_inside(manifold, queries):
        r = [radius(manifold, i) for i in range(len(manifold))]
        return sum(any(math.dist(q, m) <= r[i] for i, m in enumerate(manifold)) for q in queries) / len(queries)
    real, fake = real.tolist(), fake.tolist()
    return share_inside(real, fake), share_inside(fake, real)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_a_brute_force_count(k):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(40, 3, generator=g)
    fake = 0.7 * torch.randn(25, 3, generator=g) + torch.tensor([2.0, 0.0, 0.0])
    out = precision_recall(real, fake, k=k)
    precision, recall = _brute(real, fake, k)
    assert out["precision"] == pytest.approx(precision) and out["recall"] == pytest.approx(recall)
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1   # a case that tells the two apart
    assert (out["num_real"], out["num_fake"], out["k"]) == (40, 25, k)


def test_closed_form_on_a_line():
    """Reals at 0, 1, ..., 9 with k = 1: every real ball has radius 1, so the real manifold is [-1, 10].
    Fakes at 0.5 and 20 (their own k = 1 radius: 19.5): precision 1/2, and the fake balls hold every real."""
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[0.5], [20.0]])
    assert knn_radii(real, 1).tolist() == [1.0] * 10
    out = precision_recall(real, fake, k=1)
    assert out["precision"] == 0.5 and out["recall"] == 1.0


def test_identical_sets_and_a_collapse():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g)
    same = precision_recall(real, real.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    # samples collapsed into one small region of the data: all look real, little of the data is covered
    collapsed = precision_recall(real, 0.05 * torch.randn(300, 4, generator=g))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.2


def test_bad_inputs():
    assert math.isnan(precision_recall(torch.randn(10, 2), torch.full((10, 2), float("nan")))["precision"])
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match="differ in width"):
        precision_recall(torch.randn(10, 2), torch.randn(10, 3))


def test_digits_evaluation_reports_them_with_their_counts():
    from conftest import digits_cfg
    from stepdistill.benchmarks.registry import build_benchmark
    bm = build_benchmark(digits_cfg().benchmark)
    real = bm.images[:200]
    out = bm.evaluate(real, bm.labels[:200])
    assert (out["pr_k"], out["pr_num_real"], out["pr_num_samples"]) == (3, bm.images.shape[0], 200)
    assert out["precision"] == 1.0 and 0 < out["recall"] < 1   # real digits lie on the manifold; 200 miss some
    # the features behind them are the FD's: the direct float64 FD of them is torchmetrics' FD
    from stepdistill.eval.frechet import gaussian_frechet_distance
    direct = gaussian_frechet_distance(bm.real_features, bm.features(bm.to_output(real)))
    assert direct == pytest.approx(out["fd"], rel=1e-6)
    assert out["fd_bootstrap_resamples"] == 50 and 0 < out["fd_bootstrap_std"] < out["fd"]


def test_fd_bootstrap_spread_matches_the_spread_over_independent_sample_sets():
    """Gaussian features (real N(0, I), generated N(0.1, 1.44 I), 8-D): the FD over 200 independent generated
    sets of 1000 has some spread; the bootstrap spread of single sets, averaged over 10 of them, matches it (0.99x
    when written; the band allows for both estimates' noise)."""
    from stepdistill.eval.frechet import bootstrap_std, gaussian_frechet_distance
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 8, generator=g, dtype=torch.float64)

    def generated():
        return 0.1 + 1.2 * torch.randn(1000, 8, generator=g, dtype=torch.float64)
    spread = torch.tensor([gaussian_frechet_distance(real, generated()) for _ in range(200)]).std().item()
    boot = sum(bootstrap_std(real, generated(), resamples=50, seed=i) for i in range(10)) / 10
    assert 0.8 < boot / spread < 1.25
    fake = generated()
    assert bootstrap_std(real, fake, seed=3) == bootstrap_std(real, fake, seed=3)   # seeded
    assert math.isnan(bootstrap_std(real, torch.full_like(fake, float("nan"))))
    with pytest.raises(ValueError, match="at least 2 resamples"):
        bootstrap_std(real, fake, resamples=1)
