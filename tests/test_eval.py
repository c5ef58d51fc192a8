"""Evaluation package: exact GMM metrics, Fréchet distances (custom net + Inception wiring), figures."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stepdistill.eval import (build_fid_metric, frechet_distance, gmm_metrics, inception_fid, mmd_rbf,
                              mode_histogram, save_gmm_scatter, save_image_grid, sliced_wasserstein)
from stepdistill.eval.gmm_metrics import _chi2_quantile, expected_high_quality_counts, mode_masses, mode_std_ratio
from stepdistill.networks.gmm import GaussianMixture, circle_means

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture(circle_means(8, 4.0), 0.25)  # the default `gmm` benchmark


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- GMM metrics

def test_exact_samples_score_well(mix):
    x = mix.sample(2000, generator=gen(1))
    m = gmm_metrics(x, mix, seed=0)
    assert m["modes_covered"] == m["num_modes"] == 8
    # in 2-D, P(within 3 std) = 1 - exp(-4.5) = 0.9889; binomial sd at N=2000 is 0.0023
    assert m["high_quality_fraction"] > 0.98
    assert m["sliced_w2"] < 0.4 and abs(m["mmd"]) < 0.01
    # well-separated equal-weight mixture: E log p = -log K - (1 + log(2 pi s^2)) (2-D Gaussian entropy)
    assert m["log_likelihood"] == pytest.approx(-math.log(8) - 1 - math.log(2 * math.pi * 0.25**2), abs=0.1)
    assert (m["num_samples"], m["num_reference"], m["num_nonfinite"]) == (2000, 2000, 0)
    assert gmm_metrics(x, mix, seed=0) == m  # deterministic given the seed


def test_collapsed_samples(mix):
    x = mix.sample(2000, generator=gen(1))
    collapsed = mix.means[0].float() + 0.25 * torch.randn(2000, 2, generator=gen(2))
    good, bad = gmm_metrics(x, mix), gmm_metrics(collapsed, mix)
    assert bad["modes_covered"] == 1
    assert bad["high_quality_fraction"] > 0.97  # sharp, just all in one place
    assert bad["sliced_w2"] > 10 * good["sliced_w2"]
    assert bad["mmd"] > 0.5 and bad["mmd"] > 100 * abs(good["mmd"])
    hist = mode_histogram(collapsed, mix)
    assert hist[0] == hist.sum() and hist.sum() > 0.97 * 2000


def test_coverage_rule_and_high_quality_count(mix):
    # 7 modes x 112 points exactly at the mean, 15 in mode 7, 9 far-off points at the origin (16 std from every
    # mean). N = 808: mode 7 is due 0.2 * 808/8 * 0.9889 = 19.98 > 15 high-quality samples -> not covered.
    means = mix.means.float()
    x = torch.cat([means[:7].repeat_interleave(112, 0), means[7:].repeat(15, 1), torch.zeros(9, 2)])
    assert x.shape[0] == 808
    hist = mode_histogram(x, mix)
    assert hist.tolist() == [112] * 7 + [15]
    m = gmm_metrics(x, mix)
    assert m["modes_covered"] == 7
    assert m["high_quality_fraction"] == pytest.approx(799 / 808)
    assert float(expected_high_quality_counts(mix, 808)[7]) == pytest.approx(101 * (1 - math.exp(-4.5)))
    x2 = torch.cat([x, means[7:].repeat(6, 1)])  # 21 in mode 7, N = 814: due 0.2 * 814/8 * 0.9889 = 20.12
    assert gmm_metrics(x2, mix)["modes_covered"] == 8


def test_mode_mass_error(mix):
    # collapsed onto mode 0: masses (1, 0, ..., 0) vs 1/8 each -> |1 - 1/8| + 7/8 = 1.75
    collapsed = mix.means[0].float() + 0.25 * torch.randn(500, 2, generator=gen(2))
    assert gmm_metrics(collapsed, mix)["mode_mass_error"] == pytest.approx(1.75)
    # the coverage example: 7 x 112 + 15 at the means, and 9 at the origin, which is equidistant from every mean
    # (ties go to the first component): masses (121, 112 x 6, 15) / 808
    means = mix.means.float()
    x = torch.cat([means[:7].repeat_interleave(112, 0), means[7:].repeat(15, 1), torch.zeros(9, 2)])
    masses = torch.tensor([121] + [112] * 6 + [15], dtype=torch.float64) / 808
    assert mode_masses(x, mix).tolist() == pytest.approx(masses.tolist())
    assert gmm_metrics(x, mix)["mode_mass_error"] == pytest.approx(float((masses - 1 / 8).abs().sum()))
    # unbalanced weights: exact samples of the unbalanced mixture score near 0, equal-weight samples do not
    unbalanced = GaussianMixture(mix.means, mix.stds, weights=list(range(1, 9)))
    exact = gmm_metrics(unbalanced.sample(4000, generator=gen(4)), unbalanced)["mode_mass_error"]
    equal = gmm_metrics(mix.sample(4000, generator=gen(4)), unbalanced)["mode_mass_error"]
    # equal masses vs w_k = k/36: sum |1/8 - k/36| = 4/9; binomial noise at N=4000 is ~0.04
    assert exact < 0.06 and equal == pytest.approx(4 / 9, abs=0.06)


def test_chi2_quantile():
    for p in (0.1, 0.5, 0.9):   # D = 2: chi^2_2 is exponential with mean 2, F^-1(p) = -2 log(1 - p)
        assert _chi2_quantile(2, p) == pytest.approx(-2 * math.log(1 - p), rel=1e-9)
    assert _chi2_quantile(4, 0.9) == pytest.approx(7.779440, rel=1e-6)   # table value
    assert _chi2_quantile(1, 0.95) == pytest.approx(1.959964**2, rel=1e-6)


def test_mode_std_ratio(mix):
    n = 8000
    assert mode_std_ratio(mix.sample(n, generator=gen(6)), mix) == pytest.approx(1.0, abs=0.03)
    k = torch.randint(0, 8, (n,), generator=gen(7))
    eps = torch.randn(n, 2, generator=gen(8), dtype=torch.float64)
    for a in (0.4, 0.7):   # isotropic modes of std a * 0.25 read a
        assert mode_std_ratio(mix.means[k] + a * 0.25 * eps, mix) == pytest.approx(a, rel=0.03)
    # samples further than 3 std from every mean (the bridges between modes, strays) do not count
    narrow = mix.means[k] + 0.7 * 0.25 * eps
    strays = torch.cat([torch.zeros(n // 10, 2, dtype=torch.float64), 0.5 * (mix.means[0] + mix.means[1]).repeat(n // 10, 1)])
    assert mode_std_ratio(torch.cat([narrow, strays]), mix) == mode_std_ratio(narrow, mix)
    assert math.isnan(mode_std_ratio(torch.zeros(5, 2), mix))


def test_nonfinite_samples_do_not_crash(mix):
    x = mix.sample(200, generator=gen(3))
    x[:5] = float("nan")
    m = gmm_metrics(x, mix)
    assert m["num_nonfinite"] == 5
    assert m["high_quality_fraction"] <= 195 / 200
    assert math.isnan(m["sliced_w2"]) and math.isnan(m["mmd"]) and math.isnan(m["log_likelihood"])


def test_sliced_w2_exact_in_1d():
    # D = 1: the only unit directions are +-1, so SW2 is the 1-D W2: RMS difference of the sorted samples.
    x = torch.randn(300, 1, generator=gen(4), dtype=torch.float64)
    y = 0.5 * torch.randn(300, 1, generator=gen(5), dtype=torch.float64) + 2
    expected = (x.flatten().sort().values - y.flatten().sort().values).square().mean().sqrt()
    assert sliced_wasserstein(x, y, 16, gen(0)) == pytest.approx(float(expected), rel=1e-12)
    # a translation by c moves every sorted sample by c: W2 = |c|
    assert sliced_wasserstein(x, x - 1.7, 8, gen(0)) == pytest.approx(1.7, rel=1e-12)


def test_sliced_w2_of_a_shift_matches_analytic():
    # Projected on theta, x + d is x shifted by <d, theta>, so W2^2(theta) = <d, theta>^2 exactly and
    # SW2^2 = E <d, theta>^2 = |d|^2 / D for theta uniform on the sphere. 4096 directions: ~0.6% Monte Carlo error.
    x = torch.randn(200, 2, generator=gen(6), dtype=torch.float64)
    d = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert sliced_wasserstein(x, x + d, 4096, gen(0)) == pytest.approx(5 / math.sqrt(2), rel=0.03)


def test_sliced_w2_unequal_sizes_subsamples():
    x = torch.randn(300, 2, generator=gen(7))
    y = torch.randn(500, 2, generator=gen(8)) + torch.tensor([6.0, 0.0])
    a = sliced_wasserstein(x, y, 256, gen(0))
    assert a == sliced_wasserstein(x, y, 256, gen(0))  # reproducible with the generator
    assert a == pytest.approx(6 / math.sqrt(2), rel=0.1)  # dominated by the shift
    with pytest.raises(ValueError):
        sliced_wasserstein(x, torch.randn(10, 3))


def test_mmd_matches_naive_formula():
    x = torch.randn(40, 2, generator=gen(9), dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen(10), dtype=torch.float64) + 0.7
    scales, h = (0.5, 1.0, 2.0, 4.0), 1.3

    def k(a, b):
        return sum(math.exp(-float((a - b).square().sum()) / (2 * (s * h) ** 2)) for s in scales)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert mmd_rbf(x, y, bandwidth=h) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)
    # median heuristic: same distribution ~ 0, shifted clearly positive
    same = mmd_rbf(torch.randn(500, 2, generator=gen(11)), torch.randn(500, 2, generator=gen(12)))
    far = mmd_rbf(torch.randn(500, 2, generator=gen(11)), torch.randn(500, 2, generator=gen(12)) + 2)
    assert abs(same) < 0.01 and far > 0.3


def test_mmd_kernel_sum_in_row_blocks_is_the_whole_sum():
    """Blocks of 7 rows over 40 (the last one shorter) give the sum over the whole kernel matrix."""
    from stepdistill.eval.gmm_metrics import _kernel_sum
    a = torch.randn(40, 2, generator=gen(13), dtype=torch.float64)
    b = torch.randn(30, 2, generator=gen(14), dtype=torch.float64)
    inv = torch.tensor([0.3, 1.1], dtype=torch.float64)
    d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    whole = sum(torch.exp(-c * d2).sum() for c in inv.tolist())
    assert float(_kernel_sum(a, b, inv, block=7)) == pytest.approx(float(whole), rel=1e-12)


def test_mmd_kernel_sum_by_squaring_matches_an_exp_per_scale():
    """Scales a power of two apart are summed by squaring one exp (the default {0.5, 1, 2, 4} from one, widest
    first); other ratios, and equal coefficients, take their own exp: every mix gives the plain sum."""
    from stepdistill.eval.gmm_metrics import _kernel_sum, _squarings
    assert [_squarings(r) for r in (2.0, 4.0, 64.0 * (1 + 1e-12), 3.0, 1.0, 0.5)] == [1, 2, 6, None, None, None]
    a = torch.randn(300, 2, generator=gen(15), dtype=torch.float64)
    b = torch.randn(200, 2, generator=gen(16), dtype=torch.float64) * 2
    d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    for cs in ([1 / (2 * (s * 1.3) ** 2) for s in (0.5, 1.0, 2.0, 4.0)], [0.3, 0.6, 1.7, 1.7, 6.8, 27.2]):
        whole = sum(torch.exp(-c * d2).sum() for c in cs)
        got = _kernel_sum(a, b, torch.tensor(cs, dtype=torch.float64), block=64)
        assert float(got) == pytest.approx(float(whole), rel=1e-13)


# ---------------------------------------------------------------- Fréchet distance

class TinyConvFeatures(nn.Module):
    """A random conv feature net standing in for the digits feature network."""

    num_features = 12

    def __init__(self, channels=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 3, 3, stride=2),
                                  nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.body(x)


def sqrtm_psd(a):
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def closed_form_fd(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}); Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)  # unbiased (N - 1), as torchmetrics
    r = sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r @ s2 @ r).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def digit_like(n, seed, shift=0.0):
    return (torch.rand(n, 1, 8, 8, generator=gen(seed)) * (1 - shift) + shift).clamp(0, 1)


def test_frechet_distance_matches_closed_form():
    net = TinyConvFeatures()
    real, fake = digit_like(64, 1), digit_like(48, 2, shift=0.3)
    out = frechet_distance(real, fake, net, batch_size=20)  # several batches per side
    with torch.no_grad():
        expected = closed_form_fd(net.body(real).double(), net.body(fake).double())
    assert out["num_real"] == 64 and out["num_fake"] == 48
    assert expected > 1e-3
    assert out["fd"] == pytest.approx(expected, rel=1e-6, abs=1e-10)
    # the net saw the [0, 1] floats exactly as given, and was not converted or left in eval mode
    seen = torch.cat(net.seen)
    assert torch.equal(seen, torch.cat([real[:20], real[20:40], real[40:], fake[:20], fake[20:40], fake[40:]]))
    assert net.training and all(p.dtype == torch.float32 for p in net.parameters())
    same = frechet_distance(real, real.clone(), net)["fd"]
    assert abs(same) < 1e-6


def test_frechet_distance_input_checks():
    net = TinyConvFeatures()
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(digit_like(1, 1), digit_like(5, 2), net)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        frechet_distance(digit_like(4, 1) * 2 - 1, digit_like(4, 2), net)
    with pytest.raises(ValueError, match="num_features"):
        frechet_distance(digit_like(4, 1), digit_like(4, 2), nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="float N x C x H x W"):
        frechet_distance(digit_like(4, 1)[:, 0], digit_like(4, 2), net)        # no channel axis
    with pytest.raises(ValueError, match="float N x C x H x W"):
        frechet_distance((digit_like(4, 1) * 255).byte(), digit_like(4, 2), net)

    class WrongWidth(nn.Module):   # says 16 features, returns 8
        num_features = 16

        def forward(self, x):
            return x.flatten(1)[:, :8]
    with pytest.raises(ValueError, match=r"returned shape \(4, 8\), expected \(N, 16\)"):
        frechet_distance(digit_like(4, 1), digit_like(4, 2), WrongWidth())
    fake = digit_like(4, 2)
    fake[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        assert math.isnan(frechet_distance(digit_like(4, 1), fake, net)["fd"])


class StandInInception(nn.Module):
    """Replaces torchmetrics' NoTrainInceptionV3 (torch-fidelity's InceptionV3): same constructor, uint8 in."""

    calls = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None, antialias=True):
        super().__init__()
        StandInInception.calls.append(dict(name=name, features_list=features_list,
                                           path=feature_extractor_weights_path, antialias=antialias))
        self.proj = nn.Linear(3 * 4 * 4, int(features_list[0]))
        with torch.no_grad():  # fixed weights without touching the global RNG
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen(0)) / 4)
            self.proj.bias.zero_()
        self.inputs = []

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3  # what torch-fidelity's extractor insists on
        self.inputs.append(x.clone())
        dt = getattr(self, "_dtype", torch.float32)  # set by FrechetInceptionDistance.set_dtype
        pooled = nn.functional.adaptive_avg_pool2d(x.to(dt), 4).flatten(1) / 255
        return torch.tanh(self.proj.to(dt)(pooled))


def test_inception_fid_wiring_with_stand_in(monkeypatch, tmp_path):
    import torchmetrics.image.fid as tm_fid

    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", StandInInception)
    StandInInception.calls.clear()
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in")
    real, fake = digit_like(24, 3), digit_like(20, 4, shift=0.4)  # 1-channel 8x8: repeated to RGB

    out = inception_fid(real, fake, str(weights), batch_size=10, inception_feature=64)
    # antialias=False: torch-fidelity's TF1-style resize, the standard FID's (torchmetrics' default anti-aliases)
    assert StandInInception.calls == [dict(name="inception-v3-compat", features_list=["64"], path=str(weights),
                                           antialias=False)]
    metric_net = build_fid_metric(inception_weights=weights, inception_feature=64).inception
    assert isinstance(metric_net, StandInInception) and metric_net._dtype == torch.float64

    # independent recomputation: torchmetrics' normalize=True quantisation, 3 channels, the stand-in's features
    def features(x):
        u8 = (x.expand(-1, 3, -1, -1) * 255).byte()
        return metric_net(u8).double()

    with torch.no_grad():
        expected = closed_form_fd(features(real), features(fake))
    assert out["num_real"] == 24 and out["num_fake"] == 20
    assert out["fd"] == pytest.approx(expected, rel=1e-6)


def test_inception_reference_features_are_computed_once(monkeypatch, tmp_path):
    """Every evaluation ran the fixed reference images (the digits, a run's decoded real latents) through Inception
    again; InceptionReference keeps their features and gives inception_fid's numbers."""
    import torchmetrics.image.fid as tm_fid

    from stepdistill.eval.fid import InceptionReference
    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", StandInInception)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in")
    real = digit_like(24, 3)
    made = []
    ref = InceptionReference(weights, lambda: made.append(1) or real, batch_size=10, inception_feature=64)
    fakes = [digit_like(20, 4, shift=0.4), digit_like(16, 5, shift=-0.2)]
    got = [ref(f) for f in fakes]
    assert made == [1] and sum(x.shape[0] for x in ref.metric.inception.inputs) == 24 + 20 + 16
    for g, f in zip(got, fakes):
        fresh = inception_fid(real, f, str(weights), batch_size=10, inception_feature=64)
        assert g == pytest.approx(fresh, rel=1e-9)
    bad = fakes[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert math.isnan(ref(bad)["fd"])
    assert ref(fakes[1]) == pytest.approx(got[1], rel=1e-9)   # the reference features survive a nan set


def test_inception_missing_weights_and_missing_fidelity(monkeypatch, tmp_path):
    import torchmetrics.image.fid as tm_fid

    missing = tmp_path / "nope" / "inception.pth"
    with pytest.raises(FileNotFoundError) as err:
        inception_fid(digit_like(4, 1), digit_like(4, 2), str(missing))
    assert str(missing) in str(err.value) and "eval.fid.inception_weights" in str(err.value)
    with pytest.raises(ValueError, match="eval.fid.inception_weights"):
        build_fid_metric()

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"inception_feature must be one of \(64, 192, 768, 2048\)"):
        build_fid_metric(inception_weights=str(weights), inception_feature=100)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        inception_fid(torch.rand(4, 2, 8, 8), torch.rand(4, 2, 8, 8), str(weights))
    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        build_fid_metric(inception_weights=str(weights))


