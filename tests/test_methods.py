"""DMD/DMD2 math against the exact GMM score; gradient isolation per phase; TTUR; backward simulation."""
import math

import pytest
import torch
from conftest import ConditionalMixture, guided
from omegaconf import OmegaConf

from stepdistill.generator import FewStepGenerator
from stepdistill.methods.base import Method
from stepdistill.methods.distribution_matching import dmd_loss
from stepdistill.networks.gmm import GaussianMixture, GMMDenoiser, circle_means
from stepdistill.schedules import EDMSchedule, VPSchedule
from stepdistill.train.setup import build_run
from stepdistill.train.trainer import Trainer


@pytest.mark.parametrize("normalizer", ["sample", "batch"])
@pytest.mark.parametrize("schedule", [VPSchedule(), EDMSchedule()], ids=["vp", "edm"])
def test_dmd_surrogate_gradient_is_normalised_score_difference(schedule, normalizer):
    """d loss / d x = (x0_fake - x0_real) / (mean|x - x0_real| * numel), the mean per sample (DMD Eq. 8) or over
    the batch, and x0_fake - x0_real equals s^2 / a * (score_fake - score_real) where the scores come from
    autograd of the exact noised log-densities."""
    real = GaussianMixture(circle_means(8, 4.0), 0.25)
    fake = GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [1.0, 0.5])
    teacher, critic = GMMDenoiser(real, schedule), GMMDenoiser(fake, schedule)
    x = (torch.randn(16, 2) * 2).requires_grad_(True)
    torch.manual_seed(0)
    loss, _ = dmd_loss(x, teacher, critic, normalizer=normalizer)
    loss.backward()
    # replay the same draws of t and noise
    torch.manual_seed(0)
    t = schedule.sample_t(16, 0.02, 0.98)
    x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t).double().requires_grad_(True)
    a, s = schedule.alpha(t).double()[:, None], schedule.sigma(t).double()[:, None]
    s_real = torch.autograd.grad(real.log_prob(x_t, a[:, 0], s[:, 0]).sum(), x_t)[0]
    s_fake = torch.autograd.grad(fake.log_prob(x_t, a[:, 0], s[:, 0]).sum(), x_t)[0]
    x0_real = (x_t + s**2 * s_real) / a
    resid = (x.detach().double() - x0_real).abs()
    weight = resid.mean(1, keepdim=True) if normalizer == "sample" else resid.mean()
    expected = (s**2 / a) * (s_fake - s_real) / weight / x.numel()
    torch.testing.assert_close(x.grad.double(), expected.detach(), rtol=2e-3, atol=1e-6)


def test_dmd_gradient_vanishes_when_fake_equals_real():
    sched = VPSchedule()
    mix = GaussianMixture(circle_means(), 0.25)
    x = torch.randn(8, 2, requires_grad=True)
    loss, _ = dmd_loss(x, GMMDenoiser(mix, sched), GMMDenoiser(mix, sched))
    loss.backward()
    assert x.grad.abs().max() < 1e-6


def test_dmd_draws_average_the_gradients_of_independent_draws():
    """`draws=K` gives the mean of the K one-draw gradients that the same random stream produces one after
    another (t, then noise, per draw), and a draw count below 1 is a clear error."""
    sched = VPSchedule()
    teacher = GMMDenoiser(GaussianMixture(circle_means(8, 4.0), 0.25), sched)
    critic = GMMDenoiser(GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [1.0, 0.5]), sched)
    x = (torch.randn(16, 2) * 2).requires_grad_(True)
    torch.manual_seed(0)
    dmd_loss(x, teacher, critic, normalizer="batch", draws=3)[0].backward()
    averaged, x.grad = x.grad.clone(), None
    torch.manual_seed(0)
    singles = []
    for _ in range(3):
        dmd_loss(x, teacher, critic, normalizer="batch")[0].backward()
        singles.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(averaged, torch.stack(singles).mean(0))
    assert not torch.allclose(singles[0], singles[1])   # the draws are independent
    with pytest.raises(ValueError, match="method.dm_draws"):
        dmd_loss(x, teacher, critic, draws=0)


def test_unknown_dmd_normalizer_is_a_clear_error(tmp_path):
    from hydra import compose, initialize_config_dir

    from stepdistill.cli import CONF_DIR
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose("train", overrides=["benchmark=gmm", "method=dmd2", "method.normalizer=pixel"])
    with pytest.raises(ValueError, match="method.normalizer"):
        build_run(cfg)


