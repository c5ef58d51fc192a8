"""f-distill: reverse KL is DMD2 bit for bit; the per-sample weights are h(r) / mean h with r = exp(clipped logit)
(checked on hand-picked logits and, with the exact GMM density ratio, as a scaling of DMD's per-sample gradient);
each phase reaches only its roles; every divergence trains; clear errors."""
import pytest
import torch

from stepdistill import batch_split
from stepdistill.methods.distribution_matching import dmd_loss
from stepdistill.methods.fdistill import DIVERGENCES, f_weights
from stepdistill.networks.gmm import GaussianMixture, GMMDenoiser, circle_means
from stepdistill.schedules import VPSchedule
from stepdistill.train.batches import BatchSource
from stepdistill.train.setup import build_run
from stepdistill.train.trainer import Trainer

# h(r) = r^2 f''(r), written independently of the implementation (in r, float64)
H = {"rkl": lambda r: torch.ones_like(r), "kl": lambda r: r, "js": lambda r: r / (1 + r),
     "sh": lambda r: r.sqrt(), "jf": lambda r: 1 + r}


def _generator_grads(run, batch, seed):
    run.roles.train_only(run.method.phases["generator"])
    torch.manual_seed(seed)
    out = run.method.loss("generator", batch, 0)
    out.loss.backward()
    return out, [p.grad.clone() for p in run.roles["generator"].parameters()]


@pytest.mark.parametrize("extra", [[], ["generator=four_step", "method.step_aware_critic=true"],
                                   ["generator=four_step", "method.step_aware_critic=true", "method.gan.step_aware=true"]],
                         ids=["one_step", "four_step_step_aware", "four_step_step_aware_gan"])
def test_rkl_is_exactly_dmd2(gmm_cfg, extra):
    dmd2_cfg = gmm_cfg("method=dmd2", *extra)
    dmd2 = build_run(dmd2_cfg)
    # the same discriminator noise range: DMD2's gmm preset (conf/benchmark_method/gmm_dmd2.yaml) sets its own
    fd = build_run(gmm_cfg("method=fdistill", "method.divergence=rkl", f"method.gan.t_min={dmd2_cfg.method.gan.t_min}",
                           *extra))
    if "critic_step_embedding" in dmd2.roles:   # zero-initialised: make the exit step matter
        torch.nn.init.normal_(dmd2.roles["critic_step_embedding"].table.weight)
    for name in ("generator", "fake_score", "gan_head") + (("critic_step_embedding",) if extra else ()):
        fd.roles[name].load_state_dict(dmd2.roles[name].state_dict())
    batch = BatchSource(dmd2.benchmark, dmd2.method.batch_keys, 32, "cpu")()
    out_d, g_d = _generator_grads(dmd2, batch, 3)
    out_f, g_f = _generator_grads(fd, batch, 3)
    assert torch.equal(out_d.loss, out_f.loss)
    assert all(torch.equal(a, b) for a, b in zip(g_d, g_f))
    assert out_f.logs["fd_weight_max"] == 1.0 and "fd_log_ratio" in out_f.logs
    # the critic phase is DMD2's own
    for run in (dmd2, fd):
        run.roles.train_only(run.method.phases["critic"])
    torch.manual_seed(4)
    c_d = dmd2.method.loss("critic", batch, 0).loss
    torch.manual_seed(4)
    c_f = fd.method.loss("critic", batch, 0).loss
    assert torch.equal(c_d, c_f)