# ---------------------------------------------------------------- figures

def test_image_grid_png(tmp_path):
    from PIL import Image

    gray = digit_like(10, 5)  # 10 images, 4 per row -> 3 rows
    p = save_image_grid(gray, tmp_path / "a" / "b" / "grid.png", nrow=4, scale=3)
    with Image.open(p) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == (4 * (8 * 3 + 1) + 1, 3 * (8 * 3 + 1) + 1)
        px = torch.from_numpy(np.asarray(img).copy())
    # nearest-neighbour: each source pixel becomes a 3x3 block of equal values (first tile, top-left pixel)
    assert torch.all(px[1:4, 1:4] == round(float(gray[0, 0, 0, 0]) * 255))
    rgb = torch.rand(5, 3, 6, 6, generator=gen(6))
    with Image.open(save_image_grid(rgb, tmp_path / "rgb.png")) as img:  # default nrow = ceil(sqrt(5)) = 3, scale 4
        assert img.mode == "RGB" and img.size == (3 * 25 + 1, 2 * 25 + 1)


def test_teacher_above_student_keeps_each_student_tile_under_its_teacher():
    """The grey row wrapped across two rows when the count was not a multiple of the columns (25 digits: student
    tile i sat five columns off teacher tile i)."""
    from stepdistill.eval.grids import teacher_above_student
    teacher, student = torch.ones(25, 1, 2, 2), torch.zeros(25, 1, 2, 2)
    tiles = teacher_above_student(teacher, student, 10)
    assert tiles.shape[0] == 30 + 10 + 25
    assert torch.equal(tiles[:25], teacher) and torch.all(tiles[25:40] == 0.5)
    assert all(torch.equal(tiles[40 + i], student[i]) and (40 + i) % 10 == i % 10 for i in range(25))
    assert teacher_above_student(teacher[:20], student[:20], 10).shape[0] == 20 + 10 + 20