def test_ttur_schedule():
    m = Method.__new__(Method)
    m.cfg = OmegaConf.create({"critic_steps": 2, "critic_warmup_steps": 3})
    phases = [m.phase(s) for s in range(12)]
    assert phases[:3] == ["critic"] * 3
    assert phases[3:12] == ["critic", "critic", "generator"] * 3


def _snapshot(mod):
    return [p.detach().clone() for p in mod.parameters()]


def _changed(mod, snap):
    return any(not torch.equal(p, q) for p, q in zip(mod.parameters(), snap))


@pytest.mark.parametrize("method", ["dmd2", "dmd"])
def test_each_phase_updates_only_its_roles(gmm_cfg, tmp_path, method):
    cfg = gmm_cfg(f"method={method}", "method.regression.num_pairs=32" if method == "dmd" else "seed=0",
                  "method.critic_warmup_steps=0", "method.critic_steps=1")
    run = build_run(cfg)
    trainer = Trainer(run, tmp_path)
    from stepdistill.train.batches import BatchSource, make_regression_pairs
    pairs = make_regression_pairs(run.benchmark, 32, 0) if method == "dmd" else None
    batches = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu", pairs)
    names = [n for n in run.roles if n != "teacher"]
    for phase in ("critic", "generator"):
        snaps = {n: _snapshot(run.roles[n]) for n in names}
        assert run.method.phase(trainer.step) == phase
        got, logs = trainer.train_step(batches)
        trainer.step += 1
        assert got == phase and logs is not None
        changed = {n for n in names if _changed(run.roles[n], snaps[n])}
        expected = set(run.method.phases[phase]) | ({"generator_ema"} if phase == "generator" else set())
        assert changed == expected, (phase, changed)


def test_backward_simulation_trains_only_the_last_step():
    torch.manual_seed(0)
    sched = VPSchedule()
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.networks.mlp import TimeMLP
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2), sched, "edm", sigma_data=2.0), steps=4)
    assert gen.timesteps == [999.0, 759.0, 499.0, 259.0]
    inputs = []
    hook = gen.denoiser.net.register_forward_hook(lambda m, i, o: inputs.append((i[0], torch.is_grad_enabled())))
    z = torch.randn(5, 2)
    torch.manual_seed(1)
    out = gen(z, step=3)
    hook.remove()
    assert len(inputs) == 3
    assert [g for _, g in inputs] == [False, False, True]  # k-1 steps without gradient, step k with
    assert out.requires_grad and not inputs[-1][0].requires_grad
    # replay by hand: two no-grad steps with fresh noise between them, then the trained step
    torch.manual_seed(1)
    x = z
    with torch.no_grad():
        for i in range(2):
            x = gen.renoise(gen.denoise(x, gen.timesteps[i]), gen.timesteps[i + 1], torch.randn_like(x))
    torch.testing.assert_close(out, gen.denoise(x, gen.timesteps[2]))
    # the generator's own draws of k are uniform over 1..K
    torch.manual_seed(2)
    _, ks = gen(torch.randn(2000, 2), return_steps=True)
    counts = torch.bincount(ks, minlength=5)[1:] / 2000
    assert torch.all((counts - 0.25).abs() < 0.04), counts


def test_backward_simulation_draws_a_step_per_sample():
    """Per-sample k: every sample equals its own replay (k-1 no-grad steps, then step k), whatever k its
    neighbours in the batch drew, and one batch holds outputs of every step."""
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.networks.mlp import TimeMLP
    torch.manual_seed(0)
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2, num_classes=3), VPSchedule(), "edm", sigma_data=2.0),
                           steps=4)
    z, cond = torch.randn(64, 2), torch.randint(0, 3, (64,))
    torch.manual_seed(3)
    out = gen(z, cond)
    torch.manual_seed(3)
    ks = torch.randint(1, 5, (64,))
    assert set(ks.tolist()) == {1, 2, 3, 4} and out.requires_grad
    # replay: at each step the whole batch's re-noising noise is drawn; the samples still running take their rows
    x, alive = z.clone(), torch.ones(64, dtype=torch.bool)
    expected = torch.empty_like(z)
    with torch.no_grad():
        for i, t in enumerate(gen.timesteps):
            x0 = gen.denoise(x, t, cond)
            expected[alive & (ks == i + 1)] = x0[alive & (ks == i + 1)]
            alive = alive & (ks > i + 1)
            if i + 1 < len(gen.timesteps):
                x[alive] = gen.renoise(x0[alive], gen.timesteps[i + 1], torch.randn_like(x0)[alive])
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)


