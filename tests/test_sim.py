"""SIM's generator loss on exact analytic scores: its gradient is the gradient of the pseudo-Huber score divergence
(sign and scale, against finite differences of the divergence itself, and the naive variants fail that check); zero
with a perfect critic; gradients through the networks' inputs; only the generator trained."""
import math

import pytest
import torch

from stepdistill.denoiser import Denoiser
from stepdistill.methods.sim import pseudo_huber, sim_loss
from stepdistill.networks.gmm import GaussianMixture, GMMDenoiser
from stepdistill.schedules import make_schedule

C = 0.5   # pseudo-Huber c, of the size of the RMS x0 differences here (0.06-0.9): d is neither quadratic nor L1


@pytest.fixture(scope="module")
def sched():
    return make_schedule(kind="vp", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


@pytest.fixture(scope="module")
def teacher(sched):
    return GMMDenoiser(GaussianMixture([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], 0.5), sched)


class GaussianScore(Denoiser):
    """Exact x0-prediction of the noised N(mu, sigma² I): the generator's own score, with its θ held fixed."""

    def __init__(self, mu, sigma, schedule):
        super().__init__()
        self.mu, self.sigma, self.schedule = mu, sigma, schedule

    def _x0_single(self, x_t, t, cond, alpha_sigma=None):
        a, s = self.coeffs(t, x_t)
        return self.mu + a * self.sigma**2 / (a**2 * self.sigma**2 + s**2) * (x_t - a * self.mu)


# θ = (mu, log sigma) of the generator x_g = mu + sigma z; a few fixed noise levels
MU, LOG_SIGMA, FRACTIONS, N = (0.7, -0.4), 0.0, (0.15, 0.35, 0.55, 0.75), 100_000


def divergence_gradient(sched, teacher):
    """Central finite differences of D(θ) = mean_t E_{x_t ~ N(a mu, a²σ² + s²)} d(f_teacher - f_q), q's
    x0-prediction moving with θ, each sample's contribution kept (common random numbers): (mean, std error)."""
    w = torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def per_sample(theta):
        mu, sig, out = theta[:2], theta[2].exp(), 0
        for t in sched.t_from_fraction(torch.tensor(FRACTIONS, dtype=torch.float64)):
            a, s = sched.alpha(t).double(), sched.sigma(t).double()
            x_t = a * mu + (a**2 * sig**2 + s**2).sqrt() * w
            f_q = mu + a * sig**2 / (a**2 * sig**2 + s**2) * (x_t - a * mu)
            out = out + pseudo_huber(teacher.x0(x_t, t.expand(N)) - f_q, C)
        return out / len(FRACTIONS)

    theta, h, cols = torch.tensor([*MU, LOG_SIGMA], dtype=torch.float64), 1e-4, []
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = h
        cols.append((per_sample(theta + e) - per_sample(theta - e)) / (2 * h))
    g = torch.stack(cols, 1)
    return g.mean(0), g.std(0) / math.sqrt(N)


def reference_loss(x, teacher, fake, sched, t, noise, variant="exact"):
    """SIM's loss written out independently, per sample: d'(Δ)^T((f_p - x) - sg Δ), Δ = f_p - f_fake, d'(Δ) =
    Δ / (numel sqrt(mean Δ² + c²)); `variant` makes the naive alternatives the gradient check must reject."""
    a, s = sched.alpha(t).double()[:, None], sched.sigma(t).double()[:, None]
    x_t = a * x + s * noise
    fp = teacher.mixture.posterior_mean(x_t.detach() if variant == "detached_teacher_input" else x_t, a[:, 0], s[:, 0])
    dl = fp - fake.x0(x_t, t).double()
    u = dl / (x.shape[1] * ((dl**2).mean(1, keepdim=True) + C**2).sqrt())
    if variant == "detached_dprime":            # d'(y) without gradient: the theorem's -sg(Δ) term is then missing
        u = u.detach()
    loss = (u * ((fp - x) - (0 if variant == "no_sg_term" else dl.detach()))).sum(1)
    return -loss if variant == "flipped_sign" else loss


def generator_gradient(sched, teacher, loss_fn):
    """Per-sample θ-gradients of a SIM loss on x_g = mu + sigma z (fixed t's, exact fake score): (mean, std err)."""
    mu, sig = torch.tensor(MU, dtype=torch.float64), torch.tensor(LOG_SIGMA, dtype=torch.float64).exp()
    fake, g = GaussianScore(mu, sig, sched), torch.Generator().manual_seed(2)
    total = 0
    for t in sched.t_from_fraction(torch.tensor(FRACTIONS, dtype=torch.float64)):
        z, noise = torch.randn(2, N, 2, dtype=torch.float64, generator=g)
        x = (mu + sig * z).requires_grad_()
        (gx,) = torch.autograd.grad(loss_fn(x, fake, t.expand(N), noise).sum(), x)  # row i: sample i's gradient
        total = total + torch.cat([gx, sig * (gx * z).sum(1, keepdim=True)], 1)   # d/d mu, d/d log sigma
    per = total / len(FRACTIONS)
    return per.mean(0), per.std(0) / math.sqrt(N)


def test_gradient_is_the_divergence_gradient_with_its_sign_and_scale(sched, teacher):
    fd, fd_se = divergence_gradient(sched, teacher)

    def z_scores(loss_fn):
        g, se = generator_gradient(sched, teacher, loss_fn)
        return ((g - fd) / (se**2 + fd_se**2).sqrt()).abs()

    # sim_loss averages over the batch: N x its mean is the per-sample sum
    z = z_scores(lambda x, fake, t, noise: N * sim_loss(x, teacher, fake, c=C, t=t, noise=noise)[0])
    assert (z < 4).all(), z           # within Monte-Carlo error, every component, sign included
    assert (fd.abs() > 0.02).all()    # and the gradient checked is not ~0
    for variant in ("flipped_sign", "detached_teacher_input", "detached_dprime", "no_sg_term"):
        z = z_scores(lambda x, fake, t, noise: reference_loss(x, teacher, fake, sched, t, noise, variant))
        assert z.max() > 10, (variant, z)


@pytest.fixture
def setup(sched, teacher):
    fake = GMMDenoiser(GaussianMixture([[1.5, 0.5], [-1.5, 1.0], [-0.5, -2.0]], 0.8), sched)   # wrong but exact
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64) * 2
    t = sched.t_from_fraction(0.05 + 0.9 * torch.rand(6, generator=g, dtype=torch.float64))
    noise = torch.randn(6, 2, generator=g, dtype=torch.float64)
    return fake, x, t, noise


