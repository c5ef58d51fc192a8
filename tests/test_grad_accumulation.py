"""`trainer.grad_accum_steps=K`: each step's batch in K micro-batches, one after another. Every micro-batch replays
the step's RNG state and keeps its rows of each draw (batch_split), so K micro-batches compute the update one batch
of the same global size gives, up to float summation order."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DIGITS_FAST, GMM_FAST, compose_cfg
from stepdistill import batch_split
from stepdistill.cli.train import train
from stepdistill.train.checkpoint import latest_checkpoint
from stepdistill.train.setup import build_run
from stepdistill.train.trainer import Trainer


def test_micro_batches_take_their_rows_of_each_global_draw():
    """Process r's micro-batch i is shard i·W + r: replaying the RNG, the shards tile one global draw."""
    state = torch.get_rng_state()
    whole = torch.randn(24, 3)
    parts = {}
    try:
        for r in range(2):
            batch_split.set_split(r, 2)
            for i in range(3):
                torch.set_rng_state(state)
                with batch_split.micro_batch(i, 3):
                    assert batch_split.micro() == (i, 3) and batch_split.global_rows(4) == 24
                    parts[i * 2 + r] = batch_split.randn(4, 3)
                    assert torch.equal(batch_split.local_rows(whole), parts[i * 2 + r])
    finally:
        batch_split.set_split(0, 1)
    assert batch_split.micro() == (0, 1)   # the block restores the split
    assert torch.equal(torch.cat([parts[s] for s in range(6)]), whole)
    with pytest.raises(ValueError, match="micro-batch 2 is not in 0..1"):
        with batch_split.micro_batch(2, 2):
            pass


def test_per_sample_exit_steps_make_the_global_draws_whatever_a_shard_holds():
    """Backward simulation with per-sample exit steps: a process (or micro-batch) whose rows had all exited stopped
    drawing the global batch's between-step noise, so its RNG, and every draw after it, left the one-process run's
    (13 of 20 seeds at a global batch of 4). Outputs and the next draw must match one process on every shard."""
    from stepdistill.generator import FewStepGenerator
    from stepdistill.networks.mlp import TimeMLP
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.schedules import VPSchedule
    torch.manual_seed(0)
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 16, 2), VPSchedule(), "edm", sigma_data=2.0), steps=4)

    def run(rank, world, seed):
        batch_split.set_split(rank, world)
        torch.manual_seed(seed)
        out, ks = gen(batch_split.randn(4 // world, 2), None, return_steps=True)
        return out, ks, torch.rand(1)
    try:
        for seed in range(20):
            one = run(0, 1, seed)
            two = [run(r, 2, seed) for r in range(2)]
            torch.testing.assert_close(torch.cat([two[0][0], two[1][0]]), one[0])
            assert torch.equal(torch.cat([two[0][1], two[1][1]]), one[1])
            assert all(torch.equal(t[2], one[2]) for t in two), f"seed {seed}: exit steps {one[1].tolist()}"
    finally:
        batch_split.set_split(0, 1)


def test_a_parameter_without_gradient_on_every_process_keeps_none(monkeypatch):
    """average_gradients gave a parameter that no process had a gradient for a zero one, which AdamW then moved by
    weight decay and momentum (a step expert the batch did not train), while one process skips it."""
    from stepdistill.train import distributed
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: t.mul_(2))   # two processes with the same grads
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    used.grad = torch.tensor([1.0, 2.0, 3.0])
    distributed.average_gradients([used, unused])
    assert torch.equal(used.grad, torch.tensor([1.0, 2.0, 3.0])) and unused.grad is None


def _train(cfg, run_dir):
    train(cfg, run_dir)
    return {str(r["step"]): r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def _weights(run_dir, role):
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / f"{role}.safetensors"))