def test_batch_wide_exit_step_matches_the_masked_loop():
    """When every sample exits at the same step the generator skips the per-sample gathers: same draws, same
    output, same gradient as the masked loop that serves mixed exit steps."""
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.networks.mlp import TimeMLP
    torch.manual_seed(0)
    den = NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0)
    masked = FewStepGenerator(den, steps=4, train_steps=[3, 3])   # two choices: the masked loop, all k = 3
    direct = FewStepGenerator(den, steps=4, train_steps=[3])
    z = torch.randn(8, 2)
    outs = []
    for gen in (masked, direct):
        den.zero_grad()
        torch.manual_seed(5)
        out, ks = gen(z, return_steps=True)
        out.square().sum().backward()
        outs.append((out.detach(), ks, den.net.inp.weight.grad.clone()))
    assert outs[0][1].tolist() == outs[1][1].tolist() == [3] * 8
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_exit_step_per_batch_as_dmd2s_code():
    """per_sample_step=False (DMD2's reference code: one k per iteration): the whole batch shares k, drawn
    uniformly from the trained steps, and the output is that of the batch-wide replay."""
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.networks.mlp import TimeMLP
    torch.manual_seed(0)
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0), steps=4,
                           per_sample_step=False, train_steps=[2, 3, 4])
    z = torch.randn(16, 2)
    drawn = []
    for seed in range(300):
        torch.manual_seed(seed)
        out, ks = gen(z, return_steps=True)
        assert ks.unique().numel() == 1
        drawn.append(int(ks[0]))
        if seed < 3:  # the same output as exiting every sample at that k
            torch.manual_seed(seed)
            torch.randint(0, 3, ())  # the draw of k
            torch.testing.assert_close(out, gen(z, step=drawn[-1]), rtol=0, atol=0)
    counts = torch.bincount(torch.tensor(drawn), minlength=5)[2:] / 300
    assert set(drawn) == {2, 3, 4} and torch.all((counts - 1 / 3).abs() < 0.1), counts


def test_lcm_boundary_matches_diffusers():
    from diffusers import LCMScheduler
    sched = LCMScheduler()
    gen = FewStepGenerator.__new__(FewStepGenerator)
    gen.timestep_scaling = 10.0
    for t in (999, 499, 19):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        ours = gen.boundary_scalings(torch.tensor(float(t)))
        assert math.isclose(float(ours[0]), float(c_skip), rel_tol=1e-6)
        assert math.isclose(float(ours[1]), float(c_out), rel_tol=1e-6)


def test_boundary_condition_uses_the_batch_scalings_exactly():
    """denoise() applies the LCM boundary scalings as Python numbers cached per timestep: the same float32 values
    as the per-sample tensors, so the output is unchanged bit for bit."""
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.networks.mlp import TimeMLP
    from stepdistill.schedules import _bcast
    torch.manual_seed(0)
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0), steps=4)
    x = torch.randn(64, 2)
    for t in gen.timesteps:
        tt = torch.full((64,), float(t))
        with torch.no_grad():
            x0 = gen.denoiser.x0(x, tt)
            c_skip, c_out = gen.boundary_scalings(tt)
            want = _bcast(c_skip, x0) * x + _bcast(c_out, x0) * x0
            got = gen.denoise(x, t)
        assert torch.equal(got, want)


def test_lpips_regression_distance_from_local_backbone(tmp_path):
    import torchvision
    from stepdistill.methods.lpips_distance import LPIPSDistance
    with pytest.raises(ValueError, match="lpips_weights"):
        LPIPSDistance(None)
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        LPIPSDistance(str(tmp_path / "missing.pth"))
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)  # stands in for the real local weights file
    torch.save(alex.state_dict(), tmp_path / "alexnet.pth")
    with pytest.raises(ValueError, match=r"lpips_resize=16: need an integer >= 32"):
        LPIPSDistance(str(tmp_path / "alexnet.pth"), resize=16)   # AlexNet's pooling fails below 32 pixels
    dist = LPIPSDistance(str(tmp_path / "alexnet.pth"))
    torch.testing.assert_close(dist.lpips.net.slice1[0].weight, alex.features[0].weight)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    d_same, d_diff = dist(x, x), dist(x, -x)
    assert d_same.shape == (3,) and torch.all(d_same.abs() < 1e-6) and torch.all(d_diff > 0)