def test_gmm_scatter_png(tmp_path, mix):
    from PIL import Image

    student = mix.sample(300, generator=gen(7))
    student[0] = float("inf")
    teacher = mix.sample(300, generator=gen(8))
    p1 = save_gmm_scatter(tmp_path / "figs" / "one.png", student, mix, title="gmm")
    p2 = save_gmm_scatter(tmp_path / "figs" / "two.png", student, mix, teacher=teacher)
    with Image.open(p1) as a, Image.open(p2) as b:
        assert a.format == b.format == "PNG"
        assert a.size == (360, 360) and b.size == (720, 360)  # 4.5 in per panel at 80 dpi


def test_scatter_of_a_mixture_in_3_and_1_dimensions(tmp_path, monkeypatch):
    """A 3-D mixture is drawn on its first two coordinates over its exact marginal there (checked against numerical
    integration over the third); a 1-D one as a histogram over its density curve. Neither stops a run's evaluation."""
    from stepdistill.eval import grids
    from stepdistill.networks.gmm import GaussianMixture
    mix3 = GaussianMixture([[0.0, 0.0, 0.0], [3.0, 1.0, -2.0], [-2.0, 2.0, 4.0]], [0.5, 1.0, 0.7], [1.0, 2.0, 3.0])
    plane, note = grids._plane(mix3)
    assert note == " [x1, x2 of 3-D]"
    y = torch.tensor([[0.3, -0.2], [2.5, 1.5], [-1.0, 2.0]], dtype=torch.float64)
    z = torch.linspace(-12, 14, 20001, dtype=torch.float64)
    joint = mix3.log_prob(torch.cat([y.repeat_interleave(z.numel(), 0), z.repeat(3)[:, None]], 1)).exp()
    marginal = torch.trapezoid(joint.reshape(3, -1), z, dim=1)
    torch.testing.assert_close(plane.log_prob(y).exp(), marginal, rtol=1e-6, atol=0)
    drawn = []
    real_draw = grids._draw_panel

    def spy(ax, mixture, points, *args):
        drawn.append((mixture.means.shape[1], points.shape[1]))
        real_draw(ax, mixture, points, *args)
        drawn[-1] += (ax.get_title(),)
    monkeypatch.setattr(grids, "_draw_panel", spy)
    grids.save_gmm_scatter(tmp_path / "three.png", mix3.sample(200, generator=gen(1)), mix3, title="g3")
    mix1 = GaussianMixture([[-2.0], [3.0]], 0.5)
    far = torch.cat([mix1.sample(190, generator=gen(2)), torch.full((10, 1), 80.0)])
    grids.save_gmm_scatter_grid(tmp_path / "one.png", [[("a", mix1.sample(200, generator=gen(3))), ("b", far)]],
                                [mix1])
    assert drawn == [(2, 2, "g3: student [x1, x2 of 3-D]"), (1, 1, "a"), (1, 1, "b\n(10 of 200 outside the view)")]
    with pytest.raises(ValueError, match=r"samples must be \(N, 3\)"):
        grids.save_gmm_scatter(tmp_path / "bad.png", torch.zeros(5, 2), mix3)


