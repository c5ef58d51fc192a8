"""The analytic GMM teacher (DESIGN §2, §6): exact posterior mean / score, and the ODE samplers on it."""
from __future__ import annotations

import math

import pytest
import torch

from stepdistill.networks.gmm import GaussianMixture, GMMDenoiser, circle_means
from stepdistill.samplers import ddim_sample, heun_sample
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

STD = 0.25


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The samplers run many small (4000 x 8 x 2) ops: on a shared 2-core box intra-op threads only add sync
    overhead (measured 0.3 s vs 15 s per sampler run), so this module runs single-threaded and restores after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def eight_modes(weights=None):
    return GaussianMixture(circle_means(), STD, weights)


def quality(mix: GaussianMixture, x: torch.Tensor):
    """(fraction within 3 std of the nearest mean, counts per nearest mode)."""
    d = torch.cdist(x.double(), mix.means)
    dmin, k = d.min(1)
    return (dmin <= 3 * STD).double().mean().item(), torch.bincount(k, minlength=mix.means.shape[0])


# ---------------------------------------------------------------- the mixture itself
def test_circle_means():
    m = torch.tensor(circle_means(8, 4.0))
    assert m.shape == (8, 2)
    torch.testing.assert_close(m.norm(dim=1), torch.full((8,), 4.0))
    torch.testing.assert_close(m[0], torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(m[2], torch.tensor([0.0, 4.0]), atol=1e-6, rtol=0)


def test_sample_shapes_and_label_frequencies():
    w = torch.arange(1, 9, dtype=torch.float64)
    mix = eight_modes(w)
    torch.testing.assert_close(mix.weights, w / w.sum())
    g = torch.Generator().manual_seed(0)
    n = 40000
    x, k = mix.sample(n, generator=g, return_labels=True)
    assert x.shape == (n, 2) and x.dtype == torch.float32
    assert k.shape == (n,) and k.dtype == torch.long
    assert mix.sample(7).shape == (7, 2)
    freq = torch.bincount(k, minlength=8).double() / n
    # binomial std of each frequency is < 0.0025 here; allow 4 of them
    torch.testing.assert_close(freq, w / w.sum(), rtol=0, atol=0.01)
    # each sample sits around its own component's mean with the component's std
    resid = x.double() - mix.means[k]
    assert abs(resid.std().item() - STD) < 0.01
    assert resid.mean(0).abs().max() < 0.01


def test_weights_must_be_positive():
    with pytest.raises(ValueError):
        GaussianMixture(circle_means(), STD, [1, 1, 1, 1, 1, 1, 1, 0])


def test_log_prob_at_t0_is_mixture_density():
    mix = GaussianMixture([[0.0, 0.0], [3.0, -1.0]], [0.5, 2.0], [1.0, 3.0])
    x = torch.tensor([[0.1, -0.2], [2.0, 2.0], [-5.0, 1.0]], dtype=torch.float64)
    def n2(x, m, s):
        return torch.exp(-((x - torch.tensor(m, dtype=torch.float64)) ** 2).sum(1) / (2 * s**2)) / (2 * math.pi * s**2)
    p = 0.25 * n2(x, [0.0, 0.0], 0.5) + 0.75 * n2(x, [3.0, -1.0], 2.0)
    torch.testing.assert_close(mix.log_prob(x), p.log())


# ---------------------------------------------------------------- exact posterior mean / score
@pytest.mark.parametrize("sched", [VPSchedule(), EDMSchedule(), FlowSchedule()], ids=lambda s: s.kind)
def test_single_gaussian_posterior_mean_closed_form(sched):
    mu = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
    s0 = 0.8
    mix = GaussianMixture(mu[None], s0)
    den = GMMDenoiser(mix, sched)
    g = torch.Generator().manual_seed(0)
    n = 64
    # float32 times, as the Denoiser itself casts t to float32 before asking the schedule for (a, s)
    t = sched.t_from_fraction(torch.rand(n, generator=g)).float()
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * 3
    a = sched.alpha(t).double()[:, None]
    s = sched.sigma(t).double()[:, None]
    expect = mu + a * s0**2 / (a**2 * s0**2 + s**2) * (x - a * mu)
    got = den.x0(x, t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sched,ts", [
    (VPSchedule(), [5.0, 50.0, 200.0, 500.0, 800.0, 999.0]),
    (VPSchedule(beta_schedule="linear"), [1.0, 100.0, 600.0]),
    (EDMSchedule(), [0.01, 0.1, 0.5, 2.0, 10.0, 80.0]),
    (FlowSchedule(), [0.01, 0.3, 0.7, 0.95]),
], ids=["vp_cos", "vp_linear", "edm", "flow"])
def test_score_is_gradient_of_noised_log_density(sched, ts):
    """THE ground-truth check: denoiser.score == d/dx log p_t(x) of the noised mixture (autograd)."""
    mix = eight_modes(weights=torch.arange(1, 9, dtype=torch.float64))
    den = GMMDenoiser(mix, sched)
    g = torch.Generator().manual_seed(1)
    for tv in ts:
        t = torch.full((200,), tv)
        a = sched.alpha(t).double()
        s = sched.sigma(t).double()
        # points on the noised marginal plus some off-distribution ones
        x_on = a[:100, None] * mix.sample(100, generator=g).double() + s[:100, None] * torch.randn(
            100, 2, generator=g, dtype=torch.float64)
        x_off = torch.randn(100, 2, generator=g, dtype=torch.float64) * (4 * a[0] + s[0])
        x = torch.cat([x_on, x_off]).requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.log_prob(x, a, s).sum(), x)
        score = den.score(x.detach(), t)
        assert score.dtype == torch.float64
        scale = grad.abs().max().item()
        # observed error ~1e-13 relative; 1e-9 leaves room for other BLAS builds
        torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-9 * scale,
                                   msg=lambda m, tv=tv: f"t={tv}: {m}")
        # and the eps form of the same identity: eps = -s * score
        torch.testing.assert_close(den.eps(x.detach(), t), -s[:, None] * grad, rtol=1e-9, atol=1e-9 * scale * s[0])


