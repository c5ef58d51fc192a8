"""Export -> load -> sample gives the same samples as stepdistill's own sampler for the same noise."""
import contextlib
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_unet

from stepdistill.denoiser import NetworkDenoiser
from stepdistill.generator import FewStepGenerator
from stepdistill.schedules import VPSchedule
from stepdistill.train.evaluation import student_sample


class _Run:  # the two attributes export_run reads
    def __init__(self, student, cfg):
        self._student, self.cfg = student, cfg

    def student(self):
        return self._student


@pytest.mark.parametrize("steps", [1, 4])
def test_unconditional_unet_exports_to_stock_ddpm_pipeline(tmp_path, steps):
    from omegaconf import OmegaConf

    from stepdistill.export import export_run
    gen = FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), "v_prediction"), steps=steps)
    cfg = OmegaConf.create({"benchmark": {"name": "test"}, "method": {"name": "dmd2"}})
    out = export_run(_Run(gen, cfg), tmp_path / "export")
    # its default of 1000 steps is more than LCMScheduler takes: the export says how to call it
    assert json.loads((out / "stepdistill_student.json").read_text())["sample"].startswith(
        f"pipe(num_inference_steps={steps})")
    # the pipeline draws the initial noise and the between-step noise from one generator, in that order
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    ours = student_sample(gen, noise, None, None, g)
    # a process that never imports stepdistill loads the folder with stock diffusers
    code = (
        "import sys, torch, numpy as np\n"
        "from diffusers import DDPMPipeline\n"
        f"pipe = DDPMPipeline.from_pretrained(r'{out}')\n"
        "assert type(pipe.scheduler).__name__ == 'LCMScheduler'\n"
        f"img = pipe(batch_size=3, num_inference_steps={steps}, generator=torch.Generator().manual_seed(7), "
        "output_type='np').images\n"
        f"np.save(r'{tmp_path / 'img.npy'}', img)\n"
        "assert 'stepdistill' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    img = np.load(tmp_path / "img.npy")  # N, H, W, C in [0, 1]
    expected = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(img, expected, atol=2e-5)


def test_few_step_samples_do_not_depend_on_the_chunk_size():
    """student_sample draws the between-step noise for all N first, as one batch of N does: chunks of 7 give
    the samples of one chunk, and of the generator's own one-batch sampling from the same RNG state (so
    training's eval.batch_size, stepdistill-eval and stepdistill-sample agree)."""
    from stepdistill.networks.mlp import TimeMLP
    torch.manual_seed(0)
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0), steps=4)
    noise = torch.randn(20, 2)
    chunked = student_sample(gen, noise, None, None, torch.Generator().manual_seed(5), batch_size=7)
    whole = student_sample(gen, noise, None, None, torch.Generator().manual_seed(5), batch_size=1000)
    one_batch = gen.sample(noise, None, None, torch.Generator().manual_seed(5))
    # (chunks of another size run other matrix-product kernels: last-bit differences, not other noise)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, one_batch, rtol=0, atol=0)
    steps = student_sample(gen, noise, None, None, torch.Generator().manual_seed(5), batch_size=7, every_step=True)
    assert len(steps) == 4 and torch.equal(steps[-1], chunked)


