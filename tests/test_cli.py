"""The console scripts as a user runs them: a two-job multirun sweep, sampling, and one-line bad-input errors.
Training runs and the start-up checks use real processes; the other app calls run in this process
(`run_app`, tests/conftest.py), the same Hydra main without ~4 s of imports each."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_app

FAST = ["benchmark=gmm", "benchmark.network.width=32", "benchmark.network.depth=2", "trainer.batch_size=32",
        "method.critic_warmup_steps=2", "eval.every=0", "eval.final=false", "trainer.progress=false",
        "trainer.export=false", "logger.every=5"]


def run_cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_multirun_gives_each_job_its_own_folder(tmp_path):
    # a folder name from ~260 characters of overrides, a path's "/" among them, failed the sweep (a file name has
    # at most 255 bytes)
    from stepdistill.cli import job_dirname
    name = job_dirname(f"eval.fid.inception_weights={tmp_path}/none.pt," + "x" * 200)
    assert "/" not in name and len(name) <= 160
    long = ["optim.generator.lr=2e-4", "optim.critic.lr=1e-3", "optim.generator.betas=[0.0,0.99]",
            "optim.critic.betas=[0.0,0.99]", "trainer.max_nonfinite_steps=7", "trainer.ema_decay=0.99"]
    sweep = ["-m", "stepdistill.train", "-m", *FAST, *long, "method=dmd,dmd2", "trainer.max_steps=6",
             f"hydra.sweep.dir={tmp_path}"]
    run_cli(*sweep)
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
    assert len(jobs) == 2 and all(len(job.name) <= 160 for job in jobs) and all(len(j.name) > 140 for j in jobs)
    # the same sweep resumed finds its jobs' folders (trainer.resume is left out of their names)
    proc = run_cli(*sweep, "trainer.resume=true")
    assert (proc.stdout + proc.stderr).count("nothing to train") == 2
    assert sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "config.yaml").is_file()) == jobs
    methods = set()
    for job in jobs:
        assert (job / "checkpoints" / "step_0000006" / "generator.safetensors").is_file()
        assert (job / "metrics.jsonl").is_file() and (job / "train.log").is_file()
        methods.add([line for line in (job / "config.yaml").read_text().splitlines()
                     if line.startswith("  name: dmd")][0].split()[-1])
    assert methods == {"dmd", "dmd2"}
    # the sweep folder compared: one row per job, metrics of the re-drawn samples, a scatter figure
    out = tmp_path / "cmp"
    proc = run_cli("-m", "stepdistill.cli.compare", f"runs=[{tmp_path}]", f"out={out}", "num_samples=300")
    assert "| gmm | dmd |" in proc.stdout and "| gmm | dmd2 |" in proc.stdout
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["dmd", "dmd2"] and all(r["train_steps"] == 6 for r in rows)
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    from stepdistill.benchmarks.gmm import GMMBenchmark  # noqa: F401  (the mixture is rebuilt from config.yaml)
    from stepdistill.cli.compare import _mixture
    from stepdistill.eval.gmm_metrics import gmm_metrics
    from omegaconf import OmegaConf
    for row in rows:
        npz, cfg = tmp_path / "s.npz", OmegaConf.load(Path(row["run_dir"]) / "config.yaml")
        # compare re-samples at the run's own eval.seed
        run_app("stepdistill.cli.sample", f"run_dir='{row['run_dir']}'", "num_samples=300", f"seed={cfg.eval.seed}",
                f"out={npz}")
        with np.load(npz) as f:
            ref = gmm_metrics(torch.from_numpy(f["samples"]), _mixture(cfg))
        assert row["mode_mass_error"] == pytest.approx(ref["mode_mass_error"], rel=1e-5)
        assert row["sliced_w2"] == pytest.approx(ref["sliced_w2"], rel=1e-4)
        assert row["mode_std_ratio"] == pytest.approx(ref["mode_std_ratio"], rel=1e-5)


def test_sample_student_and_teacher(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("-m", "stepdistill.train", *FAST, "trainer.max_steps=4", f"hydra.run.dir={run_dir}")
    out = tmp_path / "s.npz"
    run_app("stepdistill.cli.sample", f"run_dir={run_dir}", "num_samples=20", f"out={out}", "steps=2")
    with np.load(out) as f:
        assert f["samples"].shape == (20, 2) and f["samples"].dtype == np.float32 and "labels" not in f
    # each step's output along a 2-step chain, scored: a table row per step, the row logged with its source
    proc = run_app("stepdistill.cli.evaluate", f"run_dir={run_dir}", "every_step=true", "steps=2",
                   "num_samples=50")
    rows = [line for line in proc.stdout.splitlines() if line[:4] in ("1 | ", "2 | ")]
    assert [r.split(" | ")[1] for r in rows] == ["999", "499"], proc.stdout
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["source"] == "stepdistill-eval every_step" and logged["student_step2_num_samples"] == 50
    # eval.* settings of the run changed for one evaluation, and recorded with it
    seeds = {}
    for seed in (7, 8):
        run_app("stepdistill.cli.evaluate", f"run_dir={run_dir}", f"eval.seed={seed}", "num_samples=60")
        seeds[seed] = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert seeds[seed]["eval_overrides"] == [f"eval.seed={seed}", "eval.num_samples=60"]
        assert seeds[seed]["student_num_samples"] == 60
    assert seeds[7]["teacher_sliced_w2"] != seeds[8]["teacher_sliced_w2"]   # another set of evaluation noise
    proc = run_app("stepdistill.cli.evaluate", f"run_dir={run_dir}", "eval.fid.inception_weights=/no/w.pth",
                   check=False)
    assert proc.returncode == 2 and "eval.fid.inception_weights needs an image benchmark" in proc.stderr
    # stepdistill-export: the latest checkpoint in diffusers format (this run trained with trainer.export=false);
    # the exported pipeline samples what stepdistill-sample does for the same seed
    assert not (run_dir / "export").exists()
    proc = run_app("stepdistill.cli.export", f"run_dir={run_dir}")
    assert f"exported to {run_dir / 'export'}" in proc.stdout
    # loaded in a fresh process, as a user would: importing stepdistill.pipelines is all it takes
    load = ("import sys, numpy, torch; from stepdistill.pipelines import PointsFewStepPipeline; "
            "pipe = PointsFewStepPipeline.from_pretrained(sys.argv[1]); "
            "numpy.save(sys.argv[2], pipe(batch_size=20, generator=torch.Generator().manual_seed(5)).numpy())")
    run_cli("-c", load, str(run_dir / "export"), str(tmp_path / "pipe.npy"))
    from stepdistill.cli.sample import sample_student
    ours, _ = sample_student(run_dir, 20, seed=5)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "pipe.npy")), ours, atol=1e-5, rtol=1e-5)
    proc = run_app("stepdistill.cli.export", check=False)
    assert proc.returncode == 2 and "stepdistill-export: error: give run_dir=D" in proc.stderr
    out_t = tmp_path / "t.npz"
    run_app("stepdistill.cli.sample", "benchmark=gmm", "teacher_steps=16", "num_samples=30", f"out={out_t}")
    with np.load(out_t) as f:
        assert f["samples"].shape == (30, 2) and f["samples"].dtype == np.float32


DIGITS_FAST = ["benchmark=digits", "trainer.max_steps=2", "eval.every=0", "eval.final=false", "trainer.progress=false"]


@pytest.mark.parametrize("args, message", [
    (["method=nope", *FAST], "stepdistill-train: error: unknown method 'nope': use method= one of dmd, dmd2, "),
    (["benchmark=nope"], "unknown benchmark 'nope': use benchmark= one of digits, gmm, "),
    (["-m", "method=dmd,nope", *FAST], "unknown method 'nope'"),
    (["experiment=nope", *FAST], "unknown experiment 'nope': use experiment= one of digits_four_step, "),
    (["method.name=nope", *FAST], "use method= one of"),
    (["trainer.resume=true", *FAST], "trainer.resume=true but"),
    (["method.guidance=3", *FAST], "set method.guidance=1.0"),
    (["benchmark.teacher.path=/no/such/teacher", *DIGITS_FAST], "set benchmark.teacher.path"),
    (["benchmark.teacher.prediction_type=epsilon", *DIGITS_FAST], "does not match the teacher's scheduler"),
    (["benchmark.resolution=7", *DIGITS_FAST], "leave benchmark.resolution at 8"),
    (["generator.steps=0", *FAST], "generator.steps=0: a generator takes at least 1 step"),
    (["generator.steps=60", *FAST], "generator.steps=60: a student on a discrete schedule samples in at most 50"),
    (["trainer.max_steps=0", *FAST], "trainer.max_steps=0: need an integer >= 1"),
    # Hydra's six lines suggested +trainer.max_step=10, which runs with the typo ignored
    (["trainer.max_step=10", *FAST], "unknown setting 'trainer.max_step': did you mean trainer.max_steps?"),
    (["+trainer.max_step=10", *FAST], "unknown setting '+trainer.max_step': no command reads it"),
    # a setting of another choice of its group was Hydra's six lines suggesting the '+' that would add it unread
    (["benchmark.teacher.path=/x", *FAST], "'benchmark.teacher.path' is not a setting of benchmark=gmm: "
                                           "benchmark=digits or text_to_image or tiny_sd has it"),
    (["method.regression.weight=0.3", *FAST], "'method.regression.weight' is not a setting of method=dmd2: method=dmd"),
    # ... and the '+' that adds it ran with it ignored: only the choices that have a setting read it
    (["+method.p_std=1.0", *FAST], "'method.p_std' is not a setting of method=dmd2: method=scm has it"),
    (["method=dmd", "++method.gan.enabled=true", *FAST], "'method.gan.enabled' is not a setting of method=dmd: "
                                                         "method=dmd2 has it"),
    (["+method.experiment_for=[dmd]", *FAST], "'method.experiment_for' is not a setting of method=dmd2: only "
                                              "experiment=sid_from_scratch sets it"),
    pytest.param(["attention.backend=xformers", *DIGITS_FAST], "attention.backend=xformers needs xformers installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="has xformers")),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    """One line on stderr, exit status 2 (an unknown group choice was Hydra's 12-18 lines with status 1)."""
    proc = run_app("stepdistill.cli.train", *args, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_misspelt_settings_and_unusable_run_folders_are_one_line(tmp_path):
    """A setting no conf/ file has is named with the nearest ones, in every app; a run folder Hydra cannot make
    (a file on its path) is one line, not Hydra's traceback."""
    from stepdistill.cli import unknown_setting
    assert unknown_setting(["num_sample=10"]) == "unknown setting 'num_sample': did you mean num_samples or eval.num_samples?"
    assert unknown_setting(["+teacher.extra.unet_overrides={}", "+benchmark.schedule.rho=5", "hydra.job.chdir=true",
                            "generator.timesteps.0=999", "method=dmd", "+experiment=sid_from_scratch",
                            "benchmark.schedule={kind: edm}", "trainer.max_steps=3",
                            "+method.reuse_generator_samples=true", "++method.critic_warmup_steps=0"]) is None
    # an addition no command reads was run with the typo ignored
    assert unknown_setting(["+trainer.max_step=10"]) == ("unknown setting '+trainer.max_step': no command reads it, so "
                                                         "the addition would be ignored; did you mean trainer.max_steps? (without "
                                                         "the '+')")
    assert unknown_setting(["++eval.evry=5"]).startswith("unknown setting '++eval.evry'")
    # a gmm schedule's settings are any schedule kind's (make_schedule checks them against the kind)
    import inspect

    from stepdistill.cli import SCHEDULE_SETTINGS
    from stepdistill.schedules import SCHEDULES
    assert set(SCHEDULE_SETTINGS) == {"kind"} | {p for c in SCHEDULES.values() for p in inspect.signature(c).parameters}
    assert unknown_setting(["+benchmark.schedule.rhoo=5"]).startswith("unknown setting '+benchmark.schedule.rhoo'")
    from stepdistill.cli import setting_of_another_choice
    assert setting_of_another_choice("sample", ["benchmark=gmm", "benchmark.teacher.path=/x"]) == (
        "'benchmark.teacher.path' is not a setting of benchmark=gmm: benchmark=digits or text_to_image or tiny_sd "
        "has it")
    # sweeps over a group's choices are Hydra's to judge (the setting may belong to one job's choice); a sweep of
    # values stands in by its first; every setting of the chosen configs passes
    assert setting_of_another_choice("train", ["-m", "benchmark=gmm,digits", "benchmark.teacher.path=/x"]) is None
    assert setting_of_another_choice("train", ["-m", "benchmark=digits", "benchmark.teacher.path=/x",
                                               "trainer.max_steps=10,20", "optim.critic.betas=[0.5,0.9]",
                                               "+benchmark.schedule.rho=5", "hydra.job.chdir=true"]) is None
    proc = run_app("stepdistill.cli.sample", "benchmark=gmm", "num_sample=10", f"out={tmp_path / 'a.npz'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "stepdistill-sample: error: unknown setting 'num_sample': did you mean num_samples or eval.num_samples?")
    from stepdistill.cli import unwritable_run_dir
    assert unwritable_run_dir(["hydra.run.dir=/proc/stepdistill-run"]).startswith(
        "hydra.run.dir: cannot make or write the folder /proc/stepdistill-run")
    import os
    here = os.getcwd()
    try:   # the default run folder goes under the working folder: one that cannot be written was a traceback
        os.chdir("/proc")
        assert unwritable_run_dir(["trainer.max_steps=3"], default_in_cwd=True).startswith(
            "the working folder /proc cannot be written")
        assert unwritable_run_dir(["hydra.run.dir=/tmp"], default_in_cwd=True) is None
    finally:
        os.chdir(here)
    (tmp_path / "afile").write_text("")
    proc = run_app("stepdistill.cli.train", *FAST, f"hydra.run.dir={tmp_path / 'afile' / 'run'}", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"hydra.run.dir: cannot make or write the folder {tmp_path / 'afile' / 'run'} (Not a directory" in proc.stderr
    # an output under a file: "[Errno 17] File exists" did not say which setting to change, and came after sampling
    proc = run_app("stepdistill.cli.sample", "benchmark=gmm", "num_samples=4", f"out={tmp_path / 'afile' / 'x.npz'}",
                   f"hydra.run.dir={tmp_path / 'h'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"stepdistill-sample: error: out: cannot make or write the folder {tmp_path / 'afile'} (File exists: "
        f"{tmp_path / 'afile'}): choose another out")
    # an existing folder that refuses writes was found only after sampling, by the write itself
    proc = run_app("stepdistill.cli.sample", "benchmark=gmm", "num_samples=4", "out=/proc/x.npz",
                   f"hydra.run.dir={tmp_path / 'h'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "stepdistill-sample: error: out: cannot make or write the folder /proc (")


def test_another_commands_setting_is_one_line(tmp_path):
    """A setting of another console script was Hydra's six lines suggesting a `+` (`stepdistill-train run_dir=D`,
    which the other apps take), and stepdistill-teacher ran its whole recipe with `trainer.max_steps=3` ignored: the
    benchmark files add training's settings to its config, none of which it reads."""
    from stepdistill.cli import setting_of_another_choice
    assert setting_of_another_choice("train", ["run_dir=/x"]) == (
        "'run_dir' is not a setting of this command: stepdistill-sample, stepdistill-eval and stepdistill-export take "
        "it; a training run's folder is hydra.run.dir=D")
    assert setting_of_another_choice("sample", ["run_dir=/x", "runs=[/y]"]) == (
        "'runs' is not a setting of this command: stepdistill-compare takes it")
    assert setting_of_another_choice("compare", ["trainer.max_steps=3"]) == (
        "'trainer.max_steps' is not a setting of this command: it takes runs=, out=, num_samples=, seed=, num_threads=")
    assert setting_of_another_choice("teacher", ["method.name=dmd"]) == (
        "'method.name' is not a setting of this command: it takes benchmark=, seed=, out=, install=, num_threads=, "
        "features=, teacher=, quality=")
    for arg, says in (("trainer.max_steps=3", "use teacher.steps= for its length"),
                      ("benchmark.teacher.path=/x", "stepdistill-teacher reads only the benchmark's name")):
        proc = run_app("stepdistill.cli.teacher", arg, f"out={tmp_path / 't'}", check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
        assert not (tmp_path / "t" / "digits_features.safetensors").exists()


def test_teacher_checks_its_settings_before_the_recipe(tmp_path):
    """quality.guidances=[] ended the recipe in min() of an empty list, after the ~30-minute training; tiny_sd
    ignored install= and the recipe's settings; a recipe keyword conf/teacher.yaml does not set was Hydra's six
    lines."""
    for args, says in ((["quality.guidances=[]"], "quality.guidances=[]: give a list of CFG scales >= 0"),
                       (["quality.guidances=[1.0,-2.0]"], "give a list of CFG scales >= 0"),
                       (["benchmark=tiny_sd", "teacher.steps=3"], "teacher.steps=3: tiny_sd is built with random "
                                                                   "weights, not trained")):
        proc = run_app("stepdistill.cli.teacher", *args, f"out={tmp_path / 't'}", check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "t" / "digits_features.safetensors").exists()
    from stepdistill.cli import unknown_setting
    assert unknown_setting(["teacher.extra.progress=false"]) == (
        "'teacher.extra.progress' is not in conf/teacher.yaml: a recipe setting it does not set takes a '+' "
        "(+teacher.extra.progress=false)")


def test_group_choices_checked_before_hydra_composes(tmp_path):
    """Every choice of a sweep list is checked; a command that adds config folders, which may hold more choices
    (a user's own experiment), is left to Hydra."""
    from stepdistill.cli import unknown_group_choice
    assert unknown_group_choice(["-m", "method=dmd,dmd2", "+experiment=sid_from_scratch", "trainer.max_steps=3",
                                 "~experiment", "method=glob(*)", "benchmark.name=other"]) is None
    assert "unknown generator 'two_step'" in unknown_group_choice(["generator=two_step"])
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ntrainer: {max_steps: 2}\n")
    assert "unknown experiment 'mine'" in unknown_group_choice(["experiment=mine"])
    for extra in (["--config-dir", str(tmp_path)], [f"hydra.searchpath=[file://{tmp_path}]"]):
        assert unknown_group_choice(["experiment=mine", *extra]) is None
    proc = run_app("stepdistill.cli.train", "--config-dir", str(tmp_path), *FAST, "experiment=mine",
                   f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0 and (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()


def test_sample_and_eval_take_a_device(tmp_path, monkeypatch):
    """`device=` (sample and eval): auto is the GPU where torch sees one; a GPU it does not see, or an unknown
    name, is one line. Sampling always ran on the CPU, on a GPU machine too."""
    import stepdistill.cli.sample as sample_module
    from stepdistill.cli import pick_device
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu") and pick_device("cpu") == "cpu"
    devices, sample_teacher = [], sample_module.sample_teacher

    def spy(*args, device=None, **kwargs):   # the device the app hands to the sampler
        devices.append(device)
        return sample_teacher(*args, device=device, **kwargs)
    monkeypatch.setattr(sample_module, "sample_teacher", spy)
    args = ["benchmark=gmm", "teacher_steps=4", "num_samples=8"]
    run_app("stepdistill.cli.sample", *args, "device=cpu", f"out={tmp_path / 'cpu.npz'}")
    run_app("stepdistill.cli.sample", *args, f"out={tmp_path / 'auto.npz'}")
    assert devices == ["cpu", pick_device("auto")]
    with np.load(tmp_path / "cpu.npz") as a, np.load(tmp_path / "auto.npz") as b:
        np.testing.assert_allclose(a["samples"], b["samples"], atol=1e-5)
    bad = [("device=tpu", "device=tpu: use auto, cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():
        bad.append(("device=cuda", "device=cuda: torch sees no such GPU here: use device=cpu (or auto)"))
    for app in ("stepdistill.cli.sample", "stepdistill.cli.evaluate"):
        for override, message in bad:
            extra = ["run_dir=" + str(tmp_path)] if app.endswith("evaluate") else []
            if extra:
                (tmp_path / "config.yaml").write_text("seed: 0\n")   # a run folder, so the device is what fails
            proc = run_app(app, *args, override, *extra, f"out={tmp_path / 'x.npz'}", check=False)
            assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_teacher_recipe_runs_and_records_its_quality(tmp_path, monkeypatch):
    """`stepdistill-teacher benchmark=digits` at toy settings: both networks are written and the teacher's
    settings and measured quality are recorded next to its weights. With out= its log and settings go there too,
    not into a dated folder under outputs/ (it made one on every run)."""
    import json
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run_app("stepdistill.cli.teacher", "benchmark=digits", "features.steps=20", "teacher.steps=20",
            "quality.guidances=[1.0,2.0]", "quality.steps=2", f"out={tmp_path}")
    assert not any((tmp_path / "cwd").iterdir())
    assert (tmp_path / "teacher.log").is_file() and (tmp_path / ".hydra" / "config.yaml").is_file()
    info = json.loads((tmp_path / "digits_teacher" / "stepdistill_teacher.json").read_text())
    assert info["training"]["steps"] == 20 and set(info["quality"]["by_guidance"]) == {"1.0", "2.0"}
    assert info["default_guidance"] in (1.0, 2.0) and info["quality"]["num_samples"] == 1797
    assert info["default_sampler_steps"] == 2   # the steps its quality and default guidance were measured at
    assert (tmp_path / "digits_features.safetensors").is_file()
    assert (tmp_path / "digits_teacher" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    proc = run_app("stepdistill.cli.teacher", "benchmark=gmm", f"hydra.run.dir={tmp_path}/g", check=False)
    assert proc.returncode != 0 and "analytic" in proc.stderr and "Traceback" not in proc.stderr
    # out= is the run folder now: one that cannot be made is one line (Hydra's traceback otherwise), and out= with
    # install=true (which writes into the package) is refused
    proc = run_app("stepdistill.cli.teacher", "benchmark=tiny_sd", f"out={tmp_path}/digits_features.safetensors/x",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("): choose another out") and "out: cannot make or write the folder" in proc.stderr
    proc = run_app("stepdistill.cli.teacher", "benchmark=tiny_sd", "install=true", f"out={tmp_path}/t", check=False)
    assert proc.returncode == 2 and "install=true writes into the package's assets" in proc.stderr
    # a misspelt recipe setting was a TypeError after the feature network had trained
    proc = run_app("stepdistill.cli.teacher", "benchmark=digits", "+teacher.extra.label_dropot=0.2", f"out={tmp_path}/u",
                   check=False)
    assert proc.returncode == 2 and "teacher.extra.label_dropot: the digits teacher recipe takes teacher.extra.{" \
        in proc.stderr and "Traceback" not in proc.stderr


def test_a_sweep_runs_past_a_failing_job_and_resumes_jobs_that_never_saved(tmp_path):
    """A job's one-line error was a sys.exit that ended the whole sweep, so the jobs after it never ran; and a
    sweep continued with trainer.resume=true stopped at the first job that had not saved a checkpoint."""
    sweep = ["-m", "stepdistill.train", "-m", *FAST, "optim.critic.lr=1e30,1e-3", "optim.critic.grad_clip=0",
             "trainer.max_nonfinite_steps=2", "trainer.max_steps=4", f"hydra.sweep.dir={tmp_path}"]
    for resume in ([], ["trainer.resume=true"]):
        proc = run_cli(*sweep, *resume, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("stepdistill-train: error: sweep job #0 (") and last.endswith("failed (the reasons "
                                                                                            "are above); the others ran")
        assert "stepdistill-train: error: 2 non-finite critic updates in a row" in proc.stderr
        jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
        assert len(jobs) == 2 and (jobs[1] / "checkpoints" / "step_0000004").is_dir()
    assert "holds no checkpoint (the job never saved one): it starts from step 0" in proc.stdout + proc.stderr
    assert "nothing to train" in proc.stdout + proc.stderr   # job #1 resumed at its last step


def test_bench_prints_a_table(tmp_path):
    proc = run_cli("-m", "stepdistill.cli.bench", "benchmark=gmm", "methods=dmd,dmd2", "steps=3", "warmup=1",
                   "benchmark.network.width=32", "trainer.batch_size=32")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("benchmark | method") and len(lines) == 4
    for line in lines[2:]:
        cells = [c.strip() for c in line.split("|")]
        assert float(cells[4]) > 0 and float(cells[5]) > 0 and float(cells[8]) > 0
        outside, optimizer = (float(c.rstrip("%")) for c in cells[6:8])
        assert 0 < optimizer <= outside   # the update is part of the time outside the networks


def test_bench_times_whole_iterations_of_each_methods_own_cycle():
    """The iteration was critic_steps + 1 updates for every method: sCM (no critic) showed 2 updates and twice its
    cost, rCM was timed inside its tangent warm-up (the student alone, as sCM), and a window that cut a cycle
    counted a critic update twice (DMD at steps=1: 4 network evaluations per iteration)."""
    import torch

    from stepdistill.cli.bench import bench_one
    small = ["benchmark.network.width=32", "trainer.batch_size=32", f"trainer.num_threads={torch.get_num_threads()}"]
    rows = {m: bench_one("gmm", m, 1, 0, small) for m in ("dmd", "scm", "rcm")}
    assert rows["dmd"]["updates_per_iteration"] == 2 and rows["dmd"]["network_evals_per_iteration"] == 6
    assert rows["scm"]["updates_per_iteration"] == 1
    assert rows["rcm"]["network_evals_per_iteration"] > rows["scm"]["network_evals_per_iteration"]


def test_bench_refuses_what_it_would_drop_or_misread(capsys):
    from stepdistill.cli.bench import main
    main(["--help"])
    assert capsys.readouterr().out.startswith("`stepdistill-bench")
    for argv, says in ((["trainer.batch_size", "64"], "'trainer.batch_size' is not a setting: give each as key=value"),
                       (["benchmark=gmm,digits", "benchmark.radius=3"],
                        "benchmark=digits method=dmd: 'benchmark.radius' is not a setting of benchmark=digits")):
        with pytest.raises(SystemExit, match=says):
            main(argv)


def test_bench_timer_counts_a_nested_call_once_and_closes_on_errors():
    """A network called inside another (a critic wrapping the exact teacher) is one evaluation, timed once; a call
    that raises (DMD2's GAN cuts the critic's forward at its bottleneck) still closes its interval."""
    import time

    from stepdistill.cli.bench import _Timer
    timer = _Timer()
    inner = timer.wrap(lambda: time.sleep(0.01))
    timer.wrap(lambda: (inner(), time.sleep(0.01)))()
    assert timer.calls == 1 and 0.02 <= timer.seconds < 1.0

    def cut():
        raise StopIteration
    with pytest.raises(StopIteration):
        timer.wrap(cut)()
    timer.wrap(lambda: None)()
    assert timer.calls == 3 and timer.seconds < 1.0   # both later calls closed: none left the timer open


def test_experiment_presets_compose():
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from stepdistill.cli import CONF_DIR
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose("train", overrides=["experiment=digits_four_step"])
    assert cfg.benchmark.name == "digits" and cfg.generator.steps == 4 and list(cfg.generator.train_steps) == [4]
    assert cfg.optim.schedule == "cosine" and cfg.method.reuse_generator_samples
    # a misspelt preset is an error listing the presets, not a silent run of the defaults (the group was optional)
    with initialize_config_dir(CONF_DIR, version_base=None):
        with pytest.raises(MissingConfigException, match="Could not find 'experiment/digits_fourstep'") as err:
            compose("train", overrides=["experiment=digits_fourstep"])
    assert "digits_four_step" in str(err.value)


def test_compare_takes_image_runs_from_their_last_evaluation(tmp_path):
    """Image runs are not re-sampled: a row holds the last evaluation the run logged (the student's FD, the
    teacher's, their ratio, precision and recall, the sample count) and the last train record's step and time.
    A line cut short by a kill is skipped; the runs' evaluations are drawn against the step, one line per run."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from stepdistill.cli.compare import compare
    logs = {"dmd2": [{"kind": "train", "step": 100, "seconds": 12.5},
                     {"kind": "eval", "step": 100, "student_fd": 3.0, "student_fd_num_samples": 500},
                     {"kind": "train", "step": 200, "seconds": 25.0},
                     {"kind": "eval", "step": 200, "student_fd": 1.2, "teacher_fd": 1.5, "student_precision": 0.9,
                      "student_recall": 0.8, "student_fd_num_samples": 1000}],
            "dmd": [{"kind": "train", "step": 50, "seconds": 5.0}]}   # evaluations off
    for method, records in logs.items():
        run = tmp_path / "sweep" / method
        run.mkdir(parents=True)
        OmegaConf.save(compose_cfg("benchmark=digits", f"method={method}"), run / "config.yaml", resolve=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    result = compare([tmp_path / "sweep"], tmp_path / "out")
    assert result["curves"] == str(tmp_path / "out" / "comparison_curves.png")
    assert (tmp_path / "out" / "comparison_curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["method"]: r for r in result["rows"]}
    assert {k: v for k, v in rows["dmd2"].items() if k not in ("run_dir", "fd_ratio")} == {
        "benchmark": "digits", "method": "dmd2", "run": "dmd2", "train_steps": 200, "train_seconds": 25.0, "fd": 1.2,
        "teacher_fd": 1.5, "precision": 0.9, "recall": 0.8, "num_samples": 1000}
    assert rows["dmd2"]["fd_ratio"] == pytest.approx(0.8)
    assert rows["dmd"]["fd"] is None and rows["dmd"]["train_steps"] == 50 and "figure" not in result
    head, _, *lines = result["table"].splitlines()
    assert head == ("| benchmark | method | run | train_steps | train_seconds | num_samples | fd | teacher_fd | "
                    "fd_ratio | precision | recall |")
    assert lines == ["| digits | dmd | dmd | 50 | 5 | – | – | – | – | – | – |",
                     "| digits | dmd2 | dmd2 | 200 | 25 | 1000 | 1.2 | 1.5 | 0.8 | 0.9 | 0.8 |"]


def test_compare_reads_diverged_resumed_and_failed_runs(tmp_path):
    """A diverged run's "nan" FD (metrics.jsonl writes non-finite values as strings) was divided by the teacher's:
    a traceback; a resumed run showed its last session's seconds only; a gmm job that stopped before its first
    checkpoint ended the whole comparison; a run stopped early showed trainer.max_steps as its steps."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from stepdistill.cli.compare import compare
    logs = {"diverged": ("digits", [{"kind": "train", "step": 7, "seconds": 2.0},
                                    {"kind": "eval", "step": 7, "student_fd": "nan", "teacher_fd": 1.5}]),
            "resumed": ("digits", [{"kind": "train", "step": 28, "seconds": 10.0},
                                   {"kind": "train", "step": 30, "seconds": 1.5}]),
            "failed": ("gmm", [{"kind": "train", "step": 3, "seconds": 0.5}])}
    for name, (bench, records) in logs.items():
        run = tmp_path / name
        run.mkdir()
        OmegaConf.save(compose_cfg(f"benchmark={bench}", "trainer.max_steps=30"), run / "config.yaml", resolve=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = compare([tmp_path / n for n in logs], tmp_path / "out")
    rows = {r["run"]: r for r in result["rows"]}
    assert math.isnan(rows["diverged"]["fd"]) and math.isnan(rows["diverged"]["fd_ratio"])
    assert rows["diverged"]["train_steps"] == 7 and rows["resumed"]["train_seconds"] == 11.5
    assert rows["failed"]["train_steps"] == 3 and "modes_covered" not in rows["failed"]
    assert any("(" + str(tmp_path / "failed") + "): no checkpoint" in n for n in result["evaluations"])
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())[0]["fd"] is None


def test_compare_shows_a_text_to_image_runs_own_metrics(tmp_path):
    """A text-to-image run logs latent_fd (and FID / CLIP score where configured), not fd: its row showed blank
    columns and no sample count."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from stepdistill.cli.compare import compare
    run = tmp_path / "t2i"
    run.mkdir()
    OmegaConf.save(compose_cfg("benchmark=tiny_sd", "method=dmd2"), run / "config.yaml", resolve=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 6, "seconds": 3.0}) + "\n" + json.dumps(
        {"kind": "eval", "step": 6, "student_latent_fd": 40.5, "student_latent_fd_num_samples": 16,
         "student_clip_score": 21.0, "student_fid": 90.0}) + "\n")
    result = compare([run], tmp_path / "out")
    row = result["rows"][0]
    assert (row["latent_fd"], row["clip_score"], row["fid"], row["num_samples"]) == (40.5, 21.0, 90.0, 16)
    assert "| latent_fd | fid | clip_score |" in result["table"].splitlines()[0]
    assert result["evaluations"] == [f"tiny_sd dmd2 ({run}): the training's evaluation at step 6, 1-step sampling, "
                                     "16 samples"]


@pytest.mark.parametrize("error, line", [
    (ValueError("set x=1"), "set x=1"), (FileNotFoundError("no /a"), "no /a"),
    (ImportError("pip install y"), "pip install y"),
    # raised by the OS with (errno, text, path): the line was "2" before
    (FileNotFoundError(2, "No such file or directory", "/proc/x"), "[Errno 2] No such file or directory: '/proc/x'"),
    (PermissionError(13, "Permission denied", "/ro/run"), "[Errno 13] Permission denied: '/ro/run'"),
])
def test_user_errors_end_in_one_line(error, line, capsys, monkeypatch):
    """What bad input raises (including a missing optional dependency or a path that cannot be written) ends
    the app with status 2 and one line; STEPDISTILL_TRACEBACK=1 lets it through; other exceptions always
    propagate."""
    from stepdistill.cli import user_errors

    @user_errors("stepdistill-x")
    def app(exc):
        raise exc
    monkeypatch.delenv("STEPDISTILL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as ended:
        app(error)
    assert ended.value.code == 2 and capsys.readouterr().err == f"stepdistill-x: error: {line}\n"
    monkeypatch.setenv("STEPDISTILL_TRACEBACK", "1")
    with pytest.raises(type(error)):
        app(error)
    with pytest.raises(RuntimeError):
        app(RuntimeError("a bug"))


def app_args(args, tmp_path):
    """An app's command line with `=D` as a run folder that does not exist and `out=x` inside tmp_path, and the
    Hydra apps' own folder there too (the bench is not a Hydra app)."""
    args = [a.replace("=D", f"={tmp_path / 'no_run'}").replace("out=x", f"out={tmp_path}/x") for a in args]
    return args + ([] if "bench" in args[0] else [f"hydra.run.dir={tmp_path / 'h'}"])


@pytest.mark.parametrize("args, message", [
    (["stepdistill.cli.sample", "run_dir=D", "num_samples=0", "out=x.npz"], "stepdistill-sample: error: num_samples=0"),
    (["stepdistill.cli.sample", "run_dir=D", "num_samples=4", "steps=0", "out=x.npz"], "error: steps=0: need an"),
    (["stepdistill.cli.sample", "benchmark=gmm", "teacher_steps=0", "num_samples=4", "out=x.npz"],
     "error: teacher_steps=0: need an integer >= 1"),
    (["stepdistill.cli.evaluate", "run_dir=D", "steps=0"], "stepdistill-eval: error: steps=0"),
    (["stepdistill.cli.evaluate", "run_dir=D", "num_samples=1"], "error: num_samples=1: need an integer >= 2"),
    (["stepdistill.cli.bench", "methods=dmd2,nope"], "stepdistill-bench: error: unknown method 'nope': use one of"),
    (["stepdistill.cli.bench", "benchmark=gmm", "steps=0"], "stepdistill-bench: error: steps=0"),
    (["stepdistill.cli.bench", "benchmark=gmm", "batch_size=8"], "stepdistill-bench: error: unknown setting 'batch_size'"),
    (["stepdistill.cli.compare", "runs=[D]", "num_samples=-1"], "stepdistill-compare: error: num_samples=-1: need an"),
    (["stepdistill.cli.bench", "benchmark=gmm", "methods=dmd2", "steps=1", "warmup=0", "method.nope=1"],
     "stepdistill-bench: error: unknown setting 'method.nope': did you mean method.name"),
    (["stepdistill.cli.bench", "benchmark=gmm", "methods=dmd2", "trainer.batch_sise=8"],
     "stepdistill-bench: error: unknown setting 'trainer.batch_sise': did you mean trainer.batch_size"),
    (["stepdistill.cli.teacher", "benchmark=digits", "teacher.steps=0"], "stepdistill-teacher: error: teacher.steps=0"),
    # "no" is a string to Hydra, and a string is true: the run resumed (the default is read with the group choices)
    (["stepdistill.cli.train", "benchmark=gmm", "trainer.resume=no"], "error: trainer.resume=no: an on/off setting"),
    (["stepdistill.cli.train", "generator=four_step", "generator.per_sample_step=maybe"],
     "error: generator.per_sample_step=maybe: an on/off setting takes true or false"),
    (["stepdistill.cli.evaluate", "run_dir=D", "every_step=yes"], "stepdistill-eval: error: every_step=yes: an on/off"),
    # a count or a rate given as text was int()'s or torch's error without the setting's name
    (["stepdistill.cli.train", "benchmark=gmm", "trainer.batch_size=abc"],
     "stepdistill-train: error: trainer.batch_size=abc: need an integer (the default is 256)"),
    (["stepdistill.cli.train", "benchmark=gmm", "optim.generator.lr=fast"],
     "error: optim.generator.lr=fast: need a number (the default is 0.0003)"),
    (["stepdistill.cli.train", "benchmark=gmm", "trainer.max_steps=1e4"], "error: trainer.max_steps=1e4: need an integer"),
    (["stepdistill.cli.sample", "benchmark=gmm", "num_samples=4", "seed=x", "out=x.npz"],
     "stepdistill-sample: error: seed=x: need an integer (the default is 0)"),
    (["stepdistill.cli.export", "run_dir=D", "num_threads=two"], "stepdistill-export: error: num_threads=two: need an"),
    (["stepdistill.cli.compare", "runs=[D]", "seed=abc"], "stepdistill-compare: error: seed=abc: need an integer"),
    (["stepdistill.cli.bench", "benchmark=gmm", "methods=dmd2", "trainer.batch_size=abc"],
     "stepdistill-bench: error: trainer.batch_size=abc: need an integer (the default is 256)"),
])
def test_apps_reject_bad_counts_in_one_line(tmp_path, args, message):
    """Each app checks its counts and on/off settings before it loads anything, and the bench names an unknown
    method (or a child's failure) in one line rather than a launcher traceback."""
    proc = run_cli("-m", *app_args(args, tmp_path), check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["stepdistill.cli.export"], "stepdistill-export: error: give run_dir=D"),
    (["stepdistill.cli.export", "run_dir=D"], "config.yaml not found: run_dir= must be a stepdistill-train run"),
    (["stepdistill.cli.evaluate", "run_dir=D"],
     "no_run/config.yaml not found: run_dir= must be a stepdistill-train run folder"),
    (["stepdistill.cli.sample", "run_dir=D", "num_samples=4", "out=x.npz"],
     "no_run/config.yaml not found: run_dir= must be a stepdistill-train run folder"),
    (["stepdistill.cli.compare"], "stepdistill-compare: error: give runs="),
    (["stepdistill.cli.teacher", "benchmark=gmm"], "the gmm teacher is analytic"),
    (["stepdistill.cli.bench", "benchmark=nope"], "stepdistill-bench: error: unknown benchmark 'nope'"),
])
def test_usage_errors_answer_before_torch_loads(tmp_path, args, message):
    """A missing or mistyped run folder, or a setting an app cannot take, is answered before torch and diffusers
    are imported (~4 s of start-up): stepdistill-export used to load both, ~8 s, before saying run_dir= was missing."""
    report = ("import atexit, runpy, sys; atexit.register(lambda: print('loaded:', sorted({'torch', 'diffusers'} & "
              "set(sys.modules)))); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')")
    proc = run_cli("-c", report, *app_args(args, tmp_path), check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "loaded: []" in proc.stdout, proc.stdout


def test_override_types_follow_the_defaults():
    """A value fits its setting when it has the default's type: ints pass for a float setting, a list setting takes a
    list (one value was a traceback deep in the run), null passes where it means the default and is refused on other
    number settings (an int(None) traceback), and settings with a string or null default are not checked."""
    from stepdistill.cli.override_types import type_error
    fits = [(True, False), (True, 0), (True, 1), (256, 512), (3e-4, 1), (3e-4, 1e-5), (3e-4, float("inf")),
            ("dmd2", 3), (None, "x"), ([1, 2], [3]), ([1, 2], None), (True, None)]
    for default, value in fits:
        assert type_error("k", str(value), default, value) is None, (default, value)
    assert type_error("k", "null", 256, None) == "k=null: need an integer: leave it out for the default (256)"
    assert type_error("optim.critic.grad_clip", "null", 1.0, None) is None   # null: no clipping
    assert type_error("k", "3", [1, 2], 3) == "k=3: need a list, e.g. k=[3]"
    assert type_error("generator.timesteps", "999", None, 999) == ("generator.timesteps=999: need a list, e.g. "
                                                                  "generator.timesteps=[999]")
    refused = [(True, "no", "an on/off setting takes true or false"), (True, 2, "an on/off"),
               (256, "abc", "need an integer (the default is 256)"), (256, 2.5, "need an integer"),
               (256, 1e4, "need an integer"), (256, True, "need an integer"),
               (3e-4, "fast", "need a number (the default is 0.0003)"), (3e-4, False, "need a number")]
    for default, value, message in refused:
        assert message in (type_error("k", "T", default, value) or ""), (default, value)
    assert type_error("optim.generator.lr", "fast", 3e-4, "fast").startswith("optim.generator.lr=fast: ")


def test_compose_config_checks_as_the_command_line_does():
    """From Python (the notebooks' way), hydra's compose took `method.gan.enabled=no` as the string "no", which is
    true: the GAN head was built and trained."""
    from stepdistill.cli import compose_config
    assert compose_config(["benchmark=gmm", "method=dmd2", "method.gan.enabled=false"]).method.gan.enabled is False
    for overrides, says in ((["benchmark=gmm", "method.gan.enabled=no"], "method.gan.enabled=no: an on/off setting"),
                            (["method=dmdd"], "unknown method 'dmdd'"),
                            (["trainer.max_step=3"], "did you mean trainer.max_steps"),
                            (["benchmark=gmm", "benchmark.teacher.path=/x"], "is not a setting of benchmark=gmm")):
        with pytest.raises(ValueError, match=says):
            compose_config(overrides)


def test_an_experiment_preset_for_other_methods_is_refused():
    """`experiment=sid_from_scratch` without `method=sid` trained DMD2 on SiD's schedule, with SiD's alpha unread."""
    from stepdistill.cli import compose_config
    from stepdistill.train.setup import build_run
    with pytest.raises(ValueError, match=r"this experiment preset is for method=sid or sid_fewstep or sida, not dmd2: "
                                         r"add method=sid"):
        build_run(compose_config(["benchmark=gmm", "experiment=sid_from_scratch"]))


def test_negative_learning_rate_names_its_setting(tmp_path):
    """torch's "Invalid learning rate: -1" did not say which role's lr it was."""
    from hydra import compose, initialize_config_dir

    from stepdistill.cli import CONF_DIR
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose("train", overrides=["benchmark=gmm", "optim.critic.lr=-1", "eval.every=0"])
    with pytest.raises(ValueError, match=r"^optim.critic.lr=-1: need a number >= 0$"):
        Trainer(build_run(cfg), tmp_path)


def test_at_least():
    from stepdistill.checks import at_least
    assert at_least("n", "3") == 3 and at_least("n", 0, 0) == 0
    for bad in (0, -1, 2.5, "x", None):
        with pytest.raises(ValueError, match=f"n={bad}: need an integer >= 1"):
            at_least("n", bad)


def test_thread_count_setting():
    """0 or null leaves torch's thread count alone; a negative count is a one-line error (it was torch's
    RuntimeError, printed as a traceback)."""
    import torch

    from stepdistill.cli import set_threads
    before = torch.get_num_threads()
    set_threads(0, "trainer.num_threads")
    set_threads(None)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"trainer.num_threads=-1: need an integer >= 0"):
        set_threads(-1, "trainer.num_threads")
    set_threads(1)
    assert torch.get_num_threads() == 1
    set_threads(before)


def test_sample_eval_and_export_take_an_earlier_checkpoint(tmp_path, gmm_cfg):
    """checkpoint=STEP picks that step's checkpoint (the latest by default); an evaluation is logged at the step
    of the weights it evaluated; a step without a checkpoint is a one-line error listing the ones there are."""
    from stepdistill.cli.evaluate import evaluate_run
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.export import export_run
    from stepdistill.train.setup import load_run
    run_dir = tmp_path / "run"
    train(gmm_cfg("trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.keep_checkpoints=5",
                  "trainer.export=false"), run_dir)
    latest, _ = sample_student(run_dir, 50, seed=3)
    step4, _ = sample_student(run_dir, 50, seed=3, checkpoint=4)
    by_path, _ = sample_student(run_dir, 50, seed=3, checkpoint=str(run_dir / "checkpoints" / "step_0000004"))
    torch.testing.assert_close(step4, by_path, rtol=0, atol=0)
    torch.testing.assert_close(sample_student(run_dir, 50, seed=3, checkpoint=8)[0], latest, rtol=0, atol=0)
    assert not torch.equal(step4, latest)   # the generator trains from step 5 (4 critic warm-up steps)
    evaluate_run(run_dir, overrides=["eval.num_samples=50"], checkpoint=4)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    export_run(load_run(run_dir, checkpoint=4), tmp_path / "export4")
    from stepdistill.pipelines import PointsFewStepPipeline
    pipe = PointsFewStepPipeline.from_pretrained(tmp_path / "export4")
    torch.testing.assert_close(pipe(batch_size=50, generator=torch.Generator().manual_seed(3)), step4,
                               atol=1e-5, rtol=1e-5)
    proc = run_app("stepdistill.cli.sample", f"run_dir={run_dir}", "checkpoint=3", "num_samples=5",
                   f"out={tmp_path}/x.npz", check=False)
    assert proc.returncode == 2 and "checkpoint=3:" in proc.stderr and "it has steps [4, 8]" in proc.stderr


def test_a_sweep_jobs_folder_is_taken_as_written(tmp_path):
    """A sweep names its jobs' folders after their overrides (`0_benchmark=gmm,method=dmd2`): as run_dir= or
    hydra.run.dir= unquoted, Hydra's grammar refused them in several lines ("mismatched input '='")."""
    from stepdistill.cli import quote_folder_values
    job = tmp_path / "0_benchmark=gmm,method=dmd2,trainer.max_steps=2"
    run_app("stepdistill.cli.train", *FAST, "trainer.max_steps=2", f"hydra.run.dir={job}")
    assert (job / "checkpoints" / "step_0000002").is_dir() and not list(tmp_path.glob("'*"))
    run_app("stepdistill.cli.sample", f"run_dir={job}", "num_samples=4", f"out={job / 'x.npz'}")
    with np.load(job / "x.npz") as f:
        assert f["samples"].shape == (4, 2)
    # values without "=", lists, dicts and quoted values stay as they are
    kept = ["method=dmd2", "generator.timesteps=[999,499]", "runs=[a=b]", "out='a=b'", "trainer.max_steps=2"]
    assert quote_folder_values(kept) == kept
    assert quote_folder_values(["run_dir=x/0_a=1,b=2"]) == ["run_dir='x/0_a=1,b=2'"]
