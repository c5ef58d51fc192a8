"""Attention benchmark: forward, forward+backward and JVP time, TFLOP/s and memory, Triton vs SDPA/xformers.

    python -m stepdistill.kernels.bench                # the README table (CUDA)
    python -m stepdistill.kernels.bench --check        # correctness at real sizes against float64 first
    python -m stepdistill.kernels.bench --tune         # try block configurations for each kernel

    python -m stepdistill.kernels.bench --tune fwd_jvp # only the named kernels (fwd, dkdv, dq, jvp, fwd_jvp)

FLOPs are counted the usual way: 4·B·H·Lq·Lk·D for the forward (two matrix products), 2.5× that for the
backward. The JVP column is torch.func.jvp (the output and its tangent); its TFLOP/s counts six matrix products
(QKᵀ, Q̇Kᵀ, QK̇ᵀ, PV, (P∘Ṡ)V, PV̇), 3× the forward: the fewest that give both, so 3× the forward's time is
the JVP's floor at the forward's efficiency. "triton, two kernels" times the same JVP through the forward
kernel and then the tangent-only kernel (seven products), the path a Function whose forward ran without a
tangent takes.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from . import autograd, triton_attention
from .dispatch import flash_attention, math_attention
from .triton_attention_dims import padded_head_dim

DEVICE = "cuda"     # the tests set "cpu" to run this module's code under Triton's interpreter at tiny sizes
SIZES = [(1024, 64), (1024, 128), (4096, 64), (4096, 128)]   # (sequence, head_dim)
TOKENS = 16384          # batch × sequence, as in the FlashAttention papers' benchmarks
WIDTH = 2048            # heads × head_dim


def _sdpa(kind: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kind]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return run


def implementations() -> dict:
    """name -> (attention fn, the fn timed under torch.func.jvp or None where the backend has no JVP).
    SDPA's math backend has none either; its JVP row times the same math through plain ops."""
    triton = lambda q, k, v: flash_attention(q, k, v, backend="triton")  # noqa: E731
    impls = {"triton (ours)": (triton, triton), "triton, two kernels": (None, _unfused(triton))}
    for kind in ("flash", "efficient", "cudnn"):
        impls[f"sdpa {kind}"] = (_sdpa(kind), None)
    impls["sdpa math"] = (_sdpa("math"), lambda q, k, v: math_attention(q, k, v, q.shape[-1] ** -0.5))
    try:
        import xformers.ops  # noqa: F401
        impls["xformers"] = (lambda q, k, v: flash_attention(q, k, v, backend="xformers"), None)
    except ImportError:
        pass
    return impls


def _unfused(fn):
    def run(q, k, v):
        autograd.FUSE_JVP = False
        try:
            return fn(q, k, v)
        finally:
            autograd.FUSE_JVP = True
    return run


def _bench(fn) -> tuple[float, float]:
    """Median milliseconds (CUDA events via do_bench) and peak extra memory in MiB (NaN off CUDA)."""
    import triton.testing
    if DEVICE != "cuda":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1], float("nan")
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak


def _inputs(seq: int, head_dim: int, dtype, grad: bool):
    batch, heads = max(1, TOKENS // seq), WIDTH // head_dim
    g = torch.Generator(device=DEVICE).manual_seed(seq + head_dim)
    return [torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=g).requires_grad_(grad)
            for _ in range(3)]