def test_class_conditional_export_matches_student(tmp_path):
    from omegaconf import OmegaConf

    from stepdistill.export import export_run
    from stepdistill.pipelines import ClassConditionalFewStepPipeline
    gen = FewStepGenerator(NetworkDenoiser(tiny_unet(11), VPSchedule(), "v_prediction", null_class=10), steps=2)
    cfg = OmegaConf.create({"benchmark": {"name": "test"}, "method": {"name": "dmd2"}})
    out = export_run(_Run(gen, cfg), tmp_path / "export")
    pipe = ClassConditionalFewStepPipeline.from_pretrained(out)
    assert list(pipe.config.trained_timesteps) == [999, 499]
    labels = torch.tensor([0, 3, 9])
    g = torch.Generator().manual_seed(3)
    ours = student_sample(gen, torch.randn(3, 1, 8, 8, generator=g), labels, None, g)
    theirs = pipe(class_labels=labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(theirs, ((ours / 2 + 0.5).clamp(0, 1)), atol=2e-5, rtol=0)
    # K steps at LCM's schedule also work
    assert pipe(class_labels=labels, num_inference_steps=4).shape == (3, 1, 8, 8)


def test_gmm_run_export_matches_sample_cli(gmm_cfg, tmp_path):
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.pipelines import PointsFewStepPipeline
    result = train(gmm_cfg("trainer.max_steps=10", "generator=four_step"), tmp_path)
    pipe = PointsFewStepPipeline.from_pretrained(result["export"])
    samples, labels = sample_student(tmp_path, 50, seed=5)
    assert labels is None
    theirs = pipe(batch_size=50, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs, samples, atol=1e-5, rtol=1e-5)


def test_digits_run_export_matches_sample_cli_with_its_labels(tmp_path):
    """stepdistill-sample's samples and the labels it writes beside them: the exported pipeline given those labels
    and the seed draws the same images (a sampler that wrote other labels than it sampled with would not)."""
    from conftest import digits_cfg
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.pipelines import ClassConditionalFewStepPipeline
    # 3 steps: two critic updates, then one generator update
    result = train(digits_cfg("trainer.max_steps=3", "trainer.checkpoint_every=0"), tmp_path)
    samples, labels = sample_student(tmp_path, 12, seed=5)
    assert len(set(labels.tolist())) == 10 and samples.shape == (12, 1, 8, 8)
    pipe = ClassConditionalFewStepPipeline.from_pretrained(result["export"])
    theirs = pipe(class_labels=labels, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs, samples, atol=2e-5, rtol=0)
    shifted = pipe(class_labels=(torch.as_tensor(labels) + 1) % 10, generator=torch.Generator().manual_seed(5))
    assert (shifted - samples).abs().max() > 1e-2   # the labels matter


def _cfg():
    from omegaconf import OmegaConf
    return OmegaConf.create({"benchmark": {"name": "test"}, "method": {"name": "dmd2"}})


def test_export_replaces_only_an_earlier_export_or_an_empty_folder(tmp_path, monkeypatch):
    """The folder the export replaces is deleted: never the run folder or one holding it, nor unrelated files."""
    from stepdistill.export import export_run
    run = _Run(FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), "v_prediction"), steps=1), _cfg())
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not an earlier export .*pick an empty or new folder"):
        export_run(run, tmp_path / "mine")
    monkeypatch.chdir(tmp_path / "mine")   # out=. : refused, not "PosixPath('.') has an empty name"
    with pytest.raises(ValueError, match="pick an empty or new folder"):
        export_run(run, ".")
    for out in (run_dir, run_dir.parent, tmp_path / "runs" / "r" / ".." / "r"):
        with pytest.raises(ValueError, match="would replace the run folder"):
            export_run(run, out, run_dir)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (run_dir / "config.yaml").is_file()
    # the default run_dir/export, again over the earlier export; an empty folder
    assert export_run(run, run_dir / "export", run_dir) == run_dir / "export"
    assert export_run(run, run_dir / "export", run_dir) == run_dir / "export"
    (tmp_path / "empty").mkdir()
    assert (export_run(run, tmp_path / "empty") / "stepdistill_student.json").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "export"]


@pytest.mark.parametrize("timesteps", [[759], [999, 600]])
def test_unconditional_unet_at_other_timesteps_exports_to_a_pipeline_that_takes_them(tmp_path, timesteps):
    """Stock DDPMPipeline samples LCMScheduler's K-step timesteps only: a student trained at others (SiD's one
    step, generator.timesteps) exports to UnconditionalFewStepPipeline, which samples at the trained ones, without
    LCMScheduler's warnings about custom timesteps (which it keeps for timesteps a user gives)."""
    import json

    from stepdistill.export import export_run
    gen = FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), "v_prediction"), timesteps=timesteps)
    out = export_run(_Run(gen, _cfg()), tmp_path / "export")
    info = json.loads((out / "stepdistill_student.json").read_text())
    assert info["pipeline"] == "UnconditionalFewStepPipeline" and info["trained_timesteps"] == timesteps
    assert info["load"] == "from stepdistill.pipelines import UnconditionalFewStepPipeline"
    from stepdistill.pipelines import UnconditionalFewStepPipeline
    pipe = UnconditionalFewStepPipeline.from_pretrained(out)
    g = torch.Generator().manual_seed(7)   # as stepdistill-sample's steps=K
    ours = student_sample(gen, torch.randn(3, 1, 8, 8, generator=g), None, gen.sampling_timesteps(len(timesteps)), g)
    with _records("diffusers.schedulers.scheduling_lcm") as warnings:
        for k in (None, len(timesteps)):
            theirs = pipe(batch_size=3, num_inference_steps=k, generator=torch.Generator().manual_seed(7))
            torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=0)
        assert warnings == []
        pipe(batch_size=1, timesteps=[801, 400])
        assert "The first timestep on the custom timestep schedule is 801" in warnings[0]


