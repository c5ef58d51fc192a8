"""Multi-process data parallelism on CPU (gloo): `accelerate launch --multi_gpu --num_processes 2` runs two
ranks that split the global batch and average gradients, so their weights stay identical; rank 0 alone writes.
The one-process runs they are compared with run in this process (`run_app`), each set of overrides once."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_app
from stepdistill.train.checkpoint import latest_checkpoint

FAST = ["benchmark=gmm", "benchmark.network.width=64", "benchmark.network.depth=2", "trainer.batch_size=64",
        "method.critic_warmup_steps=4", "eval.every=0", "eval.final=false", "trainer.progress=false",
        "trainer.num_threads=1", "logger.every=10", "trainer.max_steps=10", "trainer.export=false"]

# accelerate's `--cpu --num_processes N` starts a single process in this accelerate version; `--multi_gpu` on a
# machine without GPUs starts N processes through torchrun, which then use gloo on the CPU
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stepdistill.train"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Where the tiny_sd teacher and its cached samples are built once, then read by every run and rank."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    """The run directory of a one-process run of these overrides, trained in this process the first time a test
    asks for it: the plain gmm run is the reference of three tests."""
    done = {}

    def run(overrides):
        key = tuple(overrides)
        if key not in done:
            run_dir = tmp_path_factory.mktemp("one")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("STEPDISTILL_CACHE", str(cache_dir))
                run_app("stepdistill.cli.train", *overrides, f"hydra.run.dir={run_dir}")
            done[key] = run_dir
        return done[key]
    return run


TINY_SD = ["benchmark=tiny_sd", "benchmark.num_real=16", "benchmark.teacher_steps=4", "trainer.batch_size=4",
           "eval.every=0", "eval.final=false", "trainer.progress=false", "trainer.num_threads=1", "logger.every=10",
           "trainer.max_steps=10", "trainer.export=false"]


@pytest.mark.parametrize("overrides", [FAST, FAST + ["method=fdistill", "generator=four_step"], TINY_SD,
                                       FAST + ["trainer=fsdp", "trainer.export=true"], TINY_SD + ["trainer=fsdp"]],
                         ids=["gmm-dmd2", "gmm-fdistill-4step", "tiny_sd-dmd2", "gmm-dmd2-fsdp", "tiny_sd-dmd2-fsdp"])
def test_two_processes_stay_in_sync_and_match_one_process(tmp_path, one_process, cache_dir, overrides):
    """The 4-step fdistill run adds per-sample exit steps, re-noising between steps and a batch-normalised
    weight; tiny_sd is the latent text-to-image path (prompt embeddings, cached teacher samples as real data);
    trainer=fsdp shards every network over the two processes (FSDP2 on gloo) and gathers it for checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPDISTILL_CACHE": str(cache_dir)}
    # one process first: it builds the tiny teacher and fills the cache that both ranks then read
    one_dir = one_process(overrides)
    res = subprocess.run(LAUNCH + overrides + [f"hydra.run.dir={tmp_path / 'ddp'}"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("run folder:") == 1             # rank 0 alone reports
    ddp = rows(tmp_path / "ddp")
    summary = [r for r in ddp if "processes" in r]
    assert len(summary) == 1 and summary[0]["processes"] == 2
    if "trainer=fsdp" not in overrides:   # sharded weights have one copy each: nothing to compare across ranks
        assert summary[0]["weight_spread_across_processes"] == 0.0     # averaged gradients: identical weights
    one = rows(one_dir)[0]
    step10 = {k: v for k, v in ddp[0].items() if "/" in k}   # every logged loss term and gradient norm
    assert ddp[0]["step"] == one["step"] == 10 and any(k.endswith("/loss") for k in step10)
    assert set(step10) == {k for k in one if "/" in k}
    # every rank takes its rows of the same global-batch draws and batch-wide normalisers are global, so the
    # two-process run computes the one-process run: equal up to float summation order, after 10 updates
    for key, value in step10.items():
        assert value == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    # the final checkpoints hold the same weights (gathered whole from the shards under trainer=fsdp)
    for name in ("generator", "generator_ema", "fake_score"):
        w_ddp, w_one = (load_file(str(latest_checkpoint(d / "checkpoints") / f"{name}.safetensors"))
                        for d in (tmp_path / "ddp", one_dir))
        assert w_ddp.keys() == w_one.keys()
        for k in w_one:
            # Adam turns float-order differences of near-zero gradients into up to ~lr per step
            torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-3, atol=1e-4)
    if "trainer.export=true" in overrides:   # rank 0 exports plain weights from the final checkpoint
        from stepdistill.cli.sample import sample_student
        from stepdistill.pipelines import PointsFewStepPipeline
        pipe = PointsFewStepPipeline.from_pretrained(tmp_path / "ddp" / "export")
        samples, _ = sample_student(tmp_path / "ddp", 50, seed=5)
        torch.testing.assert_close(pipe(batch_size=50, generator=torch.Generator().manual_seed(5)), samples,
                                   atol=1e-5, rtol=1e-5)


def test_global_batch_must_split_over_the_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(LAUNCH + FAST + ["trainer.batch_size=63", f"hydra.run.dir={tmp_path}"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode != 0
    assert "trainer.batch_size=63 does not split over 2 processes: use a multiple of 2" in res.stderr


@pytest.mark.parametrize("trainer,extra,stop", [("default", [], 5), ("fsdp", [], 5),
                                                 ("default", ["method.reuse_generator_samples=true"], 6),
                                                 ("fsdp", ["optim.generator.optimism=1", "optim.critic.optimism=1"], 8),
                                                 ("fsdp", ["trainer.grad_accum_steps=2",
                                                           "method.reuse_generator_samples=true"], 6)],
                         ids=["default", "fsdp", "kept-samples", "fsdp-optimism", "fsdp-accumulation"])
def test_two_process_resume_continues_the_one_process_run(tmp_path, one_process, trainer, extra, stop):
    """`stop` two-process steps, then a two-process resume to 10: the step-10 logs equal 10 straight steps of one
    process (a checkpoint's single RNG state is every rank's). With kept samples, step 5 is a generator phase:
    the checkpoint after 6 steps holds its samples, gathered from both ranks, and each rank resumes its rows. With
    optimism, the optimizers' previous steps (both have stepped by step 8) are sharded state that the checkpoint
    gathers and the resume re-shards. With 2 micro-batches per process, FSDP accumulates each micro-batch's
    reduce-scattered gradients, and the kept samples are gathered over micro-batches and ranks, then re-split."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = one_process(FAST + extra)
    for part in ([f"trainer.max_steps={stop}", f"logger.every={stop}"], ["trainer.resume=true"]):
        res = subprocess.run(LAUNCH + FAST + extra + part + [f"trainer={trainer}", f"hydra.run.dir={tmp_path / 'ddp'}"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    # each process logged its lines into train.log too, so every line was there twice
    assert (tmp_path / "ddp" / "train.log").read_text().count(f"resumed from {tmp_path / 'ddp'}") == 1
    resumed = next(r for r in rows(tmp_path / "ddp") if r["step"] == 10 and r["kind"] == "train" and "critic/loss" in r)
    one = next(r for r in rows(straight) if r["step"] == 10)
    for key in (k for k in one if "/" in k):
        assert resumed[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def _step10(run_dir, key="critic/loss"):
    return next(r for r in rows(run_dir) if r["step"] == 10 and r["kind"] == "train" and key in r)


@pytest.mark.parametrize("extra,key", [(["method=scm"], "generator/loss"),
                                       (["generator=four_step", "generator.per_sample_step=false",
                                         "method.step_aware_critic=true", "optim.critic.optimism=1"], "critic/loss")],
                         ids=["scm", "step-aware-optimism"])
def test_fsdp_trains_a_phases_unsharded_roles(tmp_path, one_process, extra, key):
    """trainer=fsdp shards the networks, not a phase's small extra roles (sCM's weighting, the step-aware
    critic's embedding): the fused AdamW took a mix of DTensors and tensors and failed at the first update."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # sCM has no critic, so no critic warm-up to set (the command line's value would be refused, unread)
    fast = [o for o in FAST if not o.startswith("method.critic_warmup_steps=")] if "method=scm" in extra else FAST
    straight = one_process(fast + extra)
    res = subprocess.run(LAUNCH + fast + extra + ["trainer=fsdp", f"hydra.run.dir={tmp_path}"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    sharded, one = _step10(tmp_path, key), _step10(straight, key)
    for k in (k for k in one if "/" in k):
        assert sharded[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), k


def test_fsdp_resumes_a_one_process_checkpoint(tmp_path, one_process):
    """One process saves its optimizers' states numbered as torch numbers them; trainer=fsdp on several processes
    read only states keyed by parameter names, and its resume failed on 'state.0.step' (blaming the config)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_app("stepdistill.cli.train", *FAST, "trainer=fsdp", "trainer.max_steps=5", "logger.every=5",
            f"hydra.run.dir={tmp_path}")
    # one process has nothing to shard over: said, not silent
    assert "trainer=fsdp with one process: there is nothing to shard over" in (tmp_path / "train.log").read_text()
    res = subprocess.run(LAUNCH + FAST + ["trainer=fsdp", "trainer.resume=true", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, one = _step10(tmp_path), _step10(one_process(FAST))
    for k in (k for k in one if "/" in k):
        assert resumed[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), k


def test_fsdp_refuses_what_it_cannot_shard():
    from conftest import compose_cfg
    from stepdistill.train.fsdp import check_fsdp_supported
    check_fsdp_supported(compose_cfg("trainer=fsdp", "benchmark=tiny_sd"))
    with pytest.raises(ValueError, match="model.shared_base"):
        check_fsdp_supported(compose_cfg("trainer=fsdp", "benchmark=tiny_sd", "model.shared_base=true"))
    with pytest.raises(ValueError, match="generator.lora_rank=0"):
        check_fsdp_supported(compose_cfg("trainer=fsdp", "benchmark=tiny_sd", "generator.lora_rank=4"))
    with pytest.raises(ValueError, match="trainer.mixed_precision=bf16"):
        check_fsdp_supported(compose_cfg("trainer=fsdp", "benchmark=tiny_sd", "trainer.mixed_precision=fp16"))
    check_fsdp_supported(compose_cfg("trainer=fsdp", "benchmark=tiny_sd", "trainer.mixed_precision=bf16"))
    with pytest.raises(ValueError, match="generator.step_experts=false"):
        check_fsdp_supported(compose_cfg("trainer=fsdp", "generator=four_step", "generator.step_experts=true"))
    # per-sample exit steps: each process would run the sharded forwards its own rows need
    with pytest.raises(ValueError, match="set generator.per_sample_step=false"):
        check_fsdp_supported(compose_cfg("trainer=fsdp", "generator=four_step"))
    check_fsdp_supported(compose_cfg("trainer=fsdp", "generator=four_step", "generator.per_sample_step=false"))
    check_fsdp_supported(compose_cfg("trainer=fsdp", "generator=four_step", "generator.train_steps=[4]"))


def test_sharded_teacher_work_outside_the_loop_takes_every_process(tmp_path, cache_dir, monkeypatch):
    """Under trainer=fsdp the teacher is sharded, so sampling it takes every process. Two runs hung: DMD's resume
    (rank 0 read the cached regression pairs while rank 1 sampled them), and the final evaluation of a run whose
    method never drew the text-to-image benchmark's teacher samples (rank 0 alone made them on a cache miss: 12
    of them, a count no other test caches)."""
    from conftest import compose_cfg
    from stepdistill.benchmarks.registry import build_benchmark
    monkeypatch.setenv("STEPDISTILL_CACHE", str(cache_dir))
    build_benchmark(compose_cfg(*TINY_SD).benchmark)   # the tiny teacher built once, here, not by both ranks at once
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPDISTILL_CACHE": str(cache_dir)}
    common = TINY_SD + ["trainer=fsdp", "method=dmd", "method.regression.num_pairs=8", "benchmark.num_real=12",
                        f"hydra.run.dir={tmp_path / 'run'}"]
    for extra in (["trainer.max_steps=2", "eval.final=true", "eval.num_samples=8", "eval.batch_size=8"],
                  ["trainer.max_steps=4", "trainer.resume=true"]):
        res = subprocess.run(LAUNCH + common + extra, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    evals = [r for r in rows(tmp_path / "run") if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["student_latent_fd_num_reference"] == 12
    assert any(r.get("step") == 4 for r in rows(tmp_path / "run"))
