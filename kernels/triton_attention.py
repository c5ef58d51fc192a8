"""Triton flash attention (FlashAttention-2 style): forward, backward and forward-mode JVP kernels.

All kernels take (batch, heads, seq, head_dim) tensors with a unit stride along head_dim and a power-of-two
head_dim (the dispatch pads other sizes with zeros). Softmax runs in base 2: logits are pre-multiplied by
scale·log2(e), and the saved log-sum-exp `lse2` is in base 2 too (lse2 = lse / ln 2). Accumulation is fp32.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors; the interpreter
computes bf16 arithmetic wrongly, so there every loaded tile is cast to fp32 first (FP32_MATH).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .triton_attention_dims import triton_interpreted

LOG2E = 1.4426950408889634
INTERPRET = triton_interpreted()   # read once: the kernels below were decorated under this setting


# ---------------------------------------------------------------------------------------------------------
# forward: O = softmax(scale·QKᵀ) V with an online softmax over key blocks; saves lse2 for backward and JVP
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                H, LQ, LK, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                FP32_MATH: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if FP32_MATH:
        q = q.to(tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * LQ + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# backward: delta = rowsum(dO ∘ O); one kernel per key block for dK, dV and one per query block for dQ
# (no atomics: the logits are recomputed in both, as in FlashAttention-2's Triton tutorial)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, som, sdb, sdh, sdm, H, LQ,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tl.store(DELTA + bh * LQ + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                     H, LQ, LK, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     FP32_MATH: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < LK
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if FP32_MATH:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, LQ, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < LQ
        q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if FP32_MATH:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # padded query rows get lse2 = +inf, hence p = 0
        lse2 = tl.load(LSE + bh * LQ + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * LQ + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(DK + bh * LK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + bh * LK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# Its tile loads repeat the dK/dV kernel's on purpose: each kernel stays self-contained for the compiler and the
# block tuner, and this exact code is what the H200 check verified.
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                   H, LQ, LK, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP32_MATH: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if FP32_MATH:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + bh * LQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + bh * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------
# forward-mode JVP. With P = softmax(S), S = scale·QKᵀ and Ṡ = scale·(Q̇Kᵀ + QK̇ᵀ):
#   Ȯ = (P∘Ṡ)V + P V̇ − rowsum(P∘Ṡ) ∘ O
# P is rebuilt from the forward's lse2, so one pass over the keys needs no rescaling and the attention
# matrix is never written to memory. Missing tangents (None) skip their matrix products.
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _tangent_block(acc, row_sum, p, q, k, v, tq, tk_ptrs, tv_ptrs, col_ok, sm_scale,
                   HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_MATH: tl.constexpr, PRECISION: tl.constexpr):
    """One key block's share of the tangent, for both JVP kernels: acc += (P∘Ṡ)V + PV̇ and row_sum += rowsum(P∘Ṡ)
    with Ṡ = scale·(Q̇Kᵀ + QK̇ᵀ). Tangents that are off (HAS_* False) skip their loads and products."""
    if HAS_TQ or HAS_TK:
        ts = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_TQ:
            ts += tl.dot(tq, tl.trans(k), input_precision=PRECISION)
        if HAS_TK:
            tk = tl.load(tk_ptrs, mask=col_ok[:, None], other=0.0)
            if FP32_MATH:
                tk = tk.to(tl.float32)
            ts += tl.dot(q, tl.trans(tk), input_precision=PRECISION)
        pts = p * (ts * sm_scale)
        row_sum += tl.sum(pts, 1)
        acc += tl.dot(pts.to(v.dtype), v, input_precision=PRECISION)
    if HAS_TV:
        tv = tl.load(tv_ptrs, mask=col_ok[:, None], other=0.0)
        if FP32_MATH:
            tv = tv.to(tl.float32)
        acc += tl.dot(p.to(tv.dtype), tv, input_precision=PRECISION)
    return acc, row_sum


@triton.jit
def _jvp_kernel(Q, K, V, O, LSE, TQ, TK, TV, TO,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                stqb, stqh, stqm, stkb, stkh, stkn, stvb, stvh, stvn,
                H, LQ, LK, sm_scale, qk_scale,
                HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                FP32_MATH: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if FP32_MATH:
        q = q.to(tl.float32)
    if HAS_TQ:
        tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        if FP32_MATH:
            tq = tq.to(tl.float32)
    else:
        tq = q      # never read (HAS_TQ is off); _tangent_block takes a tile either way
    lse2 = tl.load(LSE + bh * LQ + offs_m, mask=row_ok, other=float("inf"))
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)      # Σ_j p_ij (ṡ_ij v_j + v̇_j)
    ps_sum = tl.zeros([BLOCK_M], tl.float32)             # Σ_j p_ij ṡ_ij
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        acc, ps_sum = _tangent_block(acc, ps_sum, p, q, k, v, tq,
                                   TK + b * stkb + h * stkh + cols[:, None] * stkn + offs_d[None, :],
                                   TV + b * stvb + h * stvh + cols[:, None] * stvn + offs_d[None, :], col_ok,
                                   sm_scale, HAS_TQ, HAS_TK, HAS_TV, BLOCK_M, BLOCK_N, FP32_MATH, PRECISION)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    to = acc - ps_sum[:, None] * o.to(tl.float32)
    tl.store(TO + bh * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             to.to(TO.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------
# fused forward + JVP: O, lse2 and Ȯ in one pass over the keys, for calls that want the output and its tangent
# (torch.func.jvp). The online softmax rescales the tangent sums by the same factor as O's:
#   acc = Σ p̃ v,  tacc = Σ p̃ (ṡ v + v̇),  r = Σ p̃ ṡ,  l = Σ p̃   (p̃ = exp2(s − running max))
#   O = acc / l,  Ȯ = tacc / l − (r / l) ∘ O
# Six matrix products (QKᵀ, Q̇Kᵀ, QK̇ᵀ, PV, (P∘Ṡ)V, PV̇) against seven for the forward kernel followed by
# _jvp_kernel, and Q, K, V are read once instead of twice.
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_jvp_kernel(Q, K, V, TQ, TK, TV, O, LSE, TO,
                    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                    stqb, stqh, stqm, stkb, stkh, stkn, stvb, stvh, stvn,
                    H, LQ, LK, sm_scale, qk_scale,
                    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    FP32_MATH: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if FP32_MATH:
        q = q.to(tl.float32)
    if HAS_TQ:
        tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        if FP32_MATH:
            tq = tq.to(tl.float32)
    else:
        tq = q      # never read (HAS_TQ is off); _tangent_block takes a tile either way
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    tacc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        tacc = tacc * alpha[:, None]
        r_i = r_i * alpha
        tacc, r_i = _tangent_block(tacc, r_i, p, q, k, v, tq,
                                   TK + b * stkb + h * stkh + cols[:, None] * stkn + offs_d[None, :],
                                   TV + b * stvb + h * stvh + cols[:, None] * stvn + offs_d[None, :], col_ok,
                                   sm_scale, HAS_TQ, HAS_TK, HAS_TV, BLOCK_M, BLOCK_N, FP32_MATH, PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    to = tacc / l_i[:, None] - (r_i / l_i)[:, None] * o
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * LQ + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(TO + bh * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             to.to(TO.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head_dim on CUDA; `kernels/bench.py --tune`
# measures alternatives and prints the best, which can be written here or set at run time.
CONFIGS: dict[tuple[str, int], tuple[int, int, int, int]] = {
    # tuned on an H200 (triton 3.6, bf16, seq 4096; kernels/NOTES.md); 16/32 take 64's, 256 is only checked
    ("fwd", 16): (128, 64, 8, 3), ("fwd", 32): (128, 64, 8, 3), ("fwd", 64): (128, 64, 8, 3),
    ("fwd", 128): (64, 64, 4, 3), ("fwd", 256): (64, 32, 4, 2),
    # (32, 128, 8, 3) at head_dim 128 compiled to a wrong dK there: the tuner checks every candidate now
    ("dkdv", 16): (32, 128, 4, 3), ("dkdv", 32): (32, 128, 4, 3), ("dkdv", 64): (32, 128, 4, 3),
    ("dkdv", 128): (32, 64, 4, 3), ("dkdv", 256): (16, 64, 8, 2),
    ("dq", 16): (128, 64, 8, 3), ("dq", 32): (128, 64, 8, 3), ("dq", 64): (128, 64, 8, 3),
    ("dq", 128): (128, 64, 8, 3), ("dq", 256): (64, 16, 8, 2),
    # the JVP kernel holds k, v, k̇, v̇ tiles per stage: (64, 64, 4, 3) ran out of shared memory at 64
    ("jvp", 16): (128, 32, 8, 2), ("jvp", 32): (128, 32, 8, 2), ("jvp", 64): (128, 32, 8, 2),
    ("jvp", 128): (64, 64, 4, 2), ("jvp", 256): (32, 16, 4, 1),
    # the fused forward + JVP holds the jvp kernel's tiles and a second (tangent) accumulator; tuned on the
    # H200 (2026-11-27): at 64, (64, 64, 4, 3) 3.51 ms against 3.85 for (64, 32, 4, 3); at 128, (128, 64, 8, 2)
    # 3.33 ms against 4.03–4.40 for the 4-warp candidates
    ("fwd_jvp", 16): (64, 64, 4, 3), ("fwd_jvp", 32): (64, 64, 4, 3), ("fwd_jvp", 64): (64, 64, 4, 3),
    ("fwd_jvp", 128): (128, 64, 8, 2), ("fwd_jvp", 256): (32, 16, 4, 1),
}
INTERPRET_BLOCK = 16          # the interpreter runs one numpy op per tile: small tiles, few programs


def _config(kind: str, head_dim: int) -> tuple[int, int, int, int]:
    if INTERPRET:
        return INTERPRET_BLOCK, INTERPRET_BLOCK, 1, 1
    return CONFIGS[(kind, head_dim)]


_WORKING: dict[tuple, tuple[int, int, int, int]] = {}
AUTO_SHRINK = True          # the tuner turns this off so that it times exactly the blocks it names


def _shrink(cfg: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    bm, bn, warps, stages = cfg
    if stages > 1:
        return bm, bn, warps, stages - 1
    if bn > 16:
        return bm, bn // 2, warps, stages
    if bm > 16:
        return bm // 2, bn, warps, stages
    return None


def _launch(kind: str, head_dim: int, dtype: torch.dtype, launch) -> None:
    """Run `launch(BLOCK_M, BLOCK_N, num_warps, num_stages)` with the configured blocks. Where they need more
    shared memory than the chip has (fp32 inputs double every tile), shrink them (fewer pipeline stages, then
    smaller key blocks, then smaller query blocks) and remember what ran for this kernel, head_dim and dtype."""
    from triton.runtime.errors import OutOfResources
    configured = _config(kind, head_dim)
    key = (kind, head_dim, dtype, configured)
    cfg = _WORKING.get(key, configured)
    while True:
        try:
            launch(*cfg)
        except OutOfResources:
            if not AUTO_SHRINK:
                raise
            cfg = _shrink(cfg)
            if cfg is None:
                raise
            continue
        _WORKING[key] = cfg
        return


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul switch: tf32 only where the user allowed it
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The storage-backed tensor under any torch.func wrappers.

    Inside torch.func transforms (jvp, grad) a custom Function's jvp/backward see wrapped tensors, and tensors
    they allocate are wrapped too. Kernels get the plain tensors underneath (Triton writes bypass torch's
    dispatcher) while the wrapped allocations are what the Function returns.
    """
    try:
        from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover - very old torch
        return t
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _outside_transforms():
    """Launch kernels with torch.func's interpreter stack cleared: the Triton interpreter copies arguments
    with torch ops, which must not see the transforms' wrappers. (Compiled kernels never call torch.)"""
    if not INTERPRET:
        return contextlib.nullcontext()
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    return temporarily_clear_interpreter_stack()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: torch.Tensor, k: torch.Tensor, scale: float):
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    return B, H, LQ, LK, D, float(scale), float(scale) * LOG2E


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns O (B, H, LQ, D) in q's dtype and lse2 (B·H, LQ) in fp32 (base-2 log-sum-exp of the logits)."""
    B, H, LQ, LK, D, _, qk_scale = _common(q, k, scale)
    o = torch.empty(B, H, LQ, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, LQ, dtype=torch.float32, device=q.device)
    q, k, v = _plain(q), _plain(k), _plain(v)

    def launch(bm, bn, warps, stages):
        _fwd_kernel[(triton.cdiv(LQ, bm), B * H)](
            q, k, v, _plain(o), _plain(lse), *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, LQ, LK, qk_scale, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, FP32_MATH=INTERPRET,
            PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)

    with _outside_transforms():
        _launch("fwd", D, q.dtype, launch)
    return o, lse


