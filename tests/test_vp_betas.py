"""diffusers teachers whose scheduler sets `trained_betas` or `rescale_betas_zero_snr`: the VP schedule is built as
DDPMScheduler / DDIMScheduler / LCMScheduler build theirs, round-trips through to_config, loads as a UNet teacher,
samples, distils, exports to an LCMScheduler with the same alphas_cumprod, and nothing divides by alpha(T-1) = 0
(an epsilon teacher on a zero-terminal-SNR schedule is refused at load in one line)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_unet

from stepdistill.schedules import VPSchedule, betas_for, make_schedule

# "trained" betas that no named schedule gives: (0.01 .. 0.2)^2, i.e. 1e-4 .. 0.04
TRAINED = (torch.linspace(0.01, 0.2, 1000, dtype=torch.float64) ** 2).tolist()
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LINEAR = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def _assert_alphas_cumprod_match(ours: VPSchedule, theirs: torch.Tensor):
    # diffusers computes in float32, we in float64: agreement to float32 rounding (relative, where it is small)
    theirs = theirs.double()
    assert ours.alphas_cumprod.dtype == torch.float64 and ours.alphas_cumprod.shape == theirs.shape
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the schedule itself
@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "LCMScheduler"])
def test_trained_betas_alphas_cumprod_match_diffusers(cls):
    import diffusers
    ref = getattr(diffusers, cls)(num_train_timesteps=1000, trained_betas=TRAINED).alphas_cumprod
    ours = VPSchedule(1000, trained_betas=TRAINED)
    _assert_alphas_cumprod_match(ours, ref)
    # the named schedule is ignored, as diffusers ignores it
    assert torch.equal(VPSchedule(1000, "linear", trained_betas=TRAINED).alphas_cumprod, ours.alphas_cumprod)
    torch.testing.assert_close(ours.alphas_cumprod, torch.cumprod(1 - torch.tensor(TRAINED, dtype=torch.float64), 0),
                               rtol=0, atol=0)
    assert not ours.zero_terminal_snr


@pytest.mark.parametrize("betas", [LINEAR, SD, dict(beta_schedule="squaredcos_cap_v2"), dict(trained_betas=TRAINED)],
                         ids=["linear", "scaled_linear", "cosine", "trained"])
@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "LCMScheduler"])
def test_zero_terminal_snr_alphas_cumprod_match_diffusers(cls, betas):
    import diffusers
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from stepdistill.schedules import rescale_zero_terminal_snr as ours_rescale
    ref = getattr(diffusers, cls)(num_train_timesteps=1000, rescale_betas_zero_snr=True, **betas).alphas_cumprod
    ours = VPSchedule(1000, rescale_betas_zero_snr=True, **betas)
    _assert_alphas_cumprod_match(ours, ref)
    assert ours.alphas_cumprod[-1] == 0 and ref[-1] == 0 and ours.zero_terminal_snr
    assert bool((ours.alphas_cumprod[:-1] > 0).all()) and bool((ours.alphas_cumprod.diff() < 0).all())
    # the rescale is diffusers' own, step for step: the same float64 betas give the same float64 betas
    b = torch.tensor(TRAINED, dtype=torch.float64) if "trained_betas" in betas else betas_for(
        betas["beta_schedule"], 1000, betas.get("beta_start", 0.0001), betas.get("beta_end", 0.02))
    assert torch.equal(ours_rescale(b), rescale_zero_terminal_snr(b.clone()))
    # alpha = 0, sigma = 1 at T-1; the first timestep keeps its signal level
    t = torch.tensor([0.0, 998.0, 999.0])
    a, s = ours.alpha_sigma(t)
    assert a[2] == 0 and s[2] == 1 and bool((a[:2] > 0).all())
    plain = VPSchedule(1000, **betas)
    torch.testing.assert_close(ours.alpha(t[:1]), plain.alpha(t[:1]))


@pytest.mark.parametrize("settings", [dict(trained_betas=TRAINED), dict(rescale_betas_zero_snr=True, **SD),
                                      dict(trained_betas=TRAINED, rescale_betas_zero_snr=True)],
                         ids=["trained", "zero_snr", "both"])
def test_to_config_round_trips(settings):
    sched = make_schedule("vp", **settings)
    cfg = sched.to_config()
    assert cfg["kind"] == "vp" and settings.items() <= cfg.items()
    json.loads(json.dumps(cfg))   # plain floats and bools: config.yaml / an export's JSON take it
    again = make_schedule(**cfg)
    assert again.to_config() == cfg
    assert torch.equal(again.alphas_cumprod, sched.alphas_cumprod)
    t = sched.t_from_fraction(torch.linspace(0, 1, 11))
    for a, b in zip(again.alpha_sigma(t), sched.alpha_sigma(t)):
        assert torch.equal(a, b)


def test_trained_betas_that_cannot_be_a_schedule_are_clear_errors():
    with pytest.raises(ValueError, match="trained_betas has 10 entries but num_train_timesteps is 1000"):
        VPSchedule(1000, trained_betas=[0.01] * 10)
    with pytest.raises(ValueError, match=r"trained_betas\[3\] = 1.0: each beta must lie in \(0, 1\)"):
        VPSchedule(10, trained_betas=[0.01] * 3 + [1.0] + [0.01] * 6)
    with pytest.raises(ValueError, match=r"trained_betas\[0\] = -0.1"):
        VPSchedule(2, trained_betas=[-0.1, 0.5])
    # the last may be 1: a zero-terminal-SNR schedule written out as its betas
    assert VPSchedule(3, trained_betas=[0.1, 0.2, 1.0]).zero_terminal_snr


def test_noise_ratio_and_fraction_helpers_stay_finite_at_zero_snr():
    """SiD's t_init (sigma/alpha = 2.5) and the fraction helpers: sigma/alpha is inf at T-1, never picked."""
    sched = VPSchedule(rescale_betas_zero_snr=True, **SD)
    t = sched.t_at_noise_ratio(2.5)
    assert 0 < t < 999 and t == int(t)
    a, s = sched.alpha(torch.tensor([t])), sched.sigma(torch.tensor([t]))
    assert abs(math.log(float(s / a)) - math.log(2.5)) < 0.05
    assert sched.t_at_noise_ratio(1e30) == 998   # the noisiest finite ratio, not the infinite one
    assert sched.fraction_at(999.0) == pytest.approx(1.0, abs=1e-3) and sched.t_max == 999.0


