"""SiD's generator loss on exact analytic scores: zero with a perfect critic, gradients through the networks'
inputs (checked against finite differences of an independently written loss), only the generator trained."""
import math

import pytest
import torch
from conftest import ConditionalMixture, guided

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
    from conftest import assert_phase_reaches_only, digits_cfg, train_briefly
    from stepdistill.train.setup import build_run
    run = build_run(gmm_cfg("method=sid"))
    assert_phase_reaches_only(run, "generator", ("generator",))
    assert_phase_reaches_only(run, "critic", ("fake_score",))
    train_briefly([gmm_cfg("method=sid", "trainer.max_steps=8"), digits_cfg("method=sid", "trainer.max_steps=4")],
                  tmp_path)
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max <= 1"):
        build_run(gmm_cfg("method=sid", "method.t_max=1.5"))


# ------------------------------------------------------------------ noise level of the one-step generator

def test_init_sigma_picks_the_same_noise_level_on_every_schedule(gmm_cfg):
    from stepdistill.train.setup import build_run
    sd = make_schedule(kind="vp", num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012)
    assert sd.t_at_noise_ratio(2.5) == 625                     # SiD-LSG's t_init on Stable Diffusion
    assert make_schedule(kind="edm").t_at_noise_ratio(2.5) == pytest.approx(2.5, rel=1e-3)
    assert make_schedule(kind="flow").t_at_noise_ratio(2.5) == pytest.approx(2.5 / 3.5, rel=1e-4)
    cos = make_schedule(kind="vp", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([cos.t_at_noise_ratio(2.5)])
    assert (cos.sigma(t) / cos.alpha(t)).item() == pytest.approx(2.5, rel=0.01)
    assert build_run(gmm_cfg("method=sid")).roles["generator"].timesteps == [float(t)]
    assert build_run(gmm_cfg("method=sid", "generator.timesteps=[999]")).roles["generator"].timesteps == [999.0]
    assert build_run(gmm_cfg("method=dmd2")).roles["generator"].timesteps == [999.0]   # only methods that ask
    assert build_run(gmm_cfg("method=sid_fewstep")).roles["generator"].num_steps == 4   # four_step by default
    with pytest.raises(ValueError, match="needs a multi-step generator: add generator=four_step"):
        build_run(gmm_cfg("method=sid_fewstep", "generator=one_step"))


# ------------------------------------------------------------------ guidance strategies (LSG, Zero-CFG, Anti-CFG)

@pytest.mark.parametrize("strategy,scales", [("lsg", (2.0, 1.5)), ("zero", (1.0, None)), ("anti", (1.0, 0.5))])
def test_guidance_strategies_use_the_papers_scales_and_conditions(setup, strategy, scales):
    from omegaconf import OmegaConf
    from stepdistill.methods.sid import SiD
    from stepdistill.roles import Roles
    sched, _, _, x, t, noise = setup
    teacher = ConditionalMixture(circle_mixture(0.25), sched)
    fake = ConditionalMixture(circle_mixture(0.6, shift=0.2), sched)
    roles = Roles({"teacher": teacher, "fake_score": fake, "generator": torch.nn.Identity()})
    cfg = OmegaConf.create(dict(alpha=1.2, t_min=0.0, t_max=0.8, guidance=2.0, fake_guidance=scales[1] or 1.0,
                                fake_train_guidance=1.0, cfg_strategy=strategy))
    method = SiD(roles, cfg)
    cond = torch.tensor([0, 1, 2, 3, 4, 5])
    loss, _ = method.sid_term(x, cond, t=t, noise=noise)
    a, s = sched.alpha(t).double()[:, None], sched.sigma(t).double()[:, None]
    x_t = a * x + s * noise
    f_real = guided(teacher, x_t, t, cond, scales[0])
    f_fake = guided(fake, x_t, t, torch.full_like(cond, 8), 1.0) if strategy == "zero" else guided(fake, x_t, t, cond, scales[1])
    w = 1 / (x - f_real).abs().mean(1, keepdim=True)
    ref = (w * (f_real - f_fake) * ((f_real - x) - 1.2 * (f_real - f_fake))).mean(1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)


def test_guidance_strategy_errors(gmm_cfg):
    from conftest import digits_cfg
    from stepdistill.train.setup import build_run
    with pytest.raises(ValueError, match="unknown method.cfg_strategy 'lsgg'"):
        build_run(gmm_cfg("method=sid", "method.cfg_strategy=lsgg"))
    with pytest.raises(ValueError, match="needs a conditional teacher"):
        build_run(gmm_cfg("method=sid", "method.cfg_strategy=zero"))
    with pytest.raises(ValueError, match="needs a conditional teacher"):
        build_run(gmm_cfg("method=sid", "method.fake_train_guidance=2.0"))
    with pytest.raises(ValueError, match="anti needs method.fake_guidance < 1"):
        build_run(digits_cfg("method=sid", "method.cfg_strategy=anti"))
    # a scale the strategy does not use is an error, not a silent no-op
    with pytest.raises(ValueError, match="cfg_strategy=zero does not use method.fake_guidance"):
        build_run(digits_cfg("method=sid", "method.cfg_strategy=zero", "method.fake_guidance=0.5"))
    with pytest.raises(ValueError, match="cfg_strategy=anti does not use method.fake_train_guidance"):
        build_run(digits_cfg("method=sid", "method.cfg_strategy=anti", "method.fake_guidance=0.5",
                             "method.fake_train_guidance=2.0"))
    with pytest.raises(ValueError, match="fake_cond_dropout=1.5: need a share in"):
        build_run(digits_cfg("method=sid", "method.fake_cond_dropout=1.5"))
    # a dropout nothing applies: Zero-CFG trains the fake score conditionally, an unconditional teacher has no null
    with pytest.raises(ValueError, match="fake_cond_dropout=0.5 is not used under method.cfg_strategy=zero"):
        build_run(digits_cfg("method=sid", "method.cfg_strategy=zero", "method.fake_cond_dropout=0.5"))
    with pytest.raises(ValueError, match="fake_cond_dropout=0.5 is not used with an unconditional teacher"):
        build_run(gmm_cfg("method=sid", "method.fake_cond_dropout=0.5"))
    # no dropout: the fake score's null branch, which a fake-score scale reads, never trains
    with pytest.raises(ValueError, match=r"fake_cond_dropout=0 with fake-score CFG scales \(2.0, 1.0\)"):
        build_run(digits_cfg("method=sid", "method.fake_cond_dropout=0", "method.fake_guidance=2"))


def test_guided_denoising_loss_regresses_the_guided_output():
    """LSG's fake-score training scale: the denoising loss of uncond + w (cond - uncond), on the digits UNet."""
    from conftest import digits_cfg
    from stepdistill.train.setup import build_run
    fake = build_run(digits_cfg("method=sid"), with_method=False).roles["fake_score"]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t, cond = torch.tensor([10.0, 300.0, 600.0, 900.0]), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        got = fake.denoising_loss(x0, t, cond, noise, guidance=1.7)
        a, s = fake.schedule.alpha(t)[:, None, None, None], fake.schedule.sigma(t)[:, None, None, None]
        x_t = a * x0 + s * noise
        out = fake.raw(x_t, t, fake.uncond(cond)) + 1.7 * (fake.raw(x_t, t, cond) - fake.raw(x_t, t, fake.uncond(cond)))
        target = a * noise - s * x0 if fake.prediction_type == "v_prediction" else noise
        ref = ((out - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert fake.prediction_type == "v_prediction"   # the target above is the shipped teacher's


@pytest.mark.parametrize("weighting", ["reference", "native"])
def test_critic_loss_of_a_v_prediction_teacher_is_eps_mse_as_sid_lsgs(weighting):
    """SiD-LSG's code trains the fake score of a v-prediction teacher with v-MSE times snr / (snr + 1): the MSE of
    the eps the network implies, written out here from its v output. `native` keeps v-MSE (this SiD before)."""
    from conftest import digits_cfg
    from stepdistill.train.setup import build_run
    run = build_run(digits_cfg("method=sid", f"method.critic_weighting={weighting}"))
    fake = run.roles["fake_score"]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t, cond = torch.tensor([10.0, 300.0, 600.0, 900.0]), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        got = run.method.fake_score_loss(x0, cond, t, noise)
        a, s = fake.schedule.alpha(t)[:, None, None, None], fake.schedule.sigma(t)[:, None, None, None]
        x_t = a * x0 + s * noise
        v = fake.raw(x_t, t, cond)
        eps = (s * x_t + a * v) / (a**2 + s**2)
        mse = ((eps - noise) ** 2 if weighting == "reference" else (v - (a * noise - s * x0)) ** 2).mean()
    torch.testing.assert_close(got, mse, rtol=1e-4, atol=1e-7)
    if weighting == "reference":   # the same as the reference code's v-MSE x snr / (snr + 1) on VP
        snr = (a / s) ** 2
        lsg = (((v - (a * noise - s * x0)) ** 2).flatten(1).mean(1) * (snr / (snr + 1)).flatten()).mean()
        torch.testing.assert_close(got, lsg, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="unknown method.critic_weighting 'eps'"):
        build_run(digits_cfg("method=sid", "method.critic_weighting=eps"))


@pytest.mark.parametrize("overrides,cond_is_null,scale", [((), False, 1.0), (("method.cfg_strategy=zero",), True, 1.0),
                                                          (("method.fake_train_guidance=1.5",), False, 1.5)])
def test_critic_phase_conditions(overrides, cond_is_null, scale):
    from conftest import digits_cfg
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    run = build_run(digits_cfg("method=sid", *overrides))
    fake, calls = run.roles["fake_score"], []
    original = fake.denoising_loss

    def record(x0, t, cond=None, noise=None, guidance=1.0):
        calls.append((cond, guidance))
        return original(x0, t, cond, noise, guidance)

    fake.denoising_loss = record
    batch = BatchSource(run.benchmark, run.method.batch_keys, 8, "cpu")()
    run.method.loss("critic", batch, 0)
    (cond, guidance), = calls
    assert bool((cond == fake.null_class).all()) == cond_is_null and guidance == scale


@pytest.mark.parametrize("overrides,share", [((), 0.0), (("method.cfg_strategy=anti", "method.fake_guidance=0.5"), 0.1),
                                             (("method.fake_train_guidance=1.5",), 0.1),
                                             (("method.fake_guidance=1.5", "method.fake_cond_dropout=0.3"), 0.3)])
def test_fake_score_trains_its_unconditional_branch_when_a_fake_scale_reads_it(overrides, share):
    """With a fake-score CFG scale other than 1 (LSG, Anti-CFG) the generator loss reads the fake score's
    unconditional branch, so its training drops the condition of ~10% of the rows (SiD-LSG's context dropout) and
    the null class's embedding gets a gradient; at scales 1 no row is dropped."""
    from conftest import digits_cfg
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    torch.manual_seed(0)
    run = build_run(digits_cfg("method=sid", *overrides))
    fake, conds = run.roles["fake_score"], []
    original = fake.denoising_loss

    def record(x0, t, cond=None, noise=None, guidance=1.0):
        conds.append(cond)
        return original(x0, t, cond, noise, guidance)

    fake.denoising_loss = record
    batch = BatchSource(run.benchmark, run.method.batch_keys, 400, "cpu")()
    run.roles.train_only(run.method.phases["critic"])
    run.method.loss("critic", batch, 0).loss.backward()
    dropped = (conds[0] == fake.null_class).double().mean().item()
    assert torch.equal(conds[0][conds[0] != fake.null_class], batch["cond"][conds[0] != fake.null_class])
    assert dropped == pytest.approx(share, abs=0.05) and (dropped > 0) == (share > 0)
    null_row = fake.net.class_embedding.weight.grad[fake.null_class]
    assert (null_row.norm() > 0) == (share > 0)


# ------------------------------------------------------------------ SiDA

def test_sida_discriminator_is_the_critics_encoder_on_equally_noised_real_and_fake(gmm_cfg):
    from stepdistill.methods.sida import encoder_logit
    from stepdistill.networks.heads import find_feature_module, tap_features
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    run = build_run(gmm_cfg("method=sida", "method.adv.critic_weight=0.5"))
    assert set(run.roles) == {"teacher", "fake_score", "generator", "generator_ema"}   # no extra network
    fake = run.roles["fake_score"]
    batch = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu")()
    calls, original = [], fake.raw

    def record(x_t, t, cond=None, alpha_sigma=None):
        calls.append((x_t.detach().clone(), t.clone()))
        return original(x_t, t, cond, alpha_sigma)

    fake.raw = record
    torch.manual_seed(3)
    out = run.method.loss("critic", batch, 0)
    fake.raw = original
    (xf_t, tf), (xr_t, tr) = calls            # the denoising loss's call on the fakes, then the real batch's
    with torch.no_grad():
        x_fake = run.roles["generator"](batch["noise"])
    a, s = fake.schedule.alpha(tf)[:, None], fake.schedule.sigma(tf)[:, None]
    assert torch.equal(tf, tr)
    torch.testing.assert_close((xf_t - a * x_fake) / s, (xr_t - a * batch["real"]) / s, rtol=1e-4, atol=1e-4)
    # the adversarial term: softplus of the mean encoder features, independently recomputed
    enc = find_feature_module(fake.net)
    logits = []
    for x_t in (xf_t, xr_t):
        with tap_features(enc) as tap:
            logits.append(encoder_logit(tap["run"](fake.raw, x_t, tf, None), x_t.shape[0]))
    l_d = torch.nn.functional.softplus(logits[0]).mean() + torch.nn.functional.softplus(-logits[1]).mean()
    assert out.logs["loss_adv_d"] == pytest.approx(l_d.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.logs["loss_fake_score"] + 0.5 * l_d.item(), rel=1e-5)


def test_sida_gradient_paths(gmm_cfg):
    from conftest import assert_phase_reaches_only
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    run = build_run(gmm_cfg("method=sida"))
    batch = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu")()
    assert_phase_reaches_only(run, "generator", ("generator",))
    assert_phase_reaches_only(run, "critic", ("fake_score",))
    # the GAN term reaches the generator through the (frozen) critic's encoder: SiDA's generator gradient is not
    # plain SiD's on the same draws (the same loss with the adversarial weight at 0)
    gen = run.roles["generator"]
    run.roles.train_only(("generator",))
    grads = {}
    for weight in (0.5, 0.0):
        run.method.weights = (weight, run.method.weights[1])   # adv.generator_weight, as __init__ reads it
        torch.manual_seed(3)
        out = run.method.loss("generator", batch, 0)
        grads[weight] = torch.autograd.grad(out.loss, list(gen.parameters()))
    diff = sum((a - b).abs().sum() for a, b in zip(grads[0.5], grads[0.0]))
    assert diff > 1e-4 * sum(b.abs().sum() for b in grads[0.0])


def test_sida_generator_term_is_the_weighted_per_position_gan_loss_and_reaches_the_generator():
    """On digits (a feature map): the discriminator has one logit per position (the encoder output's channel
    mean, as SiDA's reference), and the generator loss is L_SiD + λ_G mean_i w_i mean_pos softplus(-D), w_i SiD's
    own weight; with λ_G the generator's gradient changes (the term is neither dropped nor detached)."""
    from conftest import digits_cfg
    from stepdistill.methods.sid import sid_loss
    from stepdistill.networks.heads import tap_features
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    torch.manual_seed(0)
    run = build_run(digits_cfg("method=sida", "method.adv.generator_weight=0.5"))
    m, gen, fake = run.method, run.roles["generator"], run.roles["fake_score"]
    batch = BatchSource(run.benchmark, m.batch_keys, 4, "cpu")()
    run.roles.train_only(m.phases["generator"])
    torch.manual_seed(1)
    out = m.loss("generator", batch, 0)
    grads = torch.autograd.grad(out.loss, list(gen.parameters()), allow_unused=True)
    torch.manual_seed(1)
    x = gen(batch["noise"], batch["cond"])
    t, noise = m._noised(x)
    with tap_features(m.encoder, stop=False) as tap:
        l_sid, _ = sid_loss(x, run.roles["teacher"], fake, batch["cond"], 1.0, 1.0, 1.2, m.t_range, t, noise)
    feats = tap["features"]
    assert feats.dim() == 4 and feats.shape[0] == 4
    with torch.no_grad():
        f_real = run.roles["teacher"].x0(fake.schedule.add_noise(x, noise, t), t, batch["cond"])
        w = 1 / (x - f_real).abs().flatten(1).mean(1)
    logits = feats.float().mean(dim=1)                      # (4, H, W): one logit per position
    per_sample = torch.nn.functional.softplus(-logits.clamp(-10, 10)).flatten(1).mean(1)
    expected = l_sid + 0.5 * (w * per_sample).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["loss_adv_g"] == pytest.approx((w * per_sample).mean().item(), rel=1e-5)
    grads_sid = torch.autograd.grad(l_sid, list(gen.parameters()), allow_unused=True)
    diff = sum((a - b).abs().sum() for a, b in zip(grads, grads_sid) if a is not None and b is not None)
    assert diff > 1e-6 * sum(a.abs().sum() for a in grads_sid if a is not None)


@pytest.mark.parametrize("method", ["sid_fewstep", "sida"])
def test_sid_variants_train_on_both_benchmarks(gmm_cfg, tmp_path, method):
    from conftest import digits_cfg, train_briefly
    train_briefly([gmm_cfg(f"method={method}", "trainer.max_steps=8"),
                   digits_cfg(f"method={method}", "trainer.max_steps=4", "method.cfg_strategy=zero")], tmp_path)


def test_sid_fewstep_is_sid_on_the_uniform_mixture_of_the_k_step_outputs(gmm_cfg):
    """Its generator loss is sid_loss on backward-simulated outputs (k uniform per sample, k - 1 steps without
    gradient): recomputed by hand from the same random draws, and every exit step occurs in a batch."""
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    # alpha and the noise range away from sid_loss's defaults (1.2, [0, 0.8]): the method must pass them on
    run = build_run(gmm_cfg("method=sid_fewstep", "method.alpha=0.9", "method.t_min=0.1", "method.t_max=0.5"))
    gen, batch = run.roles["generator"], BatchSource(run.benchmark, run.method.batch_keys, 64, "cpu")()
    torch.manual_seed(5)
    got = run.method.loss("generator", batch, 0).loss
    torch.manual_seed(5)
    x, ks = gen(batch["noise"], return_steps=True)
    ref, _ = sid_loss(x, run.roles["teacher"], run.roles["fake_score"], None, 1.0, 1.0, 0.9, (0.1, 0.5),
                      normalizer="batch")
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.manual_seed(5)
    x, _ = gen(batch["noise"], return_steps=True)
    defaults, _ = sid_loss(x, run.roles["teacher"], run.roles["fake_score"], None, 1.0, 1.0, 1.2, (0.0, 0.8),
                           normalizer="batch")
    assert abs(defaults.item() - ref.item()) > 1e-3 * abs(ref.item())   # the check can tell them apart
    assert set(ks.tolist()) == {1, 2, 3, 4} and gen.num_steps == 4


def test_backpropagating_through_the_teacher_keeps_more_activations(gmm_cfg):
    """stepdistill-bench's activation measure: SiD's generator phase saves the teacher's and the critic's
    activations for backward on top of the generator's (here the analytic teacher has none: the critic's), DMD2's
    (without its GAN) only the generator's."""
    from stepdistill.cli.bench import saved_activation_bytes
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    saved = {}
    for method, extra in (("dmd2", ["method.gan.enabled=false"]), ("sid", [])):
        run = build_run(gmm_cfg(f"method={method}", *extra))
        saved[method] = saved_activation_bytes(run, BatchSource(run.benchmark, run.method.batch_keys, 64, "cpu"))
    assert 0 < saved["dmd2"] < saved["sid"]


@pytest.mark.parametrize("method", ["sid", "sida"])
def test_critic_noise_levels_follow_sids_code(gmm_cfg, method):
    """SiD's code trains its fake score at EDM's log-normal sigma on EDM teachers (ln sigma ~ N(-1.2, 1.2^2), the
    teacher's own training distribution) and SiD-LSG's at the generator loss's [t_min, t_max] on VP; `reference`
    picks the one for the teacher's schedule. `full` is DMD's whole range. Checked on the t each critic update
    hands to the denoising loss, by a Kolmogorov-Smirnov distance to the intended law."""
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run

    def critic_t(*overrides, n=4000):
        run = build_run(gmm_cfg(f"method={method}", "trainer.batch_size=4000", *overrides))
        fake, seen = run.roles["fake_score"], []
        original = fake.denoising_loss

        def record(x0, t, *args, **kwargs):
            seen.append(t.double())
            return original(x0, t, *args, **kwargs)

        fake.denoising_loss = record
        torch.manual_seed(0)
        run.method.loss("critic", BatchSource(run.benchmark, run.method.batch_keys, n, "cpu")(), 0)
        return run.method.critic_noise, torch.cat(seen).sort().values

    def ks(sorted_draws, cdf):
        n = sorted_draws.numel()
        return (torch.arange(1, n + 1, dtype=torch.float64) / n - cdf(sorted_draws)).abs().max().item()

    mode, t = critic_t("method.t_min=0.1", "method.t_max=0.5")   # VP: the loss's range, in integer timesteps
    assert mode == "loss_range" and t.min() >= 100 - 1 and t.max() <= 500 + 1
    assert ks(t, lambda v: ((v - 99.9) / 399.6).clamp(0, 1)) < 0.03
    mode, t = critic_t("method.critic_noise=full")
    assert mode == "full" and t.min() < 30 and t.max() > 970
    normal = torch.distributions.Normal(-1.2, 1.2)
    edm = ("benchmark.schedule.kind=edm", "~benchmark.schedule.num_train_timesteps", "~benchmark.schedule.beta_schedule")
    mode, sigma = critic_t(*edm)
    assert mode == "lognormal" and sigma.min() >= 0.002 and sigma.max() <= 80
    assert ks(sigma, lambda v: normal.cdf(v.log())) < 0.03
    assert ks(sigma, lambda v: torch.distributions.Normal(-1.2, 0.6).cdf(v.log())) > 0.1   # the test can tell
    mode, sigma = critic_t(*edm, "method.critic_lognormal=[0.5,0.4]")
    assert ks(sigma, lambda v: torch.distributions.Normal(0.5, 0.4).cdf(v.log())) < 0.03
    with pytest.raises(ValueError, match="method.critic_noise=lognormal draws EDM sigmas"):
        build_run(gmm_cfg(f"method={method}", "method.critic_noise=lognormal"))
    for bad in ("[1,2,3]", "1.0", "[0.5,0]"):
        with pytest.raises(ValueError, match=r"method.critic_lognormal=.*give \[P_mean, P_std\]"):
            build_run(gmm_cfg(f"method={method}", *edm, f"method.critic_lognormal={bad}"))
    build_run(gmm_cfg(f"method={method}", "method.critic_lognormal=1.0"))   # not read off EDM
    with pytest.raises(ValueError, match="unknown method.critic_noise 'uniform'"):
        build_run(gmm_cfg(f"method={method}", "method.critic_noise=uniform"))


def test_sida_adversarial_terms_start_at_their_step(gmm_cfg):
    """`method.adv.start_step` (SiDA's code starts the generator's GAN term after 200k images): before it the
    generator's loss is plain SiD (the same loss and draws as method=sid), from it on it adds the adversarial term.
    The discriminator's term trains from the first step, as in SiDA's code (it waited too: the generator then read
    an untrained discriminator)."""
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    sida = build_run(gmm_cfg("method=sida", "method.adv.start_step=5"))
    sid = build_run(gmm_cfg("method=sid"))
    sid.roles.load_state_dict(sida.roles.state_dict())
    batch = BatchSource(sida.benchmark, sida.method.batch_keys, 16, "cpu")()
    for run in (sida, sid):
        run.roles.train_only(run.method.phases["generator"])
    torch.manual_seed(0)
    before = sida.method.loss("generator", batch, 4)
    torch.manual_seed(0)
    plain = sid.method.loss("generator", batch, 4)
    assert before.loss.item() == plain.loss.item() and before.logs.keys() == plain.logs.keys()
    assert "loss_adv_g" in sida.method.loss("generator", batch, 5).logs
    sida.roles.train_only(sida.method.phases["critic"])
    assert "loss_adv_d" in sida.method.loss("critic", batch, 0).logs
    with pytest.raises(ValueError, match="method.adv.start_step"):
        build_run(gmm_cfg("method=sida", "method.adv.start_step=-1"))


def test_weight_is_floored_where_the_teacher_predicts_the_sample_exactly(setup):
    """SiD's code clips the weight's mean|x_g - f_real| at 1e-5: a sample the teacher predicts exactly gets weight
    1e5, not 1/0 (3.4e38 after nan_to_num, and a loss of -4e36)."""
    sched, _, fake, x, t, noise = setup

    class Oracle:   # predicts the clean sample from any x_t
        schedule = sched

        def x0(self, x_t, t, cond=None, guidance=1.0):
            return x.detach()

    loss, _, weight = sid_loss(x.clone().requires_grad_(), Oracle(), fake, t=t, noise=noise, with_weight=True)
    assert torch.allclose(weight, torch.full_like(weight, 1e5), rtol=1e-12, atol=0) and math.isfinite(loss.item())
