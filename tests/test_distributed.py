"""Multi-process data parallelism on CPU (gloo): `accelerate launch --multi_gpu --num_processes 2` runs two
ranks that split the global batch and average gradients, so their weights stay identical; rank 0 alone writes."""
import json
import os
import subprocess
import sys

import pytest

FAST = ["benchmark=gmm", "benchmark.network.width=64", "benchmark.network.depth=2", "trainer.batch_size=64",
        "method.critic_warmup_steps=4", "eval.every=0", "eval.final=false", "trainer.progress=false",
        "trainer.num_threads=1", "logger.every=10", "trainer.max_steps=10", "trainer.export=false"]

# accelerate's `--cpu --num_processes N` starts a single process in this accelerate version; `--multi_gpu` on a
# machine without GPUs starts N processes through torchrun, which then use gloo on the CPU
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stepdistill.train"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_stay_in_sync_and_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(LAUNCH + FAST + [f"hydra.run.dir={tmp_path / 'ddp'}"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "stepdistill.train", *FAST, f"hydra.run.dir={tmp_path / 'one'}"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert res.stdout.count("run folder:") == 1             # rank 0 alone reports
    ddp = rows(tmp_path / "ddp")
    summary = [r for r in ddp if "processes" in r]
    assert len(summary) == 1 and summary[0]["processes"] == 2
    assert summary[0]["weight_spread_across_processes"] == 0.0     # averaged gradients: identical weights
    step10 = {k: v for k, v in ddp[0].items() if k.endswith("/loss")}
    one = rows(tmp_path / "one")[0]
    assert ddp[0]["step"] == one["step"] == 10 and step10
    # each rank draws its own noise, so the global-batch losses agree only statistically with one process's
    for key, value in step10.items():
        assert value == pytest.approx(one[key], rel=0.15), key


def test_global_batch_must_split_over_the_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(LAUNCH + FAST + ["trainer.batch_size=63", f"hydra.run.dir={tmp_path}"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode != 0
    assert "trainer.batch_size=63 does not split over 2 processes: use a multiple of 2" in res.stderr
