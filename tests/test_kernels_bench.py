"""kernels/bench.py's own code (correctness check, tuning, table) at tiny sizes on CPU, under Triton's
interpreter: a mistake in the benchmark must not first show up on a lent GPU, where minutes are scarce."""
import math

import pytest
import torch

pytest.importorskip("triton")

from stepdistill.kernels import bench, triton_attention  # noqa: E402


@pytest.fixture
def tiny_bench(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the GPU runs the real benchmark (kernels/gpu_check.sh)")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "CHECK_SHAPES", [(20, 20), (24, 9)])
    monkeypatch.setattr(bench, "TOKENS", 64)
    monkeypatch.setattr(bench, "WIDTH", 128)
    monkeypatch.setattr(triton_attention, "CONFIGS", dict(triton_attention.CONFIGS))   # tune() writes here
    monkeypatch.setattr(bench, "TUNE", {k: v[:2] for k, v in bench.TUNE.items()})   # the interpreter ignores blocks
    return bench


def test_check_covers_every_output_and_padded_head_dims(tiny_bench, capsys):
    """head_dim 24 runs padded to 32: every column of the check (forward, grads, fused JVP, tangent-only kernel)
    must pad as the dispatch does."""
    assert tiny_bench.check([(torch.float32, 24)])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| float32")]
    assert len(rows) == 2
    errors = [float(x) for r in rows for x in r.strip("| ").split(" | ")[4:]]
    assert len(errors) == 2 * 7 and all(e < 1e-5 for e in errors)


def test_table_and_tuning_run(tiny_bench, capsys):
    tiny_bench.tune(["fwd_jvp"], seq=32, dtype=torch.float32)
    assert triton_attention.CONFIGS[("fwd_jvp", 64)] in tiny_bench.TUNE["fwd_jvp"]
    rows = tiny_bench.bench_table(torch.float32, sizes=[(32, 16)])
    by_name = {r["impl"]: r for r in rows}
    ours, unfused = by_name["triton (ours)"], by_name["triton, two kernels"]
    assert all(isinstance(ours[m], tuple) and ours[m][0] > 0 for m in ("fwd", "fwd+bwd", "jvp"))
    assert isinstance(unfused["jvp"], tuple) and unfused["fwd"] == "as above"
    assert by_name["sdpa flash"]["jvp"] == "no forward-mode AD"
    assert math.isnan(ours["fwd"][2])       # no CUDA memory statistics on CPU
    tiny_bench.print_table(rows, "cpu")
    table = capsys.readouterr().out
    assert "| 32 | 16 | triton, two kernels |" in table and "×" in table