def backward(do: torch.Tensor, q, k, v, o, lse, scale: float):
    """dQ, dK, dV for the loss gradient dO; `o` and `lse` are forward()'s outputs."""
    B, H, LQ, LK, D, sm_scale, qk_scale = _common(q, k, scale)
    dq = torch.empty(B, H, LQ, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, LK, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, H, LK, D, dtype=v.dtype, device=v.device)
    delta = _plain(torch.empty(lse.shape, dtype=torch.float32, device=lse.device))
    do, q, k, v, o, lse = (_plain(t) for t in (do, q, k, v, o, lse))
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), H, LQ, LK, sm_scale, qk_scale)
    flags = dict(HEAD_DIM=D, FP32_MATH=INTERPRET, PRECISION=_precision(q.dtype))

    def launch_dkdv(bm, bn, warps, stages):
        _bwd_dkdv_kernel[(triton.cdiv(LK, bn), B * H)](
            q, k, v, do, lse, delta, _plain(dk), _plain(dv), *args, BLOCK_M=bm, BLOCK_N=bn, **flags,
            num_warps=warps, num_stages=stages)

    def launch_dq(bm, bn, warps, stages):
        _bwd_dq_kernel[(triton.cdiv(LQ, bm), B * H)](
            q, k, v, do, lse, delta, _plain(dq), *args, BLOCK_M=bm, BLOCK_N=bn, **flags,
            num_warps=warps, num_stages=stages)

    bm_delta = INTERPRET_BLOCK if INTERPRET else 64
    with _outside_transforms():
        _bwd_delta_kernel[(triton.cdiv(LQ, bm_delta), B * H)](
            o, do, delta, *_strides(o), *_strides(do), H, LQ, HEAD_DIM=D, BLOCK_M=bm_delta)
        _launch("dkdv", D, q.dtype, launch_dkdv)
        _launch("dq", D, q.dtype, launch_dq)
    return dq, dk, dv