def test_a_diverged_panel_does_not_zoom_the_comparison_out(tmp_path, mix, monkeypatch):
    """One student far from the mixture (a diverged run): the row's shared axes reach one mixture width past the
    mixture's box ([-5, 5]: means +- 4 std) and no further, and that panel's title counts the samples it cannot
    show."""
    from stepdistill.eval import grids
    near, far = mix.sample(300, generator=gen(9)), mix.sample(300, generator=gen(10)) + 90.0
    x0, x1, y0, y1 = grids._plot_extent(mix, [near, far], reach=1.0)
    # the far cloud pulls the top right corner to 5 + 10, then 5% padding: 15 + 1 = 16; the near side stays at -6
    assert (x0, x1, y0, y1) == pytest.approx((-6.0, 16.0, -6.0, 16.0), abs=0.05)
    assert grids._plot_extent(mix, [near, far])[1] > 90.0   # without a reach, the box holds every cloud
    titles = []
    real_draw = grids._draw_panel

    def spy(ax, *args):
        real_draw(ax, *args)
        titles.append(ax.get_title())
    monkeypatch.setattr(grids, "_draw_panel", spy)
    grids.save_gmm_scatter_grid(tmp_path / "cmp.png", [[("ok", near), ("diverged", far)]], [mix])
    assert titles == ["ok", "diverged\n(300 of 300 outside the view)"]