def test_dmd_regression_term_is_lpips_on_the_teacher_pairs(tmp_path):
    """method.regression.distance=lpips: DMD's regression term is the LPIPS distance (local AlexNet weights)
    between the 1-step generator's output from each pair's noise and the pair's teacher sample, averaged."""
    import torchvision
    from conftest import digits_cfg
    from stepdistill.methods.lpips_distance import LPIPSDistance
    from stepdistill.train.batches import BatchSource, make_regression_pairs
    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    run = build_run(digits_cfg("method=dmd", "method.regression.distance=lpips",
                               f"method.regression.lpips_weights={weights}", "method.regression.num_pairs=6"))
    pairs = make_regression_pairs(run.benchmark, 6, 0)
    batch = BatchSource(run.benchmark, run.method.batch_keys, 6, "cpu", pairs)()
    logs = run.method.generator_loss(batch, 0).logs
    with torch.no_grad():
        pred = run.method.models["generator"](batch["reg_noise"], batch["reg_cond"], step=1)
    target = batch["reg_target"]
    lpips = LPIPSDistance(str(weights))(pred, target).mean().item()
    assert logs["loss_reg"] == pytest.approx(lpips, rel=1e-5)
    assert logs["loss_reg"] != pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-2)
    with pytest.raises(ValueError, match="use l2 or lpips"):
        build_run(digits_cfg("method=dmd", "method.regression.distance=l1"))
    # the trainer moves the roles, not the method's LPIPS network: it follows the samples to their device (a GPU
    # in training; "meta" stands in for one here)
    with torch.no_grad():
        on_meta = run.method.regression_loss(pred.to("meta"), target.to("meta"))
    assert on_meta.device.type == "meta"
    assert next(run.method.distance.parameters()).device.type == "meta"


def test_lpips_regression_is_refused_on_points_and_latents(tmp_path, gmm_cfg):
    """LPIPS compares 1- or 3-channel images: on the gmm's points or a latent benchmark's 4 channels it is a
    one-line error at build time, not a shape error at the first generator step."""
    from types import SimpleNamespace

    from stepdistill.methods import DMD
    cfg = gmm_cfg("method=dmd", "method.regression.distance=lpips",
                  f"method.regression.lpips_weights={tmp_path / 'alexnet.pth'}")
    with pytest.raises(ValueError, match=r"gmm benchmark's samples have shape \(2,\).*distance=l2"):
        build_run(cfg)
    with pytest.raises(ValueError, match=r"tiny_sd benchmark's samples have shape \(4, 8, 8\)"):
        DMD.check_benchmark(cfg.method, SimpleNamespace(name="tiny_sd", data_shape=(4, 8, 8)))
    for shape in ((1, 8, 8), (3, 32, 32)):   # digits-like and RGB images pass
        DMD.check_benchmark(cfg.method, SimpleNamespace(name="images", data_shape=shape))


def test_backward_simulation_can_train_chosen_steps_only():
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.networks.mlp import TimeMLP
    den = NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0)
    gen = FewStepGenerator(den, steps=4, train_steps=[4])
    calls = []
    hook = den.net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    gen(torch.randn(16, 2))
    hook.remove()
    assert calls == [False, False, False, True]  # every sample runs three steps without gradient, trains step 4
    with pytest.raises(ValueError, match="generator.train_steps"):
        FewStepGenerator(den, steps=4, train_steps=[5])


def _dm_levels_by_exit_step(gmm_cfg, *overrides):
    """One 4-step DMD2 generator loss on 512 samples: each sample's exit step k and its DM noise level t."""
    run = build_run(gmm_cfg("method=dmd2", "generator=four_step", "method.gan.enabled=false", *overrides))
    gen, teacher = run.roles["generator"], run.roles["teacher"]
    ks, ts = [], []
    forward, x0 = gen.forward, teacher.x0
    gen.forward = lambda *a, **kw: (lambda r: (ks.append(r[1]), r)[1])(forward(*a, **kw))
    teacher.x0 = lambda x_t, t, *a, **kw: (ts.append(t), x0(x_t, t, *a, **kw))[1]
    torch.manual_seed(0)
    run.method.loss("generator", {"noise": torch.randn(512, 2), "cond": None}, 0)
    return ks[0], ts[0]


