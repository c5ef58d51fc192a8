"""`trainer.stop_signals`: a signal (SLURM's SIGTERM, SIGUSR1, Ctrl-C) finishes the step, checkpoints it and
stops; `trainer.resume=true` then continues as if nothing had happened."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GMM_FAST, compose_cfg
from stepdistill.cli.train import train
from stepdistill.train.checkpoint import latest_checkpoint
from stepdistill.train.stop_signals import StopRequest


def test_handlers_request_a_stop_and_are_restored():
    before, before_int = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGINT)
    with StopRequest(["SIGUSR1", "sigint"]) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):   # a second Ctrl-C does not wait for the step
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGUSR1) is before and signal.getsignal(signal.SIGINT) is before_int
    with pytest.raises(ValueError, match=r"unknown signal\(s\) \['SIGNOPE'\]"):
        StopRequest(["SIGNOPE"])
    # one name without brackets was read letter by letter; SIGKILL was "[Errno 22] Invalid argument"
    assert StopRequest("SIGTERM").names == ["SIGTERM"]
    with pytest.raises(ValueError, match=r"trainer.stop_signals: SIGKILL cannot be caught"):
        StopRequest(["SIGTERM", "SIGKILL"])


def _weights(run_dir, role):
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / f"{role}.safetensors"))


def test_a_signal_mid_run_checkpoints_that_step_and_resume_continues_exactly(tmp_path, monkeypatch):
    """SIGTERM arrives during step 7's loss: the step finishes, step 8's checkpoint is written (checkpoint_every is
    50), there is no final evaluation or export, and resuming to 20 steps gives the weights of 20 straight steps."""
    common = [*GMM_FAST, "trainer.max_steps=20", "trainer.checkpoint_every=50", "method.reuse_generator_samples=true"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(compose_cfg(*common), straight)

    from stepdistill.methods.base import Method
    real_loss = Method.loss
    calls = {"n": 0}

    def loss_then_signal(self, phase, batch, step):
        calls["n"] += 1
        if step == 7 and calls["n"] == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, phase, batch, step)
    monkeypatch.setattr(Method, "loss", loss_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    result = train(compose_cfg(*common, "eval.final=true"), stopped)
    monkeypatch.setattr(Method, "loss", real_loss)
    assert result["stopped_by"] == "SIGTERM" and result["stopped_at_step"] == 8
    assert latest_checkpoint(stopped / "checkpoints").name == "step_0000008"
    assert "export" not in result and not (stopped / "export").exists()
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["stopped_by"] == "SIGTERM" and not any(r["kind"] == "eval" for r in rows)
    assert signal.getsignal(signal.SIGTERM) is before   # restored after the run
    train(compose_cfg(*common, "trainer.resume=true"), stopped)
    for role in ("generator", "generator_ema", "fake_score", "gan_head"):   # the EMA: what sampling and export use
        a, b = _weights(straight, role), _weights(stopped, role)
        assert a, role
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{role}.{name}")


def _wait_for_log(run_dir: Path, proc, timeout=120):
    """Until the run has logged a training step (it is in its loop), or fail if it ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and path.read_text().strip():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("the run logged nothing")


FAST = [o for o in GMM_FAST if not o.startswith("trainer.num_threads")] + [
    "trainer.num_threads=1", "logger.every=2", "trainer.max_steps=100000", "trainer.checkpoint_every=100000",
    "trainer.export=false"]


def test_the_cli_stops_with_the_signal_exit_status_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stepdistill.train", *FAST, f"hydra.run.dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_log(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = int(latest_checkpoint(tmp_path / "checkpoints").name.split("_")[1])
    assert f"stopped:      by SIGTERM at step {step}, checkpoint saved; continue with trainer.resume=true" in out
    res = subprocess.run([sys.executable, "-m", "stepdistill.train", *FAST, f"trainer.max_steps={step + 3}",
                          "trainer.resume=true", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step_{step + 3:07d}"


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")), None)


def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """Only rank 1 gets SIGTERM: rank 0 learns of it after the step, both save the same checkpoint together and
    exit; a two-process resume continues from it."""
    from test_distributed import LAUNCH
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(LAUNCH + FAST + [f"hydra.run.dir={tmp_path}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_log(tmp_path, proc, timeout=300)
    workers = {_rank_of(p): p for p in _children(proc.pid)}
    assert set(workers) >= {0, 1}, workers
    os.kill(workers[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0   # the launcher reports its workers' signal exit status
    assert "stopped:      by a signal to another process at step" in out, err[-3000:]
    step = int(latest_checkpoint(tmp_path / "checkpoints").name.split("_")[1])
    res = subprocess.run(LAUNCH + FAST + [f"trainer.max_steps={step + 2}", "trainer.resume=true",
                                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step_{step + 2:07d}"