def test_perfect_critic_gives_zero_loss_and_zero_gradient(sched, teacher, setup):
    _, x, t, noise = setup
    x = x.clone().requires_grad_()
    loss, logs = sim_loss(x, teacher, teacher, c=C, t=t, noise=noise)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0 and logs["sim_divergence"] == 0 and grad.abs().max().item() < 1e-12


def test_gradient_flows_through_the_networks_inputs(sched, teacher, setup):
    fake, x, t, noise = setup
    xg = x.clone().requires_grad_()
    loss, _ = sim_loss(xg, teacher, fake, c=C, t=t, noise=noise)
    (grad,) = torch.autograd.grad(loss, xg)
    ref = reference_loss(x, teacher, fake, sched, t, noise).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    # the reference's value with Δ's stop-gradient resolved at x_base, differentiated by finite differences
    a, s = sched.alpha(t).double()[:, None], sched.sigma(t).double()[:, None]
    with torch.no_grad():
        xb_t = a * x + s * noise
        dl_base = teacher.x0(xb_t, t) - fake.x0(xb_t, t)

    def f(xx):
        x_t = a * xx + s * noise
        dl = teacher.x0(x_t, t) - fake.x0(x_t, t)
        u = dl / (2 * ((dl**2).mean(1, keepdim=True) + C**2).sqrt())
        return (u * ((teacher.x0(x_t, t) - xx) - dl_base)).sum(1).mean()

    eps, fd = 1e-6, torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            d = torch.zeros_like(x)
            d[i, j] = eps
            fd[i, j] = (f(x + d) - f(x - d)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-9)
    # with the teacher's input detached, the gradient would be another one
    xd = x.clone().requires_grad_()
    detached = reference_loss(xd, teacher, fake, sched, t, noise, "detached_teacher_input").mean()
    (g_det,) = torch.autograd.grad(detached, xd)
    assert (grad - g_det).abs().max() > 1e-2 * grad.abs().max()
    # normalisers: one detached scalar per batch rescales the loss; "sample" reweights each sample
    for name in ("batch", "sample"):
        l_n, _ = sim_loss(x, teacher, fake, c=C, t=t, noise=noise, normalizer=name)
        assert torch.isfinite(l_n) and l_n.item() != loss.item()
    with pytest.raises(ValueError, match="unknown method.normalizer"):
        sim_loss(x, teacher, fake, t=t, noise=noise, normalizer="bogus")