def test_dm_noise_level_below_each_samples_step_input(gmm_cfg):
    """method.dm_below_step_input: a sample that exits at step k is scored at a DM noise level no higher than step
    k's input level t_k; without it every step draws from the whole [t_min, t_max]."""
    from stepdistill.schedules import EDMSchedule

    assert VPSchedule().fraction_at(259.0) == pytest.approx(259 / 999, abs=1e-4)
    edm = EDMSchedule()
    assert float(edm.t_from_fraction(torch.tensor(edm.fraction_at(2.5)))) == pytest.approx(2.5, rel=1e-3)
    k, t = _dm_levels_by_exit_step(gmm_cfg, "method.dm_below_step_input=true")
    k_free, t_free = _dm_levels_by_exit_step(gmm_cfg)
    caps = torch.tensor([999.0, 759.0, 499.0, 259.0])[k - 1]
    assert torch.all(t <= caps) and torch.all(t >= 0.02 * 999 - 0.5)
    for step, cap in zip((1, 2, 3, 4), (0.98 * 999, 759, 499, 259)):   # each step fills its own range
        assert t[k == step].max() > cap - 0.1 * 999 and t[k == step].min() < 0.1 * 999
    assert (t_free[k_free == 4] > 259).float().mean() > 0.5   # the plain draw ignores the exit step


@pytest.mark.parametrize("below", [False, True])
def test_dm_noise_level_above_the_next_steps_input(gmm_cfg, below):
    """method.dm_above_next_input: a sample that exits at step k < 4 is scored at DM noise levels no lower than
    step k+1's input level (the level the chain re-noises it to); the last step keeps the whole range. With
    dm_below_step_input too, step k's range is Phased DMD's [t_(k+1), t_k]."""
    k, t = _dm_levels_by_exit_step(gmm_cfg, "method.dm_above_next_input=true", f"method.dm_below_step_input={below}")
    ranges = {1: (759, 0.98 * 999), 2: (499, 759 if below else 0.98 * 999),
              3: (259, 499 if below else 0.98 * 999), 4: (0.02 * 999, 259 if below else 0.98 * 999)}
    for step, (lo, hi) in ranges.items():
        here = t[k == step]
        assert here.numel() > 50 and here.min() >= lo - 0.5 and here.max() <= hi + 0.5
        assert here.min() < lo + 0.1 * (hi - lo) and here.max() > hi - 0.1 * (hi - lo)   # it fills that range


def test_dm_above_next_input_needs_room_between_steps(gmm_cfg):
    with pytest.raises(ValueError, match="exit step 1's DM noise range .* is empty: space the generator's timesteps"):
        build_run(gmm_cfg("method=dmd2", "generator=four_step", "generator.steps=2", "generator.timesteps=[999,990]",
                          "method.dm_above_next_input=true"))


def test_dm_below_step_input_needs_room_above_t_min(gmm_cfg):
    with pytest.raises(ValueError, match="lower t_min"):
        build_run(gmm_cfg("method=dmd2", "generator=four_step", "generator.steps=2", "generator.timesteps=[999,10]",
                          "method.dm_below_step_input=true"))


def test_gan_start_step_trains_the_dm_gradient_alone_first(gmm_cfg):
    """method.gan.start_step: before it the generator loss is DMD2's without the GAN (equal to a GAN-less run's on
    the same draws) and the critic phase trains the fake score alone; from it on both GAN terms are back."""
    runs = {name: build_run(gmm_cfg("method=dmd2", *extra)) for name, extra in
            (("staged", ("method.gan.start_step=5",)), ("no_gan", ("method.gan.enabled=false",)))}
    runs["no_gan"].roles["generator"].load_state_dict(runs["staged"].roles["generator"].state_dict())
    runs["no_gan"].roles["fake_score"].load_state_dict(runs["staged"].roles["fake_score"].state_dict())
    batch = {"noise": torch.randn(64, 2), "cond": None, "real": torch.randn(64, 2), "real_cond": None}
    losses = {}
    for name, run in runs.items():
        torch.manual_seed(1)
        losses[name] = run.method.loss("generator", batch, 4)
    assert "loss_gan_g" not in losses["staged"].logs
    assert losses["staged"].loss.item() == pytest.approx(losses["no_gan"].loss.item(), rel=1e-6)
    staged = runs["staged"]
    assert "loss_gan_g" in staged.method.loss("generator", batch, 5).logs
    for p in staged.roles.parameters():
        p.grad = None
    out = staged.method.loss("critic", batch, 4)
    out.loss.backward()
    assert "loss_gan_d" not in out.logs
    assert all(p.grad is None for p in staged.roles["gan_head"].parameters())
    assert "loss_gan_d" in staged.method.loss("critic", batch, 5).logs