def test_eval_fid_hook_uses_local_inception_weights(monkeypatch, tmp_path):
    """eval.fid.inception_weights adds `fid` (student and teacher) against the benchmark's real images."""
    import json

    import torchmetrics.image.fid as tm_fid

    from conftest import compose_cfg
    from stepdistill.eval.fid import inception_fid
    from stepdistill.train.evaluation import Evaluator, eval_inputs, student_sample
    from stepdistill.train.setup import build_run

    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", StandInInception)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in")
    run = build_run(compose_cfg("benchmark=digits", "eval.num_samples=40", "eval.batch_size=40",
                                f"eval.fid.inception_weights={weights}"))
    metrics = Evaluator(run, tmp_path).evaluate(0, teacher_reference=True)
    assert metrics["student_fid_num_real"] == 1797 and metrics["student_fid_num_samples"] == 40
    assert metrics["teacher_fid_num_samples"] == 40 and metrics["teacher_fid"] > 0
    noise, cond, gen = eval_inputs(run.benchmark, 40, int(run.cfg.eval.seed))
    with torch.no_grad():
        samples = student_sample(run.student(), noise, cond, None, gen, 40)
    expected = inception_fid(run.benchmark.fid_reference_images(), run.benchmark.to_output(samples), weights)
    assert metrics["student_fid"] == pytest.approx(expected["fd"], rel=1e-9)
    json.dumps(metrics)
    with pytest.raises(ValueError, match="needs an image benchmark"):
        Evaluator(build_run(compose_cfg("benchmark=gmm", "eval.num_samples=20",
                                        f"eval.fid.inception_weights={weights}")), tmp_path).evaluate(0)