@contextlib.contextmanager
def _records(name: str):
    """The messages logger `name` emits at WARNING and above (diffusers' loggers do not propagate to pytest's)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)   # whatever verbosity an earlier test left diffusers at
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_the_trained_step_count_samples_at_the_trained_timesteps():
    gen = FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), "v_prediction"), timesteps=[755])
    assert gen.sampling_timesteps(None) == gen.sampling_timesteps(1) == [755.0]
    assert gen.sampling_timesteps(2) == [999.0, 499.0]   # other counts: LCMScheduler's


def test_an_image_student_lcm_cannot_step_is_refused_before_training(gmm_cfg, tmp_path, monkeypatch):
    """An image student's export steps with LCMScheduler, which converts epsilon, v and sample outputs only: an EDM
    or flow-velocity UNet exported fine and failed when the pipeline was called. Now refused, and stepdistill-train
    asks before it trains (the export runs after training)."""
    from stepdistill.cli.train import train
    from stepdistill.export import export as export_mod
    for prediction in ("edm", "flow_velocity"):
        gen = FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), prediction), steps=1)
        with pytest.raises(ValueError, match=f"LCMScheduler.*not the teacher's '{prediction}': set trainer.export=false"):
            export_mod.build_pipeline(gen)
    for prediction in ("epsilon", "v_prediction", "sample"):
        export_mod.check_exportable(FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), prediction), steps=1))

    def refuse(student):
        raise ValueError("no export for this student")
    monkeypatch.setattr(export_mod, "check_exportable", refuse)
    with pytest.raises(ValueError, match="no export for this student"):
        train(gmm_cfg("method=dmd2", "trainer.max_steps=2"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()   # refused before the first step
    train(gmm_cfg("method=dmd2", "trainer.max_steps=2", "trainer.export=false"), tmp_path / "no_export")


def test_more_steps_than_lcm_picks_from_are_refused_in_one_line():
    gen = FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), "v_prediction"), steps=1)
    with pytest.raises(ValueError, match=r"steps=60: a student on a discrete schedule samples in at most 50 steps"):
        gen.default_timesteps(60)   # not diffusers' message about `strength`


def test_a_schedule_of_fewer_than_50_timesteps_trains_and_exports(tmp_path):
    """LCMScheduler refuses an original_inference_steps (50 by default) above the schedule's timesteps, even for
    given timesteps: a 40-timestep student failed to build with diffusers' message, and one at given timesteps
    exported a pipeline that could not sample. Both take every timestep now (at most 40 steps)."""
    from stepdistill.export import export_run
    from stepdistill.networks.mlp import TimeMLP
    from stepdistill.pipelines import PointsFewStepPipeline
    torch.manual_seed(0)
    den = NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(num_train_timesteps=40), "edm", sigma_data=2.0)
    assert FewStepGenerator(den, steps=1).timesteps == [39.0]
    with pytest.raises(ValueError, match=r"^steps=41: a student on a discrete schedule samples in at most 40 steps"):
        FewStepGenerator(den, steps=1).default_timesteps(41)
    gen = FewStepGenerator(den, timesteps=[39, 20])
    pipe = PointsFewStepPipeline.from_pretrained(export_run(_Run(gen, _cfg()), tmp_path / "export"))
    g = torch.Generator().manual_seed(1)
    ours = student_sample(gen, torch.randn(4, 2, generator=g), None, None, g)
    theirs = pipe(batch_size=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert pipe(batch_size=4, num_inference_steps=3).shape == (4, 2)


@pytest.mark.parametrize("kind", ["class_conditional", "unconditional", "points_vp", "points_edm"])
def test_pipelines_refuse_step_counts_their_scheduler_cannot_take(tmp_path, kind):
    """num_inference_steps=0 was LCMScheduler's ZeroDivisionError, 51 its message about `strength`; now one line
    each, with the wording of stepdistill-sample's steps=K (FewStepGenerator.default_timesteps)."""
    from diffusers import LCMScheduler

    from stepdistill.pipelines import (ClassConditionalFewStepPipeline, PointsFewStepPipeline,
                                       UnconditionalFewStepPipeline)
    if kind == "class_conditional":
        pipe, args = ClassConditionalFewStepPipeline(tiny_unet(11), LCMScheduler(), [999]), {"class_labels": [0, 1, 2]}
    elif kind == "unconditional":
        pipe, args = UnconditionalFewStepPipeline(tiny_unet(), LCMScheduler(), [999]), {"batch_size": 3}
    else:
        from stepdistill.export import export_run
        from stepdistill.networks.mlp import TimeMLP
        from stepdistill.schedules import make_schedule
        gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2, fourier_features=8), make_schedule(kind[7:]), "edm",
                                               sigma_data=2.0), steps=1)
        pipe = PointsFewStepPipeline.from_pretrained(export_run(_Run(gen, _cfg()), tmp_path / "export"))
        args = {"batch_size": 3}
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"^num_inference_steps={k}: a student samples in a whole number of "
                                             r"steps, at least 1$"):
            pipe(**args, num_inference_steps=k)
    if kind != "points_edm":   # LCMScheduler's: the EDM grid takes any count
        with pytest.raises(ValueError, match=r"^num_inference_steps=51: a student on a discrete schedule samples in "
                                             r"at most 50 steps \(LCMScheduler's original_inference_steps\)$"):
            pipe(**args, num_inference_steps=51)
    pipe._check_steps(50 if kind != "points_edm" else 60)   # the bound itself is taken


