"""SiD's generator loss on exact analytic scores: zero with a perfect critic, gradients through the networks'
inputs (checked against finite differences of an independently written loss), only the generator trained."""
import math

import pytest
import torch

from stepdistill.methods.sid import sid_loss
from stepdistill.networks.gmm import GaussianMixture, GMMDenoiser
from stepdistill.schedules import make_schedule


def circle_mixture(std, shift=0.0):
    means = [[4 * math.cos(2 * math.pi * k / 8 + shift), 4 * math.sin(2 * math.pi * k / 8 + shift)] for k in range(8)]
    return GaussianMixture(means, std)


@pytest.fixture
def setup():
    sched = make_schedule(kind="vp", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    teacher = GMMDenoiser(circle_mixture(0.25), sched)
    fake = GMMDenoiser(circle_mixture(0.6, shift=0.2), sched)     # a wrong, but exact, "fake" score
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 2, generator=g, dtype=torch.float64) * 3)
    t = sched.t_from_fraction(0.05 + 0.75 * torch.rand(6, generator=g, dtype=torch.float64))
    noise = torch.randn(6, 2, generator=g, dtype=torch.float64)
    return sched, teacher, fake, x, t, noise


def reference_loss(x, x_base, teacher, fake, sched, t, noise, alpha=1.2):
    """SiD's loss written out with the mixture's exact posterior means; the weight taken at x_base (it carries
    no gradient in SiD)."""
    a, s = sched.alpha(t).double()[:, None], sched.sigma(t).double()[:, None]
    x_t = a * x + s * noise
    fr = teacher.mixture.posterior_mean(x_t, a[:, 0], s[:, 0]).double()
    ff = fake.mixture.posterior_mean(x_t, a[:, 0], s[:, 0]).double()
    with torch.no_grad():
        xb_t = a * x_base + s * noise
        w = 1 / (x_base - teacher.mixture.posterior_mean(xb_t, a[:, 0], s[:, 0]).double()).abs().mean(1, keepdim=True)
    return (w * (fr - ff) * ((fr - x) - alpha * (fr - ff))).mean(1).mean()


def test_perfect_critic_gives_zero_loss_and_zero_gradient(setup):
    sched, teacher, _, x, t, noise = setup
    x = x.clone().requires_grad_()
    loss, _ = sid_loss(x, teacher, teacher, t=t, noise=noise)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0 and grad.abs().max().item() < 1e-12     # the two backward paths cancel to rounding


def test_gradient_flows_through_the_networks_inputs(setup):
    sched, teacher, fake, x, t, noise = setup
    xg = x.clone().requires_grad_()
    loss, _ = sid_loss(xg, teacher, fake, t=t, noise=noise)
    (grad,) = torch.autograd.grad(loss, xg)
    assert loss.item() == pytest.approx(reference_loss(x, x, teacher, fake, sched, t, noise).item(), rel=1e-6)
    eps, fd = 1e-6, torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            d = torch.zeros_like(x)
            d[i, j] = eps
            fd[i, j] = (reference_loss(x + d, x, teacher, fake, sched, t, noise)
                        - reference_loss(x - d, x, teacher, fake, sched, t, noise)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    # with the networks' outputs detached (DMD-style), the gradient would be another one
    a, s = sched.alpha(t).double()[:, None], sched.sigma(t).double()[:, None]
    with torch.no_grad():
        x_t = a * x + s * noise
        fr, ff = teacher.x0(x_t, t).double(), fake.x0(x_t, t).double()
        w = 1 / (x - fr).abs().mean(1, keepdim=True)
    detached = -w * (fr - ff) / (x.shape[0] * x.shape[1])
    assert (grad - detached).abs().max() > 1e-3 * grad.abs().max()


def test_generator_phase_trains_only_the_generator_and_runs_on_both_benchmarks(gmm_cfg, tmp_path):
    from conftest import compose_cfg
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    run = build_run(gmm_cfg("method=sid"))
    batch = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu")()
    run.roles.train_only(run.method.phases["generator"])
    run.method.loss("generator", batch, 0).loss.backward()
    assert all(p.grad is not None for p in run.roles["generator"].parameters())
    assert all(p.grad is None for n in ("fake_score", "teacher") for p in run.roles[n].parameters())
    for cfg in (gmm_cfg("method=sid", "trainer.max_steps=8"),
                compose_cfg("benchmark=digits", "method=sid", "trainer.max_steps=4", "trainer.batch_size=8",
                            "eval.every=0", "eval.final=false", "trainer.progress=false")):
        out = build_run(cfg)
        Trainer(out, tmp_path / cfg.benchmark.name).fit()
        assert all(torch.isfinite(p).all() for p in out.roles["generator"].parameters())
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max <= 1"):
        build_run(gmm_cfg("method=sid", "method.t_max=1.5"))
