"""What stepdistill-sample, -eval, -export and -compare do with the input a user gives them: a setting an app would
ignore is refused in one line, stepdistill-eval leaves the training's grid and its count checks as training's, and
stepdistill-compare shows the evaluation at the run's own sampling whatever stepdistill-eval appended since."""
import json

import pytest
import torch
from conftest import GMM_FAST, compose_cfg, run_app


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    """A 1-step gmm run of 3 steps whose final evaluation (50 samples) wrote samples/step_0000003.png."""
    from stepdistill.cli.train import train
    run_dir = tmp_path_factory.mktemp("gmm_run")
    train(compose_cfg(*GMM_FAST, "trainer.max_steps=3", "method.critic_warmup_steps=1", "eval.final=true",
                      "eval.num_samples=50", "trainer.export=false"), run_dir)
    assert (run_dir / "samples" / "step_0000003.png").is_file()
    return run_dir


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(proc, app, message):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith(f"{app}: error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_refuses_too_few_evaluation_samples(gmm_run):
    """eval.num_samples=0 was an IndexError deep in the sampling; stepdistill-train refuses it in one line."""
    before = records(gmm_run)
    for n in (0, 1):
        proc = run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", f"eval.num_samples={n}", check=False)
        assert_one_line_error(proc, "stepdistill-eval", f"eval.num_samples={n}: an evaluation needs at least 2 samples")
    from stepdistill.cli.evaluate import evaluate_run
    with pytest.raises(ValueError, match="eval.num_samples=0: an evaluation needs at least 2 samples"):
        evaluate_run(gmm_run, overrides=["eval.num_samples=0"])   # the library call too
    assert records(gmm_run) == before


@pytest.mark.parametrize("setting, message", [
    # the teacher reference is at the run's benchmark.teacher_steps, as training's evaluations (and curves.png's
    # dashed teacher line) are: teacher_steps=4 was ignored while the output said teacher_steps 64
    ("teacher_steps=4", ("teacher_steps=4: stepdistill-eval's teacher reference samples at the run's own "
                         "benchmark.teacher_steps")),
    ("benchmark=gmm", "benchmark=gmm: stepdistill-eval evaluates the run on its own benchmark"),
    ("out=x.json", "out=x.json: stepdistill-eval writes into run_dir=D"),
    ("seed=3", "seed=3: stepdistill-eval's noise seed is the run's eval.seed: use eval.seed=S"),
])
def test_eval_refuses_settings_it_would_ignore(gmm_run, setting, message):
    before = records(gmm_run)
    proc = run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", "num_samples=20", setting, check=False)
    assert_one_line_error(proc, "stepdistill-eval", message)
    assert records(gmm_run) == before


def test_eval_writes_its_grid_beside_the_training_grid(gmm_run):
    """stepdistill-eval's sample grid used to replace samples/step_0000003.png, the training's final one."""
    grid = gmm_run / "samples" / "step_0000003.png"
    training_grid = grid.read_bytes()
    proc = run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", "num_samples=20", "num_threads=1")
    out = json.loads(proc.stdout)
    assert out["figure"] == str(gmm_run / "samples" / "step_0000003_eval.png") and out["student_steps"] == 1
    assert (gmm_run / "samples" / "step_0000003_eval.png").is_file() and grid.read_bytes() == training_grid
    proc = run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", "num_samples=20", "num_threads=1", "steps=2")
    assert json.loads(proc.stdout)["figure"] == str(gmm_run / "samples" / "step_0000003_2steps_eval.png")
    assert grid.read_bytes() == training_grid
    # a second evaluation of the checkpoint (another noise seed) keeps the first one's grid
    first = (gmm_run / "samples" / "step_0000003_eval.png").read_bytes()
    proc = run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", "num_samples=20", "num_threads=1", "eval.seed=5")
    assert json.loads(proc.stdout)["figure"] == str(gmm_run / "samples" / "step_0000003_eval_2.png")
    assert (gmm_run / "samples" / "step_0000003_eval.png").read_bytes() == first


def test_compare_picks_the_evaluation_at_the_runs_own_sampling_among_real_records(gmm_run):
    """What stepdistill-eval really appends (each step along the chain, another step count, the trained count)
    after the training's final evaluation: the comparison's evaluation stays the training's."""
    from stepdistill.cli.compare import run_evaluation
    from stepdistill.eval.curves import read_metrics
    for extra in ([], ["every_step=true", "steps=2"], ["steps=2"]):
        run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", "num_samples=20", "num_threads=1", *extra)
    evaluation = run_evaluation(read_metrics(gmm_run / "metrics.jsonl"), 1)
    assert "source" not in evaluation and evaluation["student_num_samples"] == 50


def digits_run(root, name, recs, *overrides):
    from omegaconf import OmegaConf
    run = root / name
    run.mkdir(parents=True)
    OmegaConf.save(compose_cfg("benchmark=digits", *overrides), run / "config.yaml", resolve=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def test_compare_shows_the_evaluation_at_the_runs_own_sampling(tmp_path):
    """A 4-step digits run evaluated again by stepdistill-eval (records as it writes them): every_step=true left
    the row without an FD, steps=1 put the 1-step FD in the row labelled 4-step. The row now shows the training's
    final evaluation, or a later stepdistill-eval at the trained count, and the output says which."""
    from stepdistill.cli.compare import compare
    train = [{"kind": "train", "step": 100, "seconds": 10.0}, {"kind": "train", "step": 200, "seconds": 20.0},
             {"kind": "eval", "step": 100, "student_fd": 3.0, "teacher_fd": 1.5, "student_fd_num_samples": 500},
             {"kind": "eval", "step": 200, "student_fd": 1.2, "teacher_fd": 1.5, "student_fd_num_samples": 5000}]
    every_step = {"kind": "eval", "step": 200, "timesteps": [999.0, 759.0, 499.0, 259.0],
                  "student_step4_fd": 1.3, "student_step4_fd_num_samples": 500, "source": "stepdistill-eval every_step",
                  "student_steps": 4}
    one_step = {"kind": "eval", "step": 200, "student_fd": 9.0, "teacher_fd": 1.5, "student_fd_num_samples": 500,
                "source": "stepdistill-eval steps=1", "student_steps": 1}
    one_step_before = {**one_step, "source": "stepdistill-eval"}   # as written before the source named the count
    at_trained = {"kind": "eval", "step": 200, "student_fd": 1.4, "teacher_fd": 1.6, "student_fd_num_samples": 300,
                  "source": "stepdistill-eval", "student_steps": 4, "eval_overrides": ["eval.num_samples=300"]}
    four = ("generator=four_step",)
    digits_run(tmp_path / "a", "every_step", [*train, every_step], *four)
    digits_run(tmp_path / "a", "one_step", [*train, one_step_before, one_step], *four)
    # no evaluation of its own (eval.final=false): the latest stepdistill-eval at the trained count
    digits_run(tmp_path / "a", "evaluated_later", [*train[:2], at_trained, one_step], *four)
    result = compare([tmp_path / "a"], tmp_path / "out")
    rows = {r["run_dir"].rsplit("/", 1)[1]: r for r in result["rows"]}
    for name in ("every_step", "one_step"):
        assert (rows[name]["fd"], rows[name]["teacher_fd"], rows[name]["num_samples"]) == (1.2, 1.5, 5000), name
    assert (rows["evaluated_later"]["fd"], rows["evaluated_later"]["num_samples"]) == (1.4, 300)
    notes = {n.split("(")[1].split(")")[0].rsplit("/", 1)[1]: n for n in result["evaluations"]}
    assert notes["every_step"].endswith("the training's evaluation at step 200, 4-step sampling, 5000 samples")
    assert notes["evaluated_later"].endswith("stepdistill-eval at step 200, 4-step sampling, 300 samples "
                                             "(eval.num_samples=300)")
    assert notes["one_step"] in (tmp_path / "out" / "comparison.md").read_text()


def test_compare_redraws_a_gmm_run_as_its_final_evaluation_did(gmm_run, tmp_path):
    """By default a gmm row re-samples at the run's eval.num_samples and eval.seed and scores as its evaluations do:
    the row is the run's final evaluation (it re-sampled with seed 0 and drew the metric's reference with it).
    num_samples= and seed= given with image runs, which they do not change, get a note."""
    from stepdistill.cli.compare import compare
    final = [r for r in records(gmm_run) if r.get("kind") == "eval" and "source" not in r][-1]   # training's
    row = compare([gmm_run], tmp_path / "default")["rows"][0]
    for key in ("high_quality_fraction", "sliced_w2", "modes_covered"):
        assert row[key] == pytest.approx(final[f"student_{key}"], rel=1e-6), key
    # a larger final evaluation (eval.final_num_samples): its count, not eval.num_samples
    import shutil

    from omegaconf import OmegaConf
    larger = tmp_path / "larger"
    shutil.copytree(gmm_run, larger)
    cfg = OmegaConf.load(larger / "config.yaml")
    cfg.eval.final_num_samples = 70
    OmegaConf.save(cfg, larger / "config.yaml")
    assert compare([larger], tmp_path / "final_count")["rows"][0]["num_samples"] == 70
    other = compare([gmm_run], tmp_path / "other", seed=7)
    assert other["rows"][0]["sliced_w2"] != pytest.approx(row["sliced_w2"], rel=1e-6)
    assert other["evaluations"] == []   # no image rows: nothing to note
    digits_run(tmp_path / "d", "run", [{"kind": "train", "step": 50, "seconds": 5.0}])
    notes = compare([gmm_run, tmp_path / "d"], tmp_path / "mixed", num_samples=20, seed=7)["evaluations"]
    assert notes[-1].startswith("num_samples=20 and seed=7 re-sample the gmm runs only; the 1 image row(s)")
    assert notes[-1] in (tmp_path / "mixed" / "comparison.md").read_text()


def test_compare_row_without_an_evaluation_at_its_sampling_has_no_fd(tmp_path):
    from stepdistill.cli.compare import compare
    digits_run(tmp_path / "a", "run", [{"kind": "train", "step": 50, "seconds": 5.0},
                                       {"kind": "eval", "step": 50, "student_fd": 9.0, "student_steps": 2,
                                        "source": "stepdistill-eval steps=2"}])
    result = compare([tmp_path / "a"], tmp_path / "out")
    assert result["rows"][0]["fd"] is None and result["evaluations"][0].endswith(": no evaluation logged")


@pytest.mark.parametrize("args, message", [
    (["run_dir=RUN", "benchmark=gmm"], ("benchmark=gmm: a run samples its own benchmark (run_dir=D's config.yaml): "
                                        "leave out benchmark=")),
    (["run_dir=RUN", "eval.seed=3"], "eval.seed=3: eval.* settings are stepdistill-eval's: leave them out"),
    (["benchmark=gmm", "checkpoint=3"], "checkpoint=3: checkpoint= picks a trained run's checkpoint (with run_dir=D)"),
    (["benchmark=gmm", "every_step=true"], "every_step=true: every_step= is stepdistill-eval's"),
])
def test_sample_refuses_settings_it_would_ignore(gmm_run, tmp_path, args, message):
    args = [a.replace("RUN", str(gmm_run)) for a in args]
    proc = run_app("stepdistill.cli.sample", *args, "num_samples=4", f"out={tmp_path / 'x.npz'}", check=False)
    assert_one_line_error(proc, "stepdistill-sample", message)
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("setting, message", [
    ("steps=2", ("steps=2: an export holds the student, not a step count: leave it out and choose the steps when "
                 "sampling (pipe(num_inference_steps=K)")),
    ("num_samples=5", ("num_samples=5: stepdistill-export does not use num_samples= here (it takes run_dir=, "
                       "checkpoint=, out=, num_threads=): leave it out")),
])
def test_export_refuses_settings_it_would_ignore(gmm_run, tmp_path, setting, message):
    proc = run_app("stepdistill.cli.export", f"run_dir={gmm_run}", setting, f"out={tmp_path / 'export'}", check=False)
    assert_one_line_error(proc, "stepdistill-export", message)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("args, line", [
    # no run_dir= and no benchmark=: the default benchmark's teacher, as documented, and now said
    ([], "wrote 6 teacher samples (1, 8, 8) of benchmark digits (20 sampler steps) to "),
    (["benchmark=gmm", "teacher_steps=5"], "wrote 6 teacher samples (2,) of benchmark gmm (5 sampler steps) to "),
    (["benchmark=gmm"], "wrote 6 teacher samples (2,) of benchmark gmm (64 sampler steps) to "),
])
def test_teacher_samples_say_whose_and_how_many_steps(tmp_path, args, line):
    out = tmp_path / "t.npz"   # one thread: the digits UNet's tiny convolutions were 10x slower on two busy cores
    proc = run_app("stepdistill.cli.sample", *args, "num_samples=6", "num_threads=1", f"out={out}")
    assert proc.stdout == f"{line}{out}\n"


def test_eval_follows_the_runs_teacher_reference_and_refuses_training_settings(gmm_run):
    """eval.teacher_reference=false still sampled and scored the teacher; eval.every, eval.final and
    eval.final_num_samples were accepted, recorded as applied, and ignored."""
    before = records(gmm_run)
    for setting in ("eval.every=5", "eval.final=false", "eval.final_num_samples=100"):
        proc = run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", "num_samples=20", setting, check=False)
        assert_one_line_error(proc, "stepdistill-eval", f"{setting}: {setting.split('=')[0]} is a training run's "
                                                        "setting")
    assert records(gmm_run) == before
    from stepdistill.cli.evaluate import evaluate_run
    metrics = evaluate_run(gmm_run, overrides=["eval.num_samples=20", "eval.teacher_reference=false"])
    assert "student_sliced_w2" in metrics and not any(k.startswith("teacher_") for k in metrics)
    assert any(k.startswith("teacher_") for k in evaluate_run(gmm_run, overrides=["eval.num_samples=20"]))


def test_sample_refuses_an_out_it_cannot_write_before_sampling(gmm_run, tmp_path):
    """out=<a folder> sampled first, then failed with [Errno 21] and left a .tmp.npz beside the folder."""
    for out in (tmp_path, ""):
        proc = run_app("stepdistill.cli.sample", f"run_dir={gmm_run}", "num_samples=4", f"out={out}", check=False)
        assert_one_line_error(proc, "stepdistill-sample", f"out={out}: give the file to write")
    assert not list(tmp_path.parent.glob("*.tmp.npz"))


def test_sample_warns_when_a_students_samples_are_not_finite(gmm_run, tmp_path):
    """A student whose weights went NaN had its NaN samples written without a word; they are still written (worth
    looking at), with a warning that counts them. A finite student's sampling warns of nothing."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file
    run = tmp_path / "run"
    shutil.copytree(gmm_run, run)
    for f in (run / "checkpoints" / "step_0000003").glob("generator*.safetensors"):
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in load_file(str(f)).items()}, str(f))
    proc = run_app("stepdistill.cli.sample", f"run_dir={run}", "num_samples=5", f"out={tmp_path / 'nan.npz'}")
    assert proc.stderr.strip() == ("stepdistill-sample: warning: 5 of 5 samples hold NaN or inf: the student "
                                   "diverged or overflowed: an earlier checkpoint=STEP may not")
    assert np.isnan(np.load(tmp_path / "nan.npz")["samples"]).all()
    proc = run_app("stepdistill.cli.sample", f"run_dir={gmm_run}", "num_samples=5", f"out={tmp_path / 'ok.npz'}")
    assert "warning" not in proc.stderr


def test_a_checkpoint_folder_is_found_relative_to_the_run(gmm_run, tmp_path, monkeypatch):
    """checkpoint=checkpoints/step_0000003 (a folder of run_dir, as sample.yaml says) was looked for in the working
    directory and refused with advice to give exactly that."""
    from stepdistill.train.setup import find_checkpoint
    monkeypatch.chdir(tmp_path)
    step = gmm_run / "checkpoints" / "step_0000003"
    assert find_checkpoint(gmm_run, "checkpoints/step_0000003") == step == find_checkpoint(gmm_run, "step_0000003")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        find_checkpoint(gmm_run, "checkpoints/step_0000009")


def test_eval_refuses_another_runs_checkpoint(gmm_run, tmp_path):
    """checkpoint=<another run's checkpoint folder> was scored and logged into run_dir's metrics.jsonl at that run's
    step, as if it were this run's; stepdistill-eval names the run to evaluate it with. Its own folders, absolute
    or relative, still work."""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(gmm_run, other)
    before = records(gmm_run)
    proc = run_app("stepdistill.cli.evaluate", f"run_dir={gmm_run}", "num_samples=20",
                   f"checkpoint={other / 'checkpoints' / 'step_0000003'}", check=False)
    assert_one_line_error(proc, "stepdistill-eval", f"is not one of {(gmm_run / 'checkpoints').resolve()}'s "
                          f"checkpoints: stepdistill-eval logs into run_dir's metrics.jsonl, so evaluate it with "
                          f"run_dir= its own run folder ({other.resolve()})")
    assert records(gmm_run) == before
    from stepdistill.cli.evaluate import evaluate_run
    own = gmm_run / "checkpoints" / "step_0000003"
    assert evaluate_run(gmm_run, overrides=["eval.num_samples=20", "eval.teacher_reference=false"],
                        checkpoint=str(own))["source"] == "stepdistill-eval"


def test_another_networks_checkpoint_is_one_line(gmm_run, tmp_path):
    """A checkpoint of another network was a RuntimeError, which the apps printed as a traceback."""
    import torch

    from stepdistill.train.checkpoint import load_module, save_module
    save_module(torch.nn.Linear(3, 3), tmp_path / "lin.safetensors")
    with pytest.raises(ValueError, match="does not match the network: size mismatch for weight"):
        load_module(torch.nn.Linear(2, 3), tmp_path / "lin.safetensors")
    with pytest.raises(ValueError, match="does not match the network: missing"):
        load_module(torch.nn.Linear(3, 3), gmm_run / "checkpoints" / "step_0000003" / "generator.safetensors")


def test_compare_keeps_every_runs_curves_and_writes_strict_json(gmm_run, tmp_path):
    """Two runs of one benchmark, method and folder name (jobs of two sweeps) drew one curve; a NaN metric (the mode
    width with no mode covered) was written as NaN, which is not JSON."""
    import math
    import shutil

    from stepdistill.cli.compare import compare, curve_labels
    for sweep in ("a", "b"):
        shutil.copytree(gmm_run, tmp_path / sweep / "0_method=dmd2")
    runs = [(("gmm dmd2"), tmp_path / s / "0_method=dmd2") for s in "ab"]
    assert len(set(curve_labels(runs))) == 2
    assert curve_labels([("gmm dmd2", tmp_path / "x"), ("gmm dmd2", tmp_path / "y"), ("gmm dmd", tmp_path / "x")]) \
        == ["gmm dmd2 (x)", "gmm dmd2 (y)", "gmm dmd"]
    result = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out", num_samples=40)
    rows = json.loads((tmp_path / "out" / "comparison.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in comparison.json"))
    assert len(rows) == 2 and "curves" in result
    assert math.isnan(result["rows"][0]["mode_std_ratio"]) and rows[0]["mode_std_ratio"] is None   # no mode covered