@pytest.mark.parametrize("clip", [(-3.0, 3.0), (-1.0, 2.0)])
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_weights_on_hand_picked_logits(divergence, clip):
    logits = torch.tensor([-10.0, -3.0, -1.5, -0.5, 0.0, 0.7, 1.9, 3.0, 8.0])
    w = f_weights(logits, divergence, clip)
    r = logits.double().clamp(*clip).exp()
    h = H[divergence](r)
    torch.testing.assert_close(w.double(), h / h.mean(), rtol=1e-6, atol=1e-7)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    inside = (logits > clip[0]) & (logits < clip[1])
    if divergence == "rkl":
        assert torch.equal(w, torch.ones_like(w))
    else:   # larger r, larger relative weight (rkl's are all equal); clipped samples share the bound's weight
        assert torch.all(w[inside][1:] > w[inside][:-1])
        assert torch.all(w[1:] >= w[:-1])
        assert w[logits <= clip[0]].unique().numel() == 1 and w[logits >= clip[1]].unique().numel() == 1


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_gradient_is_dmd_gradient_scaled_by_exact_ratio_weights(divergence):
    """With the exact log p_t / q_t of two mixtures as the 'discriminator', each sample's generator gradient is
    h_i / mean h times DMD's, and kl/js/sh/jf weigh the samples where the teacher is denser more."""
    sched = VPSchedule()
    real = GaussianMixture(circle_means(8, 4.0), 0.25)
    fake = GaussianMixture([[3.0, 0.5], [-1.0, 2.0], [0.0, -3.0]], [0.8, 0.5, 1.0])
    teacher, critic = GMMDenoiser(real, sched), GMMDenoiser(fake, sched)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    seen = {}

    def exact_weights(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        a, s = sched.alpha(t).double(), sched.sigma(t).double()
        log_r = real.log_prob(x_t.double(), a, s) - fake.log_prob(x_t.double(), a, s)
        seen["log_r"], seen["w"] = log_r, f_weights(log_r, divergence, (-3.0, 3.0))
        return seen["w"]

    grads = []
    for fn in (None, exact_weights):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(0)
        loss, _ = dmd_loss(x, teacher, critic, normalizer="batch", weight_fn=fn)
        loss.backward()
        grads.append(x.grad)
    plain, weighted = grads
    # the ratio is read where the scores are: the noised sample at the DM loss's own noise level
    torch.manual_seed(0)
    t = sched.sample_t(16, 0.02, 0.98)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], sched.add_noise(x0, batch_split.randn_like(x0), t))
    w, log_r = seen["w"], seen["log_r"]
    h = H[divergence](log_r.clamp(-3.0, 3.0).exp())
    torch.testing.assert_close(w, h / h.mean())
    torch.testing.assert_close(weighted, w[:, None] * plain, rtol=1e-5, atol=1e-6 * plain.abs().max().item())
    assert log_r.min() < -3 and log_r.max() > 3   # the draw reaches both sides of the clip
    if divergence != "rkl":
        hi, lo = log_r.argmax(), log_r.argmin()
        assert w[hi] > 1 > w[lo]   # relative to rkl's weight of 1: more where p_t / q_t is larger
        order = torch.argsort(log_r.clamp(-3.0, 3.0))
        assert torch.all(w[order][1:] >= w[order][:-1])


def _by_hand(logits, t, divergence, clip, bins, previous=None, ema=0.0):
    """f-distill's two normalisations, written out in float64: r / its noise-level bin's mean r, then h / mean h."""
    r = logits.double().clamp(*clip).exp()
    index = (t.double() / 999 * bins).floor().long().clamp(max=bins - 1)   # VP: fraction = t / 999
    means = torch.ones(bins, dtype=torch.float64) if previous is None else previous.double().clone()
    for b in index.unique():
        means[b] = ema * means[b] + (1 - ema) * r[index == b].mean()
    h = H[divergence](r / means[index])
    return h / h.mean(), means