def test_every_step_scores_each_output_along_the_sampling_chain(tmp_path):
    """evaluate_every_step: step k's metrics are those of the chain's k-th x0 output, replayed by hand with the
    same eval noise and between-step draws; the last step's are `evaluate`'s; a figure per step; the CLI table."""
    from conftest import compose_cfg
    from stepdistill.cli.evaluate import every_step_table
    from stepdistill.train.evaluation import Evaluator, eval_inputs
    from stepdistill.train.setup import build_run

    run = build_run(compose_cfg("benchmark=gmm", "generator=four_step", "eval.num_samples=200", "eval.batch_size=200"))
    evaluator = Evaluator(run, tmp_path)
    per_step = evaluator.evaluate_every_step(7)
    final = evaluator.evaluate(7)
    student, bm = run.student(), run.benchmark
    assert per_step["timesteps"] == student.timesteps == [999.0, 759.0, 499.0, 259.0]
    noise, cond, rng = eval_inputs(bm, 200, int(run.cfg.eval.seed))
    x, outputs = student.start(noise), []
    with torch.no_grad():
        for k, t in enumerate(student.timesteps):
            outputs.append(student.denoise(x, t, cond))
            if k < 3:
                x = student.renoise(outputs[-1], student.timesteps[k + 1], torch.randn(noise.shape, generator=rng))
    for k, out in enumerate(outputs, start=1):
        expected = bm.evaluate(out, cond)
        for name in ("high_quality_fraction", "sliced_w2", "mode_std_ratio", "num_samples"):
            assert per_step[f"student_step{k}_{name}"] == pytest.approx(expected[name], rel=1e-6, nan_ok=True)
        assert (tmp_path / "samples" / f"step_0000007_4steps_step{k}.png").is_file()
    assert per_step["student_step4_sliced_w2"] == pytest.approx(final["student_sliced_w2"], rel=1e-9)
    assert per_step["student_step1_sliced_w2"] != pytest.approx(per_step["student_step4_sliced_w2"])
    # evaluated again, the chain's figures do not replace the first evaluation's
    again = evaluator.evaluate_every_step(7)["figures"]
    assert again == [str(tmp_path / "samples" / f"step_0000007_4steps_step{k}_2.png") for k in range(1, 5)]
    assert all(Path(f).is_file() for f in again) and per_step["figures"][0].endswith("_step1.png")
    table = every_step_table(per_step).splitlines()
    assert len(table) == 2 + 4 + 1 and table[2].startswith("1 | 999 |") and "num_samples 200" in table[-1]
    # the bookkeeping of digits' FD and precision/recall (resamples, k) was shown as metric columns
    digits = {"timesteps": [999, 499], **{f"student_step{k}_{n}": v for k in (1, 2) for n, v in
                                          (("fd", 1.5), ("fd_bootstrap_resamples", 50), ("pr_k", 3),
                                           ("fd_num_samples", 100))}}
    head = every_step_table(digits).splitlines()[0]
    assert head.split(" | ")[2:] == ["fd"] and "fd_bootstrap_resamples 50" in every_step_table(digits)