def test_fdistill_needs_the_gan_from_the_start(gmm_cfg):
    with pytest.raises(ValueError, match="start_step must be 0"):
        build_run(gmm_cfg("method=fdistill", "method.gan.start_step=10"))


def test_gan_losses_are_the_non_saturating_pair_with_the_right_signs():
    """DMD2's GAN terms: L_G = E softplus(-D(fake)), L_D = E softplus(D(fake)) + E softplus(-D(real)), checked
    against log(1 + e^x) directly; a descent step on L_D raises the real logits and lowers the fake ones, and
    one on L_G raises the fake logits (the generator is pushed to be called real)."""
    from stepdistill.methods.gan import DiffusionGAN
    real = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    fake = torch.tensor([-0.3, 1.5], requires_grad=True)
    l_d = DiffusionGAN.discriminator_loss(real, fake)
    expected_d = (sum(math.log1p(math.exp(f)) for f in (-0.3, 1.5)) / 2
                  + sum(math.log1p(math.exp(-r)) for r in (0.5, -1.0, 2.0)) / 3)
    assert l_d.item() == pytest.approx(expected_d, rel=1e-6)
    l_d.backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()   # descent: real logits up, fake logits down
    fake.grad = None
    l_g = DiffusionGAN.generator_loss(fake)
    assert l_g.item() == pytest.approx(sum(math.log1p(math.exp(-f)) for f in (-0.3, 1.5)) / 2, rel=1e-6)
    l_g.backward()
    assert (fake.grad < 0).all()


def test_each_method_keeps_its_own_update_ratio_on_digits():
    """The digits benchmark tunes 2 critic updates per generator update for the DMD2 and SiD families only
    (conf/benchmark_method/digits_*.yaml): DMD keeps its paper's 1:1 and rCM its 4."""
    from conftest import compose_cfg
    expected = {"dmd": 1, "dmd2": 2, "fdistill": 2, "sid": 2, "sida": 2, "sid_fewstep": 2, "sim": 2, "rcm": 4}
    got = {m: compose_cfg("benchmark=digits", f"method={m}").method.critic_steps for m in expected}
    assert got == expected
    assert compose_cfg("benchmark=gmm", "method=rcm").method.critic_steps == 1   # gmm's documented 1:1 for all