def test_generator_phase_trains_only_the_generator_and_runs_on_both_benchmarks(gmm_cfg, tmp_path):
    from conftest import assert_phase_reaches_only, digits_cfg, train_briefly
    from stepdistill.train.setup import build_run
    out = assert_phase_reaches_only(build_run(gmm_cfg("method=sim")), "generator", ("generator",))
    assert "loss_sim" in out.logs
    train_briefly([gmm_cfg("method=sim", "trainer.max_steps=8"), digits_cfg("method=sim", "trainer.max_steps=4")],
                  tmp_path)
    with pytest.raises(ValueError, match="pseudo-Huber constant must be > 0"):
        build_run(gmm_cfg("method=sim", "method.c=0"))
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max <= 1"):
        build_run(gmm_cfg("method=sim", "method.t_max=1.5"))
    with pytest.raises(ValueError, match="unknown method.normalizer"):
        build_run(gmm_cfg("method=sim", "method.normalizer=bogus"))


def test_sim_generator_loss_passes_its_settings_to_sim_loss(gmm_cfg):
    """Catches SIM's generator loss dropping c, the noise range or the normaliser: the settings here differ from
    sim_loss's defaults (0.1, [0.02, 0.98], none), and the loss and the gradient at the generator's output equal
    sim_loss's with them written out."""
    from conftest import generator_output_grad
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    run = build_run(gmm_cfg("method=sim", "method.c=0.3", "method.t_min=0.2", "method.t_max=0.6",
                            "method.normalizer=batch"))
    batch = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu")()
    out, grad = generator_output_grad(run, batch, 0)
    torch.manual_seed(0)
    x = run.roles["generator"](batch["noise"], batch["cond"]).detach().requires_grad_()
    ref, _ = sim_loss(x, run.roles["teacher"], run.roles["fake_score"], None, 1.0, 1.0, c=0.3, t_range=(0.2, 0.6),
                      normalizer="batch")
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-9)
    torch.manual_seed(0)
    x = run.roles["generator"](batch["noise"], batch["cond"]).detach()
    assert abs(sim_loss(x, run.roles["teacher"], run.roles["fake_score"])[0].item() - ref.item()) > 1e-3 * abs(ref.item())


@pytest.mark.parametrize("normalizer", ["sample", "batch"])
def test_normalizers_divide_by_each_samples_or_the_batchs_denoising_error(sched, teacher, setup, normalizer):
    """Catches normalizer="sample" silently computing "batch" (or the reverse, or a weight that is not detached):
    "sample" divides sample i's reference loss by its own mean|x_i - f_p,i|, "batch" the mean loss by one scalar,
    mean|x - f_p| over the batch; the value and every sample's gradient (the weights carry none)."""
    fake, x, t, noise = setup
    xg = x.clone().requires_grad_()
    loss, _ = sim_loss(xg, teacher, fake, c=C, t=t, noise=noise, normalizer=normalizer)
    (grad,) = torch.autograd.grad(loss, xg)
    xr = x.clone().requires_grad_()
    ref = reference_loss(xr, teacher, fake, sched, t, noise)          # per sample
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)                   # row i: d ref_i / d x_i
    a, s = sched.alpha(t).double(), sched.sigma(t).double()
    err = (x - teacher.mixture.posterior_mean(a[:, None] * x + s[:, None] * noise, a, s)).abs()
    w = err.mean(1) if normalizer == "sample" else err.mean().expand(len(x))
    assert loss.item() == pytest.approx(float((ref.detach() / w).mean()), rel=1e-9)
    torch.testing.assert_close(grad, ref_grad / w[:, None] / len(x), rtol=1e-7, atol=1e-12)
