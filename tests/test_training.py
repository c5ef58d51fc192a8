"""End-to-end training on gmm through the Python API: both methods, resume exactness, atomic checkpoints."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_app
from stepdistill.cli.train import train
from stepdistill.train import checkpoint as ckpt_mod
from stepdistill.train.checkpoint import latest_checkpoint, list_checkpoints
from stepdistill.train.loggers import MetricsLogger


def _weights(run_dir, step):
    d = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    return {f.stem: load_file(str(f)) for f in d.glob("*.safetensors")}


@pytest.mark.parametrize("method", ["dmd2", "dmd"])
def test_gmm_end_to_end(gmm_cfg, tmp_path, method):
    # periodic evaluations at eval.num_samples, the final one at eval.final_num_samples (teacher too)
    cfg = gmm_cfg(f"method={method}", "trainer.max_steps=30", "eval.final=true", "eval.every=20", "eval.num_samples=100",
                  "eval.final_num_samples=256", "eval.batch_size=256",
                  "method.regression.num_pairs=64" if method == "dmd" else "seed=0")
    result = train(cfg, tmp_path)
    for f in ("config.yaml", "metrics.jsonl", "export/model_index.json", "checkpoints/step_0000030/generator.safetensors"):
        assert (tmp_path / f).exists(), f
    assert Path(result["figure"]).is_file()
    assert result["student_num_samples"] == 256 and 0 <= result["student_high_quality_fraction"] <= 1
    text = (tmp_path / "config.yaml").read_text()
    assert "mixture:" in text and "means:" in text and "weights:" in text
    import json
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == 30
    assert rows[-1]["student_num_samples"] == rows[-1]["teacher_num_samples"] == 256
    assert [r["student_num_samples"] for r in rows if r["kind"] == "eval" and r["step"] == 20] == [100]
    assert any(r["kind"] == "train" and r["step"] == 30 for r in rows)


@pytest.mark.parametrize("method", ["dmd2", "sid"])
def test_gmm_fake_score_from_teacher_trains(gmm_cfg, tmp_path, method):
    """A critic that starts as the exact teacher trains with DMD2 and with SiD (whose generator loss
    differentiates through the critic's input); its checkpoint holds the residual MLP's weights only."""
    cfg = gmm_cfg(f"method={method}", "benchmark.fake_score_from_teacher=true", "trainer.max_steps=20",
                  "eval.final=true", "eval.num_samples=128", "eval.batch_size=128")
    result = train(cfg, tmp_path)
    assert 0 <= result["student_high_quality_fraction"] <= 1
    fake = _weights(tmp_path, 20)["fake_score"]
    assert fake and all(k.startswith("net.") and torch.isfinite(v).all() for k, v in fake.items())
    assert fake["net.out.2.weight"].abs().sum() > 0   # the zero-initialised residual has learned


def test_resume_is_exact(gmm_cfg, tmp_path):
    # LR warm-ups that span the resume (8 generator and 12 critic updates by step 20): a resume that left the LR
    # schedulers at their start would run other rates (a constant rate alone cannot tell)
    common = ["method=dmd2", "trainer.checkpoint_every=10", "trainer.keep_checkpoints=5", "eval.every=10",
              "eval.num_samples=64", "eval.batch_size=64", "optim.generator.warmup_steps=12",
              "optim.critic.warmup_steps=16"]
    straight = tmp_path / "straight"
    train(gmm_cfg(*common, "trainer.max_steps=40"), straight)
    resumed = tmp_path / "resumed"
    train(gmm_cfg(*common, "trainer.max_steps=20"), resumed)
    train(gmm_cfg(*common, "trainer.max_steps=40", "trainer.resume=true"), resumed)
    a, b = _weights(straight, 40), _weights(resumed, 40)
    assert a.keys() == b.keys() and "generator_ema" in a and "fake_score" in a
    for role in a:
        for k in a[role]:
            torch.testing.assert_close(a[role][k], b[role][k], rtol=0, atol=0, msg=f"{role}.{k}")
    st_a = torch.load(straight / "checkpoints/step_0000040/trainer_state.pt", weights_only=True)
    st_b = torch.load(resumed / "checkpoints/step_0000040/trainer_state.pt", weights_only=True)
    assert st_a["step"] == st_b["step"] == 40
    assert torch.equal(st_a["rng_cpu"], st_b["rng_cpu"])
    assert st_a["schedulers"] == st_b["schedulers"]
    for phase in ("generator", "critic"):
        opt_a, opt_b = st_a["optimizers"][phase], st_b["optimizers"][phase]
        assert opt_a["param_groups"] == opt_b["param_groups"]
        for i, state in opt_a["state"].items():
            for k, v in state.items():
                assert torch.equal(v, opt_b["state"][i][k]), (phase, i, k)


def test_resume_takes_the_configured_learning_rates_and_betas(gmm_cfg, tmp_path, caplog):
    """A resume that lowers a learning rate (a second stage) runs at the new rate: loading the optimizer and the LR
    scheduler had restored the checkpoint's, while config.yaml recorded the new one. The resume says which
    settings it changes (a setting added since with a new default would change silently otherwise)."""
    import json
    import logging
    common = ["method=dmd2", "trainer.checkpoint_every=3", "eval.every=0", "logger.every=1", "trainer.export=false"]
    train(gmm_cfg(*common, "trainer.max_steps=6"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="stepdistill"):
        train(gmm_cfg(*common, "trainer.max_steps=12", "trainer.resume=true", "optim.generator.lr=1e-5",
                      "optim.critic.betas=[0.5,0.9]"), tmp_path)
    changed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: this run changes")]
    assert changed == [f"resume: this run changes optim.critic.betas: [0.0, 0.999] -> [0.5, 0.9]; "
                       f"optim.generator.lr: 0.0003 -> 1e-05 against {tmp_path / 'config.yaml'}"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr_generator"] for r in rows if "lr_generator" in r}
    st = torch.load(tmp_path / "checkpoints/step_0000012/trainer_state.pt", weights_only=True)
    assert st["schedulers"]["generator"]["base_lrs"] == [1e-5]
    assert st["optimizers"]["critic"]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert max(lr for step, lr in lrs.items() if step > 6) <= 1e-5 < min(lr for step, lr in lrs.items() if step <= 6)


def test_resume_after_a_crash_logs_each_step_once(gmm_cfg, tmp_path):
    """A run killed after logging steps its last checkpoint does not hold: the resumed run logs them again, and
    metrics.jsonl (one row per logged step and kind, read by the curves and stepdistill-compare) keeps its own."""
    import json
    import shutil
    common = ["method=dmd2", "trainer.checkpoint_every=5", "eval.every=3", "eval.num_samples=16",
              "eval.batch_size=16", "logger.every=1", "trainer.export=false", "eval.final=false"]
    train(gmm_cfg(*common, "trainer.max_steps=8"), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints/step_0000008")   # as if killed after step 8 was logged, before its save
    train(gmm_cfg(*common, "trainer.max_steps=8", "trainer.resume=true"), tmp_path)
    rows = [(r["step"], r["kind"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert rows == sorted(set(rows), key=rows.index) and [s for s, k in rows if k == "train"] == list(range(1, 9))
    assert [s for s, k in rows if k == "eval"] == [3, 6]


def test_a_resumed_run_logs_the_straight_runs_rows(gmm_cfg, tmp_path):
    """metrics.jsonl of a resumed run is the straight run's: each train row holds both phases' latest values (the
    checkpoint keeps the phase that did not run last; its row after the resume had only the other), a line a crash
    cut short neither ends the resume nor swallows the next row, and a resume with nothing to train replaces the
    training's final evaluation instead of logging a second one (stepdistill-eval's rows stay)."""
    import json
    common = ["method=dmd2", "method.critic_warmup_steps=0", "trainer.checkpoint_every=5", "eval.every=0",
              "logger.every=1", "trainer.export=false", "eval.num_samples=16", "eval.batch_size=16"]

    def rows(run):
        recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if k not in ("seconds", "figure")} for r in recs]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(gmm_cfg(*common, "trainer.max_steps=8", "eval.final=true"), straight)
    train(gmm_cfg(*common, "trainer.max_steps=5", "eval.final=false"), resumed)
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "kind": "tra')   # a crash mid-write, after the checkpoint of step 5
    train(gmm_cfg(*common, "trainer.max_steps=8", "eval.final=true", "trainer.resume=true"), resumed)
    assert rows(resumed) == rows(straight)
    assert {"critic/loss", "generator/loss"} <= rows(resumed)[5].keys()   # step 6, the first after the resume
    with open(resumed / "metrics.jsonl", "a") as f:   # another cut line, now before an appended evaluation
        f.write('{"step": 9, "ki')
    MetricsLogger(resumed, resume=True, console=False, curves=False).log(8, {"x": 1.0, "source": "stepdistill-eval"},
                                                                           kind="eval")
    train(gmm_cfg(*common, "trainer.max_steps=8", "eval.final=true", "trainer.resume=true"), resumed)
    assert rows(resumed) == rows(straight)[:-1] + [{"step": 8, "kind": "eval", "x": 1.0, "source": "stepdistill-eval"},
                                                   rows(straight)[-1]]


def test_resume_without_checkpoint_is_a_clear_error(gmm_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer.resume"):
        train(gmm_cfg("trainer.max_steps=5", "trainer.resume=true"), tmp_path)


@pytest.mark.parametrize("first, change, named", [
    ("method=dmd2", "benchmark.network.width=96", "benchmark.network.width: 64 -> 96"),   # the networks' shapes
    ("method=dmd2", "method=dmd", "method.name: dmd2 -> dmd"),   # the optimizers' parameter groups
    ("method=dmd", "method=dmd2", "method.name: dmd -> dmd2"),   # a role the checkpoint has no weights for
])
def test_resume_with_another_config_names_the_changed_settings(gmm_cfg, tmp_path, first, change, named):
    """A resume whose networks or optimizers do not fit the checkpoint says which settings differ from the
    run's config.yaml, in one message, and leaves config.yaml as the checkpoints were written with."""
    def with_pairs(*overrides):   # DMD's regression pairs, fewer of them
        method = [o for o in overrides if o.startswith("method=")][-1]
        return gmm_cfg(*overrides, *(["method.regression.num_pairs=64"] if method == "method=dmd" else []))
    train(with_pairs(first, "trainer.max_steps=4", "trainer.export=false"), tmp_path)
    written = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError) as err:
        train(with_pairs(first, change, "trainer.max_steps=8", "trainer.resume=true"), tmp_path)
    msg = str(err.value)
    assert msg.startswith("trainer.resume=true but checkpoint") and "step_0000004" in msg and "\n" not in msg
    assert "this run changes " in msg and named in msg and "another hydra.run.dir" in msg, msg
    assert (tmp_path / "config.yaml").read_text() == written
    # the run's own settings (with more steps) still resume, and then config.yaml records the new run
    train(with_pairs(first, "trainer.max_steps=6", "trainer.resume=true", "trainer.export=false"), tmp_path)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000006"
    assert "max_steps: 6" in (tmp_path / "config.yaml").read_text()