def test_dmd_guidance_goes_to_the_teacher_and_fake_guidance_to_the_critic():
    """Catches dmd_loss swapping `guidance` and `fake_guidance` (or applying one scale to both): with exact
    class-conditional teacher and critic, guidance=3 and fake_guidance=1, x.grad equals
    (guided(fake, 1) - guided(teacher, 3)) / mean|x - guided(teacher, 3)| / numel on the replayed draws."""
    sched = VPSchedule()
    teacher = ConditionalMixture(GaussianMixture(circle_means(8, 4.0), 0.25), sched)
    fake = ConditionalMixture(GaussianMixture(circle_means(8, 3.0), 0.8), sched)
    x = (torch.randn(32, 2, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_(True)
    cond = torch.arange(32) % 8
    torch.manual_seed(0)
    dmd_loss(x, teacher, fake, cond, guidance=3.0, fake_guidance=1.0)[0].backward()
    torch.manual_seed(0)   # replay the draws: t, then the noise
    t = sched.sample_t(32, 0.02, 0.98)
    x_t = sched.add_noise(x.detach(), torch.randn_like(x), t)
    real, fake_x0 = guided(teacher, x_t, t, cond, 3.0), guided(fake, x_t, t, cond, 1.0)
    norm = (x.detach().double() - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x.grad.double(), (fake_x0 - real) / norm / x.numel(), rtol=2e-3, atol=1e-6)


def test_dmd2_gan_generator_term_reaches_the_generator_through_the_noised_sample(gmm_cfg):
    """Catches a `.detach()` on x in DMD2's generator GAN term, and the clean x fed to the discriminator instead of
    the noised x_t. The generator's parameter gradients with the GAN on, minus those of the DM term alone on the
    same draws, equal the autograd gradient of generator_weight * mean softplus(-D(x_t, t)) with x_t = a x + s eps
    noised by hand from the replayed draws (t in [gan.t_min, gan.t_max], drawn after the DM term's t and noise),
    and the discriminator's input is that x_t."""
    import torch.nn.functional as F
    weight = 0.7
    run = build_run(gmm_cfg("method=dmd2", f"method.gan.generator_weight={weight}"))
    m, gen, gan_cfg = run.method, run.roles["generator"], run.cfg.method.gan
    sched, params = gen.schedule, list(gen.parameters())
    torch.manual_seed(0)
    batch = {"noise": torch.randn(64, 2), "cond": None, "real": torch.randn(64, 2), "real_cond": None}
    outs, seen = [], []
    forward, noised = gen.forward, m.gan.logits_noised

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        outs.append(out[0])
        return out
    gen.forward = spy
    m.gan.logits_noised = lambda x_t, t, cond=None: (seen.append((x_t.detach(), t)), noised(x_t, t, cond))[1]
    torch.manual_seed(1)
    full = torch.autograd.grad(m.loss("generator", batch, 0).loss, params)
    m.gan_start = 10**9   # the same step without the GAN term: the DM term's draws are the same
    torch.manual_seed(1)
    dm = torch.autograd.grad(m.loss("generator", batch, 0).loss, params, retain_graph=True)
    x = outs[-1]
    t = sched.sample_t(64, float(gan_cfg.t_min), float(gan_cfg.t_max))   # the GAN's draws, replayed
    x_t = sched.alpha(t)[:, None] * x + sched.sigma(t)[:, None] * torch.randn(64, 2)
    seen_x_t, seen_t = seen[0]
    lo, hi = (float(sched.t_from_fraction(torch.tensor(u))) for u in (gan_cfg.t_min, gan_cfg.t_max))
    assert torch.equal(seen_t, t) and bool(((t >= lo) & (t <= hi)).all())
    torch.testing.assert_close(seen_x_t, x_t.detach())
    expected = torch.autograd.grad(weight * F.softplus(-noised(x_t, t)).mean(), params)
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 1e-3 * max(float(d.abs().max()) for d in dm)   # the GAN term is not negligible here
    for f, d, e in zip(full, dm, expected):
        torch.testing.assert_close(f - d, e, rtol=1e-3, atol=1e-4 * scale)


def test_ema_after_a_generator_update_is_decay_times_ema_plus_one_minus_decay_times_generator(gmm_cfg, tmp_path):
    """Catches the EMA weights swapped (`_foreach_lerp_(ema, params, decay)` instead of `1 - decay`) or the trainer
    passing 1 - ema_decay: after one generator update through the trainer, from an EMA set apart from the generator,
    ema_new = d ema_old + (1 - d) generator_new."""
    from stepdistill.train.batches import BatchSource
    d = 0.9
    run = build_run(gmm_cfg("method=dmd2", "method.critic_warmup_steps=0", "method.critic_steps=1",
                            f"trainer.ema_decay={d}"))
    trainer = Trainer(run, tmp_path)
    ema, gen = run.roles["generator_ema"], run.roles["generator"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
    ema_old, gen_old = _snapshot(ema), _snapshot(gen)
    trainer.step = 1   # 1:1 updates: odd steps are generator steps
    phase, logs = trainer.train_step(BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu"))
    assert phase == "generator" and logs is not None and _changed(gen, gen_old)
    for new, old, g in zip(ema.parameters(), ema_old, gen.parameters()):
        torch.testing.assert_close(new, d * old + (1 - d) * g.detach(), rtol=1e-5, atol=1e-6)


def test_dmd_generator_loss_weights_the_regression_term(gmm_cfg):
    """Catches DMD's generator loss dropping (or squaring, inverting) regression.weight lambda: out.loss equals
    loss_dm + lambda mean((pred - target)^2), and the gradient reaching the generator's output on the regression
    pairs is lambda 2 (pred - target) / numel."""
    from stepdistill.train.batches import BatchSource, make_regression_pairs
    lam = 0.3
    run = build_run(gmm_cfg("method=dmd", "method.regression.num_pairs=16", f"method.regression.weight={lam}"))
    batch = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu", make_regression_pairs(run.benchmark, 16, 0))()
    gen, preds = run.roles["generator"], []
    forward = gen.forward

    def spy(noise, *args, **kwargs):
        out = forward(noise, *args, **kwargs)
        if noise is batch["reg_noise"]:
            out.retain_grad()
            preds.append(out)
        return out
    gen.forward = spy
    torch.manual_seed(0)
    out = run.method.loss("generator", batch, 0)
    out.loss.backward()
    pred, target = preds[0].detach(), batch["reg_target"]
    assert out.loss.item() == pytest.approx(out.logs["loss_dm"] + lam * float(((pred - target) ** 2).mean()), rel=1e-5)
    torch.testing.assert_close(preds[0].grad, lam * 2 * (pred - target) / pred.numel(), rtol=1e-5, atol=1e-8)


def test_dmd_generator_loss_passes_its_settings_and_gradient_to_the_dm_term(gmm_cfg):
    """Catches DMD's generator loss detaching its samples from the DM term (the regression term alone would still
    move the generator) or dropping its noise range and normaliser (the defaults differ from these): the
    gradient at the samples equals dmd_loss's, replayed with the settings written out."""
    from stepdistill.methods.distribution_matching import dmd_loss
    from stepdistill.train.batches import BatchSource, make_regression_pairs
    run = build_run(gmm_cfg("method=dmd", "method.regression.num_pairs=16", "method.t_min=0.2", "method.t_max=0.6",
                            "method.normalizer=sample"))
    batch = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu", make_regression_pairs(run.benchmark, 16, 0))()
    from conftest import generator_output_grad
    out, grad = generator_output_grad(run, batch, 0)
    torch.manual_seed(0)
    x = run.roles["generator"](batch["noise"], batch["cond"]).detach().requires_grad_()
    dm, _ = dmd_loss(x, run.roles["teacher"], run.roles["fake_score"], None, 1.0, 1.0, (0.2, 0.6), "sample")
    dm.backward()
    assert out.logs["loss_dm"] == pytest.approx(dm.item(), rel=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-9)
    assert grad.abs().max() > 0


@pytest.mark.parametrize("method", ["dmd", "dmd2", "fdistill", "sim", "rcm"])
def test_fake_guidance_needs_a_trained_unconditional_branch(gmm_cfg, method):
    """These methods train their fake score on conditional rows only: `method.fake_guidance=2` was accepted and mixed
    in a null branch that got no gradient (on digits: zero on the null class embedding), or, on an unconditional
    teacher, failed at the first generator step with "set guidance to 1.0" while guidance was 1.0."""
    with pytest.raises(ValueError, match=f"method.fake_guidance=2.0: method '{method}' trains its fake score on "
                                         "conditional rows only"):
        build_run(gmm_cfg(f"method={method}", "method.fake_guidance=2.0"))


# (method, settings, the fake score's scale in the generator loss): on digits, a teacher with CFG; every
# generator-level test on the gmm runs at guidance 1, where a swapped or dropped scale changes nothing
GUIDED = [("dmd", ["method.regression.num_pairs=4"], 1.0), ("dmd2", [], 1.0), ("fdistill", [], 1.0),
          ("sim", [], 1.0), ("sid", ["method.fake_guidance=1.5"], 1.5), ("sida", ["method.fake_guidance=1.5"], 1.5),
          ("scm", [], None), ("rcm", ["method.warmup_steps=0"], 1.0)]


@pytest.mark.parametrize("method, extra, fake_scale", GUIDED, ids=[g[0] for g in GUIDED])
def test_the_teacher_is_guided_at_method_guidance_and_the_fake_score_at_its_own_scale(method, extra, fake_scale):
    """Each generator loss calls the teacher at `method.guidance` and the fake score at `method.fake_guidance`
    (every call, and at least one of each)."""
    from conftest import digits_cfg
    from stepdistill.train.batches import BatchSource, make_regression_pairs
    run = build_run(digits_cfg(f"method={method}", "method.guidance=2.5", *extra))
    pairs = (make_regression_pairs(run.benchmark, 4, 0, guidance=2.5) if "reg_noise" in run.method.batch_keys
             else None)
    batch = BatchSource(run.benchmark, run.method.batch_keys, 4, "cpu", pairs)()
    scales = {"teacher": [], "fake_score": []}
    for role, seen in scales.items():
        if role in run.roles:
            x0 = run.roles[role].x0

            def spy(x_t, t, cond=None, guidance=1.0, *args, _x0=x0, _seen=seen, **kwargs):
                _seen.append(float(guidance))
                return _x0(x_t, t, cond, guidance, *args, **kwargs)
            run.roles[role].x0 = spy
    torch.manual_seed(0)
    run.method.loss("generator", batch, 10)
    assert scales["teacher"] and set(scales["teacher"]) == {2.5}
    if fake_scale is None:
        assert "fake_score" not in run.roles
    else:
        assert scales["fake_score"] and set(scales["fake_score"]) == {fake_scale}
