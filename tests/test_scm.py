"""sCM / sCD: TrigFlow <-> teacher conversion against the exact GMM score, the JVP tangent against finite
differences, gradient isolation, the generator evaluating the consistency function, short real trainings."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from stepdistill.denoiser import NetworkDenoiser
from stepdistill.generator import FewStepGenerator
from stepdistill.methods.scm import SCM
from stepdistill.methods.trigflow import TrigFlow
from stepdistill.networks.gmm import GaussianMixture, GMMDenoiser, circle_means
from stepdistill.networks.mlp import TimeMLP
from stepdistill.roles import Roles
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule
from stepdistill.train.setup import build_run
from stepdistill.train.trainer import Trainer

SCHEDULES = [VPSchedule(), EDMSchedule(), FlowSchedule()]
IDS = ["vp", "edm", "flow"]
THREADS = f"trainer.num_threads={torch.get_num_threads()}"
SCM_CFG = dict(name="scm", guidance=1.0, sigma_data=None, p_mean=-1.0, p_std=1.4, warmup_steps=10,
               tangent_norm_c=0.1, weighting="adaptive", weighting_width=16)


def _method(schedule, prediction_type="edm", steps=1, **cfg):
    torch.manual_seed(0)
    mix = GaussianMixture(circle_means(8, 4.0), 0.25)
    roles = Roles()
    roles["teacher"] = GMMDenoiser(mix, schedule)
    student = NetworkDenoiser(TimeMLP(2, 32, 2, fourier_features=8), schedule, prediction_type, sigma_data=2.8)
    roles["generator"] = FewStepGenerator(student, steps=steps)
    return SCM(roles, OmegaConf.create({**SCM_CFG, **cfg})), mix


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_teacher_tangent_is_the_exact_pf_ode_velocity(schedule):
    """sigma_d F_teacher, taken through the teacher's native time and input scaling, equals the TrigFlow PF-ODE
    velocity -tan(t) (x + sigma_d^2 grad log p_t(x)) with the score from autograd of the exact noised mixture
    density of x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2)."""
    method, mix = _method(schedule)
    tf, sd = method.trig, method.trig.sigma_data
    assert sd == 2.8
    t = torch.linspace(tf.t_min + 1e-3, min(tf.t_max, 1.55), 64, dtype=torch.float64)
    x = tf.add_noise(mix.sample(64).double(), sd * torch.randn(64, 2, dtype=torch.float64), t).float()
    v = tf.velocity(method.models["teacher"], x, t)
    xd = x.double().requires_grad_(True)
    score = torch.autograd.grad(mix.log_prob(xd, torch.cos(t), sd * torch.sin(t)).sum(), xd)[0]
    exact = -torch.tan(t)[:, None] * (x.double() + sd**2 * score)
    torch.testing.assert_close(v.double(), exact, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_native_time_matches_sigma_data_tan_t(schedule):
    """s / a = sigma_d tan t at every TrigFlow time (EDM: sigma = sigma_d tan t), x = k x_t keeps the signal and
    noise parts apart, and the schedule's own grid points map back to themselves."""
    tf = TrigFlow(schedule, 0.5)
    t = torch.linspace(tf.t_min, tf.t_max, 50, dtype=torch.float64)
    t_native, a, s, k = tf.native(t)
    torch.testing.assert_close(s / a, 0.5 * torch.tan(t))
    torch.testing.assert_close(a, k * torch.cos(t))
    grid = schedule.ode_timesteps(8).double()
    back = tf.native(tf.from_native(grid))
    torch.testing.assert_close(back[0], grid, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back[1].float(), schedule.alpha(grid.float()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back[2].float(), schedule.sigma(grid.float()), rtol=1e-5, atol=1e-6)
    if schedule.kind == "edm":
        torch.testing.assert_close(t_native, 0.5 * torch.tan(t))


# The VP student's time input is the DDPM index, ~250-1100 index units per radian of TrigFlow time, and its
# sinusoidal embedding has a period of 2 pi index units: a central difference needs a step well below one index.
@pytest.mark.parametrize("schedule, h", [(VPSchedule(), 1e-4), (EDMSchedule(), 1e-3)], ids=["vp", "edm"])
def test_jvp_tangent_matches_finite_difference(schedule, h):
    """d f_theta / dt along (dx_t/dt, 1) from torch.func.jvp equals a central difference of f_theta."""
    method, mix = _method(schedule)
    tf = method.trig
    n = 32
    t = torch.linspace(0.3, 1.3, n, dtype=torch.float64)
    x = tf.add_noise(mix.sample(n), tf.sigma_data * torch.randn(n, 2), t)
    v = tf.velocity(method.models["teacher"], x, t)
    f, df = method.tangent(method.consistency, x, t, v)
    with torch.no_grad():
        fd = (method.consistency(x + h * v, t + h) - method.consistency(x - h * v, t - h)) / (2 * h)
        torch.testing.assert_close(f, method.consistency(x, t))
    torch.testing.assert_close(df, fd, rtol=2e-2, atol=2e-2 * float(df.abs().mean()))
    # F and f are tied: f = cos t x - sin t sigma_d F, so their tangents are too
    F, dF = method.tangent(method.F_student, x, t, v)
    c, s = torch.cos(t)[:, None].float(), torch.sin(t)[:, None].float()
    sd = tf.sigma_data
    torch.testing.assert_close(df, -s * x + c * v - c * sd * F - s * sd * dF, rtol=1e-3, atol=1e-3)


def test_tangent_has_no_gradient_and_only_the_student_learns():
    method, mix = _method(VPSchedule())
    m = method.models
    m.train_only(method.phases["generator"])
    batch = {"noise": torch.randn(16, 2), "real": mix.sample(16), "real_cond": None}
    x, t = batch["real"], torch.full((16,), 0.7, dtype=torch.float64)
    F, dF = method.tangent(method.F_student, x, t, torch.randn(16, 2))
    assert not F.requires_grad and not dF.requires_grad and dF.grad_fn is None
    assert all(p.grad is None for p in m.parameters())
    out = method.loss(method.phase(5), batch, step=5)
    assert method.phase(5) == "generator" and torch.isfinite(out.loss)
    out.loss.backward()
    got = {name for name, mod in m.items() if any(p.grad is not None for p in mod.parameters())}
    assert got == {"generator", "weighting"}
    assert all(p.grad is not None for p in m["generator"].parameters())
    assert set(method.roles) == {"teacher", "generator", "weighting"} and set(method.phases) == {"generator"}


@pytest.mark.parametrize("steps", [1, 2])
def test_generator_samples_with_the_consistency_function(steps):
    """At each of the generator's (LCM) timesteps, its x0 is f_theta at the matching TrigFlow time and x_t = x / k;
    and f_theta(x, t -> 0) = x (the TrigFlow boundary condition)."""
    method, _ = _method(VPSchedule(), steps=steps)
    gen, tf = method.models["generator"], method.trig
    x = torch.randn(8, 2) * 3
    torch.set_grad_enabled(False)
    for t_k in gen.timesteps:
        s = tf.from_native(torch.full((8,), t_k))
        k = tf.native(s)[3].float()[:, None]
        torch.testing.assert_close(gen.denoise(x, t_k), method.consistency(x / k, s), rtol=1e-4, atol=1e-4)
    tiny = torch.full((8,), 1e-6, dtype=torch.float64)
    torch.testing.assert_close(method.consistency(x, tiny), x, rtol=1e-4, atol=1e-4)
    torch.set_grad_enabled(True)


def test_cfg_applies_to_the_teacher_tangent():
    """Guidance acts on the teacher's x0, hence linearly on dx_t/dt."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(3, 2)

        def forward(self, x, t, cond):
            return torch.tanh(x) * (1 + self.emb(cond)) + 1e-3 * t[:, None]

    teacher = NetworkDenoiser(Net(), VPSchedule(), "v_prediction", null_class=2)
    tf = TrigFlow(teacher.schedule, 1.0)
    x, t, cond = torch.randn(6, 2), torch.linspace(0.2, 1.4, 6, dtype=torch.float64), torch.tensor([0, 1] * 3)
    v_c, v_u = tf.velocity(teacher, x, t, cond), tf.velocity(teacher, x, t, torch.full_like(cond, 2))
    torch.testing.assert_close(tf.velocity(teacher, x, t, cond, 3.0), v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)
    # with sigma_d = 1 a v-prediction VP teacher is TrigFlow already: F is the network's own output
    torch.testing.assert_close(tf.F(teacher, x, t, cond), teacher.raw(x, tf.native(t)[0].float(), cond),
                               rtol=1e-4, atol=1e-4)


def test_scm_trains_on_gmm_through_the_trainer(gmm_cfg, tmp_path):
    from stepdistill.cli.train import train
    cfg = gmm_cfg("method=scm", THREADS, "trainer.max_steps=12", "method.warmup_steps=6", "eval.final=true",
                  "eval.num_samples=128", "eval.batch_size=128", "eval.teacher_reference=false")
    result = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows[-1]["step"] == 12 and train_rows[-1]["generator/tangent_warmup"] == 1.0
    assert all(math.isfinite(r["generator/loss"]) for r in train_rows)
    assert result["student_num_nonfinite"] == 0 and (tmp_path / "checkpoints/step_0000012/weighting.safetensors").is_file()


def test_each_scm_step_updates_generator_and_weighting_only(gmm_cfg, tmp_path):
    run = build_run(gmm_cfg("method=scm", THREADS, "method.weighting=adaptive"))
    trainer = Trainer(run, tmp_path)
    from stepdistill.train.batches import BatchSource
    batches = BatchSource(run.benchmark, run.method.batch_keys, 16, "cpu")
    names = [n for n in run.roles if n != "teacher"]
    snaps = {n: [p.detach().clone() for p in run.roles[n].parameters()] for n in names}
    phase, logs = trainer.train_step(batches)
    assert phase == "generator" and logs is not None and math.isfinite(logs["generator/loss"])
    changed = {n for n in names if any(not torch.equal(p, q) for p, q in zip(run.roles[n].parameters(), snaps[n]))}
    assert changed == {"generator", "generator_ema", "weighting"}
    assert list(trainer.optimizers) == ["generator"]


@pytest.mark.parametrize("override, match", [("method.weighting=softmax", "method.weighting"),
                                             ("method.p_std=-1", "method.p_std")])
def test_bad_scm_config_is_a_clear_error(gmm_cfg, override, match):
    with pytest.raises(ValueError, match=match) as e:
        build_run(gmm_cfg("method=scm", override))
    assert "\n" not in str(e.value)


def test_sample_prediction_student_is_refused():
    with pytest.raises(ValueError, match="f\\(x, 0\\) = x"):
        _method(VPSchedule(), prediction_type="sample")


def test_step_experts_are_refused(gmm_cfg):
    with pytest.raises(ValueError, match="generator.step_experts=false"):
        build_run(gmm_cfg("method=scm", "generator=four_step", "generator.step_experts=true"))


@pytest.mark.parametrize("bench, method, scale", [("gmm", "scm", math.pi / 2000), ("gmm", "rcm", math.pi / 2000),
                                                  ("gmm_unbalanced", "scm", math.pi / 2000),
                                                  ("gmm", "dmd2", 1.0), ("gmm", "sid", 1.0)])
def test_gmm_consistency_students_take_the_schedule_angle_as_time(bench, method, scale):
    """conf/benchmark_method/gmm_scm.yaml: sCM-family students on the gmm embed the VP index x pi/2000 (the cosine
    schedule's angle, sCM's c_noise(t) = t); the other methods keep the index."""
    from conftest import compose_cfg
    cfg = compose_cfg(f"benchmark={bench}", f"method={method}")
    assert cfg.benchmark.network.time_scale == pytest.approx(scale)
    net = build_run(cfg).roles["generator"].denoiser.net
    assert net.time_scale == pytest.approx(scale)
    if method == "scm":  # the angle the student sees tracks the schedule's own angle across the range
        idx = torch.tensor([0.0, 250.0, 500.0, 999.0])
        angle = (idx / 1000 + 0.008) / 1.008 * math.pi / 2
        assert (idx * net.time_scale - angle).abs().max() < 0.02
    assert compose_cfg(f"benchmark={bench}", f"method={method}",
                       "benchmark.network.time_scale=1.0").benchmark.network.time_scale == 1.0


@pytest.mark.slow
def test_scm_gmm_default_run_reaches_the_measured_quality(tmp_path):
    """`stepdistill-train benchmark=gmm method=scm` (5000 steps, ~3 min on 2 cores; slow): the README's 1-step and
    2-step figures (HQ 0.90 / 0.96 at seeds 0-2), with margin for the thread count."""
    from conftest import compose_cfg

    from stepdistill.cli.train import train
    from stepdistill.train.evaluation import eval_inputs, student_sample
    from stepdistill.train.setup import load_run
    result = train(compose_cfg("benchmark=gmm", "method=scm", "eval.every=0", "trainer.progress=false"), tmp_path)
    assert result["student_modes_covered"] == 8 and result["student_high_quality_fraction"] >= 0.87
    run = load_run(tmp_path)
    noise, cond, gen = eval_inputs(run.benchmark, 4000, 0)
    student = run.student()
    two = run.benchmark.evaluate(student_sample(student, noise, cond, student.default_timesteps(2), gen, 4000))
    assert two["modes_covered"] == 8 and two["high_quality_fraction"] >= 0.94


def _exact_trigflow_velocity(mix, sd, x, t):
    """dx_t/dt of the TrigFlow PF-ODE, -tan t (x + sigma_d^2 grad log p_t(x)), the score by autograd of the exact
    noised mixture density (a = cos t, s = sigma_d sin t)."""
    xd = x.double().requires_grad_(True)
    score = torch.autograd.grad(mix.log_prob(xd, torch.cos(t), sd * torch.sin(t)).sum(), xd)[0]
    return -torch.tan(t)[:, None] * (x.double() + sd**2 * score)


@pytest.mark.parametrize("step, w", [(20, 0.0), (5, 0.0), (0, 0.0), (20, 0.7)],
                         ids=["r=1", "r=0.5", "r=0", "r=1-w=0.7"])
def test_scm_loss_gradient_is_the_normalised_tangent(step, w):
    """Catches a sign flip of the r cos t sin t (x_t + sigma_d dF/dt) term, a warm-up r that is not step/warmup_steps,
    a missing cos t or 1/D, and the adaptive weighting written e^w L - w instead of e^-w L + w (scm.py docstring).

    Independent reference: at F_theta = F^- the loss e^-w ||F_theta - F^- - g/(||g|| + c)||^2 / D + w has
    d loss / d F_theta = -2 e^-w g_n / (D N) and d loss / d w = (1 - e^-w ||g_n||^2 / D) / N, where at r = 1
    g = cos t df/dt along the exact PF-ODE (f's central difference), and in general g = A + r (cos t df/dt - A) with
    A = -cos^2 t (sigma_d F^- - dx_t/dt), sigma_d F^- = (cos t x_t - f(x_t, t)) / sin t."""
    method, mix = _method(EDMSchedule(), tangent_norm_c=3.0)   # c ~ ||g||: neither the identity nor unit vectors
    tf, sd, c, n, h = method.trig, method.trig.sigma_data, 3.0, 32, 1e-3
    with torch.no_grad():
        method.models["weighting"].mlp[-1].bias.fill_(w)
    t = torch.linspace(0.2, 1.45, n, dtype=torch.float64)
    tf.sample_t = lambda *args, **kwargs: t                    # known times instead of the proposal's draws
    torch.manual_seed(1)
    batch = {"noise": torch.randn(n, 2), "real": mix.sample(n), "real_cond": None}
    caught = {}
    F_student = method.F_student

    def spy(x, s, cond=None):
        out = F_student(x, s, cond)
        if out.requires_grad:   # the differentiated F_theta, not the JVP's F^-
            out.retain_grad()
            caught["F"] = out
        return out
    method.F_student = spy

    def keep_w(module, inputs, out):
        out.retain_grad()
        caught["w"] = out
    method.models["weighting"].register_forward_hook(keep_w)
    out = method.loss("generator", batch, step)
    out.loss.backward()

    cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = (cos * batch["real"].double() + sin * sd * batch["noise"].double()).float()
    v = _exact_trigflow_velocity(mix, sd, x_t, t).float()
    with torch.no_grad():
        f = method.consistency(x_t, t).double()
        df = (method.consistency(x_t + h * v, t + h) - method.consistency(x_t - h * v, t - h)).double() / (2 * h)
    A = -cos**2 * ((cos * x_t.double() - f) / sin - v.double())
    r = min(1.0, step / 10)   # SCM_CFG's warmup_steps=10: linear in the step
    g = A + r * (cos * df - A)
    g_n = g / (g.norm(dim=1, keepdim=True) + c)
    L = (g_n**2).sum(1) / 2                                      # ||F_theta - F^- - g_n||^2 / D at F_theta = F^-
    assert out.logs["tangent_warmup"] == pytest.approx(r)
    assert out.loss.item() == pytest.approx(float((math.exp(-w) * L + w).mean()), rel=2e-2)
    torch.testing.assert_close(caught["F"].grad.double(), -2 * math.exp(-w) * g_n / (2 * n),
                               rtol=3e-2, atol=3e-2 * float(g_n.abs().mean()) / n)
    torch.testing.assert_close(caught["w"].grad.double(), (1 - math.exp(-w) * L) / n, rtol=1e-2, atol=1e-5)


def test_scm_proposal_is_log_normal_in_sigma_d_tan_t():
    """Catches a proposal that is not log(sigma_d tan t) ~ N(p_mean, p_std^2): sigma_d on the wrong side, p_mean and
    p_std swapped or not passed on by the loss. The t the loss draws, on EDM (range sigma 0.002-80, 3.7 std either
    side of p_mean), against the normal CDF: Kolmogorov-Smirnov distance below its 1% critical value 1.63/sqrt(n)."""
    method, mix = _method(EDMSchedule(), p_mean=-0.6, p_std=1.2)
    tf, n, drawn = method.trig, 4096, []
    sample_t = tf.sample_t
    tf.sample_t = lambda *args, **kwargs: drawn.append(sample_t(*args, **kwargs)) or drawn[-1]
    torch.manual_seed(0)
    with torch.no_grad():
        method.loss("generator", {"noise": torch.randn(n, 2), "real": mix.sample(n), "real_cond": None}, 20)
    tau = torch.log(tf.sigma_data * torch.tan(drawn[0])).sort().values
    cdf = torch.distributions.Normal(-0.6, 1.2).cdf(tau)
    ecdf_hi, ecdf_lo = torch.arange(1, n + 1) / n, torch.arange(n) / n
    ks = max(float((ecdf_hi - cdf).abs().max()), float((cdf - ecdf_lo).abs().max()))
    assert ks < 1.63 / math.sqrt(n), ks


def test_scm_under_cpu_bf16_autocast_trains_a_unet_student(tmp_path):
    """Under CPU autocast the JVP gave GroupNorm a bfloat16 primal with a float32 tangent, and the next convolution
    failed ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same")."""
    from conftest import digits_cfg
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    run = build_run(digits_cfg("method=scm", "trainer.mixed_precision=bf16", "method.warmup_steps=0"))
    trainer = Trainer(run, tmp_path)
    phase, logs = trainer.train_step(BatchSource(run.benchmark, run.method.batch_keys, 4, "cpu"))
    assert phase == "generator" and math.isfinite(logs["generator/loss"])


def test_only_rcm_has_a_batch_statistic(gmm_cfg):
    """gmm sets method.normalizer=batch for every method: sCM, which never reads it, warned under gradient
    accumulation that its update was not the one-batch update; rCM's DM term does read it."""
    from stepdistill.train.setup import build_run
    assert build_run(gmm_cfg("method=scm")).method.batch_statistic() is None
    assert build_run(gmm_cfg("method=rcm")).method.batch_statistic() == "method.normalizer=batch"