def _tangent_operands(q: torch.Tensor, tq, tk, tv):
    """The tangents as the JVP kernels take them: plain tensors (q stands in for an absent one and is never read,
    its HAS_* flag being off), their strides in order, and the flags."""
    tangents = tuple(_plain(t) if t is not None else q for t in (tq, tk, tv))
    strides = tuple(s for t in tangents for s in _strides(t))
    return tangents, strides, dict(HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None)


def jvp(q, k, v, o, lse, tq, tk, tv, scale: float) -> torch.Tensor:
    """Tangent of O given tangents of q, k, v (any may be None, meaning zero)."""
    B, H, LQ, LK, D, sm_scale, qk_scale = _common(q, k, scale)
    to = torch.empty(B, H, LQ, D, dtype=q.dtype, device=q.device)
    if tq is None and tk is None and tv is None:
        return to.zero_()
    q, k, v, o, lse = (_plain(t) for t in (q, k, v, o, lse))
    tangents, tangent_strides, flags = _tangent_operands(q, tq, tk, tv)

    def launch(bm, bn, warps, stages):
        _jvp_kernel[(triton.cdiv(LQ, bm), B * H)](
            q, k, v, o, lse, *tangents, _plain(to),
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *tangent_strides,
            H, LQ, LK, sm_scale, qk_scale, **flags, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, FP32_MATH=INTERPRET,
            PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)

    with _outside_transforms():
        _launch("jvp", D, q.dtype, launch)
    return to