CASES = {
    # DMD's per-sample normaliser: the batch-wide one is over each micro-batch under accumulation (below)
    "gmm-dmd2": [*GMM_FAST, "method.normalizer=sample"],
    "gmm-dmd2-4step-kept": [*GMM_FAST, "method.normalizer=sample", "generator=four_step",
                            "method.reuse_generator_samples=true"],
    "gmm-sid": [*GMM_FAST, "method=sid", "method.normalizer=sample"],
    "digits-dmd2": [*DIGITS_FAST, "trainer.num_threads=2", "logger.every=5", "trainer.export=false"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_compute_the_one_batch_update(tmp_path, case):
    """10 steps in 1, 2 and 4 micro-batches (digits: 1 and 2 of its 8 rows): every logged loss term and gradient
    norm agrees at step 10, and so do the weights. The 4-step run adds per-sample exit steps, re-noising and kept
    samples (one entry per micro-batch, taken by the critic's micro-batch of the same rows)."""
    counts = (1, 2) if case.startswith("digits") else (1, 2, 4)
    logs = {k: _train(compose_cfg(*CASES[case], "trainer.max_steps=10", f"trainer.grad_accum_steps={k}"),
                      tmp_path / str(k)) for k in counts}
    one = logs[1]["10"]
    terms = [key for key in one if "/" in key]
    assert any(key.startswith("generator/") for key in terms) and any(key.startswith("critic/") for key in terms)
    for k in counts[1:]:
        for key in terms:
            assert logs[k]["10"][key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (k, key)
        for role in ("generator", "generator_ema", "fake_score"):
            a, b = _weights(tmp_path / "1", role), _weights(tmp_path / str(k), role)
            assert a, role
            for name in a:   # Adam turns float-order differences of near-zero gradients into up to ~lr per step
                torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=f"{k}: {role}.{name}")


def test_kept_samples_checkpoint_is_the_global_batch_and_resumes_under_any_split(tmp_path):
    """Steps 0-3 warm the critic up, then critic and generator alternate: step 21 is a generator phase, so the
    checkpoint after 22 steps holds its kept samples. Saved from 2 micro-batches, they are the whole batch in its
    row order: resuming at 2 micro-batches is bit-exact, and resuming at 1 continues the 1-micro-batch run."""
    common = [*GMM_FAST, "method=dmd2", "method.reuse_generator_samples=true", "trainer.checkpoint_every=22",
              "trainer.keep_checkpoints=5", "method.normalizer=sample"]
    two, one, split = tmp_path / "two", tmp_path / "one", tmp_path / "split"
    _train(compose_cfg(*common, "trainer.max_steps=30", "trainer.grad_accum_steps=2"), two)
    _train(compose_cfg(*common, "trainer.max_steps=30"), one)
    _train(compose_cfg(*common, "trainer.max_steps=22", "trainer.grad_accum_steps=2"), split)
    st = torch.load(split / "checkpoints/step_0000022/trainer_state.pt", weights_only=True)
    kept = st["method"]["kept_samples"]["kept"]
    assert kept["x"].shape == (64, 2) and kept["cond"] is None
    resumed = split / "resumed"
    import shutil
    shutil.copytree(split, resumed)
    _train(compose_cfg(*common, "trainer.max_steps=30", "trainer.grad_accum_steps=2", "trainer.resume=true"), split)
    _train(compose_cfg(*common, "trainer.max_steps=30", "trainer.resume=true"), resumed)
    for role in ("generator", "generator_ema", "fake_score", "gan_head"):
        exact, ref = _weights(two, role), _weights(one, role)
        assert exact, role
        for name, w in _weights(split, role).items():
            torch.testing.assert_close(w, exact[name], rtol=0, atol=0, msg=f"{role}.{name}")
        for name, w in _weights(resumed, role).items():
            torch.testing.assert_close(w, ref[name], rtol=1e-3, atol=1e-4, msg=f"{role}.{name}")


def test_a_non_finite_micro_batch_skips_the_update(tmp_path):
    """The first micro-batch's loss is NaN: no weight moves, the guard counts one non-finite step, and every
    micro-batch still ran its loss, so the RNG ends where the step without the NaN ends."""
    cfg = compose_cfg(*GMM_FAST, "trainer.grad_accum_steps=2", "method.critic_warmup_steps=0")
    trainers = [Trainer(build_run(cfg), tmp_path / name) for name in ("nan", "clean")]
    from stepdistill.train.batches import BatchSource
    nan_trainer = trainers[0]
    calls = {"n": 0}
    loss = nan_trainer.method.loss

    def second_is_nan(*a):
        out = loss(*a)
        calls["n"] += 1
        if calls["n"] == 1:
            out.loss = out.loss * float("nan")
        return out
    nan_trainer.method.loss = second_is_nan
    before = [p.detach().clone() for p in nan_trainer.run.roles.parameters()]
    rng_after, logs = [], []
    for t in trainers:
        torch.manual_seed(0)
        batches = BatchSource(t.run.benchmark, t.method.batch_keys, 32, t.device)
        phase, step_logs = t.train_step(batches)
        logs.append(step_logs)
        rng_after.append(torch.get_rng_state())
    assert calls["n"] == 2 and logs[0] is None and logs[1] is not None   # skipped; the clean step updated
    assert nan_trainer.nonfinite_in_a_row[phase] == 1
    for p, q in zip(nan_trainer.run.roles.parameters(), before):
        assert torch.equal(p, q)
    assert torch.equal(rng_after[0], rng_after[1])


@pytest.mark.parametrize("k,message", [
    (3, r"trainer.batch_size=64 does not split over 1 processes x 3 micro-batches \(trainer.grad_accum_steps\): "
        "use a multiple of 3"),
    (0, r"trainer.grad_accum_steps=0: need an integer >= 1")])
def test_a_batch_that_does_not_split_into_micro_batches_is_a_clear_error(tmp_path, k, message):
    with pytest.raises(ValueError, match=message):
        Trainer(build_run(compose_cfg(*GMM_FAST, f"trainer.grad_accum_steps={k}")), tmp_path)


def test_bench_reports_the_micro_batch_activations():
    """One micro-batch's loss keeps about 1/K of the whole batch's activations (the point of accumulating)."""
    from stepdistill.cli.bench import bench_one, table
    common = ["benchmark.network.width=32", "trainer.batch_size=64"]
    rows = [bench_one("gmm", "dmd2", 2, 1, [*common, f"trainer.grad_accum_steps={k}"]) for k in (1, 4)]
    assert rows[1]["generator_saved_mb"] / rows[0]["generator_saved_mb"] == pytest.approx(0.25, rel=0.05)
    assert "| 64 = 4 x 16 |" in table(rows).splitlines()[3]
    assert not list(Path(tempfile.gettempdir()).glob("stepdistill-bench-*"))   # its run directories are removed


def test_a_logged_maximum_is_the_whole_batchs_and_batch_statistics_are_named(tmp_path, monkeypatch, caplog):
    """A `*_max` log is a maximum over the step's rows: over micro-batches it is their maximum, as over processes
    (their mean depended on K). A batch statistic under accumulation is said once at the start (gmm's default
    normaliser is one)."""
    import logging

    from stepdistill.methods.dmd2 import DMD2
    loss = DMD2.loss

    def with_noise_max(self, phase, batch, step):
        out = loss(self, phase, batch, step)
        out.logs["noise_max"] = batch["noise"].abs().max().item()
        return out
    monkeypatch.setattr(DMD2, "loss", with_noise_max)
    logs = {}
    for k in (1, 2):
        with caplog.at_level(logging.WARNING, logger="stepdistill"):
            caplog.clear()
            logs[k] = _train(compose_cfg(*GMM_FAST, "trainer.max_steps=2", f"trainer.grad_accum_steps={k}"),
                             tmp_path / str(k))
        said = [r.getMessage() for r in caplog.records if "taken over each micro-batch" in r.getMessage()]
        assert len(said) == (k > 1) and (k == 1 or "method.normalizer=batch" in said[0])
    assert logs[2]["2"]["critic/noise_max"] == pytest.approx(logs[1]["2"]["critic/noise_max"], rel=1e-6)