# ---------------------------------------------------------------- scheduler configs -> teacher schedules
def _config(**kwargs) -> dict:
    from diffusers import DDPMScheduler
    return dict(DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **kwargs).config)


@pytest.mark.parametrize("kwargs", [dict(trained_betas=TRAINED), dict(rescale_betas_zero_snr=True,
                                                                      prediction_type="v_prediction", **SD),
                                    dict(rescale_betas_zero_snr=True, prediction_type="sample", **LINEAR)],
                         ids=["trained", "zero_snr_v", "zero_snr_sample"])
def test_vp_schedule_of_a_diffusers_config_has_its_alphas_cumprod(kwargs):
    from diffusers import DDPMScheduler

    from stepdistill.teachers import vp_schedule
    cfg = _config(**kwargs)
    cfg = json.loads(json.dumps(cfg))   # as read from scheduler_config.json
    ours = vp_schedule(cfg)
    _assert_alphas_cumprod_match(ours, DDPMScheduler.from_config(cfg).alphas_cumprod)
    assert ours.zero_terminal_snr == bool(kwargs.get("rescale_betas_zero_snr"))


def test_a_teacher_on_continuous_euler_time_is_refused():
    """EulerDiscreteScheduler's timestep_type="continuous" (CosXL) feeds its UNet 0.25 log sigma; the teacher was
    accepted and fed the timestep index."""
    from diffusers import EulerDiscreteScheduler

    from stepdistill.teachers import vp_schedule
    config = dict(EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                         timestep_type="continuous").config)
    with pytest.raises(ValueError, match="sets timestep_type='continuous': its UNet takes 0.25 log sigma"):
        vp_schedule(config)
    assert vp_schedule({**config, "timestep_type": "discrete"}).num_train_timesteps == 1000