@pytest.mark.parametrize("divergence", ["kl", "js", "jf"])
def test_ratio_is_normalised_per_noise_level_then_weights_per_batch(gmm_cfg, divergence):
    """FastGen's f-distill divides each density ratio by the mean ratio of its noise-level bin before h (its
    `ratio_normalization`, 10 bins); the discriminator's logit is read as log p / q (not q / p); the bins' means
    follow `ratio_ema` and travel in the method's state."""
    run = build_run(gmm_cfg("method=fdistill", f"method.divergence={divergence}", "method.ratio_ema=0.5"))
    logits = torch.tensor([-4.0, -1.0, 0.5, 2.0, -0.3, 1.2, 3.5, 0.0])
    t = torch.tensor([10.0, 95.0, 99.0, 400.0, 410.0, 420.0, 980.0, 999.0])   # bins 0, 0, 0, 4, 4, 4, 9, 9
    run.method.gan.logits_noised = lambda x_t, t_, cond: logits   # a stand-in discriminator
    run.method.bin_means.fill_(2.0)
    logs = {}
    w = run.method.dm_weight_fn({"cond": None}, logs, step=0)(torch.zeros(8, 2), t)
    want, means = _by_hand(logits, t, divergence, (-3.0, 3.0), 10, torch.full((10,), 2.0), ema=0.5)
    torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-7)
    # the next step's batch moves the means on from the first's; the state carries them to a resumed run
    w2 = run.method.dm_weight_fn({"cond": None}, logs, step=1)(torch.zeros(8, 2), t.flip(0))
    want2, means2 = _by_hand(logits, t.flip(0), divergence, (-3.0, 3.0), 10, means, ema=0.5)
    torch.testing.assert_close(w2.double(), want2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(run.method.state_dict()["ratio_bin_means"], means2)
    assert means2[1].item() == 2.0   # a bin without samples keeps its mean
    resumed = build_run(gmm_cfg("method=fdistill", f"method.divergence={divergence}", "method.ratio_ema=0.5"))
    resumed.method.load_state_dict(run.method.state_dict(), "cpu")
    torch.testing.assert_close(resumed.method.bin_means, means2)
    # ratio_bins=0: the batch normalisation alone
    plain = build_run(gmm_cfg("method=fdistill", f"method.divergence={divergence}", "method.ratio_bins=0"))
    plain.method.gan.logits_noised = lambda x_t, t_, cond: logits
    w0 = plain.method.dm_weight_fn({"cond": None}, {}, step=0)(torch.zeros(8, 2), t)
    h = H[divergence](logits.double().clamp(-3.0, 3.0).exp())
    torch.testing.assert_close(w0.double(), h / h.mean(), rtol=1e-6, atol=1e-7)
    # the unbalanced mixture's preset leaves the normalisation out (conf/benchmark_method/gmm_unbalanced_fdistill.yaml)
    assert build_run(gmm_cfg("benchmark=gmm_unbalanced", "method=fdistill")).method.bin_means is None
    assert build_run(gmm_cfg("method=fdistill")).method.bin_means.numel() == 10
    with pytest.raises(ValueError, match="method.ratio_bins must be >= 0"):
        build_run(gmm_cfg("method=fdistill", "method.ratio_ema=1.0"))


def test_bin_means_move_once_per_step_over_micro_batches_and_draws(gmm_cfg):
    """`ratio_ema` is a decay per trainer step: the micro-batches of gradient accumulation and the draws of
    `dm_draws` each call the weight function, and the kept means moved once per call (K micro-batches: ema^K
    per step). Now they move once, by the mean of all the step's rows, as one batch of them would; each call's
    weights still divide by the means moved by its own rows (a batch statistic, like the mean of h)."""
    from stepdistill import batch_split
    logits = torch.tensor([-1.0, 0.5, 2.0, -0.3, 1.2, 0.1, 0.7, -2.0])
    t = torch.tensor([10.0, 95.0, 400.0, 410.0, 420.0, 980.0, 999.0, 50.0])

    def method():
        run = build_run(gmm_cfg("method=fdistill", "method.divergence=kl", "method.ratio_ema=0.5"))
        # a stand-in discriminator: each row's logit, found by its (distinct) t
        run.method.gan.logits_noised = lambda x_t, t_, cond: logits[[int((t == v).nonzero()[0]) for v in t_]]
        return run.method

    whole = method()
    whole.dm_weight_fn({"cond": None}, {}, step=0)(torch.zeros(8, 2), t)
    _, want = _by_hand(logits, t, "kl", (-3.0, 3.0), 10, ema=0.5)
    torch.testing.assert_close(whole.state_dict()["ratio_bin_means"], want)
    split = method()
    for i in range(2):   # two micro-batches of 4 rows, then a second draw of the last one
        with batch_split.micro_batch(i, 2):
            w = split.dm_weight_fn({"cond": None}, {}, step=0)(torch.zeros(4, 2), t[4 * i:4 * i + 4])
            torch.testing.assert_close(w.double(), _by_hand(logits[4 * i:4 * i + 4], t[4 * i:4 * i + 4], "kl",
                                                            (-3.0, 3.0), 10, ema=0.5)[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split.state_dict()["ratio_bin_means"], want)
    draws = method()
    weight_fn = draws.dm_weight_fn({"cond": None}, {}, step=0)
    weight_fn(torch.zeros(4, 2), t[:4])
    weight_fn(torch.zeros(4, 2), t[4:])
    torch.testing.assert_close(draws.state_dict()["ratio_bin_means"], want)


def test_a_non_finite_ratio_does_not_stick_in_its_bin(gmm_cfg):
    """A step whose discriminator gave a NaN logit is skipped by the trainer; its bin's kept mean stays what it
    was (0 · NaN is NaN: at any ratio_ema the bin, and every later weight in it, had turned NaN for good)."""
    for ema in (0.0, 0.5):
        run = build_run(gmm_cfg("method=fdistill", "method.divergence=kl", f"method.ratio_ema={ema}"))
        t = torch.tensor([10.0, 20.0, 500.0, 990.0])
        logits = torch.tensor([float("nan"), 0.5, 1.0, -1.0])
        run.method.gan.logits_noised = lambda x_t, t_, cond: logits
        assert torch.isnan(run.method.dm_weight_fn({"cond": None}, {}, step=0)(torch.zeros(4, 2), t)).any()
        logits = torch.tensor([0.3, 0.5, 1.0, -1.0])
        w = run.method.dm_weight_fn({"cond": None}, {}, step=1)(torch.zeros(4, 2), t)
        assert torch.isfinite(w).all() and torch.isfinite(run.method.state_dict()["ratio_bin_means"]).all()


def test_fraction_of_inverts_t_from_fraction():
    from stepdistill.schedules import EDMSchedule, FlowSchedule
    u = torch.linspace(0, 1, 11)
    for sched in (EDMSchedule(), FlowSchedule()):
        torch.testing.assert_close(sched.fraction_of(sched.t_from_fraction(u)), u, rtol=0, atol=1e-5)
    vp = VPSchedule()
    torch.testing.assert_close(vp.fraction_of(torch.tensor([0.0, 999.0, 333.0])), torch.tensor([0.0, 1.0, 1 / 3]))


def test_each_phase_reaches_only_its_roles(gmm_cfg):
    run = build_run(gmm_cfg("method=fdistill", "method.divergence=kl"))
    batch = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu")()
    expect = {"generator": {"generator"}, "critic": {"fake_score", "gan_head"}}
    for phase in ("generator", "critic"):
        for name in ("teacher", "fake_score", "generator", "gan_head"):
            for p in run.roles[name].parameters():
                p.grad = None
        run.roles.train_only(run.method.phases[phase])
        run.method.loss(phase, batch, 0).loss.backward()
        for name in ("generator", "fake_score", "gan_head"):
            got = [p.grad is not None for p in run.roles[name].parameters()]
            assert all(got) if name in expect[phase] else not any(got), (phase, name)
        assert all(p.grad is None for p in run.roles["teacher"].parameters())


def test_every_divergence_trains_and_clear_errors(gmm_cfg, tmp_path):
    from conftest import compose_cfg
    for div in DIVERGENCES:
        run = build_run(gmm_cfg("method=fdistill", f"method.divergence={div}", "trainer.max_steps=8"))
        Trainer(run, tmp_path / div).fit()
        assert all(torch.isfinite(p).all() for p in run.roles["generator"].parameters()), div
    digits = compose_cfg("benchmark=digits", "method=fdistill", "method.divergence=js", "method.critic_steps=1",
                         "trainer.max_steps=4", "trainer.batch_size=8", "eval.every=0", "eval.final=false",
                         "trainer.progress=false")
    run = build_run(digits)
    Trainer(run, tmp_path / "digits").fit()
    assert all(torch.isfinite(p).all() for p in run.roles["generator"].parameters())
    with pytest.raises(ValueError, match="method.divergence 'tv'.*rkl, kl, js, sh, jf"):
        build_run(gmm_cfg("method=fdistill", "method.divergence=tv"))
    with pytest.raises(ValueError, match="gan.enabled=true"):
        build_run(gmm_cfg("method=fdistill", "method.gan.enabled=false"))
    # a weight of 0 switched the discriminator's training off: the DM gradient was weighted by a random head
    with pytest.raises(ValueError, match="method.gan.critic_weight=0: method=fdistill reads the density ratio"):
        build_run(gmm_cfg("method=fdistill", "method.gan.critic_weight=0"))
    # a resume with another bin count was torch's "The size of tensor a (5) must match the size of tensor b (10)"
    state = build_run(gmm_cfg("method=fdistill")).method.state_dict()
    with pytest.raises(ValueError, match="method.ratio_bins=5, but the checkpoint kept the means of 10 noise-level "
                                         "bins: resume with method.ratio_bins=10"):
        build_run(gmm_cfg("method=fdistill", "method.ratio_bins=5")).method.load_state_dict(state, "cpu")


def test_a_skipped_step_leaves_the_ratio_bins_as_they_were(gmm_cfg, tmp_path):
    """A generator update skipped as non-finite moves no weight, and its density ratios do not enter the kept
    bin means either (they were folded in at the next step or the next save)."""
    run = build_run(gmm_cfg("method=fdistill", "method.ratio_ema=0.5", "method.critic_warmup_steps=0"))
    trainer, m = Trainer(run, tmp_path), run.method
    batches = BatchSource(run.benchmark, m.batch_keys, 32, "cpu")
    for _ in range(3):   # critic, generator, critic: the generator's ratios are in the means
        trainer.train_step(batches)
        trainer.step += 1
    before = m.state_dict()["ratio_bin_means"].clone()
    assert not torch.equal(before, torch.ones_like(before))
    loss = m.loss

    def nan_loss(*args):
        out = loss(*args)
        out.loss = out.loss * float("nan")
        return out
    m.loss = nan_loss
    phase, logs = trainer.train_step(batches)
    assert phase == "generator" and logs is None and trainer.nonfinite_in_a_row["generator"] == 1
    assert torch.equal(m.state_dict()["ratio_bin_means"], before)