@pytest.mark.parametrize("benchmark", ["gmm", "digits"])
def test_evaluations_do_not_move_the_training_trajectory(tmp_path, benchmark):
    """A run with evaluations trains on the same batches as one without: everything an evaluation draws comes from a
    forked RNG. Digits builds its feature network at the first evaluation, and its random initial weights moved
    training's stream (step 3's generator loss 0.0110 against 0.0149)."""
    from safetensors.torch import load_file

    from conftest import compose_cfg
    from stepdistill.cli.train import train

    def final_weights(every):
        out = tmp_path / f"every{every}"
        train(compose_cfg(f"benchmark={benchmark}", "trainer.max_steps=4", "trainer.batch_size=8",
                          "method.critic_warmup_steps=0", f"eval.every={every}", "eval.num_samples=16",
                          "eval.batch_size=16", "eval.final=false", "trainer.export=false", "trainer.progress=false",
                          "logger.curves=false", "trainer.num_threads=2"), out)
        return {f.stem: load_file(str(f)) for f in (out / "checkpoints" / "step_0000004").glob("*.safetensors")}

    a, b = final_weights(0), final_weights(2)
    assert a.keys() == b.keys() and "generator" in a
    for role in a:
        for k in a[role]:
            assert torch.equal(a[role][k], b[role][k]), f"{role}.{k}"


