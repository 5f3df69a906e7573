"""Flash attention in Triton: forward and backward, causal, GQA, sliding window, packed documents.

This is the FlashAttention-2 algorithm (Tri Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023), written to be read:

  forward   one program per (batch, query head, block of BLOCK_M queries). It walks the keys in
            blocks of BLOCK_N keeping a running max m, running sum l and an unnormalised output
            (the "online softmax"), so the T×T score matrix never exists in memory. Scores are kept
            in base 2 (log2(e) is folded into the scale, exp2 is what the hardware has). It saves
            the log-sum-exp per query row (base 2) for the backward.
  backward  three kernels and no atomics, so every result is bitwise reproducible:
            1. Δ = rowsum(dO ∘ O) per query row (the softmax backward's correction term);
            2. dK, dV: one program per (batch, KV head, block of keys) that recomputes P for every
               query block that can see its keys, over all G query heads sharing this KV head (GQA),
               so dK/dV are accumulated in registers and written once;
            3. dQ: one program per (batch, query head, block of queries), walking keys like forward.

Which key s a query t may see (always causal):
    s <= t  and  s >= doc_start[b, t] (packed documents)  and  t - s < window (sliding window)
The window has transformers' Mistral semantics: `window` keys including the query itself
(transformers.masking_utils: kv_idx > q_idx - sliding_window). Every loop is bounded by the first
and last block that can hold a visible pair, so a window costs O(T·window) and packed documents
cost the sum of squared document lengths, not T². Blocks where every pair is visible run without
building a mask; only blocks that cross the diagonal, the window edge, a document edge or the end of
the sequence pay for one.

Public API:
    flash_attention(q, k, v, doc_start=None, window=None, scale=None) -> o
    supports(q, k, v) -> bool     whether this kernel handles these tensors (else use SDPA)

On CPU it runs under the Triton interpreter: set TRITON_INTERPRET=1 before anything imports triton
(slow, for tests only; fp16/fp32, numpy has no bfloat16).
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
HEAD_DIMS = (16, 32, 64, 128)


def _interpreting():
    # Whether @triton.jit made interpreted functions instead of compiled kernels. Triton's own
    # helpers (tl.zeros, ...) are made when triton is first imported: TRITON_INTERPRET=1 set later
    # leaves them compiled, and the interpreter cannot run; so ask them, not the environment.
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_fwd_kernel, InterpretedFunction)


def _check_interpreter_numpy():
    # Triton's interpreter before 3.7 turns scalar tensors into Python ints with int() on a 1-element
    # array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars",
    # from deep inside the interpreter; seen with Triton 3.6 and NumPy 2.4.6, not 3.7 or NumPy 2.3.5).
    import numpy

    def major_minor(version):
        return tuple(int(part) for part in version.split(".")[:2])
    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run with "
                           f"NumPy {numpy.__version__}: pip install 'numpy<2.4', or a torch that comes with "
                           f"Triton 3.7 or newer")


# --------------------------------------------------------------------------------------------------
# Block sizes. Fixed per (head dim, dtype), not autotuned: a different block size sums in a different
# order, and we promise bitwise-identical results from run to run and process to process.
# Each entry: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M counts queries, BLOCK_N keys: the
# forward and dQ programs own BLOCK_M queries and step through keys BLOCK_N at a time; the dK/dV
# program owns BLOCK_N keys and steps through queries BLOCK_M at a time (it holds K, V, dK and dV,
# hence its small query steps at d128). Chosen so that no variant spills registers or overflows
# shared memory on sm_90 (`python bench/compile_check.py`); not yet timed on a GPU: retune with
# `python bench/attention.py --sweep` on an H100.

_GPU_CONFIGS = {
    # head dim: {kernel: config}, for 2-byte dtypes (fp16, bf16)
    16: dict(fwd=(128, 64, 4, 3), dkdv=(64, 64, 4, 3), dq=(64, 64, 4, 3)),
    32: dict(fwd=(128, 64, 4, 3), dkdv=(64, 64, 8, 3), dq=(64, 64, 4, 3)),  # dkdv at 4 warps: 24 B spill (window)
    64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 64, 8, 3)),
    128: dict(fwd=(128, 64, 8, 3), dkdv=(16, 128, 8, 2), dq=(128, 32, 8, 2)),
}
# Small tiles for fp32 on a GPU (IEEE fp32 products run on the CUDA cores and need many registers;
# fp32 on a GPU is for checking, not for speed) and for the interpreter (where every op is a numpy
# call, so only the number of blocks matters). BLOCK_M != BLOCK_N on purpose, so the tests exercise
# the block-boundary arithmetic in its general form.
_SMALL_CONFIG = dict(fwd=(32, 16, 4, 2), dkdv=(16, 32, 4, 2), dq=(32, 16, 4, 2))


def _config(head_dim, dtype):
    return _SMALL_CONFIG if _interpreting() or dtype == torch.float32 else _GPU_CONFIGS[head_dim]


# --------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _visible(t, s, t_doc_start, T, window, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Boolean tile: may query t see key s? t and s come broadcast ((M,1) and (1,N) or the transpose)."""
    ok = (s <= t) & (t < T)  # causal; also drops the padding rows past the end of the sequence
    if HAS_WINDOW:
        ok &= t - s < window
    if HAS_DOCS:
        ok &= s >= t_doc_start
    return ok