def bench_table(dtype=torch.bfloat16, sizes=SIZES) -> list[dict]:
    rows = []
    for seq, d in sizes:
        q, k, v = _inputs(seq, d, dtype, grad=True)
        b, h = q.shape[:2]
        fwd_flops = 4 * b * h * seq * seq * d
        do = torch.randn_like(q)
        tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
        for name, (fn, jvp_fn) in implementations().items():
            row = {"seq": seq, "head_dim": d, "impl": name}
            for mode in ("fwd", "fwd+bwd", "jvp"):
                if mode == "jvp" and jvp_fn is None:
                    row[mode] = "no forward-mode AD"
                    continue
                if mode != "jvp" and fn is None:
                    row[mode] = "as above"
                    continue
                try:
                    if mode == "fwd":
                        def call(fn=fn):
                            with torch.no_grad():
                                fn(q, k, v)
                        flops = fwd_flops
                    elif mode == "fwd+bwd":
                        def call(fn=fn):
                            fn(q, k, v).backward(do)
                        flops = 3.5 * fwd_flops
                    else:
                        def call(f=jvp_fn):
                            with torch.no_grad():
                                torch.func.jvp(f, (q.detach(), k.detach(), v.detach()), (tq, tk, tv))
                        flops = fwd_flops * 3     # the six products output and tangent need
                    ms, mem = _bench(call)
                    row[mode] = (ms, flops / ms / 1e9, mem)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    row[mode] = str(e).splitlines()[0][:40]
                q.grad = k.grad = v.grad = None
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def print_table(rows: list[dict], device_name: str) -> None:
    print(f"\n{device_name}, bf16, batch×seq = {TOKENS}, heads×head_dim = {WIDTH}; ms / TFLOP/s / peak extra MiB")
    print("| seq | head_dim | impl | fwd | fwd+bwd | jvp | jvp / fwd |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for mode in ("fwd", "fwd+bwd", "jvp"):
            x = r[mode]
            cells.append(f"{x[0]:.3f} ms / {x[1]:.0f} / {x[2]:.0f}" if isinstance(x, tuple) else f"n/a ({x})")
        fwd = r["fwd"] if isinstance(r["fwd"], tuple) else next(
            (x["fwd"] for x in rows if x["seq"] == r["seq"] and x["head_dim"] == r["head_dim"]
             and x["impl"] == "triton (ours)" and isinstance(x["fwd"], tuple)), None)
        ratio = f"{r['jvp'][0] / fwd[0]:.2f}×" if isinstance(r["jvp"], tuple) and fwd else "–"
        print(f"| {r['seq']} | {r['head_dim']} | {r['impl']} | " + " | ".join(cells) + f" | {ratio} |")


# ------------------------------------------------------------------------------------------------ check
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _poison_allocator():
    """Fill the caching allocator's free blocks with NaN so an unwritten output element cannot pass."""
    if DEVICE != "cuda":
        return
    free = torch.cuda.mem_get_info()[0]
    x = torch.full((min(free // 8, 2**30) // 4,), float("nan"), device="cuda")
    del x


CHECKS = [(torch.bfloat16, d) for d in (32, 64, 80, 128, 256)] + [(torch.float16, 128), (torch.float32, 128)]
CHECK_SHAPES = [(1000, 1000), (1024, 77)]     # (Lq, Lk): self-attention with ragged blocks, and cross-attention


def check(cases=CHECKS) -> bool:
    """Forward, dq/dk/dv and JVP vs a float64 reference on fresh random inputs, self- and cross-attention."""
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-3}
    ok = True
    print("| dtype | head_dim | Lq | Lk | out | dq | dk | dv | jvp output | jvp tangent | tangent-only kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 inputs: exact fp32 products
    for dtype, d in cases:
        for lq, lk in CHECK_SHAPES:
            errs = list(_errors(d, dtype, lq, lk, batch=2).values())
            good = all(math.isfinite(e) and e < tol[dtype] for e in errs)
            ok &= good
            print(f"| {str(dtype)[6:]} | {d} | {lq} | {lk} | " + " | ".join(f"{e:.1e}" for e in errs)
                  + ("" if good else "  ← FAIL") + " |")
    return ok


# ------------------------------------------------------------------------------------------------- tune
TUNE = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    "dkdv": [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 8, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    "jvp": [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)],
    "fwd_jvp": [(64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
}
OUTPUTS = {"fwd": ("out",), "dkdv": ("dk", "dv"), "dq": ("dq",), "jvp": ("tangent-only kernel",),
           "fwd_jvp": ("jvp output", "jvp tangent")}


def _errors(d: int, dtype=torch.bfloat16, lq: int | None = None, lk: int | None = None, batch: int = 1,
            heads: int = 4) -> dict[str, float]:
    """Relative errors of every output against float64 on fresh random inputs (allocator poisoned first)."""
    _poison_allocator()
    lq, lk = lq or CHECK_SHAPES[0][0], lk or CHECK_SHAPES[0][1]
    q, k, v = (torch.randn(batch, heads, n, d, device=DEVICE, dtype=dtype).requires_grad_() for n in (lq, lk, lk))
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    do = torch.randn_like(q)
    o = flash_attention(q, k, v, backend="triton")
    o.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = math_attention(q64, k64, v64, d ** -0.5)
    ref.backward(do.double())
    with torch.no_grad():
        o_jvp, t_ours = torch.func.jvp(lambda a, b, c: flash_attention(a, b, c, backend="triton"),
                                       (q.detach(), k.detach(), v.detach()), (tq, tk, tv))
        pad = (0, padded_head_dim(d) - d)      # the kernels run at a power-of-two head_dim
        qp, kp, vp, tqp, tkp, tvp = (torch.nn.functional.pad(t.detach(), pad) for t in (q, k, v, tq, tk, tv))
        o2, lse = triton_attention.forward(qp, kp, vp, d ** -0.5)
        t_only = triton_attention.jvp(qp, kp, vp, o2, lse, tqp, tkp, tvp, d ** -0.5)[..., :d]
    _, t_ref = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, d ** -0.5),
                              (q64.detach(), k64.detach(), v64.detach()), (tq.double(), tk.double(), tv.double()))
    return {"out": _rel(o, ref), "dq": _rel(q.grad, q64.grad), "dk": _rel(k.grad, k64.grad),
            "dv": _rel(v.grad, v64.grad), "jvp output": _rel(o_jvp, ref), "jvp tangent": _rel(t_ours, t_ref),
            "tangent-only kernel": _rel(t_only, t_ref)}


def tune(kinds=tuple(TUNE), seq: int = 4096, dtype=torch.bfloat16) -> None:
    """Time each named kernel's candidate blocks at head_dim 64 and 128 and keep the fastest for this process."""
    unknown = set(kinds) - set(TUNE)
    if unknown:
        raise SystemExit(f"--tune takes kernels among {', '.join(TUNE)}; got {', '.join(sorted(unknown))}")
    triton_attention.AUTO_SHRINK = False
    try:
        _tune(kinds, seq, dtype)
    finally:
        triton_attention.AUTO_SHRINK = True


def _tune(kinds, seq: int, dtype) -> None:
    for d in (64, 128):
        q, k, v = _inputs(seq, d, dtype, grad=True)
        do = torch.randn_like(q)
        tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
        with torch.no_grad():
            o, lse = triton_attention.forward(q, k, v, d ** -0.5)
        calls = {"fwd": lambda: triton_attention.forward(q, k, v, d ** -0.5),
                 "dkdv": lambda: triton_attention.backward(do, q, k, v, o, lse, d ** -0.5),
                 "dq": lambda: triton_attention.backward(do, q, k, v, o, lse, d ** -0.5),
                 "jvp": lambda: triton_attention.jvp(q, k, v, o, lse, tq, tk, tv, d ** -0.5),
                 "fwd_jvp": lambda: triton_attention.forward_jvp(q, k, v, tq, tk, tv, d ** -0.5)}
        for kind in kinds:
            configs = TUNE[kind]
            default = triton_attention.CONFIGS[(kind, d)]
            results = []
            for cfg in configs:
                triton_attention.CONFIGS[(kind, d)] = cfg
                triton_attention._WORKING.clear()      # time this configuration, not a shrunk fallback
                try:
                    errs = _errors(d)
                    bad = [n for n in OUTPUTS[kind] if not errs[n] < 2e-2]
                    if bad:      # a miscompiled or racy configuration is never kept, however fast
                        raise RuntimeError(f"wrong {bad}: rel. err {[f'{errs[n]:.1e}' for n in bad]}")
                    ms, _ = _bench(calls[kind])
                    results.append((ms, cfg))
                except Exception as e:  # out of shared memory etc.
                    results.append((float("inf"), cfg))
                    print(f"  {kind} d={d} {cfg}: {str(e).splitlines()[0][:60]}")
            results.sort()
            best = results[0][1] if results[0][0] < float("inf") else default
            triton_attention.CONFIGS[(kind, d)] = best     # the table that follows uses the tuned blocks
            print(f"tune {kind:5s} d={d:3d} seq={seq}: " + ", ".join(f"{c}={ms:.3f}ms" for ms, c in results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness against float64 before timing")
    parser.add_argument("--tune", nargs="*", metavar="KERNEL",
                        help=f"time block configurations for the named kernels ({', '.join(TUNE)}; all if none)")
    parser.add_argument("--no-bench", action="store_true", help="skip the timing table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels/bench.py times CUDA kernels: run it on a machine with a GPU")
    name = torch.cuda.get_device_name()
    print(f"{name}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    if args.tune is not None:
        tune(args.tune or tuple(TUNE))
    ok = check() if args.check else None
    if not args.no_bench:
        print_table(bench_table(), name + ("" if ok is not False else " (CORRECTNESS CHECK FAILED)"))
    for (kind, d), cfg in sorted(triton_attention.CONFIGS.items()):
        if d in (64, 128):
            print(f"config {kind} d={d}: BLOCK_M, BLOCK_N, num_warps, num_stages = {cfg}")
    if ok is False:
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