def test_digits_metrics_of_diverged_or_too_few_samples(tmp_path):
    """A diverged student's nan/inf samples give nan metrics and say how many (inf was clamped into a valid image,
    and argmax of nan logits is class 0: chance-level accuracy); 3 samples are too few for k = 3 precision/recall
    (nan, not an error that ended the evaluation)."""
    from conftest import compose_cfg
    from stepdistill.benchmarks.registry import build_benchmark

    bm = build_benchmark(compose_cfg("benchmark=digits").benchmark)
    labels = torch.arange(20) % 10
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    x[3, 0, 2, 2], x[7, 0, 0, 0] = float("nan"), float("inf")
    m = bm.evaluate(x, labels)
    assert m["num_nonfinite"] == 2 and m["fd_num_samples"] == 20 and m["class_accuracy_num_samples"] == 20
    assert all(math.isnan(m[k]) for k in ("fd", "precision", "recall", "class_accuracy", "fd_bootstrap_std"))
    few = bm.evaluate(x[:3], labels[:3])
    assert math.isnan(few["precision"]) and math.isnan(few["recall"]) and math.isfinite(few["fd"])
    assert few["pr_num_samples"] == 3 and few["num_nonfinite"] == 0
    ok = bm.evaluate(x[8:], labels[8:])
    assert ok["num_nonfinite"] == 0 and all(math.isfinite(ok[k]) for k in ("fd", "precision", "recall", "class_accuracy"))


@pytest.mark.parametrize("scale", [None, 0.0, 2.5])
def test_teacher_reference_samples_the_teacher_at_the_distilled_guidance(tmp_path, scale):
    """The teacher_* metrics describe the teacher the student is distilled from: at `method.guidance` when set (0,
    the unconditional teacher, included), else the benchmark's default. They used benchmark.guidance always, so
    a sweep over method.guidance compared every student with the same, differently guided teacher."""
    from conftest import compose_cfg
    from stepdistill.train.evaluation import Evaluator
    from stepdistill.train.setup import build_run

    run = build_run(compose_cfg("benchmark=digits", "eval.num_samples=10", "eval.batch_size=10",
                                *([] if scale is None else [f"method.guidance={scale}"])))
    seen = []
    real = run.benchmark.teacher_sample

    def spy(noise, cond=None, steps=None, guidance=None):
        seen.append(guidance)
        return real(noise, cond, 2, guidance)   # 2 steps: the scale is what is checked
    run.benchmark.teacher_sample = spy
    metrics = Evaluator(run, tmp_path).evaluate(0, teacher_reference=True)
    expected = run.benchmark.guidance if scale is None else scale
    assert seen == [expected] and metrics["teacher_guidance"] == expected