def test_gmm_teacher_refuses_guidance():
    den = GMMDenoiser(eight_modes(), VPSchedule())
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="guidance"):
        den.x0(x, torch.full((4,), 100.0), guidance=2.0)


# ---------------------------------------------------------------- samplers on the exact teacher
def _noise(n=4000, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_samples(mix, x, min_quality=0.95):
    assert x.shape == (4000, 2)
    assert torch.isfinite(x).all(), "sampler produced non-finite values"
    q, counts = quality(mix, x)
    assert q >= min_quality, f"only {q:.3f} of samples within 3 std of a mean"
    assert (counts > 0).all(), f"modes missed: {counts.tolist()}"
    # equal weights: every mode gets a fair share (expected 500 each)
    assert counts.min() > 300, counts.tolist()
    # each mode's spread is the data's: a sampler that stops short of the clean end returns x0-estimates pulled
    # towards the means (stopped at 30% of the range: 0.12-0.14), which the checks above let through
    d = torch.cdist(x.double(), mix.means)
    near = d.min(1).values <= 3 * STD
    spread = (x.double() - mix.means[d.argmin(1)])[near].std(0)
    assert ((spread - STD).abs() < 0.02).all(), f"within-mode std {spread.tolist()}, the data's is {STD}"


@pytest.mark.parametrize("sched", [VPSchedule(), EDMSchedule(), FlowSchedule()], ids=lambda s: s.kind)
def test_ddim_64_steps_hits_all_modes(sched):
    mix = eight_modes()
    x = ddim_sample(GMMDenoiser(mix, sched), _noise(), steps=64)
    _check_samples(mix, x)


@pytest.mark.parametrize("sched", [EDMSchedule(), VPSchedule(), FlowSchedule()], ids=lambda s: s.kind)
def test_heun_hits_all_modes(sched):
    """Heun (Karras Alg. 1 in y = x/a, tau = s/a) must serve every schedule family, like DDIM (samplers.py
    docstring): including the cosine VP schedule (tau_max ~ 2e4) and rectified flow (a = 0 at t = 1)."""
    mix = eight_modes()
    x = heun_sample(GMMDenoiser(mix, sched), _noise(seed=1), steps=32)
    _check_samples(mix, x)


def test_zero_sampler_steps_is_a_clear_error():
    from conftest import compose_cfg

    from stepdistill.benchmarks.registry import build_benchmark
    den = GMMDenoiser(eight_modes(), VPSchedule())
    for sampler in (ddim_sample, heun_sample):
        with pytest.raises(ValueError, match="sampler steps=0: need an integer >= 1"):
            sampler(den, _noise(8), steps=0)
    with pytest.raises(ValueError, match="benchmark.teacher_steps=0: need an integer >= 1"):
        build_benchmark(compose_cfg("benchmark=gmm", "benchmark.teacher_steps=0").benchmark)


def test_ddim_follows_unbalanced_weights():
    w = torch.arange(1, 9, dtype=torch.float64)
    mix = eight_modes(w)
    x = ddim_sample(GMMDenoiser(mix, EDMSchedule()), _noise(seed=2), steps=64)
    q, counts = quality(mix, x)
    assert q >= 0.95
    torch.testing.assert_close(counts.double() / counts.sum(), w / w.sum(), rtol=0, atol=0.03)


def test_mlp_time_scale_rescales_the_time_input(tmp_path):
    """`benchmark.network.time_scale` feeds t_net * scale to the students' time embedding, and survives export."""
    from conftest import compose_cfg

    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.networks.mlp import TimeMLP

    scale = math.pi / 2000
    net = build_benchmark(compose_cfg("benchmark=gmm", "benchmark.network.width=32",
                                      f"benchmark.network.time_scale={scale}").benchmark).make_student_denoiser().net
    plain = TimeMLP(2, 32, 4, fourier_features=64)
    plain.load_state_dict(net.state_dict())
    x, t = torch.randn(5, 2), torch.tensor([0.0, 10.0, 250.5, 700.0, 999.0])
    torch.testing.assert_close(net(x, t), plain(x, t * scale))
    assert not torch.allclose(net(x, t), plain(x, t))
    net.save_pretrained(tmp_path)
    torch.testing.assert_close(TimeMLP.from_pretrained(tmp_path)(x, t), net(x, t))


def test_generator_fourier_scale_shapes_the_generator_only(tmp_path):
    """`benchmark.network.generator_fourier_scale`: the generator and each step expert take their input features
    at that frequency (the same random directions, scaled), the critic keeps `fourier_scale` (null: the generator's
    too); every trainable weight is the same draw whatever the scale, and the exported generator rebuilds its
    features. DMD2's gmm preset sets 0.5."""
    from conftest import compose_cfg

    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.networks.mlp import TimeMLP

    def roles(*overrides):
        cfg = compose_cfg("benchmark=gmm", "benchmark.network.width=32", "generator=four_step",
                          "generator.step_experts=true", *overrides)
        torch.manual_seed(0)
        return build_benchmark(cfg.benchmark).build_roles(cfg.method, cfg.generator, cfg.model)

    key = "benchmark.network.generator_fourier_scale"
    base, low = roles(f"{key}=null"), roles(f"{key}=0.5")
    torch.testing.assert_close(low["fake_score"].net.fourier, base["fake_score"].net.fourier, rtol=0, atol=0)
    torch.testing.assert_close(base["generator"].denoiser.net.fourier, base["fake_score"].net.fourier, rtol=0, atol=0)
    assert len(low["generator"].step_denoisers) == 4
    for den_base, den_low in zip(base["generator"].step_denoisers, low["generator"].step_denoisers):
        torch.testing.assert_close(den_low.net.fourier, 0.5 * den_base.net.fourier, rtol=0, atol=0)
        for (name, a), (_, b) in zip(den_base.net.named_parameters(), den_low.net.named_parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    net = low["generator"].step_denoisers[0].net
    net.save_pretrained(tmp_path)
    assert TimeMLP.from_pretrained(tmp_path).config.fourier_scale == 0.5


def test_mlp_student_and_gan_head_run_in_float64():
    """`.double()` works on the MLP students and the GAN head (float64 gradient checks): the time embedding and
    the head's input take the weights' dtype, and float64 agrees with float32."""
    from stepdistill.networks.heads import ClassifierHead
    from stepdistill.networks.mlp import TimeMLP
    torch.manual_seed(0)
    net, head = TimeMLP(width=32, depth=2, fourier_features=8), ClassifierHead((32,), width=16)
    x, t, feats = torch.randn(5, 2), torch.tensor([999.0]), torch.randn(5, 32)
    out32, logit32 = net(x, t), head(feats)
    net.double()
    head.double()
    out64, logit64 = net(x.double(), t.double()), head(feats.double())
    assert out64.dtype == logit64.dtype == torch.float64
    assert torch.allclose(out64.float(), out32, atol=1e-5) and torch.allclose(logit64.float(), logit32, atol=1e-5)


# ---------------------------------------------------------------- the fake score that starts as the teacher
def _residual_fake(width=32):
    from conftest import compose_cfg

    from stepdistill.benchmarks.registry import build_benchmark
    bench = build_benchmark(compose_cfg("benchmark=gmm", f"benchmark.network.width={width}",
                                        "benchmark.fake_score_from_teacher=true").benchmark)
    return bench, bench.as_fake_score(bench.make_student_denoiser())


def test_teacher_residual_fake_score_starts_as_the_exact_teacher():
    """`benchmark.fake_score_from_teacher`: at initialisation the critic's x0 (hence its score) is the teacher's
    at every noise level, so DMD's gradient starts at zero; its weights are the MLP's alone."""
    torch.manual_seed(0)
    bench, fake = _residual_fake()
    x, t = 3 * torch.randn(64, 2), torch.randint(0, 1000, (64,)).float()
    assert torch.equal(fake.x0(x, t), bench.teacher.x0(x, t))
    assert set(fake.state_dict()) == {f"net.{k}" for k in fake.net.state_dict()}


def test_teacher_residual_denoising_loss_is_the_edm_loss_on_its_x0():
    """Its denoising loss is EDM's: the x0 error over c_out^2, on the same noise; the gradient reaches only the
    residual MLP (the teacher has no trainable weights), and one SGD step on it lowers the loss."""
    from stepdistill.prediction import edm_coefficients
    torch.manual_seed(1)
    bench, fake = _residual_fake()
    torch.nn.init.normal_(fake.net.out[-1].weight, std=0.1)   # a residual that is not zero
    x0, noise = bench.sample_real(128)[0], torch.randn(128, 2)
    t = torch.randint(0, 1000, (128,)).float()
    a, s = fake.coeffs(t, x0)
    c_out = edm_coefficients(a, s, fake.sigma_data)[2]
    expect = (((fake.x0(a * x0 + s * noise, t) - x0) / c_out) ** 2).mean(1)
    loss = fake.denoising_loss(x0, t, noise=noise)
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-5)
    loss.mean().backward()
    grads = {n: p.grad for n, p in fake.named_parameters()}
    assert grads and all(g is not None for g in grads.values())
    assert bench.teacher.dummy.grad is None
    with torch.no_grad():
        for p in fake.parameters():
            p -= 1e-3 * p.grad
    assert fake.denoising_loss(x0, t, noise=noise).mean() < loss.mean()


def test_teacher_residual_fake_score_refuses_guidance():
    _, fake = _residual_fake()
    with pytest.raises(ValueError, match="guidance 1"):
        fake.denoising_loss(torch.zeros(2, 2), torch.tensor([5.0, 5.0]), guidance=2.0)


def test_heun_is_second_order_on_a_single_gaussian():
    """Catches the Heun correction replaced by (or degraded to) an Euler step: on N(mu, s0^2 I) the EDM PF-ODE from
    x_T at sigma_T = 80 has the closed-form solution x(0) = mu + (x_T - mu) s0 / sqrt(s0^2 + 80^2), and doubling the
    steps cuts Heun's error ~4x (measured 4.2-4.3 from 16 to 64 steps; Euler's ~2x: 1.9-2.0)."""
    mu, s0 = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    den = GMMDenoiser(GaussianMixture(mu[None], s0), EDMSchedule())
    noise = _noise(64)
    exact = mu + (80.0 * noise - mu) * s0 / math.sqrt(s0**2 + 80.0**2)
    err = [float((heun_sample(den, noise, steps) - exact).abs().max()) for steps in (16, 32, 64)]
    assert err[0] / err[1] > 3.5 and err[1] / err[2] > 3.5, err
    assert err[2] < 0.01, err