@triton.jit
def _query_block_bounds(m0, b, DOC_START, stride_db, T, window,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Key range for the queries [m0, m0 + BLOCK_M), split into three loops:
    [lo, mid_lo) masked, [mid_lo, mid_hi) every pair visible (no mask), [mid_hi, hi) masked."""
    last = tl.minimum(m0 + BLOCK_M, T) - 1  # last real query row of the block
    hi = last + 1  # causal: no key past the last query
    lo = 0  # first key any row can see
    full_lo = 0  # first key every row can see
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0)
        full_lo = tl.maximum(last - window + 1, 0)
    if HAS_DOCS:
        # doc_start is non-decreasing along T: the first row's is the smallest, the last row's the largest
        lo = tl.maximum(lo, tl.load(DOC_START + b * stride_db + m0))
        full_lo = tl.maximum(full_lo, tl.load(DOC_START + b * stride_db + last))
    lo = lo // BLOCK_N * BLOCK_N
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (m0 + 1) // BLOCK_N * BLOCK_N  # key blocks wholly at or left of the first row's diagonal
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, t_doc_start,
               start, stop, T, window, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN) scores, base 2
        if MASKED:
            ok = _visible(offs_m[:, None], offs_n[None, :], t_doc_start[:, None], T, window,
                          HAS_WINDOW, HAS_DOCS)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new  # what is subtracted from the scores
        if MASKED:
            # a row with nothing visible so far keeps m = -inf, but subtracts 0, so that exp2(-inf - -inf)
            # = NaN never happens and its p stays exactly 0. (Only the subtraction: a max stuck at 0 would
            # let exp2(s - 0) of very negative scores underflow in p's fp16, while l in fp32 does not.)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])  # (BM, BN)
        alpha = tl.exp2(m_i - m_sub)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, DOC_START,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_db,
                H, T, GROUP, window, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    # Grid (batch × head, query block): (batch × head) on axis 0, which has no 65535 limit, and the
    # heaviest (last) query blocks first, for every head at once: under causal masking they have the
    # most keys, and starting them early keeps the last wave of programs short.
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # GQA: the KV head this query head reads
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    t_doc_start = offs_m  # unused unless HAS_DOCS
    if HAS_DOCS:
        t_doc_start = tl.load(DOC_START + b * stride_db + offs_m, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running sum of exp2(score - m_i) · v

    lo, mid_lo, mid_hi, hi = _query_block_bounds(m0, b, DOC_START, stride_db, T, window,
                                                 BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_DOCS)
    if HAS_WINDOW or HAS_DOCS:  # left edge: the window or document starts inside these blocks
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                   t_doc_start, lo, mid_lo, T, window, qk_scale, BLOCK_N, HEAD_DIM,
                                   True, HAS_WINDOW, HAS_DOCS, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               t_doc_start, mid_lo, mid_hi, T, window, qk_scale, BLOCK_N, HEAD_DIM,
                               False, HAS_WINDOW, HAS_DOCS, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               t_doc_start, mid_hi, hi, T, window, qk_scale, BLOCK_N, HEAD_DIM,
                               True, HAS_WINDOW, HAS_DOCS, PRECISION)

    # A row that saw no key (only padding rows past T, or doc_start > t) gets o = 0 and lse = +inf,
    # which makes its probabilities exactly 0 in the backward too.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot,
                      stride_dob, stride_doh, stride_dot, H, T,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # Δ_t = Σ_d dO_td · O_td = Σ_s P_ts · dP_ts: what the softmax backward subtracts from dP.
    m0 = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC_START_B,
                    stride_qt, stride_dot, offs_n, start, stop, T, window, qk_scale,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    # Works in the transposed frame (keys × queries) so that dK and dV come out as (BLOCK_N, D)
    # products without transposing the accumulators.
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        if MASKED:
            row_ok = offs_m < T
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BN, BM) scores, base 2
        p_t = tl.exp2(s_t - lse[None, :])  # probabilities, recomputed from the saved log-sum-exp
        if MASKED:
            t_doc_start = offs_m
            if HAS_DOCS:
                t_doc_start = tl.load(DOC_START_B + offs_m, mask=offs_m < T, other=0)
            ok = _visible(offs_m[None, :], offs_n[:, None], t_doc_start[None, :], T, window,
                          HAS_WINDOW, HAS_DOCS)
            p_t = tl.where(ok, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += Pᵀ dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO Vᵀ)ᵀ
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P ∘ (dP - Δ), unscaled
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)  # dK += dSᵀ Q
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, Q_END,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                     stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                     stride_db, H, HKV, T, GROUP, window, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    # Grid (batch × KV head, key block). Key blocks near the start of the sequence are seen by the most
    # queries: run them first.
    n0 = tl.program_id(1) * BLOCK_N
    bh = tl.program_id(0)
    b = bh // HKV
    hk = bh % HKV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Query range for the keys [n0, n0 + BLOCK_N), split like the forward's key range:
    # [lo, mid_lo) masked (diagonal), [mid_lo, mid_hi) every pair visible, [mid_hi, hi) masked.
    last = tl.minimum(n0 + BLOCK_N, T) - 1  # last real key of the block
    lo = n0 // BLOCK_M * BLOCK_M  # causal: no query before the first key
    hi = T  # one past the last query any key can see
    full_hi = T  # one past the last query that sees every key
    if HAS_WINDOW:
        hi = tl.minimum(hi, last + window)
        full_hi = tl.minimum(full_hi, n0 + window)
    if HAS_DOCS:
        # Q_END[s] = number of rows t with doc_start[t] <= s: the end of the document holding s
        hi = tl.minimum(hi, tl.load(Q_END + b * stride_db + last))
        full_hi = tl.minimum(full_hi, tl.load(Q_END + b * stride_db + n0))
    full_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # query blocks wholly at or below the diagonal
    full_hi = full_hi // BLOCK_M * BLOCK_M
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)

    DOC_START_B = DOC_START + b * stride_db
    for g in range(GROUP):  # GQA: every query head that reads this KV head adds into dK, dV
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * T
        delta_base = DELTA + (b * H + h).to(tl.int64) * T
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC_START_B,
                                 stride_qt, stride_dot, offs_n, lo, mid_lo, T, window, qk_scale,
                                 BLOCK_M, HEAD_DIM, True, HAS_WINDOW, HAS_DOCS, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC_START_B,
                                 stride_qt, stride_dot, offs_n, mid_lo, mid_hi, T, window, qk_scale,
                                 BLOCK_M, HEAD_DIM, False, HAS_WINDOW, HAS_DOCS, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC_START_B,
                                 stride_qt, stride_dot, offs_n, mid_hi, hi, T, window, qk_scale,
                                 BLOCK_M, HEAD_DIM, True, HAS_WINDOW, HAS_DOCS, PRECISION)

    dk *= sm_scale  # S = scale · QKᵀ, so dK = scale · dSᵀ Q
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, t_doc_start,
                  start, stop, T, window, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            ok = _visible(offs_m[:, None], offs_n[None, :], t_doc_start[:, None], T, window,
                          HAS_WINDOW, HAS_DOCS)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # dQ += dS K
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC_START,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dqb, stride_dqh, stride_dqt, stride_db,
                   H, T, GROUP, window, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # heaviest blocks first
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    t_doc_start = offs_m
    if HAS_DOCS:
        t_doc_start = tl.load(DOC_START + b * stride_db + offs_m, mask=row_ok, other=0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    lo, mid_lo, mid_hi, hi = _query_block_bounds(m0, b, DOC_START, stride_db, T, window,
                                                 BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_DOCS)
    if HAS_WINDOW or HAS_DOCS:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                           t_doc_start, lo, mid_lo, T, window, qk_scale, BLOCK_N, HEAD_DIM,
                           True, HAS_WINDOW, HAS_DOCS, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                       t_doc_start, mid_lo, mid_hi, T, window, qk_scale, BLOCK_N, HEAD_DIM,
                       False, HAS_WINDOW, HAS_DOCS, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                       t_doc_start, mid_hi, hi, T, window, qk_scale, BLOCK_N, HEAD_DIM,
                       True, HAS_WINDOW, HAS_DOCS, PRECISION)

    dq *= sm_scale  # dQ = scale · dS K
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# the two custom ops (forward, backward) and the public function

def _last_dim_contiguous(x):
    # the kernels index (b, h, t) by stride and assume the head dim is packed (16-byte loads)
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_bthd(B, H, T, D, like):
    # (B, T, H, D) memory seen as (B, H, T, D): model.py's o.transpose(1, 2).reshape(B, T, H*D) is free
    return torch.empty(B, T, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


# The forward and the backward are PyTorch custom ops (torch.library), tied together by
# register_autograd: torch.compile then sees one opaque op per attention call (no graph break, no
# tracing into the launches), and the fake implementations give it the output shapes and strides.

def _device_guard(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()  # launch on x's GPU


def _flags(q, doc_start, window):
    return dict(HAS_WINDOW=window > 0, HAS_DOCS=doc_start is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 tests must not use TF32


@torch.library.custom_op("nanoadapt::flash_attention_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor],
             window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, T, D) and the base-2 log-sum-exp (B, Hq, T) fp32. q, k, v with the head dim packed
    (flash_attention sees to it); doc_start: (B, T) int32 or None; window: 0 for none."""
    B, H, T, D = q.shape
    HKV = k.shape[1]
    docs = doc_start if doc_start is not None else torch.empty(1, device=q.device, dtype=torch.int32)  # never read
    o = _empty_bthd(B, H, T, D, q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    BM, BN, warps, stages = _config(D, q.dtype)["fwd"]
    with _device_guard(q):
        _fwd_kernel[(B * H, triton.cdiv(T, BM))](
            q, k, v, o, lse, docs,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], docs.stride(0),
            H, T, H // HKV, window, scale * LOG2_E,
            HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, **_flags(q, doc_start, window), num_warps=warps, num_stages=stages)
    return o, lse


@_forward.register_fake
def _(q, k, v, doc_start, window, scale):
    B, H, T, D = q.shape
    return _empty_bthd(B, H, T, D, q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nanoadapt::flash_attention_backward", mutates_args=())
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, doc_start: Optional[torch.Tensor], window: int, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv: Δ = rowsum(dO ∘ O), then the dK/dV kernel, then the dQ kernel."""
    B, H, T, D = q.shape
    HKV = k.shape[1]
    do = _last_dim_contiguous(do)                  # (q, k, v are saved as the forward got them: packed)
    if T * do.stride(2) >= 2**31:  # row offsets are int32: lay dO out as (B, T, H, D), like o
        do = do.transpose(1, 2).contiguous().transpose(1, 2)
    if doc_start is not None:
        # q_end[b, s] = number of rows t with doc_start[b, t] <= s: for a key s, every query that
        # can see it lies before q_end (the dK/dV kernel stops its query loop there)
        positions = torch.arange(T, device=q.device, dtype=torch.int32).expand(B, T).contiguous()
        docs, q_end = doc_start, torch.searchsorted(doc_start, positions, right=True, out_int32=True)
    else:
        docs = q_end = torch.empty(1, device=q.device, dtype=torch.int32)  # never read
    cfg = _config(D, q.dtype)
    flags = _flags(q, doc_start, window)
    qk_scale = scale * LOG2_E
    delta = torch.empty_like(lse)  # (B, H, T) fp32
    dq = _empty_bthd(B, H, T, D, q)
    dk = _empty_bthd(B, HKV, T, D, k)
    dv = _empty_bthd(B, HKV, T, D, v)
    with _device_guard(q):
        BM = 64
        _bwd_delta_kernel[(B * H, triton.cdiv(T, BM))](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T, HEAD_DIM=D, BLOCK_M=BM)
        BM, BN, warps, stages = cfg["dkdv"]
        _bwd_dkdv_kernel[(B * HKV, triton.cdiv(T, BN))](
            q, k, v, do, lse, delta, dk, dv, docs, q_end,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], docs.stride(0),
            H, HKV, T, H // HKV, window, qk_scale, scale,
            HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, **flags, num_warps=warps, num_stages=stages)
        BM, BN, warps, stages = cfg["dq"]
        _bwd_dq_kernel[(B * H, triton.cdiv(T, BM))](
            q, k, v, do, lse, delta, dq, docs,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], docs.stride(0),
            H, T, H // HKV, window, qk_scale, scale,
            HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, **flags, num_warps=warps, num_stages=stages)
    return dq, dk, dv


@_backward.register_fake
def _(do, q, k, v, o, lse, doc_start, window, scale):
    B, H, T, D = q.shape
    HKV = k.shape[1]
    return _empty_bthd(B, H, T, D, q), _empty_bthd(B, HKV, T, D, k), _empty_bthd(B, HKV, T, D, v)


def _setup_context(ctx, inputs, output):
    q, k, v, doc_start, window, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], doc_start)
    ctx.window, ctx.scale = window, scale
    ctx.set_materialize_grads(False)               # lse gets no gradient: no (B, H, T) of zeros for it


def _backward_rule(ctx, do, _dlse):
    q, k, v, o, lse, doc_start = ctx.saved_tensors
    dq, dk, dv = _backward(do, q, k, v, o, lse, doc_start, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def supports(q, k, v):
    """True when flash_attention handles these tensors; otherwise use F.scaled_dot_product_attention."""
    if not (q.dim() == k.dim() == v.dim() == 4) or k.shape != v.shape:
        return False
    B, H, T, D = q.shape
    if T == 0 or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or H % k.shape[1] != 0:
        return False  # no KV cache (queries and keys must cover the same positions)
    if T * max(H * D, *(x.stride(2) for x in (q, k, v))) >= 2**31:
        return False  # row offsets are int32 inside the kernels (o and dQ are laid out (B, T, H, D))
    if D not in HEAD_DIMS or not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return False
    if q.device.type == "cuda":
        if q.dtype == torch.bfloat16:
            return torch.cuda.get_device_capability(q.device)[0] >= 8
        return q.dtype in (torch.float16, torch.float32)
    if q.device.type == "cpu" and _interpreting():
        return q.dtype in (torch.float16, torch.float32)  # numpy has no bfloat16
    return False


def flash_attention(q, k, v, doc_start=None, window=None, scale=None):
    """Causal attention softmax(scale · q kᵀ + mask) v without materialising the T×T matrix.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0 (GQA: query head h reads KV head
    h // (Hq // Hkv)). Any strides with the head dim packed (e.g. x.view(B, T, H, D).transpose(1, 2)).
    doc_start: optional int tensor (B, T), non-decreasing along T: the first position of each
    position's document (packed sequences). A value > t makes row t see nothing (its output is 0).
    window: optional int W >= 1, transformers' Mistral sliding window: W keys, the query included.
    Query t sees key s iff s <= t, s >= doc_start[b, t] and t - s < W.
    scale: defaults to D ** -0.5.
    Returns o: (B, Hq, T, D) in q's dtype (memory laid out as (B, T, Hq, D)); differentiable in q, k, v.
    """
    if not supports(q, k, v):
        raise ValueError(f"flash_attention does not support q {tuple(q.shape)} {q.dtype} {q.device}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} (see supports())")
    if q.device.type == "cpu":
        _check_interpreter_numpy()
    B, H, T, D = q.shape
    if doc_start is not None and tuple(doc_start.shape) != (B, T):
        raise ValueError(f"doc_start must have shape {(B, T)}, got {tuple(doc_start.shape)}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    scale = D ** -0.5 if scale is None else float(scale)
    if doc_start is not None:
        doc_start = doc_start.to(device=q.device, dtype=torch.int32).contiguous()  # (B, T)
    window = int(window) if window is not None and window < T else 0  # a window >= T hides nothing
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))                # (saved so for the backward too)
    return _forward(q, k, v, doc_start, window, scale)[0]