def test_pipelines_take_the_output_types_they_name():
    from diffusers import LCMScheduler
    from PIL import Image

    from stepdistill.pipelines import ClassConditionalFewStepPipeline
    pipe = ClassConditionalFewStepPipeline(tiny_unet(11), LCMScheduler(), [999])
    pt = pipe(class_labels=[0, 3], generator=torch.Generator().manual_seed(1))
    arr = pipe(class_labels=[0, 3], generator=torch.Generator().manual_seed(1), output_type="np")
    pil = pipe(class_labels=[0, 3], generator=torch.Generator().manual_seed(1), output_type="pil")
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 1, 8, 8) and arr.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (8, 8) for im in pil)
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1, :, :, 0] * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="output_type='latent': use one of pt, np, pil"):
        pipe(class_labels=[0], output_type="latent")
    with pytest.raises(ValueError, match=r"class_labels must lie in 0\.\.10 \(the UNet's 11 class embeddings\), "
                                         r"got 0\.\.11"):
        pipe(class_labels=[0, 11])   # was a bare IndexError


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_points_pipeline_runs_in_bf16(tmp_path, kind):
    from stepdistill.export import export_run
    from stepdistill.networks.mlp import TimeMLP
    from stepdistill.pipelines import PointsFewStepPipeline
    from stepdistill.schedules import make_schedule
    torch.manual_seed(0)
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2, fourier_features=8), make_schedule(kind), "edm",
                                           sigma_data=2.0), steps=2)
    pipe = PointsFewStepPipeline.from_pretrained(export_run(_Run(gen, _cfg()), tmp_path / "export"))
    fp32 = pipe(batch_size=64, generator=torch.Generator().manual_seed(2))
    bf16 = pipe.to(torch.bfloat16)(batch_size=64, generator=torch.Generator().manual_seed(2))
    assert pipe.net.dtype == torch.bfloat16   # the network did run in bf16 (else the error below would be 0)
    assert bf16.dtype == torch.float32   # the x0 arithmetic stays float32; only the network runs in bf16
    err = (bf16 - fp32).abs()   # bf16's 8-bit mantissa through two steps: ~1.5% of the samples' size on average
    assert err.mean() < 0.05 * fp32.abs().mean() and err.max() < 0.15 * fp32.abs().max() and err.max() > 0


@pytest.fixture(scope="module")
def gmm_run_at_700(tmp_path_factory):
    """A 1-step gmm student trained at timestep 700 (not LCM's 999), exported at the end of training."""
    from conftest import GMM_FAST, compose_cfg

    from stepdistill.cli.train import train
    run_dir = tmp_path_factory.mktemp("gmm700")
    train(compose_cfg(*GMM_FAST, "trainer.max_steps=2", "generator.timesteps=[700]"), run_dir)
    return run_dir