def test_epsilon_teacher_on_zero_terminal_snr_is_a_one_line_error():
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.teachers import vp_schedule
    for cfg, why in [(_config(rescale_betas_zero_snr=True, **SD), "sets rescale_betas_zero_snr"),
                     (_config(trained_betas=TRAINED[:-1] + [1.0]), "has trained_betas ending in 1")]:
        with pytest.raises(ValueError) as e:
            vp_schedule(cfg)
        msg = str(e.value)
        assert "\n" not in msg and why in msg and "prediction_type 'epsilon'" in msg and "'v_prediction'" in msg
    # any network denoiser too (a student, a points benchmark's schedule setting)
    with pytest.raises(ValueError, match="prediction_type 'epsilon' on a zero-terminal-SNR schedule"):
        NetworkDenoiser(tiny_unet(), VPSchedule(rescale_betas_zero_snr=True), "epsilon")


# ---------------------------------------------------------------- a tiny UNet teacher, end to end
def _save_teacher(root, **sched):
    from diffusers import DDPMScheduler
    tiny_unet(11).save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **sched).save_pretrained(root / "scheduler")
    (root / "stepdistill_teacher.json").write_text(json.dumps({"null_class": 10}))
    return root


TEACHERS = {"trained_eps": dict(trained_betas=TRAINED, prediction_type="epsilon"),
            "zero_snr_v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", **SD),
            "zero_snr_sample": dict(rescale_betas_zero_snr=True, prediction_type="sample", **LINEAR)}


@pytest.mark.parametrize("name", list(TEACHERS))
def test_unet_teacher_loads_denoises_at_the_top_and_samples(tmp_path, name):
    from diffusers import DDPMScheduler

    from stepdistill.samplers import ddim_sample, heun_sample
    from stepdistill.teachers import load_unet_teacher
    teacher = load_unet_teacher(_save_teacher(tmp_path / name, **TEACHERS[name]))
    ref = DDPMScheduler.from_pretrained(tmp_path / name / "scheduler")
    _assert_alphas_cumprod_match(teacher.schedule, ref.alphas_cumprod)
    assert teacher.prediction_type == TEACHERS[name]["prediction_type"]
    torch.manual_seed(0)
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    t = torch.full((3,), 999.0)
    with torch.no_grad():
        x0 = teacher.x0(x, t, labels)
        out = teacher.raw(x, t, labels)
        guided = teacher.x0(x, t, labels, guidance=3.0)
    assert torch.isfinite(x0).all() and torch.isfinite(guided).all()
    if name == "zero_snr_v":   # x0 = alpha x_t - sigma v with alpha = 0, sigma = 1
        assert torch.equal(x0, -out)
    elif name == "zero_snr_sample":
        assert torch.equal(x0, out)
    for sampler, steps in ((ddim_sample, 4), (heun_sample, 3), (heun_sample, 1)):
        with torch.no_grad():
            assert torch.isfinite(sampler(teacher, x, steps, labels, guidance=2.0)).all()


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


