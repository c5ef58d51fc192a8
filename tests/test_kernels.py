"""stepdistill.kernels: the Triton flash-attention kernels against a float64 reference, the backend dispatch,
and its errors. On a machine without CUDA the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so sizes are tiny; with CUDA the same tests run the compiled kernels."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from stepdistill.kernels import flash_attention, math_attention, resolve_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
if DEVICE == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 inputs then use exact fp32 products


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(shape_q, shape_kv, dtype):
    # fresh random inputs each run: the kernels must compute the same function on any valid input
    q = torch.randn(*shape_q, dtype=dtype, device=DEVICE)
    k = torch.randn(*shape_kv, dtype=dtype, device=DEVICE)
    v = torch.randn(*shape_kv, dtype=dtype, device=DEVICE)
    return q, k, v


def reference(q, k, v, scale):
    return math_attention(q.double(), k.double(), v.double(), scale)


CASES = [  # (head_dim, q_len, kv_len): self-attention, cross-attention (shorter and longer keys), ragged tails
    (16, 40, 40), (32, 33, 20), (64, 24, 50), (128, 20, 17),
    (8, 16, 16), (40, 30, 12),      # padded head_dims: the digits UNet's 8, SD1.5's 40
]
if DEVICE == "cuda":   # the GPU's key blocks are 64 wide: keys past 128 reach the online softmax's rescaling there
    CASES.append((64, 70, 150))   # (the interpreter's 16-wide blocks reach it with the cases above)


@pytest.mark.parametrize("head_dim,lq,lk", CASES)
def test_forward_backward_match_float64(head_dim, lq, lk):
    q, k, v = make((2, 2, lq, head_dim), (2, 2, lk, head_dim), torch.float32)
    scale = head_dim ** -0.5
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, scale)
    ref.backward(grad_out.double())
    assert out.shape == (2, 2, lq, head_dim) and out.dtype == torch.float32
    assert rel_err(out, ref) < TOL[torch.float32]
    for ours, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert ours.shape == theirs.shape
        assert rel_err(ours, theirs) < TOL[torch.float32]


@pytest.mark.parametrize("head_dim,lq,lk", CASES)
def test_jvp_matches_float64(head_dim, lq, lk):
    q, k, v = make((1, 2, lq, head_dim), (1, 2, lk, head_dim), torch.float32)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    scale = 0.7 / head_dim ** 0.5      # a non-default scale: the tangent of the logits must carry it
    out, tangent = torch.func.jvp(lambda a, b, c: flash_attention(a, b, c, scale=scale, backend="triton"),
                                  (q, k, v), tangents)
    ref, ref_tangent = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, scale),
                                      (q.double(), k.double(), v.double()), tuple(t.double() for t in tangents))
    assert rel_err(out, ref) < TOL[torch.float32]
    assert rel_err(tangent, ref_tangent) < TOL[torch.float32]


@pytest.mark.parametrize("which", ["q", "k", "v", "qk"])
def test_jvp_with_some_tangents_only(which):
    """Inputs without a tangent skip their products in the kernel; the rest must still be exact."""
    q, k, v = make((1, 1, 20, 32), (1, 1, 28, 32), torch.float32)
    names = ("q", "k", "v")
    primals = (q, k, v)

    def f(*moving):
        args = dict(zip(names, primals))
        args.update(dict(zip([n for n in names if n in which], moving)))
        return args["q"], args["k"], args["v"]

    moving = tuple(p for n, p in zip(names, primals) if n in which)
    tangents = tuple(torch.randn_like(p) for p in moving)
    _, ours = torch.func.jvp(lambda *m: flash_attention(*f(*m), backend="triton"), moving, tangents)
    _, ref = torch.func.jvp(lambda *m: math_attention(*(t.double() for t in f(*m)), 32 ** -0.5),
                            tuple(m.double() for m in moving), tuple(t.double() for t in tangents))
    assert rel_err(ours, ref) < TOL[torch.float32]


def test_forward_ad_dual_tensors():
    """The other forward-mode API (torch.autograd.forward_ad) reaches the same jvp."""
    import torch.autograd.forward_ad as fwad
    q, k, v = make((1, 2, 16, 16), (1, 2, 16, 16), torch.float32)
    tq = torch.randn_like(q)
    with fwad.dual_level():
        out = flash_attention(fwad.make_dual(q, tq), k, v, backend="triton")
        tangent = fwad.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda a: math_attention(a, k.double(), v.double(), 0.25), (q.double(),),
                            (tq.double(),))
    assert rel_err(tangent, ref) < TOL[torch.float32]


def _count_kernel_calls(monkeypatch):
    """Record which entry points of triton_attention run (the fused forward+JVP or the separate kernels)."""
    from stepdistill.kernels import triton_attention
    calls = []
    for name in ("forward", "jvp", "forward_jvp"):
        original = getattr(triton_attention, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(triton_attention, name, counted)
    return calls


@pytest.mark.parametrize("api", ["torch.func", "forward_ad"])
def test_jvp_runs_the_fused_kernel_once(api, monkeypatch):
    """With tangents present, output and tangent come from one kernel: no separate forward, no tangent-only
    kernel. Without tangents (a plain call, or inside torch.func.grad) the forward kernel runs alone."""
    import torch.autograd.forward_ad as fwad
    calls = _count_kernel_calls(monkeypatch)
    q, k, v = make((1, 2, 20, 16), (1, 2, 24, 16), torch.float32)
    tv = torch.randn_like(v)
    attn = lambda a: flash_attention(q, k, a, backend="triton")  # noqa: E731
    if api == "torch.func":
        out, tangent = torch.func.jvp(attn, (v,), (tv,))
    else:
        with fwad.dual_level():
            out, tangent = fwad.unpack_dual(attn(fwad.make_dual(v, tv)))
    assert calls == ["forward_jvp"]
    ref, ref_tangent = torch.func.jvp(lambda a: reference(q, k, a, 0.25), (v.double(),), (tv.double(),))
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(tangent, ref_tangent) < TOL[torch.float32]
    calls.clear()
    attn(v)
    torch.func.grad(lambda a: attn(a).sum())(v)
    assert calls == ["forward", "forward"]


def test_fused_jvp_output_backpropagates():
    """O and the log-sum-exp that jvp() fills are what backward() reads: gradients through a jvp's output
    (forward-mode and reverse-mode AD together, gradients enabled) match float64."""
    import torch.autograd.forward_ad as fwad
    q, k, v = make((1, 2, 18, 32), (1, 2, 26, 32), torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with fwad.dual_level():
        out, tangent = fwad.unpack_dual(flash_attention(fwad.make_dual(q, torch.randn_like(q)), k, v,
                                                        backend="triton"))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, 32 ** -0.5).backward(grad_out.double())
    for ours, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(ours, theirs) < TOL[torch.float32]


@pytest.mark.parametrize("head_dim,lq,lk", [(16, 40, 40), (64, 24, 50), (128, 20, 17)])
def test_tangent_only_kernel_matches_float64(head_dim, lq, lk):
    """The tangent-only kernel (P rebuilt from a saved log-sum-exp), which a Function whose forward already ran
    uses, against float64; its log-sum-exp and output are the fused kernel's too."""
    from stepdistill.kernels import triton_attention
    q, k, v = make((2, 2, lq, head_dim), (2, 2, lk, head_dim), torch.float32)
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    scale = head_dim ** -0.5
    o, lse = triton_attention.forward(q, k, v, scale)
    tangent = triton_attention.jvp(q, k, v, o, lse, tq, tk, tv, scale)
    _, ref = torch.func.jvp(lambda a, b, c: reference(a, b, c, scale), (q.double(), k.double(), v.double()),
                            (tq.double(), tk.double(), tv.double()))
    assert rel_err(tangent, ref) < TOL[torch.float32]
    o_fused, lse_fused, tangent_fused = triton_attention.forward_jvp(q, k, v, tq, tk, tv, scale)
    assert torch.allclose(o_fused, o, atol=1e-6) and torch.allclose(lse_fused, lse, atol=1e-5)
    assert rel_err(tangent_fused, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """fp16/bf16 inputs, fp32 accumulation: errors at the inputs' rounding level, outputs in the input dtype."""
    q, k, v = make((1, 2, 24, 64), (1, 2, 40, 64), dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, backend="triton")
    out.backward(torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, 64 ** -0.5)
    ref.backward(torch.ones_like(ref))
    assert out.dtype == dtype and q.grad.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(v.grad, v64.grad) < TOL[dtype] and rel_err(q.grad, q64.grad) < 5 * TOL[dtype]
    assert rel_err(k.grad, k64.grad) < 5 * TOL[dtype]
    tq = torch.randn_like(q)
    _, tangent = torch.func.jvp(lambda a: flash_attention(a, k.detach(), v.detach(), backend="triton"),
                                (q.detach(),), (tq,))
    _, tangent64 = torch.func.jvp(lambda a: reference(a, k64.detach(), v64.detach(), 64 ** -0.5),
                                  (q64.detach(),), (tq.double(),))
    assert tangent.dtype == dtype and rel_err(tangent, tangent64) < 5 * TOL[dtype]


def test_non_contiguous_inputs_like_a_diffusers_processor():
    """Processors hand over (B, L, H, D) projections transposed to (B, H, L, D): strided, not copied."""
    x = torch.randn(2, 24, 3, 32, device=DEVICE)    # (B, L, H, D)
    q = x.transpose(1, 2)
    k = torch.randn(2, 18, 3, 32, device=DEVICE).transpose(1, 2)
    v = torch.randn(2, 3, 32, 18, device=DEVICE).transpose(2, 3)    # unit stride not on head_dim: copied
    out = flash_attention(q, k, v, backend="triton")
    assert rel_err(out, reference(q, k, v, 32 ** -0.5)) < TOL[torch.float32]


def test_dispatch_picks_and_agrees():
    q, k, v = make((1, 2, 12, 16), (1, 2, 12, 16), torch.float32)
    if DEVICE == "cpu":
        assert resolve_backend("auto", q) == "sdpa"
    ref = reference(q, k, v, 0.25)
    for backend in ("auto", "sdpa", "math", "triton"):
        assert rel_err(flash_attention(q, k, v, backend=backend), ref) < 1e-5, backend


def test_auto_takes_a_backend_with_a_jvp_under_forward_ad():
    """SDPA has no forward-mode AD; under torch.func.jvp, auto falls back to one that has."""
    q, k, v = make((1, 1, 8, 16), (1, 1, 8, 16), torch.float32)
    seen = []

    def f(a):
        seen.append(resolve_backend("auto", a))
        return flash_attention(a, k, v)

    tq = torch.randn_like(q)
    _, tangent = torch.func.jvp(f, (q,), (tq,))
    assert seen == (["triton"] if DEVICE == "cuda" else ["math"])
    _, ref = torch.func.jvp(lambda a: reference(a, k, v, 16 ** -0.5), (q.double(),), (tq.double(),))
    assert rel_err(tangent, ref) < TOL[torch.float32]


def test_bad_inputs_say_what_to_change():
    q, k, v = make((1, 2, 8, 16), (1, 2, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        flash_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="same length"):
        flash_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="share head_dim"):
        flash_attention(q, k[..., :8], v)
    big = torch.zeros(1, 1, 4, 320)
    with pytest.raises(ValueError, match="head_dim up to 256"):
        flash_attention(big, big, big, backend="triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only error path")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch; from stepdistill.kernels import flash_attention\n"
            "x = torch.zeros(1, 1, 4, 16)\n"
            "try:\n    flash_attention(x, x, x, backend='triton')\n"
            "except RuntimeError as e:\n    print(e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "needs a CUDA GPU, or TRITON_INTERPRET=1" in out.stdout, out.stderr[-2000:]