def test_steps_at_the_trained_count_sample_the_trained_timesteps(gmm_run_at_700):
    """steps=K for the trained K (stepdistill-sample, stepdistill-eval, the pipeline's num_inference_steps) is
    the trained timesteps, as no steps= is; another K is LCMScheduler's K-step timesteps."""
    from stepdistill.cli.sample import sample_student
    from stepdistill.pipelines import PointsFewStepPipeline
    from stepdistill.train.evaluation import Evaluator
    from stepdistill.train.setup import load_run
    default, _ = sample_student(gmm_run_at_700, 40, seed=3)
    one, _ = sample_student(gmm_run_at_700, 40, steps=1, seed=3)
    torch.testing.assert_close(one, default, rtol=0, atol=0)
    evaluator = Evaluator(load_run(gmm_run_at_700), gmm_run_at_700)
    assert evaluator._sample_chain(1, every_step=False)[3] == [700.0]
    assert evaluator._sample_chain(2, every_step=False)[3] == [999.0, 499.0]
    pipe = PointsFewStepPipeline.from_pretrained(gmm_run_at_700 / "export")
    two, _ = sample_student(gmm_run_at_700, 40, steps=2, seed=3)
    for k, ours in ((1, default), (2, two)):
        theirs = pipe(batch_size=40, num_inference_steps=k, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_export_cli_refuses_the_run_folder(gmm_run_at_700):
    from conftest import run_app
    proc = run_app("stepdistill.cli.export", f"run_dir={gmm_run_at_700}", f"out={gmm_run_at_700}", check=False)
    assert proc.returncode == 2 and "stepdistill-export: error: out=" in proc.stderr
    assert "would replace the run folder" in proc.stderr and (gmm_run_at_700 / "config.yaml").is_file()


@pytest.mark.parametrize("args, message", [
    (["run_dir=D", "teacher_steps=3"], "teacher_steps= counts the teacher's ODE steps"),
    (["benchmark=gmm", "steps=3"], "steps= counts a trained student's steps (with run_dir=D): the teacher's"),
])
def test_sample_refuses_the_step_count_of_the_other_mode(tmp_path, args, message):
    """The count that does not apply would be ignored: refused, naming the one that does."""
    from conftest import run_app
    proc = run_app("stepdistill.cli.sample", *args, "num_samples=4", f"out={tmp_path / 'x.npz'}", check=False)
    assert proc.returncode == 2 and f"stepdistill-sample: error: {message}" in proc.stderr
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_gmm_run_on_a_continuous_schedule_exports_and_matches_sample_cli(gmm_cfg, tmp_path, kind):
    """Training ends with an export on any schedule; the pipeline steps as FewStepGenerator.sample does."""
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.pipelines import PointsFewStepPipeline
    result = train(gmm_cfg("trainer.max_steps=3", "generator=four_step", f"benchmark.schedule.kind={kind}",
                           "~benchmark.schedule.num_train_timesteps", "~benchmark.schedule.beta_schedule"), tmp_path)
    pipe = PointsFewStepPipeline.from_pretrained(result["export"])
    assert pipe.scheduler is None and pipe.config.schedule["kind"] == kind
    for k in (None, 2):
        samples, _ = sample_student(tmp_path, 50, steps=k, seed=5)
        theirs = pipe(batch_size=50, num_inference_steps=k, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(theirs, samples, atol=1e-5, rtol=1e-5)


def test_edm_student_sampled_off_its_timesteps_starts_at_the_sampled_sigma(gmm_cfg, tmp_path):
    """A 1-step EDM student trained at sigma 2.5 (SiD's one step) sampled in 2 steps starts from noise at the
    2-step grid's first sigma, 80: FewStepGenerator scaled it by the trained 2.5 and then denoised it as sigma 80."""
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.pipelines import PointsFewStepPipeline
    result = train(gmm_cfg("trainer.max_steps=2", "benchmark.schedule.kind=edm", "generator.timesteps=[2.5]",
                           "~benchmark.schedule.num_train_timesteps", "~benchmark.schedule.beta_schedule"), tmp_path)
    from stepdistill.train.setup import load_run
    student = load_run(tmp_path).student()
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    ts = student.sampling_timesteps(2)
    assert ts[0] == pytest.approx(80.0)
    first = student.denoise(noise * ts[0], ts[0], None)   # the 2-step chain's first x0, from noise at sigma 80
    torch.testing.assert_close(student.sample(noise, timesteps=ts, every_step=True)[0], first)
    pipe = PointsFewStepPipeline.from_pretrained(result["export"])
    samples, _ = sample_student(tmp_path, 50, steps=2, seed=5)
    theirs = pipe(batch_size=50, num_inference_steps=2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs, samples, atol=1e-5, rtol=1e-5)