def test_config_differences_lists_changed_settings_first():
    from stepdistill.train.resume_check import config_differences
    saved = {"method": {"name": "dmd2", "gan": {"enabled": True}}, "trainer": {"resume": False, "max_steps": 4},
             "ts": [1, 2]}
    current = {"method": {"name": "dmd"}, "trainer": {"resume": True, "max_steps": 8}, "ts": [1, 3], "seed": 0}
    assert config_differences(saved, current) == [
        "method.name: dmd2 -> dmd", "trainer.max_steps: 4 -> 8", "ts: [1, 2] -> [1, 3]",
        "method.gan.enabled: True -> (unset)", "seed: (unset) -> 0"]


def test_a_fresh_run_refuses_a_folder_with_checkpoints(gmm_cfg, tmp_path):
    """Training again in a run folder without trainer.resume left the earlier run's later steps beside the new
    ones, so sample, eval, export and a resume took the earlier run's weights with the new config."""
    train(gmm_cfg("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.export=false"), tmp_path)
    kept = {f: (tmp_path / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(steps \[2, 4\]\): continue it with "
                                         r"trainer.resume=true, or train in another hydra.run.dir"):
        train(gmm_cfg("trainer.max_steps=2", "trainer.checkpoint_every=2", "trainer.export=false"), tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in kept} == kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_kill_mid_save_keeps_previous_checkpoint(gmm_cfg, tmp_path, monkeypatch):
    train(gmm_cfg("trainer.max_steps=10", "trainer.checkpoint_every=10", "trainer.export=false"), tmp_path)
    root = tmp_path / "checkpoints"
    before = latest_checkpoint(root)
    calls = {"n": 0}
    real_save = torch.save

    def dying_save(*a, **k):  # the process "dies" while writing trainer_state.pt of the next checkpoint
        calls["n"] += 1
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(gmm_cfg("trainer.max_steps=20", "trainer.checkpoint_every=20", "trainer.resume=true",
                      "trainer.export=false"), tmp_path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert calls["n"] == 1
    assert list_checkpoints(root) == [before]  # the half-written one is not a checkpoint
    st = torch.load(before / "trainer_state.pt", weights_only=True)
    assert st["step"] == 10
    # and training resumes from it; the next save clears temporary folders left by killed saves (this process's,
    # and one of another process that died before its rename)
    assert (root / f".tmp_step_0000020_{os.getpid()}").is_dir()
    (root / ".tmp_step_0000015_999999").mkdir()
    train(gmm_cfg("trainer.max_steps=20", "trainer.checkpoint_every=20", "trainer.resume=true",
                  "trainer.export=false"), tmp_path)
    assert latest_checkpoint(root).name == "step_0000020"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000010", "step_0000020"]


def test_a_rewrite_killed_between_its_renames_keeps_the_step(tmp_path, monkeypatch):
    """Rewriting a step moves its folder aside, then renames the new one in: a kill between the two leaves the
    old, complete checkpoint under its `.old_` name, which still counts (and loads) until the step is written."""
    root = tmp_path / "checkpoints"
    net = torch.nn.Linear(2, 2)
    ckpt_mod.save_checkpoint(root, 10, {"generator": net}, {"step": 10})
    real, renames = os.replace, []

    def dying(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)
    monkeypatch.setattr(ckpt_mod.os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint(root, 10, {"generator": torch.nn.Linear(2, 2)}, {"step": 10})
    monkeypatch.setattr(ckpt_mod.os, "replace", real)
    [found] = list_checkpoints(root)
    assert found.name == f".old_step_0000010_{os.getpid()}" and latest_checkpoint(root) == found
    loaded = torch.nn.Linear(2, 2)
    assert ckpt_mod.load_checkpoint(found, {"generator": loaded})["step"] == 10
    assert torch.equal(loaded.weight, net.weight)
    ckpt_mod.save_checkpoint(root, 11, {"generator": net}, {"step": 11})
    assert [p.name for p in list_checkpoints(root)] == [found.name, "step_0000011"]
    ckpt_mod.save_checkpoint(root, 10, {"generator": net}, {"step": 10})   # the step written again: the aside goes
    assert sorted(p.name for p in root.iterdir()) == ["step_0000010", "step_0000011"]


def test_each_step_is_checkpointed_once(gmm_cfg, tmp_path, monkeypatch, caplog):
    """A run whose last step is a checkpoint step writes that step once (the loop's save), not again at the end;
    a resume that has nothing to train writes nothing, and says so."""
    written = []
    real = ckpt_mod.save_checkpoint

    def counting(root, step, *a, **k):
        written.append(step)
        return real(root, step, *a, **k)
    import stepdistill.train.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "save_checkpoint", counting)
    train(gmm_cfg("trainer.max_steps=10", "trainer.checkpoint_every=5", "trainer.export=false"), tmp_path)
    assert written == [5, 10]
    train(gmm_cfg("trainer.max_steps=12", "trainer.checkpoint_every=5", "trainer.export=false"), tmp_path / "b")
    assert written == [5, 10, 5, 10, 12]
    train(gmm_cfg("trainer.max_steps=12", "trainer.checkpoint_every=5", "trainer.export=false",
                  "trainer.resume=true"), tmp_path / "b")
    assert written == [5, 10, 5, 10, 12]
    assert "trainer.max_steps=12 but the checkpoint is at step 12: nothing to train" in caplog.text


def test_nonfinite_guard_stops_with_clear_error(gmm_cfg, tmp_path):
    from stepdistill.train.trainer import NonFiniteError
    cfg = gmm_cfg("trainer.max_steps=20", "optim.critic.lr=1e30", "optim.critic.grad_clip=0",
                  "trainer.max_nonfinite_steps=2", "trainer.export=false")
    with pytest.raises(NonFiniteError, match="2 non-finite critic updates in a row .* lower optim.critic.lr"):
        train(cfg, tmp_path)


def test_a_run_that_leaves_the_generator_no_update_says_so(gmm_cfg, tmp_path, caplog):
    """gmm's 200 critic warm-up steps took all of `trainer.max_steps=200` (the README's sweep example): the run
    exported its initial generator without a word."""
    with caplog.at_level("WARNING"):
        train(gmm_cfg("trainer.max_steps=3", "method.critic_warmup_steps=3", "trainer.export=false"), tmp_path)
    assert ("trainer.max_steps=3 leaves the generator no update: its first comes at step 5, after "
            "method.critic_warmup_steps=3 warm-up steps and method.critic_steps=1 critic updates" in caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING"):   # no warm-up: the critic's updates before the first generator update
        train(gmm_cfg("trainer.max_steps=2", "method.critic_warmup_steps=0", "method.critic_steps=2",
                      "trainer.export=false"), tmp_path / "ttur")
    assert "trainer.max_steps=2 leaves the generator no update: its first comes at step 3" in caplog.text


def test_no_checkpoint_is_taken_amid_non_finite_updates(gmm_cfg, tmp_path):
    """A finite update that blew the weights up, then non-finite ones: the checkpoint of a step inside the streak
    held those weights, so a resume with the error's advice (a lower lr) stopped again at once. Now the last
    checkpoint is the one before the streak, and the error names it."""
    from stepdistill.train.trainer import NonFiniteError
    cfg = gmm_cfg("trainer.max_steps=20", "optim.critic.lr=1e30", "optim.critic.grad_clip=0", "method=dmd2",
                  "trainer.max_nonfinite_steps=3", "trainer.checkpoint_every=1", "trainer.export=false")
    with pytest.raises(NonFiniteError) as err:
        train(cfg, tmp_path)
    steps = [c.name for c in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == ["step_0000001"]   # the first update was finite; none after it, the streak's three, was saved
    assert f"trainer.resume=true continues from {steps[-1]}, saved before these updates" in str(err.value)


def test_a_damaged_newest_checkpoint_names_its_file_and_the_one_before(gmm_cfg, tmp_path):
    """A newest checkpoint truncated after it was written (the write itself is atomic) was read as a config that no
    longer fits, or ended in a bare EOFError: now one line naming the file, and the checkpoint to fall back on."""
    train(gmm_cfg("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.export=false"), tmp_path)
    newest = tmp_path / "checkpoints" / "step_0000004"
    for damage in ("generator.safetensors", "trainer_state.pt"):
        data = (newest / damage).read_bytes()
        (newest / damage).write_bytes(data[:100])
        with pytest.raises(ValueError, match=rf"checkpoint {newest} is damaged \({damage}: .*\): move {newest} "
                                             rf"aside to resume from {tmp_path / 'checkpoints' / 'step_0000002'}$"):
            train(gmm_cfg("trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.resume=true",
                          "trainer.export=false"), tmp_path)
        # stepdistill-sample, -eval and -export load the newest too: one line, not a safetensors traceback
        proc = run_app("stepdistill.cli.sample", f"run_dir={tmp_path}", "num_samples=4", f"out={tmp_path / 'x.npz'}",
                       check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert (f"stepdistill-sample: error: checkpoint {newest} is damaged ({damage}: " in proc.stderr
                and proc.stderr.rstrip().endswith("): pass checkpoint=2 for the one before it"))
        (newest / damage).write_bytes(data)


def test_logger_backends_start_before_training(gmm_cfg, tmp_path, monkeypatch):
    """wandb started with the first logged row: an init failure (online without a key) ended the run after all its
    training with a traceback and no checkpoint. TensorBoard kept a crashed run's rows past the checkpoint."""
    import wandb
    import torch.utils.tensorboard

    def fail(**_):
        raise wandb.errors.UsageError("No API key configured")
    monkeypatch.setattr(wandb, "init", fail)
    with pytest.raises(ValueError, match=r"^logger=wandb could not start \(UsageError: No API key configured\): "):
        train(gmm_cfg("logger=wandb", "logger.every=0", "trainer.max_steps=3", "trainer.export=false"), tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists()
    made = []
    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", lambda *a, **kw: made.append(kw) or _NoWriter())
    common = ("logger=tensorboard", "trainer.export=false", "eval.every=0", "eval.final=false",
              "trainer.checkpoint_every=2")
    train(gmm_cfg(*common, "trainer.max_steps=2"), tmp_path / "t")
    train(gmm_cfg(*common, "trainer.max_steps=4", "trainer.resume=true"), tmp_path / "t")
    assert made == [{"purge_step": None}, {"purge_step": 3}]


class _NoWriter:
    def add_scalar(self, *a):
        pass

    def close(self):
        pass


def test_nonfinite_guard_counts_each_phase_s_own_updates(gmm_cfg, tmp_path):
    """A critic whose every update is non-finite between finite generator updates: one count shared by the phases
    went 1, 0, 1, 0 and the run went on without ever training the critic."""
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import NonFiniteError, Trainer
    cfg = gmm_cfg("method=dmd2", "trainer.max_nonfinite_steps=3", "method.critic_warmup_steps=0")
    trainer = Trainer(build_run(cfg), tmp_path)
    loss = trainer.method.loss

    def critic_nan(phase, *args):
        out = loss(phase, *args)
        if phase == "critic":
            out.loss = out.loss * float("nan")
        return out
    trainer.method.loss = critic_nan
    batches = BatchSource(trainer.run.benchmark, trainer.method.batch_keys, 32, trainer.device)
    phases = []
    with pytest.raises(NonFiniteError, match="3 non-finite critic updates in a row"):
        for _ in range(20):
            phases.append(trainer.train_step(batches)[0])
            trainer.step += 1
    assert "generator" in phases and trainer.nonfinite_in_a_row == {"generator": 0, "critic": 3}


@pytest.mark.parametrize("method", ["dmd2", "dmd"])
def test_digits_end_to_end(tmp_path, method):
    from conftest import compose_cfg
    cfg = compose_cfg("benchmark=digits", f"method={method}", "trainer.max_steps=6", "trainer.batch_size=16",
                      "eval.every=0", "eval.num_samples=40", "eval.batch_size=40", "trainer.progress=false",
                      "method.regression.num_pairs=32" if method == "dmd" else "method.critic_steps=1")
    result = train(cfg, tmp_path)
    assert result["student_fd_num_samples"] == 40 and result["teacher_fd_num_samples"] == 40
    assert 0 <= result["student_class_accuracy"] <= 1 and result["student_fd"] >= 0
    assert (tmp_path / "export" / "model_index.json").is_file()
    assert Path(result["figure"]).is_file()


def test_dmd_regression_pairs_come_from_the_guided_teacher_of_the_dm_loss(tmp_path):
    """DMD's two terms target one teacher: with method.guidance=2 the cached regression pairs are the teacher's
    ODE samples at CFG scale 2 (the benchmark's own scale is 1), not at the benchmark's default."""
    from conftest import digits_cfg
    from stepdistill.train.setup import build_run
    cfg = digits_cfg("method=dmd", "method.guidance=2.0", "method.regression.num_pairs=4", "trainer.max_steps=1",
                     "trainer.export=false", "benchmark.teacher_steps=4")
    train(cfg, tmp_path)
    pairs = load_file(str(tmp_path / "regression_pairs.safetensors"))
    bm = build_run(cfg).benchmark
    assert bm.guidance == 1.0
    with torch.no_grad():
        guided = bm.teacher_sample(pairs["noise"], pairs["cond"], guidance=2.0)
        plain = bm.teacher_sample(pairs["noise"], pairs["cond"])
    torch.testing.assert_close(pairs["target"], guided, rtol=0, atol=1e-5)
    assert (pairs["target"] - plain).abs().max() > 1e-2


def test_regression_pairs_cached_in_the_run_folder_follow_the_settings(gmm_cfg, tmp_path):
    """The pairs' file in the run folder has a fixed name: a rerun there with other pairs settings (after a run that
    failed before its first checkpoint, which a fresh run may overwrite) read the old pairs. The same settings
    reuse them."""
    from stepdistill.train.batches import make_regression_pairs
    from stepdistill.train.setup import build_run
    bm = build_run(gmm_cfg("method=dmd")).benchmark
    path = tmp_path / "regression_pairs.safetensors"
    first = make_regression_pairs(bm, 8, 0, path)
    stamp = path.stat().st_mtime_ns
    assert torch.equal(make_regression_pairs(bm, 8, 0, path)["target"], first["target"])
    assert path.stat().st_mtime_ns == stamp   # read, not made again
    assert make_regression_pairs(bm, 16, 0, path)["noise"].shape[0] == 16
    assert not torch.equal(make_regression_pairs(bm, 16, 1, path)["noise"][:8], first["noise"])
    other = build_run(gmm_cfg("method=dmd", "benchmark.teacher_steps=8")).benchmark
    coarse = make_regression_pairs(other, 16, 1, path)["target"]
    assert (coarse - make_regression_pairs(bm, 16, 1)["target"]).abs().max() > 1e-3


def test_regression_pairs_key_follows_the_teachers_weights_not_only_its_path(tmp_path):
    """The key hashed the config, which names the teacher by path: a teacher re-trained into the same folder (or a
    prompt file rewritten) kept the key, and a rerun in that run folder read the old teacher's pairs."""
    import shutil

    from conftest import digits_cfg
    from stepdistill.benchmarks.digits import SHIPPED_TEACHER
    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.train.batches import regression_pairs_key
    teacher = tmp_path / "teacher"
    shutil.copytree(SHIPPED_TEACHER, teacher)
    cfg = digits_cfg("method=dmd", f"benchmark.teacher.path={teacher}").benchmark

    def key():
        return regression_pairs_key(build_benchmark(cfg), 8, 0)
    before = key()
    assert key() == before
    weights = next(teacher.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())   # rewritten in place: same path, same size, a new file
    assert key() != before


@pytest.mark.slow
def test_default_run_meets_its_budget(tmp_path):
    """The README's main job: `stepdistill-train` with no arguments (slow: several minutes)."""
    import subprocess
    import sys
    import time
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "stepdistill.train", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - t0 < 600
    assert "student fd" in proc.stdout and (tmp_path / "export" / "model_index.json").is_file()


@pytest.mark.slow
def test_gmm_dmd2_default_run_reaches_the_measured_quality(tmp_path):
    """`stepdistill-train benchmark=gmm method=dmd2` (conf/benchmark_method/gmm_dmd2.yaml, 6000 updates, ~3 min on
    2 cores; slow): the README's targets, met on eight runs (seeds 0-4 at 1 thread, 0-2 at 2): HQ 0.903-0.926 and
    the sliced W2 at 0.97-1.48x the teacher's."""
    from conftest import compose_cfg
    result = train(compose_cfg("benchmark=gmm", "method=dmd2", "eval.every=0", "trainer.progress=false",
                               "trainer.export=false"), tmp_path)
    assert result["student_modes_covered"] == 8 and result["student_high_quality_fraction"] >= 0.9
    assert result["student_sliced_w2"] <= 1.5 * result["teacher_sliced_w2"]


@pytest.mark.parametrize("extra, produced", [
    (["logger=tensorboard"], "tensorboard"),
    (["logger=wandb"], "wandb"),
    (["trainer.mixed_precision=bf16"], None),
])
def test_loggers_and_precision_switches(gmm_cfg, tmp_path, monkeypatch, extra, produced):
    import torch.nn.modules.linear as linear_module
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    dtypes, linear = set(), linear_module.F.linear

    def spy(*args, **kwargs):   # the dtype the networks' linear layers compute in
        out = linear(*args, **kwargs)
        dtypes.add(out.dtype)
        return out
    monkeypatch.setattr(linear_module.F, "linear", spy)
    result = train(gmm_cfg("trainer.max_steps=6", "trainer.export=false", *extra), tmp_path)
    assert (tmp_path / "metrics.jsonl").is_file() and result["train_seconds"] > 0
    if produced:
        assert (tmp_path / produced).is_dir() and any((tmp_path / produced).rglob("*"))
    # bf16 autocast reaches the networks; without it they stay float32
    assert (torch.bfloat16 in dtypes) == ("trainer.mixed_precision=bf16" in extra) and torch.float32 in dtypes


@pytest.mark.parametrize("backend, folder", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_resume_that_fails_leaves_no_logger_files(gmm_cfg, tmp_path, monkeypatch, backend, folder):
    """wandb and TensorBoard start with the first row: a resume with nothing to resume wrote their files."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(FileNotFoundError, match="trainer.resume=true but"):
        train(gmm_cfg(f"logger={backend}", "trainer.max_steps=3", "trainer.resume=true"), tmp_path)
    assert not (tmp_path / folder).exists() and not (tmp_path / "wandb_run_id").exists()


def test_a_resumed_run_continues_its_wandb_run(gmm_cfg, tmp_path, monkeypatch):
    """Each resume started a new wandb run; the run folder now keeps its wandb run's id and resumes it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = ["logger=wandb", "trainer.export=false", "eval.every=0", "eval.final=false"]
    train(gmm_cfg(*common, "trainer.max_steps=3"), tmp_path)
    run_id = (tmp_path / "wandb_run_id").read_text()
    train(gmm_cfg(*common, "trainer.max_steps=6", "trainer.resume=true"), tmp_path)
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in name for name in runs), runs   # wandb may add "-1"


def test_wandb_syncs_where_it_has_a_key_and_stays_offline_without(tmp_path, monkeypatch):
    """`wandb login` stores its key in ~/.netrc, not the environment: a logged-in user's runs were forced offline."""
    from stepdistill.train.loggers import wandb_mode
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() == "offline"   # no netrc file
    netrc.write_text("machine example.com login user password secret\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "offline"   # a key for another host
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert wandb_mode() is None        # wandb's own choice: online, or a folder's `wandb offline`
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode() == "offline"   # a private server's key would sit under its own host
    monkeypatch.delenv("WANDB_BASE_URL")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None        # wandb reads WANDB_MODE itself


@pytest.mark.parametrize("max_norm", [0.5, 100.0, float("inf")])
def test_clip_gradients_equals_torch(max_norm):
    """Same norm and same gradients as torch's clip_grad_norm_, whether it clips or not."""
    from stepdistill.train.optim import clip_gradients
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (5,), (3, 3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(b, max_norm)
    assert clip_gradients(a, max_norm) == pytest.approx(float(expected), rel=1e-6)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0)


def test_cosine_schedule_ends_each_phase_at_zero(gmm_cfg, tmp_path):
    """Each phase's cosine runs over that phase's own updates: with 2 critic updates per generator update both
    learning rates reach 0 at the last step (over the trainer's step count the generator would stop at 0.75x)."""
    import json
    import math
    cfg = gmm_cfg("optim.schedule=cosine", "method.critic_steps=2", "method.critic_warmup_steps=4",
                  "trainer.max_steps=16", "logger.every=1", "trainer.export=false", "trainer.checkpoint_every=0")
    train(cfg, tmp_path)
    lr0 = float(cfg.optim.generator.lr)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr_generator"] for r in logged if r["kind"] == "train"]
    # steps 1..4 are critic warm-up, then critic, critic, generator: 4 generator updates in 16 steps
    gen_updates = [0] * 4 + [(s - 4) // 3 for s in range(5, 17)]
    assert lrs == pytest.approx([lr0 * 0.5 * (1 + math.cos(math.pi * n / 4)) for n in gen_updates], abs=1e-12)
    state = torch.load(tmp_path / "checkpoints/step_0000016/trainer_state.pt", weights_only=True)
    assert state["schedulers"]["critic"]["_last_lr"] == pytest.approx([0.0], abs=1e-12)
    assert state["schedulers"]["generator"]["_last_lr"] == pytest.approx([0.0], abs=1e-12)


def test_warmup_rises_linearly_over_each_phase_s_own_updates(gmm_cfg, tmp_path):
    """optim.<phase>.warmup_steps=W: the phase's lr is lr * min(1, (n + 1) / W) after n of its own updates (the
    multiplier LambdaLR applies after each update), then constant, or under cosine a cosine from the full rate at
    the end of the warm-up to 0 at the phase's last update."""
    import json
    import math
    for kind in ("constant", "cosine"):
        run_dir = tmp_path / kind
        cfg = gmm_cfg(f"optim.schedule={kind}", "optim.generator.warmup_steps=3", "method.critic_steps=1",
                      "method.critic_warmup_steps=4", "trainer.max_steps=16", "logger.every=1",
                      "trainer.export=false", "trainer.checkpoint_every=0")
        train(cfg, run_dir)
        lr0 = float(cfg.optim.generator.lr)
        lrs = [json.loads(line)["lr_generator"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "train"]
        gen_updates = [0] * 4 + [(s - 4) // 2 for s in range(5, 17)]   # critic, generator, ... after warm-up
        # 6 generator updates in 16 steps, 3 of them the warm-up's
        cosine = (lambda n: 0.5 * (1 + math.cos(math.pi * max(n - 3, 0) / 3))) if kind == "cosine" else (lambda n: 1.0)
        assert lrs == pytest.approx([lr0 * min(1.0, (n + 1) / 3) * cosine(n) for n in gen_updates], abs=1e-12), kind


def test_lr_drop_step_scales_each_phase_from_its_own_update_count(gmm_cfg, tmp_path):
    """optim.lr_drop_step=S multiplies both learning rates by optim.lr_drop_factor from trainer step S on; each
    phase's scheduler counts its own updates, so it drops after the updates that phase made before step S."""
    import json
    cfg = gmm_cfg("optim.lr_drop_step=10", "optim.lr_drop_factor=0.25", "method.critic_steps=2",
                  "method.critic_warmup_steps=4", "trainer.max_steps=16", "logger.every=1", "trainer.export=false",
                  "trainer.checkpoint_every=8")
    train(cfg, tmp_path)
    lr_gen, lr_critic = float(cfg.optim.generator.lr), float(cfg.optim.critic.lr)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr_generator"] for r in logged if r["kind"] == "train"]
    # critic warm-up in steps 0-3, then critic, critic, generator: generator updates at steps 6, 9 before step 10
    gen_updates = [0] * 4 + [(s - 4) // 3 for s in range(5, 17)]
    assert lrs == pytest.approx([lr_gen * (0.25 if n >= 2 else 1.0) for n in gen_updates], rel=1e-12)
    critic_lr = {step: torch.load(tmp_path / f"checkpoints/step_{step:07d}/trainer_state.pt",
                                  weights_only=True)["schedulers"]["critic"]["_last_lr"][0] for step in (8, 16)}
    assert critic_lr[8] == pytest.approx(lr_critic)              # 7 critic updates by step 8, 8 before step 10
    assert critic_lr[16] == pytest.approx(0.25 * lr_critic)


def test_bad_lr_drop_is_a_clear_error(gmm_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"optim.lr_drop_step=-1: need an integer >= 0"):
        train(gmm_cfg("optim.lr_drop_step=-1", "trainer.max_steps=2"), tmp_path)


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=0", "trainer.batch_size=0: need an integer >= 1"),
    ("trainer.ema_decay=1.5", "trainer.ema_decay=1.5: need a decay in [0, 1)"),
    ("trainer.ema_decay=1.0", "trainer.ema_decay=1.0: need a decay in [0, 1)"),
    ("optim.lr_drop_step=2.5", "optim.lr_drop_step=2.5: need an integer >= 0"),
    ("eval.final_num_samples=inf", "eval.final_num_samples=inf: need an integer >= 2"),
    ("generator.steps=0", "generator.steps=0: a generator takes at least 1 step"),
    ("generator.timesteps=[999,499]", "has 2 entries but generator.steps=1: set generator.steps=2 too"),
    ("method.t_min=0.99", "method.t_min=0.99, method.t_max=0.98: need 0 <= t_min < t_max <= 1"),
    ("method.gan.t_max=1.5", "method.gan.t_min=0.15, method.gan.t_max=1.5: need 0 <= t_min < t_max <= 1"),
    ("method.critic_steps=0", "method.critic_steps=0: need an integer >= 1"),
    ("method.critic_warmup_steps=-1", "method.critic_warmup_steps=-1: need an integer >= 0"),
    ("benchmark.num_modes=0", "benchmark.num_modes=0: a mixture needs at least one mode"),
    ("benchmark.std=-1", "benchmark.std=-1: each mode's standard deviation must be > 0"),
    ("benchmark.weights=[1,2]", "benchmark.weights=[1, 2]: give 8 positive weights"),
    ("benchmark.weights=[1,1,1,1,1,1,1,0]", "benchmark.weights=[1, 1, 1, 1, 1, 1, 1, 0]: give 8 positive weights"),
    ("benchmark.network.width=0", "benchmark.network.width=0: need an integer >= 1"),
    ("method.dm_draws=0", "method.dm_draws=0: need an integer >= 1"),
    ("method.gan.generator_weight=-1", "method.gan.generator_weight=-1: need a number >= 0"),
    ("method=dmd method.regression.num_pairs=0", "method.regression.num_pairs=0: need an integer >= 1"),
    ("optim.generator.betas=[0.9]", "optim.generator.betas=[0.9]: give Adam's two decay rates, each in [0, 1)"),
    ("trainer.max_steps=-3", "trainer.max_steps=-3: need an integer >= 1"),
    ("eval.every=-5", "eval.every=-5: need an integer >= 0"),
    ("trainer.checkpoint_every=2.5", "trainer.checkpoint_every=2.5: need an integer >= 0"),
    ("eval.final=true eval.num_samples=1", "eval.num_samples=1: an evaluation needs at least 2 samples"),
    ("eval.batch_size=0", "eval.batch_size=0: need an integer >= 1"),
    ("eval.final_num_samples=1", "eval.final_num_samples=1: need an integer >= 2"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0: need an integer >= 1"),
    ("optim.generator.grad_clip=-1", "optim.generator.grad_clip=-1: need a number >= 0"),
    ("optim.critic.warmup_steps=-1", "optim.critic.warmup_steps=-1: need an integer >= 0"),
    ("trainer.grad_accum_steps=2.5", "trainer.grad_accum_steps=2.5: need an integer >= 1"),   # ran as 2
    ("trainer.batch_size=64.9", "trainer.batch_size=64.9: need an integer >= 1"),           # trained on 64 rows
    ("method.gan.head_width=0", "method.gan.head_width=0: need an integer >= 1"),
    ("method=scm method.weighting_width=0", "method.weighting_width=0: need an integer >= 1"),
    ("generator.timesteps=[1200]", "generator.timesteps=[1200.0]: each must lie in the schedule's range [0, 999]"),
    ("generator.timesteps=[-5]", "generator.timesteps=[-5.0]: each must lie in the schedule's range [0, 999]"),
    ("benchmark.sigma_data=0", "benchmark.sigma_data=0: need a data scale > 0"),
    ("method.guidance=-2", "method.guidance=-2: need a number >= 0"),
    ("benchmark.network.generator_fourier_scale=0", "benchmark.network.generator_fourier_scale=0: the input features'"),
    ("benchmark.network.fourier_scale=-1", "benchmark.network.fourier_scale=-1: the input features' frequency scale"),
])
def test_settings_out_of_range_are_clear_errors(gmm_cfg, tmp_path, override, message):
    """Settings that used to run silently (an EMA decay past 1, an empty DM noise range, a critic that never
    updates, a negative mode width or GAN weight) or to crash deep inside (0 steps, an empty batch, no modes, one
    Adam beta, no regression pairs, evaluations of 0 samples)."""
    with pytest.raises(ValueError) as err:
        train(gmm_cfg("method=dmd2", "trainer.max_steps=2", *override.split()), tmp_path)
    assert message in str(err.value)
    assert not (tmp_path / "checkpoints").exists()   # checked before anything ran


def test_update_path_edges(gmm_cfg, tmp_path, monkeypatch):
    """A null warm-up was accepted as 0, then failed in int(None); an accelerate config's
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS divided every loss once more; a phase's gradients were held through
    the other phase's steps; sCM with gradient checkpointing looked up a fake score it does not have."""
    from conftest import digits_cfg
    from stepdistill.train.batches import BatchSource
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    run = build_run(gmm_cfg("method=dmd2", "optim.generator.warmup_steps=null", "method.critic_warmup_steps=0"))
    trainer = Trainer(run, tmp_path / "gmm")
    assert trainer.accelerator.gradient_accumulation_steps == 1
    batches = BatchSource(run.benchmark, run.method.batch_keys, 8, "cpu")
    for _ in range(2):
        phase, logs = trainer.train_step(batches)
        trainer.step += 1
        assert logs is not None
        assert all(p.grad is None for p in trainer.phase_params[phase]), phase
    build_run(digits_cfg("method=scm", "model.gradient_checkpointing=true"))


def test_fp16_on_the_cpu_says_it_runs_in_float32(gmm_cfg, tmp_path, caplog):
    """accelerate has no fp16 autocast on the CPU: the run was float32 without a word."""
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    with caplog.at_level("WARNING", logger="stepdistill"):
        Trainer(build_run(gmm_cfg("trainer.mixed_precision=fp16")), tmp_path)
    assert "trainer.mixed_precision=fp16 on the CPU runs in float32" in caplog.text


def test_accelerate_sharding_configs_are_refused():
    """An accelerate config's DeepSpeed or FSDP plugin was never applied (no accelerator.prepare): the run went on
    with whole replicas, or failed at the first backward."""
    from accelerate.utils import DistributedType

    from stepdistill.train.trainer import refuse_accelerate_sharding
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ValueError, match=f"accelerate launch with a {kind.value} config: .* set trainer=fsdp"):
            refuse_accelerate_sharding(kind)
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        refuse_accelerate_sharding(kind)


def test_the_collectives_wait_for_rank_0s_evaluations(monkeypatch):
    """Rank 0 alone evaluates, checkpoints and exports while the others wait in a collective: NCCL's 10-minute
    default timeout would end a run whose evaluation takes longer."""
    from stepdistill.train import trainer
    seen = {}

    class Spy:
        def __init__(self, **kw):
            seen.update(kw)
    monkeypatch.setattr(trainer, "Accelerator", Spy)
    trainer._accelerator("no")
    (handler,) = seen["kwargs_handlers"]
    assert handler.timeout == trainer.COLLECTIVE_TIMEOUT >= __import__("datetime").timedelta(hours=1)