def forward_jvp(q, k, v, tq, tk, tv, scale: float, o: torch.Tensor | None = None,
                lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """O, lse2 and the tangent of O in one kernel; tangents may be None (zero). `o` and `lse` may be given
    (forward()'s shapes and dtypes) to be written in place: the autograd Function allocates them in its forward
    and fills them here, in its jvp."""
    B, H, LQ, LK, D, sm_scale, qk_scale = _common(q, k, scale)
    if o is None:
        o = torch.empty(B, H, LQ, D, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B * H, LQ, dtype=torch.float32, device=q.device)
    to = torch.empty(B, H, LQ, D, dtype=q.dtype, device=q.device)
    q, k, v = (_plain(t) for t in (q, k, v))
    tangents, tangent_strides, flags = _tangent_operands(q, tq, tk, tv)
    o_, lse_ = _plain(o), _plain(lse)

    def launch(bm, bn, warps, stages):
        _fwd_jvp_kernel[(triton.cdiv(LQ, bm), B * H)](
            q, k, v, *tangents, o_, lse_, _plain(to),
            *_strides(q), *_strides(k), *_strides(v), *_strides(o_), *tangent_strides,
            H, LQ, LK, sm_scale, qk_scale, **flags, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, FP32_MATH=INTERPRET,
            PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)

    with _outside_transforms():
        _launch("fwd_jvp", D, q.dtype, launch)
    return o, lse, to