@pytest.mark.parametrize("name", ["trained_eps", "zero_snr_v"])
def test_dmd2_distils_exports_and_the_export_samples_as_the_student(tmp_path, name):
    """A short DMD2 run on the teacher (its fake-score loss draws t = 999, its 2-step student starts there), then the
    export: its LCMScheduler carries trained_betas / rescale_betas_zero_snr, so it has the teacher's alphas_cumprod
    and samples what the student samples."""
    from conftest import digits_cfg
    from diffusers import LCMScheduler

    from stepdistill.cli.train import train
    from stepdistill.pipelines import ClassConditionalFewStepPipeline
    from stepdistill.train.evaluation import student_sample
    from stepdistill.train.setup import load_run
    teacher = _save_teacher(tmp_path / "teacher", **TEACHERS[name])
    run_dir = tmp_path / "run"
    result = train(digits_cfg("method=dmd2", f"benchmark.teacher.path={teacher}", "generator.steps=2",
                              "trainer.max_steps=3", "method.critic_steps=1", "trainer.num_threads=1",
                              "logger.every=1"), run_dir)
    rows = _train_rows(run_dir)
    assert rows and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    sched_cfg = json.loads((tmp_path / "run" / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert sched_cfg["_class_name"] == "LCMScheduler"
    if name == "trained_eps":
        assert sched_cfg["trained_betas"] == TRAINED
    else:
        assert sched_cfg["rescale_betas_zero_snr"] is True and sched_cfg["prediction_type"] == "v_prediction"
    gen = load_run(run_dir).student()
    assert list(gen.timesteps) == [999.0, 499.0]
    pipe = ClassConditionalFewStepPipeline.from_pretrained(result["export"])
    assert isinstance(pipe.scheduler, LCMScheduler)
    _assert_alphas_cumprod_match(gen.schedule, pipe.scheduler.alphas_cumprod)
    assert (pipe.scheduler.alphas_cumprod[-1] == 0) == gen.schedule.zero_terminal_snr
    labels = torch.tensor([0, 3, 9])
    g = torch.Generator().manual_seed(3)
    ours = student_sample(gen, torch.randn(3, 1, 8, 8, generator=g), labels, None, g)
    theirs = pipe(class_labels=labels, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(theirs, ((ours / 2 + 0.5).clamp(0, 1)), atol=2e-5, rtol=0)


def test_points_export_on_a_zero_snr_schedule_samples_as_the_student(gmm_cfg, tmp_path):
    """The points export's LCMScheduler runs prediction_type="sample" (the x0 comes from the pipeline): its step at
    t = 999, where alpha = 0, stays finite and equals the student's."""
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.pipelines import PointsFewStepPipeline
    result = train(gmm_cfg("trainer.max_steps=6", "method.critic_warmup_steps=2", "generator=four_step",
                           "+benchmark.schedule.rescale_betas_zero_snr=true", "trainer.num_threads=1"), tmp_path)
    pipe = PointsFewStepPipeline.from_pretrained(result["export"])
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.alphas_cumprod[-1] == 0
    assert pipe.scheduler.config.prediction_type == "sample"
    samples, _ = sample_student(tmp_path, 50, seed=5)
    theirs = pipe(batch_size=50, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(samples).all()
    torch.testing.assert_close(theirs, samples, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- TrigFlow (sCM, rCM) on a zero-SNR schedule
def test_trigflow_native_time_reaches_the_last_timestep_continuously():
    """log(s / a) is +inf at T-1: linear interpolation in it froze the native time at T-2 over the whole last
    interval (zero slope for sCM's JVP); interpolated in a / s instead, it rises continuously to T-1."""
    from stepdistill.methods.trigflow import TrigFlow
    sched = VPSchedule(rescale_betas_zero_snr=True, **SD)
    tf = TrigFlow(sched, 0.5)
    assert tf.t_max < math.pi / 2 and math.isfinite(tf.t_max) and tf.t_min > 0
    grid = torch.arange(999, dtype=torch.float64)
    tn, a, s, k = tf.native(tf.from_native(grid))
    torch.testing.assert_close(tn, grid, rtol=0, atol=1e-9)      # grid points map back to themselves
    assert float(tf.from_native(torch.tensor([999.0]))) == pytest.approx(math.pi / 2)
    t = torch.linspace(float(tf.from_native(torch.tensor([998.0]))), math.pi / 2 - 1e-12, 200,
                       dtype=torch.float64)
    tn, a, s, k = tf.native(t)
    assert torch.isfinite(torch.stack([tn, a, s, k])).all()
    assert bool((tn.diff() > 0).all()) and tn[0] == pytest.approx(998.0) and tn[-1] == pytest.approx(999.0, abs=1e-3)
    _, slope = torch.func.jvp(lambda u: tf.native(u)[0], (t[1:-1],), (torch.ones(198, dtype=torch.float64),))
    assert torch.isfinite(slope).all() and bool((slope > 0).all())


@pytest.mark.parametrize("method", ["scm", "rcm", "sid"])
def test_trigflow_and_sid_methods_train_on_a_zero_snr_v_teacher(tmp_path, method):
    """sCM / rCM (TrigFlow's conversion, its JVP) and SiD (its t_init at sigma/alpha 2.5) on the v-prediction
    zero-SNR teacher: finite losses and a finite generator."""
    from conftest import digits_cfg, train_briefly
    teacher = _save_teacher(tmp_path / "teacher", **TEACHERS["zero_snr_v"])
    extra = ["method.warmup_steps=1"] + (["method.critic_steps=1"] if method == "rcm" else []) if method != "sid" else []
    cfg = digits_cfg(f"method={method}", f"benchmark.teacher.path={teacher}", "trainer.max_steps=3",
                     "trainer.num_threads=1", "logger.every=1", "trainer.export=false", *extra)
    train_briefly([cfg], tmp_path)
    rows = _train_rows(next((tmp_path).glob("0_*")))
    assert rows and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


# ---------------------------------------------------------------- the Stable Diffusion teacher path
def test_stable_diffusion_teacher_with_zero_snr_distils_and_exports(tmp_path, monkeypatch):
    """benchmarks/text_to_image.py reads the pipeline's scheduler through vp_schedule too: an epsilon SD teacher
    with rescale_betas_zero_snr is the one-line error, a v-prediction one trains (its cached teacher samples start
    at t = 999) and exports a stock StableDiffusionPipeline whose LCMScheduler samples what the student samples."""
    import shutil

    from conftest import compose_cfg
    from diffusers import StableDiffusionPipeline

    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.benchmarks.tiny_sd_teacher import build_tiny_sd
    from stepdistill.export import export_run
    from stepdistill.train.evaluation import student_sample
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    base = build_tiny_sd(tmp_path / "tiny")

    def variant(name, **edit):
        root = shutil.copytree(base, tmp_path / name)
        f = root / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **edit}))
        return root

    tiny = ["benchmark=tiny_sd", "trainer.progress=false", "trainer.num_threads=1", "benchmark.num_real=8",
            "benchmark.teacher_steps=3", "eval.every=0", "eval.final=false", "logger.curves=false"]
    eps = variant("eps", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=r"sets rescale_betas_zero_snr .* prediction_type 'epsilon'"):
        build_benchmark(compose_cfg(*tiny, f"benchmark.teacher.path={eps}").benchmark)
    v = variant("v", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    run = build_run(compose_cfg(*tiny, f"benchmark.teacher.path={v}", "trainer.max_steps=2", "generator.steps=2",
                                "method.critic_steps=1", "trainer.batch_size=2", "logger.every=1"))
    assert run.benchmark.schedule.zero_terminal_snr and run.benchmark.prediction_type == "v_prediction"
    Trainer(run, tmp_path / "run").fit()
    rows = _train_rows(tmp_path / "run")
    assert rows and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    export_run(run, tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.alphas_cumprod[-1] == 0
    _assert_alphas_cumprod_match(run.student().schedule, pipe.scheduler.alphas_cumprod)
    prompts = ["a photo of a cat", "a zebra on the moon!"]
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    theirs = pipe(prompts, latents=latents, generator=g, guidance_scale=1.0, output_type="latent",
                  num_inference_steps=2).images
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    ours = student_sample(run.student(), noise, run.benchmark.prompt_cond(prompts), None, g)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
