"""Triton kernels for chunked linear attention (Lightning Attention-2, GLA), non-causal and single-step forms.

Schedule (fla-style, two passes). The sequence is cut into chunks of BT = 64 positions.
1. ``state`` kernels, one program per (K tile, V tile, sequence * head), walk the chunks in order and write
   the state *before* each chunk to HBM (``hs`` [chunks, H, K, V]); the walk's loop-carried work is one
   elementwise fma per chunk, the chunk's k^T v product does not depend on it and pipelines.
2. Every chunk's outputs are then computed in parallel (grid over V tiles x chunks x heads):
   o = scale * (q * decay) @ h + (masked intra-chunk scores) @ v.
Parallelism of the heavy part is B * H * T / 64 programs, independent of the batch size, so throughput
stays flat in T and small batches at long T fill the GPU. The single-pass alternative (one program per
(b, h, V tile) that also computes the outputs) has only B * H * V/BV programs.

Gates. Lightning (``SCALAR`` kernels): a per-head slope s, log-gate -s at every position, so every decay
is exp(-s * distance) computed from indices; nothing of size [B, T, H, K] is read. GLA (``vector``
kernels): chunk-local inclusive cumsums of the log-gates ``gc`` are precomputed (fp32); exponentials are
re-anchored (chunk start, chunk end, or a 16-row sub-chunk boundary) so that each is exp(x) with x <= 0.
The intra-chunk scores of GLA are computed per 16 x 16 sub-block: off-diagonal blocks as tensor-core
matmuls of anchored operands, the diagonal blocks elementwise in fp32 one column at a time.

Backward recomputes the states (and, for GLA, the intra scores) instead of storing them, and runs one
reverse walk over the chunks for the state gradients ``dhs`` (gradient of the state *after* each chunk);
the gate gradient is dg = reverse-cumsum over the chunk of (q*dq - k*dk) plus, at the chunk's last row,
sum_v(dH * h_next) (see docs/linear.md). Nothing uses atomics: the backward is deterministic.

Varlen: sequences are packed ([1, total, H, D], ``cu_seqlens``); a chunk table maps the global chunk
index to (sequence, chunk in sequence), and chunks never straddle sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_numerics import masked_dot
from ..._triton_utils import configs, dot_precision, interpreter_enabled
from .common import LOG_GATE_FLOOR

CHUNK = 64  # BT: positions per chunk
SUB = 16  # BC: rows per sub-chunk of the GLA intra-chunk products (tl.dot needs >= 16)
NONCAUSAL_SEGMENT = 512  # positions summed by one program of the non-causal state kernel
_FLOOR = tl.constexpr(LOG_GATE_FLOOR)  # jit code may only read constexpr globals


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN: tl.constexpr):
    """(sequence, batch row, first token of the sequence, its length, chunk index in it) of global chunk
    ``pid_c``. Dense inputs: sequence == batch row, tokens start at 0."""
    if IS_VARLEN:
        n = tl.load(CHUNK_IDX + pid_c * 2)
        i = tl.load(CHUNK_IDX + pid_c * 2 + 1)
        bos = tl.load(CU + n)
        seqlen = tl.load(CU + n + 1) - bos
        b = 0
    else:
        i = pid_c % n_chunks
        n = pid_c // n_chunks
        b = n
        bos = 0
    return n, b, bos, seqlen, i


@triton.jit
def _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN: tl.constexpr, BT: tl.constexpr):
    """(batch row, first token of the sequence, its length, first token of the chunk, tokens in the chunk,
    row offsets [BT], row mask [BT]) of global chunk ``pid_c``."""
    n, b, bos, seqlen, i = _chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    length = tl.minimum(seqlen - t0, BT)
    offs_t = tl.arange(0, BT)
    return b, bos, seqlen, t0, length, offs_t, offs_t < length


@triton.jit
def _seq_coords(n, CU, CHUNK_OFF, seqlen, n_chunks, IS_VARLEN: tl.constexpr):
    """(batch row, first token, length, global index of its first chunk, number of chunks) of sequence n."""
    if IS_VARLEN:
        bos = tl.load(CU + n)
        seqlen = tl.load(CU + n + 1) - bos
        first = tl.load(CHUNK_OFF + n)
        count = tl.load(CHUNK_OFF + n + 1) - first
        b = 0
    else:
        bos = 0
        first = n * n_chunks
        count = n_chunks
        b = n
    return b, bos, seqlen, first, count


@triton.jit
def _row_base(PTR, b, bos, t0, h, stride_b, stride_t, stride_h):
    """Pointer to row t0 of the sequence starting at token ``bos`` of batch row b, head h (int64 offsets)."""
    return (PTR + tl.cast(b, tl.int64) * stride_b + tl.cast(bos + t0, tl.int64) * stride_t
            + tl.cast(h, tl.int64) * stride_h)


@triton.jit
def _buf_base(PTR, b, bos, t0, h, seqlen, row_stride, head_stride):
    """Row t0 of a buffer allocated here as contiguous [B, T, H, X] (row_stride = H * X, head_stride = X);
    seqlen is T for dense inputs (varlen inputs have a single batch row)."""
    return PTR + (tl.cast(b, tl.int64) * seqlen + tl.cast(bos + t0, tl.int64)) * row_stride + h * head_stride


@triton.jit
def _tile_mask(row_ok, col_ok, EVEN_COL: tl.constexpr):
    """Mask of an [R, C] tile contiguous along C. When C is known to be in bounds (EVEN_COL) only the rows are
    masked: a mask that varies along the contiguous dimension stops loads and stores from vectorizing."""
    if EVEN_COL:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & col_ok[None, :]
    return mask


@triton.jit
def _tile_mask_t(row_ok, col_ok, EVEN_COL: tl.constexpr):
    """Mask of the transposed tile [C, R] (still contiguous along C)."""
    if EVEN_COL:
        mask = row_ok[None, :]
    else:
        mask = col_ok[:, None] & row_ok[None, :]
    return mask


@triton.jit
def _load_tile(base, stride_t, offs_t, t_ok, offs_d, d_ok, EVEN_D: tl.constexpr):
    """[BT, BD] tile of rows offs_t (stride stride_t) and contiguous columns offs_d; zeros where masked."""
    return tl.load(base + offs_t[:, None] * stride_t + offs_d[None, :], mask=_tile_mask(t_ok, d_ok, EVEN_D),
                   other=0.0)


@triton.jit
def _load_tile_t(base, stride_t, offs_t, t_ok, offs_d, d_ok, EVEN_D: tl.constexpr):
    """The transposed tile [BD, BT]."""
    return tl.load(base + offs_t[None, :] * stride_t + offs_d[:, None], mask=_tile_mask_t(t_ok, d_ok, EVEN_D),
                   other=0.0)


@triton.jit
def _state_ptrs(HS, chunk, h, num_heads, offs_k, offs_v, K_DIM: tl.constexpr, V_DIM: tl.constexpr):
    """[BK, BV] pointers into a per-chunk state buffer [chunks, H, K, V]."""
    base = HS + tl.cast(chunk * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    return base + offs_k[:, None] * V_DIM + offs_v[None, :]


@triton.jit
def _state_ptrs_t(HS, chunk, h, num_heads, offs_k, offs_v, K_DIM: tl.constexpr, V_DIM: tl.constexpr):
    """[BV, BK] pointers (transposed view) into a per-chunk state buffer."""
    base = HS + tl.cast(chunk * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    return base + offs_k[None, :] * V_DIM + offs_v[:, None]


@triton.jit
def _slope(SLOPES, h):
    # Capped like the log-gates so that exp(-slope * distance) stays finite and never inf * 0; a NaN or
    # negative (out of domain) slope is NaN (selects: tl.minimum would turn NaN into the cap).
    slope = tl.load(SLOPES + h).to(tl.float32)
    slope = tl.where(slope > -_FLOOR, -_FLOOR, slope)
    return tl.where(slope < 0, float("nan"), slope)


# ------------------------------------------------------------------------------------- GLA gate cumsum
@triton.jit
def gla_gate_cumsum_kernel(
    G, GC, CU, CHUNK_IDX, stride_gb, stride_gt, stride_gh, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    """gc = inclusive cumsum of max(g, floor) from the start of each chunk (fp32, [B, T, H, K] contiguous)."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    pid_c, pid_k, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, b, bos, seqlen, i = _chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    t_ok = t0 + offs_t < seqlen
    k_ok = offs_k < K_DIM
    g = _load_tile(_row_base(G, b, bos, t0, h, stride_gb, stride_gt, stride_gh), stride_gt,
                   offs_t, t_ok, offs_k, k_ok, EVEN_K)
    g = g.to(tl.float32)
    g = tl.where(g < _FLOOR, _FLOOR, g)  # NaN stays NaN
    g = tl.where(g > 0, float("nan"), g)  # out of domain: NaN from here on, as on every backend
    gc = tl.cumsum(g, axis=0)
    gc_base = _buf_base(GC, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM)
    tl.store(gc_base + offs_t[:, None] * (num_heads * K_DIM) + offs_k[None, :], gc, mask=_tile_mask(t_ok, k_ok, EVEN_K))


# --------------------------------------------------------------------------------- state walks (fwd/bwd)
@triton.jit
def linear_attn_fwd_kernel_state(
    K, V, GC, SLOPES, H0, HS, HT, CU, CHUNK_OFF,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """hs[chunk] = state before the chunk; ht = final state (fp32). S <- decay(chunk) S + (k * decay_to_end)^T v."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_nh, pid_k, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_nh // num_heads
    h = pid_nh % num_heads
    b, bos, seqlen, first, count = _seq_coords(n, CU, CHUNK_OFF, seqlen, n_chunks, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < K_DIM
    v_ok = offs_v < V_DIM
    kv_ok = _tile_mask(k_ok, v_ok, EVEN_V)
    state_off = offs_k[:, None] * V_DIM + offs_v[None, :]
    seq_state = tl.cast(n * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = tl.load(H0 + seq_state + state_off, mask=kv_ok, other=0.0).to(tl.float32)
    slope = 0.0
    if SCALAR:
        slope = _slope(SLOPES, h)
    for i in range(count):
        tl.store(_state_ptrs(HS, first + i, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                 state.to(HS.dtype.element_ty), mask=kv_ok)
        t0 = i * BT
        length = tl.minimum(seqlen - t0, BT)
        t_ok = offs_t < length
        k_t = _load_tile_t(_row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh), stride_kt,
                           offs_t, t_ok, offs_k, k_ok, EVEN_K)  # [BK, BT]
        v = _load_tile(_row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh), stride_vt,
                       offs_t, t_ok, offs_v, v_ok, EVEN_V)
        if SCALAR:
            to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
            k_dec = k_t * to_end[None, :]
            state = state * tl.exp(-slope * length.to(tl.float32))
        else:
            gc_base = _buf_base(GC, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM)
            gc_t = _load_tile_t(gc_base, num_heads * K_DIM, offs_t, t_ok, offs_k, k_ok, EVEN_K)
            g_last = tl.load(gc_base + (length - 1) * (num_heads * K_DIM) + offs_k, mask=k_ok, other=0.0)
            k_dec = k_t * tl.exp(g_last[:, None] - gc_t)
            state = state * tl.exp(g_last)[:, None]
        state += tl.dot(k_dec.to(v.dtype), v, input_precision=DOT)
    if STORE_FINAL:
        tl.store(HT + seq_state + state_off, state, mask=kv_ok)


@triton.jit
def linear_attn_bwd_kernel_state(
    Q, DO, GC, SLOPES, DHT, DHS, DH0, CU, CHUNK_OFF,
    stride_qb, stride_qt, stride_qh, stride_db, stride_dt, stride_dh,
    scale, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Reverse walk: dhs[chunk] = dL/d(state after the chunk); dh0 = dL/d(initial state).
    D <- decay(chunk) D + scale * (q * decay_from_start)^T do."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_nh, pid_k, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_nh // num_heads
    h = pid_nh % num_heads
    b, bos, seqlen, first, count = _seq_coords(n, CU, CHUNK_OFF, seqlen, n_chunks, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < K_DIM
    v_ok = offs_v < V_DIM
    kv_ok = _tile_mask(k_ok, v_ok, EVEN_V)
    state_off = offs_k[:, None] * V_DIM + offs_v[None, :]
    seq_state = tl.cast(n * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state = tl.load(DHT + seq_state + state_off, mask=kv_ok, other=0.0).to(tl.float32)
    slope = 0.0
    if SCALAR:
        slope = _slope(SLOPES, h)
    for j in range(count):
        i = count - 1 - j
        tl.store(_state_ptrs(DHS, first + i, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                 d_state.to(DHS.dtype.element_ty), mask=kv_ok)
        t0 = i * BT
        length = tl.minimum(seqlen - t0, BT)
        t_ok = offs_t < length
        q_t = _load_tile_t(_row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh), stride_qt,
                           offs_t, t_ok, offs_k, k_ok, EVEN_K)  # [BK, BT]
        do = _load_tile(_row_base(DO, b, bos, t0, h, stride_db, stride_dt, stride_dh), stride_dt,
                        offs_t, t_ok, offs_v, v_ok, EVEN_V)
        if SCALAR:
            from_start = tl.exp(-slope * (offs_t + 1).to(tl.float32)) * scale
            q_dec = q_t * from_start[None, :]
            d_state = d_state * tl.exp(-slope * length.to(tl.float32))
        else:
            gc_base = _buf_base(GC, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM)
            gc_t = _load_tile_t(gc_base, num_heads * K_DIM, offs_t, t_ok, offs_k, k_ok, EVEN_K)
            g_last = tl.load(gc_base + (length - 1) * (num_heads * K_DIM) + offs_k, mask=k_ok, other=0.0)
            q_dec = q_t * (tl.exp(gc_t) * scale)
            d_state = d_state * tl.exp(g_last)[:, None]
        d_state += tl.dot(q_dec.to(do.dtype), do, input_precision=DOT)
    if STORE_DH0:
        tl.store(DH0 + seq_state + state_off, d_state, mask=kv_ok)


# ------------------------------------------------------------------------------ Lightning (scalar decay)
@triton.jit
def lightning_fwd_kernel_output(
    Q, K, V, SLOPES, HS, O, CU, CHUNK_IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, scale, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """o = scale * [(q * lambda^(r+1)) h + ((q k^T) * D) v] with D[r, c] = lambda^(r-c) for c <= r."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    q_base = _row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = _row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        q = _load_tile(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        k_t = _load_tile_t(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        state = tl.load(_state_ptrs(HS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                        mask=_tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        acc += tl.dot(q, state.to(q.dtype), input_precision=DOT)
        scores += tl.dot(q, k_t, input_precision=DOT)
    slope = _slope(SLOPES, h)
    rows = offs_t.to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, -slope * (rows[:, None] - rows[None, :]), float("-inf")))
    v = _load_tile(_row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh), stride_vt,
                   offs_t, t_ok, offs_v, v_ok, EVEN_V)
    out = acc * (tl.exp(-slope * (rows + 1.0)) * scale)[:, None]
    # Selects, not products with a 0 mask: a NaN/Inf k or v of a later row must not reach earlier rows.
    out = masked_dot(tl.where(causal, scores * decay * scale, 0.0), v, causal, out, DOT)
    o_base = _row_base(O, b, bos, t0, h, stride_ob, stride_ot, stride_oh)
    tl.store(o_base + offs_t[:, None] * stride_ot + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=_tile_mask(t_ok, v_ok, EVEN_V))


@triton.jit
def lightning_bwd_kernel_dv(
    Q, K, DO, SLOPES, DHS, DV, CU, CHUNK_IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_db, stride_dt, stride_dh,
    stride_vb, stride_vt, stride_vh, scale, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """dv_c = scale * sum_{r>=c} lambda^(r-c) (q_r . k_c) do_r + lambda^(L-1-c) k_c dH."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    slope = _slope(SLOPES, h)
    rows = offs_t.to(tl.float32)
    to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
    q_base = _row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = _row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    scores_t = tl.zeros([BT, BT], dtype=tl.float32)  # [c, r]
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        k = _load_tile(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        q_t = _load_tile_t(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        d_state = tl.load(_state_ptrs(DHS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=_tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        scores_t += tl.dot(k, q_t, input_precision=DOT)
        acc += tl.dot((k * to_end[:, None]).to(k.dtype), d_state.to(k.dtype), input_precision=DOT)
    causal_t = offs_t[:, None] <= offs_t[None, :]  # c <= r
    decay_t = tl.exp(tl.where(causal_t, -slope * (rows[None, :] - rows[:, None]), float("-inf")))
    do = _load_tile(_row_base(DO, b, bos, t0, h, stride_db, stride_dt, stride_dh), stride_dt,
                    offs_t, t_ok, offs_v, v_ok, EVEN_V)
    acc += tl.dot((scores_t * decay_t * scale).to(do.dtype), do, input_precision=DOT)
    dv_base = _row_base(DV, b, bos, t0, h, stride_vb, stride_vt, stride_vh)
    tl.store(dv_base + offs_t[:, None] * stride_vt + offs_v[None, :], acc.to(DV.dtype.element_ty),
             mask=_tile_mask(t_ok, v_ok, EVEN_V))


@triton.jit
def lightning_bwd_kernel_dqdk(
    Q, K, V, DO, SLOPES, HS, DHS, DQ, DK, CU, CHUNK_IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_db, stride_dt, stride_dh, stride_gb, stride_gt, stride_gh,
    scale, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """dq = scale lambda^(r+1) do h^T + dA k,  dk = lambda^(L-1-c) v dH^T + dA^T q,
    with dA = scale * (do v^T) * D. dq/dk share the strides (stride_g*) of fresh [B, T, H, K] buffers."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_c, pid_k, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    v_base = _row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh)
    do_base = _row_base(DO, b, bos, t0, h, stride_db, stride_dt, stride_dh)
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        do = _load_tile(do_base, stride_dt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        v = _load_tile(v_base, stride_vt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        state_t = tl.load(_state_ptrs_t(HS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=_tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)  # [BV, BK]
        d_state_t = tl.load(_state_ptrs_t(DHS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                            mask=_tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)
        d_scores += tl.dot(do, tl.trans(v), input_precision=DOT)
        dq += tl.dot(do, state_t.to(do.dtype), input_precision=DOT)
        dk += tl.dot(v, d_state_t.to(v.dtype), input_precision=DOT)
    slope = _slope(SLOPES, h)
    rows = offs_t.to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, -slope * (rows[:, None] - rows[None, :]), float("-inf")))
    d_scores = d_scores * decay * scale
    q = _load_tile(_row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh), stride_qt,
                   offs_t, t_ok, offs_k, k_ok, EVEN_K)
    k = _load_tile(_row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh), stride_kt,
                   offs_t, t_ok, offs_k, k_ok, EVEN_K)
    to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
    dq = dq * (tl.exp(-slope * (rows + 1.0)) * scale)[:, None]
    dq += tl.dot(d_scores.to(k.dtype), k, input_precision=DOT)
    dk = dk * to_end[:, None]
    dk += tl.dot(tl.trans(d_scores).to(q.dtype), q, input_precision=DOT)
    mask = _tile_mask(t_ok, k_ok, EVEN_K)
    offs = offs_t[:, None] * stride_gt + offs_k[None, :]
    tl.store(_row_base(DQ, b, bos, t0, h, stride_gb, stride_gt, stride_gh) + offs,
             dq.to(DQ.dtype.element_ty), mask=mask)
    tl.store(_row_base(DK, b, bos, t0, h, stride_gb, stride_gt, stride_gh) + offs,
             dk.to(DK.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ GLA (vector)
@triton.jit
def gla_fwd_kernel_intra(
    Q, K, GC, A, CU, CHUNK_IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    scale, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    """Rows of sub-chunk s of the intra-chunk scores A[r, c] = scale sum_k q_rk k_ck exp(gc_rk - gc_ck), c <= r
    ([B, T, H, BT] fp32; every column of a valid row is written, zeros above the diagonal)."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    pid_c, s, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, b, bos, seqlen, i = _chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    length = tl.minimum(seqlen - t0, BT)
    if s * BC >= length:
        return
    gc_stride = num_heads * K_DIM
    a_stride = num_heads * BT
    offs_c = tl.arange(0, BC)
    rows = s * BC + offs_c
    r_ok = rows < length
    q_base = _row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = _row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh)
    gc_base = _buf_base(GC, b, bos, t0, h, seqlen, gc_stride, K_DIM)
    a_ptrs = _buf_base(A, b, bos, t0, h, seqlen, a_stride, BT) + rows[:, None] * a_stride + offs_c[None, :]
    # Off-diagonal blocks j < s: anchored at the first row of sub-chunk s (gc_c >= gc_anchor >= gc_r).
    for j in range(s):
        cols = j * BC + offs_c
        acc = tl.zeros([BC, BC], dtype=tl.float32)
        for kt in range(tl.cdiv(K_DIM, BK)):
            offs_k = kt * BK + tl.arange(0, BK)
            k_ok = offs_k < K_DIM
            q = _load_tile(q_base, stride_qt, rows, r_ok, offs_k, k_ok, EVEN_K)
            g_r = _load_tile(gc_base, gc_stride, rows, r_ok, offs_k, k_ok, EVEN_K)
            g_anchor = tl.load(gc_base + (s * BC) * gc_stride + offs_k, mask=k_ok, other=0.0)
            k_t = _load_tile_t(k_base, stride_kt, cols, cols < length, offs_k, k_ok, EVEN_K)
            g_c = _load_tile_t(gc_base, gc_stride, cols, cols < length, offs_k, k_ok, EVEN_K)
            q_scaled = q * tl.exp(tl.where(r_ok[:, None], g_r - g_anchor[None, :], float("-inf")))
            k_scaled = k_t * tl.exp(g_anchor[:, None] - g_c)
            acc += tl.dot(q_scaled.to(q.dtype), k_scaled.to(q.dtype), input_precision=DOT)
        tl.store(a_ptrs + j * BC, acc * scale, mask=r_ok[:, None])
    # Diagonal block, elementwise in fp32 as one [r, c, k] product per K tile (c <= r; invalid rows masked).
    causal = (offs_c[:, None] >= offs_c[None, :]) & r_ok[:, None]
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        q = _load_tile(q_base, stride_qt, rows, r_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
        k = _load_tile(k_base, stride_kt, rows, r_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
        g = _load_tile(gc_base, gc_stride, rows, r_ok, offs_k, k_ok, EVEN_K)
        weight = tl.exp(tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], float("-inf")))
        # a select, not 0 * k: a NaN/Inf key of a later row must not reach earlier rows
        acc += tl.sum(tl.where(causal[:, :, None], q[:, None, :] * k[None, :, :] * weight, 0.0), axis=2)
    tl.store(a_ptrs + s * BC, acc * scale, mask=r_ok[:, None])
    zeros = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(s + 1, BT // BC):
        tl.store(a_ptrs + j * BC, zeros, mask=r_ok[:, None])


@triton.jit
def gla_fwd_kernel_output(
    Q, V, GC, A, HS, O, CU, CHUNK_IDX,
    stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    scale, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """o = scale * (q * exp(gc)) h + A v."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    gc_stride = num_heads * K_DIM
    q_base = _row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh)
    gc_base = _buf_base(GC, b, bos, t0, h, seqlen, gc_stride, K_DIM)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        q = _load_tile(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        g = _load_tile(gc_base, gc_stride, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        state = tl.load(_state_ptrs(HS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                        mask=_tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        acc += tl.dot((q * tl.exp(g)).to(q.dtype), state.to(q.dtype), input_precision=DOT)
    a_stride = num_heads * BT
    scores = _load_tile(_buf_base(A, b, bos, t0, h, seqlen, a_stride, BT), a_stride,
                        offs_t, t_ok, offs_t, offs_t < BT, True)
    v = _load_tile(_row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh), stride_vt,
                   offs_t, t_ok, offs_v, v_ok, EVEN_V)
    # scores are 0 above the diagonal; a NaN/Inf v of a later row must still not reach earlier rows
    out = masked_dot(scores, v, offs_t[:, None] >= offs_t[None, :], acc * scale, DOT)
    o_base = _row_base(O, b, bos, t0, h, stride_ob, stride_ot, stride_oh)
    tl.store(o_base + offs_t[:, None] * stride_ot + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=_tile_mask(t_ok, v_ok, EVEN_V))


@triton.jit
def gla_bwd_kernel_dv(
    K, DO, GC, A, DHS, DV, CU, CHUNK_IDX,
    stride_kb, stride_kt, stride_kh, stride_db, stride_dt, stride_dh, stride_vb, stride_vt, stride_vh,
    seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """dv = A^T do + (k * exp(gl - gc)) dH."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    gc_stride = num_heads * K_DIM
    k_base = _row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh)
    gc_base = _buf_base(GC, b, bos, t0, h, seqlen, gc_stride, K_DIM)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        k = _load_tile(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        g = _load_tile(gc_base, gc_stride, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        g_last = tl.load(gc_base + (length - 1) * gc_stride + offs_k, mask=k_ok, other=0.0)
        d_state = tl.load(_state_ptrs(DHS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=_tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        k_dec = k * tl.exp(tl.where(t_ok[:, None], g_last[None, :] - g, float("-inf")))
        acc += tl.dot(k_dec.to(k.dtype), d_state.to(k.dtype), input_precision=DOT)
    a_stride = num_heads * BT
    scores_t = _load_tile_t(_buf_base(A, b, bos, t0, h, seqlen, a_stride, BT), a_stride, offs_t, t_ok, offs_t,
                            offs_t < BT, True)  # [c, r]
    do = _load_tile(_row_base(DO, b, bos, t0, h, stride_db, stride_dt, stride_dh), stride_dt,
                    offs_t, t_ok, offs_v, v_ok, EVEN_V)
    acc += tl.dot(scores_t.to(do.dtype), do, input_precision=DOT)
    dv_base = _row_base(DV, b, bos, t0, h, stride_vb, stride_vt, stride_vh)
    tl.store(dv_base + offs_t[:, None] * stride_vt + offs_v[None, :], acc.to(DV.dtype.element_ty),
             mask=_tile_mask(t_ok, v_ok, EVEN_V))


@triton.jit
def gla_bwd_kernel_dscores(
    V, DO, DA, CU, CHUNK_IDX, stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh,
    scale, seqlen, n_chunks, num_heads,
    V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """dA[r, c] = scale * do_r . v_c for c <= r (fp32 [B, T, H, BT])."""
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_c, h = tl.program_id(0), tl.program_id(1)
    b, bos, seqlen, t0, length, offs_t, t_ok = _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    v_base = _row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh)
    do_base = _row_base(DO, b, bos, t0, h, stride_db, stride_dt, stride_dh)
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        do = _load_tile(do_base, stride_dt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        v_t = _load_tile_t(v_base, stride_vt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        acc += tl.dot(do, v_t, input_precision=DOT)
    acc = tl.where(offs_t[:, None] >= offs_t[None, :], acc * scale, 0.0)
    a_stride = num_heads * BT
    da_base = _buf_base(DA, b, bos, t0, h, seqlen, a_stride, BT)
    tl.store(da_base + offs_t[:, None] * a_stride + offs_t[None, :], acc, mask=t_ok[:, None])


@triton.jit
def gla_bwd_kernel_intra(
    Q, K, GC, DA, DQ, DK, CU, CHUNK_IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    """Intra-chunk parts for sub-chunk s (fp32 [B, T, H, K] outputs):
    dq_r = sum_{c<=r} dA_rc k_c exp(gc_r - gc_c),  dk_c = sum_{r>=c} dA_rc q_r exp(gc_r - gc_c)."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    pid_c, pid_ks, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_sub: tl.constexpr = BT // BC
    pid_k = pid_ks // n_sub
    s = pid_ks % n_sub
    n, b, bos, seqlen, i = _chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    length = tl.minimum(seqlen - t0, BT)
    if s * BC >= length:
        return
    gc_stride = num_heads * K_DIM
    a_stride = num_heads * BT
    offs_c = tl.arange(0, BC)
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    rows = s * BC + offs_c
    r_ok = rows < length
    q_base = _row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = _row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh)
    gc_base = _buf_base(GC, b, bos, t0, h, seqlen, gc_stride, K_DIM)
    da_base = _buf_base(DA, b, bos, t0, h, seqlen, a_stride, BT)
    g_s = _load_tile(gc_base, gc_stride, rows, r_ok, offs_k, k_ok, EVEN_K)
    q_s = _load_tile(q_base, stride_qt, rows, r_ok, offs_k, k_ok, EVEN_K)
    k_s = _load_tile(k_base, stride_kt, rows, r_ok, offs_k, k_ok, EVEN_K)

    # dq, off-diagonal (columns of earlier sub-chunks), anchored at the first row of s.
    dq = tl.zeros([BC, BK], dtype=tl.float32)
    g_first = tl.load(gc_base + (s * BC) * gc_stride + offs_k, mask=k_ok, other=0.0)
    for j in range(s):
        cols = j * BC + offs_c
        k_j = _load_tile(k_base, stride_kt, cols, cols < length, offs_k, k_ok, EVEN_K)
        g_j = _load_tile(gc_base, gc_stride, cols, cols < length, offs_k, k_ok, EVEN_K)
        d_scores = tl.load(da_base + rows[:, None] * a_stride + cols[None, :], mask=r_ok[:, None], other=0.0)
        k_scaled = k_j * tl.exp(g_first[None, :] - g_j)
        dq += tl.dot(d_scores.to(k_j.dtype), k_scaled.to(k_j.dtype), input_precision=DOT)
    dq = dq * tl.exp(tl.where(r_ok[:, None], g_s - g_first[None, :], float("-inf")))
    # dk, off-diagonal (rows of later sub-chunks), anchored at the last row of s.
    dk = tl.zeros([BC, BK], dtype=tl.float32)
    last = tl.minimum(s * BC + BC, length) - 1
    g_last = tl.load(gc_base + last * gc_stride + offs_k, mask=k_ok, other=0.0)
    for m in range(s + 1, tl.cdiv(length, BC)):
        later = m * BC + offs_c
        l_ok = later < length
        q_m = _load_tile(q_base, stride_qt, later, l_ok, offs_k, k_ok, EVEN_K)
        g_m = _load_tile(gc_base, gc_stride, later, l_ok, offs_k, k_ok, EVEN_K)
        d_scores_t = tl.load(da_base + later[None, :] * a_stride + rows[:, None], mask=l_ok[None, :], other=0.0)
        q_scaled = q_m * tl.exp(tl.where(l_ok[:, None], g_m - g_last[None, :], float("-inf")))
        dk += tl.dot(d_scores_t.to(q_m.dtype), q_scaled.to(q_m.dtype), input_precision=DOT)
    dk = dk * tl.exp(tl.where(r_ok[:, None], g_last[None, :] - g_s, float("-inf")))
    # Diagonal block, elementwise in fp32: one weight tensor w[r, c, k] = exp(gc_r - gc_c) (c <= r) serves
    # dq (sum over c) and dk (sum over r).
    causal = (offs_c[:, None] >= offs_c[None, :]) & r_ok[:, None]
    weight = tl.exp(tl.where(causal[:, :, None], g_s[:, None, :] - g_s[None, :, :], float("-inf")))
    d_scores = tl.load(da_base + rows[:, None] * a_stride + rows[None, :], mask=r_ok[:, None], other=0.0)
    d_weighted = d_scores[:, :, None] * weight
    dq += tl.sum(d_weighted * k_s.to(tl.float32)[None, :, :], axis=1)
    dk += tl.sum(d_weighted * q_s.to(tl.float32)[:, None, :], axis=0)
    mask = _tile_mask(r_ok, k_ok, EVEN_K)
    out_off = rows[:, None] * gc_stride + offs_k[None, :]
    tl.store(_buf_base(DQ, b, bos, t0, h, seqlen, gc_stride, K_DIM) + out_off, dq, mask=mask)
    tl.store(_buf_base(DK, b, bos, t0, h, seqlen, gc_stride, K_DIM) + out_off, dk, mask=mask)


@triton.jit
def gla_bwd_kernel_inter(
    Q, K, V, G, GC, DO, HS, DHS, DQ_INTRA, DK_INTRA, DQ, DK, DG, CU, CHUNK_IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh, stride_db, stride_dt, stride_dh,
    scale, seqlen, n_chunks, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """dq = scale exp(gc) do h^T + dq_intra,  dk = exp(gl - gc) v dH^T + dk_intra, and
    dg = reverse cumsum over the chunk of (q dq - k dk), with exp(gl) sum_v(h dH) + sum_c k_c dk_inter_c added
    at the last row (the chunk's gates also scale the state it hands on)."""
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    EVEN_V: tl.constexpr = V_DIM % BV == 0
    pid_c, pid_k, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = _chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    v_base = _row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh)
    do_base = _row_base(DO, b, bos, t0, h, stride_db, stride_dt, stride_dh)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    d_last = tl.zeros([BK], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        do = _load_tile(do_base, stride_dt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        v = _load_tile(v_base, stride_vt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        state_t = tl.load(_state_ptrs_t(HS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=_tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)  # [BV, BK]
        d_state_t = tl.load(_state_ptrs_t(DHS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                            mask=_tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)
        dq += tl.dot(do, state_t.to(do.dtype), input_precision=DOT)
        dk += tl.dot(v, d_state_t.to(v.dtype), input_precision=DOT)
        d_last += tl.sum(state_t.to(tl.float32) * d_state_t.to(tl.float32), axis=0)
    gc_stride = num_heads * K_DIM
    gc_base = _buf_base(GC, b, bos, t0, h, seqlen, gc_stride, K_DIM)
    g = _load_tile(gc_base, gc_stride, offs_t, t_ok, offs_k, k_ok, EVEN_K)
    g_last = tl.load(gc_base + (length - 1) * gc_stride + offs_k, mask=k_ok, other=0.0)
    q = _load_tile(_row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh), stride_qt,
                   offs_t, t_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
    k = _load_tile(_row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh), stride_kt,
                   offs_t, t_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
    mask = _tile_mask(t_ok, k_ok, EVEN_K)
    tile_off = offs_t[:, None] * gc_stride + offs_k[None, :]
    dq = dq * tl.exp(g) * scale + tl.load(_buf_base(DQ_INTRA, b, bos, t0, h, seqlen, gc_stride, K_DIM) + tile_off,
                                          mask=mask, other=0.0)
    dk_inter = dk * tl.exp(tl.where(t_ok[:, None], g_last[None, :] - g, float("-inf")))
    dk = dk_inter + tl.load(_buf_base(DK_INTRA, b, bos, t0, h, seqlen, gc_stride, K_DIM) + tile_off,
                            mask=mask, other=0.0)
    d_cum = q * dq - k * dk
    d_last = d_last * tl.exp(g_last) + tl.sum(k * dk_inter, axis=0)
    d_cum += tl.where(offs_t[:, None] == length - 1, d_last[None, :], 0.0)
    dg = tl.cumsum(d_cum, axis=0, reverse=True)
    g_raw = _load_tile(_row_base(G, b, bos, t0, h, stride_gb, stride_gt, stride_gh), stride_gt,
                       offs_t, t_ok, offs_k, k_ok, EVEN_K)
    dg = tl.where(g_raw < _FLOOR, 0.0, dg)
    tl.store(_buf_base(DQ, b, bos, t0, h, seqlen, gc_stride, K_DIM) + tile_off, dq.to(DQ.dtype.element_ty), mask=mask)
    tl.store(_buf_base(DK, b, bos, t0, h, seqlen, gc_stride, K_DIM) + tile_off, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(_buf_base(DG, b, bos, t0, h, seqlen, gc_stride, K_DIM) + tile_off, dg.to(DG.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- non-causal
@triton.jit
def noncausal_kernel_partial_state(
    X, Y, PART, CU, SEG_IDX, stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
    seqlen, n_segments, num_heads,
    X_DIM: tl.constexpr, Y_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    SEGMENT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """part[segment, h] = sum over the segment's positions of x_t^T y_t (fp32 [segments, H, X, Y])."""
    EVEN_K: tl.constexpr = X_DIM % BK == 0
    EVEN_V: tl.constexpr = Y_DIM % BV == 0
    pid_s, pid_kv, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_v = tl.cdiv(Y_DIM, BV)
    offs_k = (pid_kv // n_v) * BK + tl.arange(0, BK)
    offs_v = (pid_kv % n_v) * BV + tl.arange(0, BV)
    k_ok = offs_k < X_DIM
    v_ok = offs_v < Y_DIM
    n, b, bos, seqlen, i = _chunk_coords(pid_s, CU, SEG_IDX, seqlen, n_segments, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(SEGMENT // BT):
        t0 = i * SEGMENT + j * BT
        t_ok = t0 + offs_t < seqlen
        x_t = _load_tile_t(_row_base(X, b, bos, t0, h, stride_xb, stride_xt, stride_xh), stride_xt,
                           offs_t, t_ok, offs_k, k_ok, EVEN_K)
        y = _load_tile(_row_base(Y, b, bos, t0, h, stride_yb, stride_yt, stride_yh), stride_yt,
                       offs_t, t_ok, offs_v, v_ok, EVEN_V)
        acc += tl.dot(x_t, y, input_precision=DOT)
    tl.store(_state_ptrs(PART, pid_s, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM), acc,
             mask=_tile_mask(k_ok, v_ok, EVEN_V))


@triton.jit
def noncausal_kernel_reduce_state(
    PART, EXTRA, S, SEG_OFF, n_segments, num_heads, scale,
    X_DIM: tl.constexpr, Y_DIM: tl.constexpr, HAS_EXTRA: tl.constexpr, IS_VARLEN: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """S[n, h] = scale * sum of the sequence's partial states + extra[n, h] (fp32), in segment order."""
    EVEN_V: tl.constexpr = Y_DIM % BV == 0
    pid_nh, pid_k, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_nh // num_heads
    h = pid_nh % num_heads
    if IS_VARLEN:
        first = tl.load(SEG_OFF + n)
        count = tl.load(SEG_OFF + n + 1) - first
    else:
        first = n * n_segments
        count = n_segments
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    kv_ok = _tile_mask(offs_k < X_DIM, offs_v < Y_DIM, EVEN_V)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(count):
        acc += tl.load(_state_ptrs(PART, first + j, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM), mask=kv_ok, other=0.0)
    acc = acc * scale
    ptrs = _state_ptrs(S, n, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM)
    if HAS_EXTRA:
        acc += tl.load(_state_ptrs(EXTRA, n, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM), mask=kv_ok,
                       other=0.0).to(tl.float32)
    tl.store(ptrs, acc, mask=kv_ok)


@triton.jit
def noncausal_kernel_apply(
    X, S, Y, CU, CHUNK_IDX, stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
    stride_sn, stride_sh, stride_sr, stride_sc, scale, seqlen, n_chunks,
    X_DIM: tl.constexpr, Y_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """y_t = scale * x_t M_n with M_n [X, Y] a (possibly transposed, by its strides) fp32 state of sequence n."""
    EVEN_K: tl.constexpr = X_DIM % BK == 0
    EVEN_V: tl.constexpr = Y_DIM % BV == 0
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, b, bos, seqlen, i = _chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    offs_t = tl.arange(0, BT)
    t_ok = t0 + offs_t < seqlen
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < Y_DIM
    x_base = _row_base(X, b, bos, t0, h, stride_xb, stride_xt, stride_xh)
    s_base = S + tl.cast(n, tl.int64) * stride_sn + h * stride_sh
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kt in range(tl.cdiv(X_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < X_DIM
        x = _load_tile(x_base, stride_xt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        m = tl.load(s_base + offs_k[:, None] * stride_sr + offs_v[None, :] * stride_sc,
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        acc += tl.dot(x, m.to(x.dtype), input_precision=DOT)
    y_base = _row_base(Y, b, bos, t0, h, stride_yb, stride_yt, stride_yh)
    tl.store(y_base + offs_t[:, None] * stride_yt + offs_v[None, :], (acc * scale).to(Y.dtype.element_ty),
             mask=_tile_mask(t_ok, v_ok, EVEN_V))


# ------------------------------------------------------------------------------------------ decode steps
@triton.jit
def _step_decay(G, SLOPES, b, h, stride_gb, stride_gh, offs_k, k_ok, SCALAR: tl.constexpr):
    """Per-key decay exp(g) [BK] of one step (the slope broadcast over K for Lightning) and the raw log-gate."""
    if SCALAR:
        g = tl.zeros_like(offs_k.to(tl.float32)) - _slope(SLOPES, h)
    else:
        g = tl.load(G + b * stride_gb + h * stride_gh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.where(g > 0, float("nan"), g)  # out of domain, as in the chunked kernels
    return tl.exp(tl.where(g < _FLOOR, _FLOOR, g)), g


@triton.jit
def recurrent_step_fwd_kernel(
    Q, K, V, G, SLOPES, S0, O, S1,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh, stride_ob, stride_oh,
    scale, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_S0: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """S1 = diag(exp(g)) S0 + k^T v, o = scale * q S1 for one token; one program per (b*h, V tile)."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < K_DIM
    v_ok = offs_v < V_DIM
    kv_ok = k_ok[:, None] & v_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    decay, _ = _step_decay(G, SLOPES, b, h, stride_gb, stride_gh, offs_k, k_ok, SCALAR)
    state_off = tl.cast(pid_bh, tl.int64) * (K_DIM * V_DIM) + offs_k[:, None] * V_DIM + offs_v[None, :]
    state = k[:, None] * v[None, :]
    if HAS_S0:
        state += decay[:, None] * tl.load(S0 + state_off, mask=kv_ok, other=0.0).to(tl.float32)
    tl.store(S1 + state_off, state, mask=kv_ok)
    o = tl.sum(q[:, None] * state, axis=0) * scale
    tl.store(O + b * stride_ob + h * stride_oh + offs_v, o.to(O.dtype.element_ty), mask=v_ok)


@triton.jit
def recurrent_step_bwd_kernel(
    Q, K, V, G, SLOPES, S0, DO, DS1, DQ, DK, DV, DG, DS0,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh, stride_ob, stride_oh,
    scale, num_heads,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_S0: tl.constexpr, HAS_DS1: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """Gradients of one step; one program per b*h walks the V tiles (dq, dk, dg need all of V).
    Gradient buffers are fresh and contiguous ([B, H, D] and [B, H, K, V])."""
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_k = tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    decay, g = _step_decay(G, SLOPES, b, h, stride_gb, stride_gh, offs_k, k_ok, SCALAR)
    dq = tl.zeros([BK], dtype=tl.float32)
    dk = tl.zeros([BK], dtype=tl.float32)
    dg = tl.zeros([BK], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        kv_ok = k_ok[:, None] & v_ok[None, :]
        state_off = tl.cast(pid_bh, tl.int64) * (K_DIM * V_DIM) + offs_k[:, None] * V_DIM + offs_v[None, :]
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_ob + h * stride_oh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        prev = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_S0:
            prev = tl.load(S0 + state_off, mask=kv_ok, other=0.0).to(tl.float32)
        new = decay[:, None] * prev + k[:, None] * v[None, :]
        d_new = (scale * q)[:, None] * do[None, :]
        if HAS_DS1:
            d_new += tl.load(DS1 + state_off, mask=kv_ok, other=0.0).to(tl.float32)
        dq += tl.sum(new * do[None, :], axis=1) * scale
        dk += tl.sum(d_new * v[None, :], axis=1)
        dg += tl.sum(d_new * prev, axis=1)
        dv = tl.sum(d_new * k[:, None], axis=0)
        tl.store(DV + pid_bh * V_DIM + offs_v, dv.to(DV.dtype.element_ty), mask=v_ok)
        if HAS_S0:
            tl.store(DS0 + state_off, decay[:, None] * d_new, mask=kv_ok)
    tl.store(DQ + pid_bh * K_DIM + offs_k, dq.to(DQ.dtype.element_ty), mask=k_ok)
    tl.store(DK + pid_bh * K_DIM + offs_k, dk.to(DK.dtype.element_ty), mask=k_ok)
    if not SCALAR:
        dg = tl.where(g < _FLOOR, 0.0, dg * decay)
        tl.store(DG + pid_bh * K_DIM + offs_k, dg.to(DG.dtype.element_ty), mask=k_ok)


# ---------------------------------------------------------------------------------------------- launchers
def _cfg(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# First entry of each list: the default when autotuning is off. Interpreter: 16-wide tiles so that the
# small test head dims still cross tile boundaries.
_STATE = [_cfg(4, 3, BK=64, BV=64), _cfg(4, 3, BK=32, BV=64), _cfg(4, 3, BK=64, BV=32), _cfg(2, 3, BK=32, BV=32),
          _cfg(8, 2, BK=64, BV=64), _cfg(4, 4, BK=32, BV=32), _cfg(4, 2, BK=128, BV=64)]
_OUTPUT = [_cfg(4, 2, BK=64, BV=64), _cfg(8, 2, BK=64, BV=128), _cfg(4, 3, BK=32, BV=64), _cfg(4, 3, BK=64, BV=32),
           _cfg(8, 2, BK=128, BV=64), _cfg(4, 2, BK=128, BV=128), _cfg(8, 3, BK=64, BV=64)]
_DQDK = [_cfg(4, 2, BK=64, BV=64), _cfg(8, 2, BK=64, BV=64), _cfg(4, 3, BK=32, BV=64), _cfg(4, 3, BK=64, BV=32),
         _cfg(8, 2, BK=128, BV=64), _cfg(4, 2, BK=32, BV=32)]
# The diagonal sub-blocks of the GLA intra kernels hold a [16, 16, BK] fp32 product: BK <= 32.
_INTRA = [_cfg(4, 2, BK=32), _cfg(2, 2, BK=32), _cfg(4, 3, BK=16), _cfg(2, 2, BK=16), _cfg(8, 2, BK=32)]
_DSCORES = [_cfg(4, 2, BV=64), _cfg(8, 2, BV=128), _cfg(4, 3, BV=32)]
_APPLY = [_cfg(4, 2, BK=64, BV=64), _cfg(8, 2, BK=64, BV=128), _cfg(4, 3, BK=32, BV=64)]
_REDUCE = [_cfg(4, 1, BK=64, BV=64), _cfg(4, 1, BK=32, BV=64)]
_INTERPRETED = {"BK": 16, "BV": 16}

_KEY = ["K_DIM", "V_DIM", "IS_VARLEN"]
_TUNED: dict = {}


def _tuned(kernel, table, key=_KEY):
    """The autotuned launcher of ``kernel`` (never keyed on T: packed lengths vary call to call)."""
    if kernel in _TUNED:
        return _TUNED[kernel]
    interpreted = [triton.Config({name: _INTERPRETED[name] for name in table[0].kwargs}, num_warps=1, num_stages=1)]
    _TUNED[kernel] = triton.autotune(configs=configs(table, interpreted), key=key)(kernel)
    return _TUNED[kernel]


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


class _Layout:
    """How chunks of ``chunk`` positions map to sequences: dense [B, T] or packed with cu_seqlens."""

    def __init__(self, q: torch.Tensor, cu_seqlens, chunk: int):
        self.varlen = cu_seqlens is not None
        dummy = q  # stands in for the pointers that dense inputs never read
        if not self.varlen:
            self.n_seq, self.seqlen = q.shape[0], q.shape[1]
            self.n_chunks = triton.cdiv(self.seqlen, chunk)
            self.total = self.n_seq * self.n_chunks
            self.cu, self.index, self.offsets = dummy, dummy, dummy
            return
        cu = cu_seqlens.to(torch.int64)
        counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
        offsets = torch.zeros_like(cu)
        offsets[1:] = torch.cumsum(counts, 0)
        self.total = int(offsets[-1])
        seq = torch.repeat_interleave(torch.arange(counts.numel(), device=q.device), counts, output_size=self.total)
        local = torch.arange(self.total, device=q.device) - offsets[seq]
        self.n_seq, self.seqlen, self.n_chunks = cu_seqlens.numel() - 1, 0, 1
        self.cu = cu_seqlens
        self.index = torch.stack([seq, local], dim=1).to(torch.int32).contiguous() if self.total else dummy
        self.offsets = offsets.to(torch.int32)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # Per-chunk states round-trip through HBM in the input precision (fp32 stays fp32), as fla does; the
    # carried state and the returned final state are fp32.
    return dtype


def _gate_cumsum(g, lay: _Layout, heads: int, d_k: int):
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    kernel = gla_gate_cumsum_kernel
    block_k = 16 if interpreter_enabled() else min(64, max(16, triton.next_power_of_2(d_k)))
    kernel[(lay.total, triton.cdiv(d_k, block_k), heads)](
        g, gc, lay.cu, lay.index, *_strides(g), lay.seqlen, lay.n_chunks, heads,
        K_DIM=d_k, IS_VARLEN=lay.varlen, BT=CHUNK, BK=block_k)
    return gc


def _forward_states(k, v, gc, slopes, initial_state, lay: _Layout, store_final: bool):
    heads, d_k, d_v = k.shape[2], k.shape[3], v.shape[3]
    hs = torch.empty((lay.total, heads, d_k, d_v), dtype=_state_dtype(k.dtype), device=k.device)
    ht = torch.empty((lay.n_seq, heads, d_k, d_v), dtype=torch.float32, device=k.device) if store_final else hs
    dummy = hs
    kernel = _tuned(linear_attn_fwd_kernel_state, _STATE, _KEY + ["SCALAR", "HAS_H0", "STORE_FINAL"])
    grid = lambda m: (lay.n_seq * heads, triton.cdiv(d_k, m["BK"]), triton.cdiv(d_v, m["BV"]))  # noqa: E731
    kernel[grid](
        k, v, gc if gc is not None else dummy, slopes if slopes is not None else dummy,
        initial_state if initial_state is not None else dummy, hs, ht, lay.cu, lay.offsets,
        *_strides(k), *_strides(v), lay.seqlen, lay.n_chunks, heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=gc is None, HAS_H0=initial_state is not None, STORE_FINAL=store_final,
        IS_VARLEN=lay.varlen, DOT=dot_precision(k.dtype), BT=CHUNK)
    return hs, (ht if store_final else None)


def _backward_states(q, do, gc, slopes, dht, scale, lay: _Layout, store_dh0: bool, d_v: int):
    heads, d_k = q.shape[2], q.shape[3]
    dhs = torch.empty((lay.total, heads, d_k, d_v), dtype=_state_dtype(q.dtype), device=q.device)
    dh0 = torch.empty((lay.n_seq, heads, d_k, d_v), dtype=torch.float32, device=q.device) if store_dh0 else dhs
    dummy = dhs
    kernel = _tuned(linear_attn_bwd_kernel_state, _STATE, _KEY + ["SCALAR", "HAS_DHT", "STORE_DH0"])
    grid = lambda m: (lay.n_seq * heads, triton.cdiv(d_k, m["BK"]), triton.cdiv(d_v, m["BV"]))  # noqa: E731
    kernel[grid](
        q, do, gc if gc is not None else dummy, slopes if slopes is not None else dummy,
        dht if dht is not None else dummy, dhs, dh0, lay.cu, lay.offsets,
        *_strides(q), *_strides(do), scale, lay.seqlen, lay.n_chunks, heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=gc is None, HAS_DHT=dht is not None, STORE_DH0=store_dh0,
        IS_VARLEN=lay.varlen, DOT=dot_precision(q.dtype), BT=CHUNK)
    return dhs, (dh0 if store_dh0 else None)


def _gla_intra_scores(q, k, gc, scale, lay: _Layout):
    heads, d_k = q.shape[2], q.shape[3]
    scores = torch.empty((*q.shape[:3], CHUNK), dtype=torch.float32, device=q.device)
    kernel = _tuned(gla_fwd_kernel_intra, _INTRA, ["K_DIM", "IS_VARLEN"])
    kernel[(lay.total, CHUNK // SUB, heads)](
        q, k, gc, scores, lay.cu, lay.index, *_strides(q), *_strides(k), scale, lay.seqlen, lay.n_chunks, heads,
        K_DIM=d_k, IS_VARLEN=lay.varlen, DOT=dot_precision(q.dtype), BT=CHUNK, BC=SUB)
    return scores


def _contiguous_states(t):
    return None if t is None else t.float().contiguous()


def chunk_forward(q, k, v, g, slopes, scale, initial_state, cu_seqlens, output_final_state):
    """See pytorch.chunk_forward: same contract."""
    heads, d_k, d_v = q.shape[2], q.shape[3], v.shape[3]
    lay = _Layout(q, cu_seqlens, CHUNK)
    o = torch.empty((*q.shape[:3], d_v), dtype=q.dtype, device=q.device)
    initial_state = _contiguous_states(initial_state)
    if lay.total == 0:
        if not output_final_state:
            return o, None
        final = initial_state.clone() if initial_state is not None else q.new_zeros(
            (lay.n_seq, heads, d_k, d_v), dtype=torch.float32)
        return o, final
    gc = _gate_cumsum(g, lay, heads, d_k) if g is not None else None
    hs, final = _forward_states(k, v, gc, slopes, initial_state, lay, output_final_state)
    if gc is None:
        kernel = _tuned(lightning_fwd_kernel_output, _OUTPUT)
        kernel[lambda m: (lay.total, triton.cdiv(d_v, m["BV"]), heads)](
            q, k, v, slopes, hs, o, lay.cu, lay.index, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            scale, lay.seqlen, lay.n_chunks, heads,
            K_DIM=d_k, V_DIM=d_v, IS_VARLEN=lay.varlen, DOT=dot_precision(q.dtype), BT=CHUNK)
    else:
        scores = _gla_intra_scores(q, k, gc, scale, lay)
        kernel = _tuned(gla_fwd_kernel_output, _OUTPUT)
        kernel[lambda m: (lay.total, triton.cdiv(d_v, m["BV"]), heads)](
            q, v, gc, scores, hs, o, lay.cu, lay.index, *_strides(q), *_strides(v), *_strides(o),
            scale, lay.seqlen, lay.n_chunks, heads,
            K_DIM=d_k, V_DIM=d_v, IS_VARLEN=lay.varlen, DOT=dot_precision(q.dtype), BT=CHUNK)
    return o, final


def chunk_backward(do, dht, q, k, v, g, slopes, scale, initial_state, cu_seqlens):
    """See pytorch.chunk_backward: same contract."""
    heads, d_k, d_v = q.shape[2], q.shape[3], v.shape[3]
    lay = _Layout(q, cu_seqlens, CHUNK)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dg = torch.empty(g.shape, dtype=g.dtype, device=g.device) if g is not None else None
    initial_state = _contiguous_states(initial_state)
    dht = _contiguous_states(dht)
    if lay.total == 0:
        dh0 = None
        if initial_state is not None:
            dh0 = (dht.clone() if dht is not None else torch.zeros_like(initial_state))
        return dq, dk, dv, dg, dh0
    gc = _gate_cumsum(g, lay, heads, d_k) if g is not None else None
    hs, _ = _forward_states(k, v, gc, slopes, initial_state, lay, False)
    dhs, dh0 = _backward_states(q, do, gc, slopes, dht, scale, lay, initial_state is not None, d_v)
    dot = dot_precision(q.dtype)
    if gc is None:
        kernel = _tuned(lightning_bwd_kernel_dv, _OUTPUT)
        kernel[lambda m: (lay.total, triton.cdiv(d_v, m["BV"]), heads)](
            q, k, do, slopes, dhs, dv, lay.cu, lay.index, *_strides(q), *_strides(k), *_strides(do), *_strides(dv),
            scale, lay.seqlen, lay.n_chunks, heads, K_DIM=d_k, V_DIM=d_v, IS_VARLEN=lay.varlen, DOT=dot, BT=CHUNK)
        kernel = _tuned(lightning_bwd_kernel_dqdk, _DQDK)
        kernel[lambda m: (lay.total, triton.cdiv(d_k, m["BK"]), heads)](
            q, k, v, do, slopes, hs, dhs, dq, dk, lay.cu, lay.index, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dq), scale, lay.seqlen, lay.n_chunks, heads,
            K_DIM=d_k, V_DIM=d_v, IS_VARLEN=lay.varlen, DOT=dot, BT=CHUNK)
    else:
        scores = _gla_intra_scores(q, k, gc, scale, lay)
        kernel = _tuned(gla_bwd_kernel_dv, _OUTPUT)
        kernel[lambda m: (lay.total, triton.cdiv(d_v, m["BV"]), heads)](
            k, do, gc, scores, dhs, dv, lay.cu, lay.index, *_strides(k), *_strides(do), *_strides(dv),
            lay.seqlen, lay.n_chunks, heads, K_DIM=d_k, V_DIM=d_v, IS_VARLEN=lay.varlen, DOT=dot, BT=CHUNK)
        d_scores = scores  # the scores are no longer needed: reuse their buffer
        kernel = _tuned(gla_bwd_kernel_dscores, _DSCORES, ["V_DIM", "IS_VARLEN"])
        kernel[(lay.total, heads)](
            v, do, d_scores, lay.cu, lay.index, *_strides(v), *_strides(do), scale, lay.seqlen, lay.n_chunks, heads,
            V_DIM=d_v, IS_VARLEN=lay.varlen, DOT=dot, BT=CHUNK)
        dq_intra = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk_intra = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        kernel = _tuned(gla_bwd_kernel_intra, _INTRA, ["K_DIM", "IS_VARLEN"])
        kernel[lambda m: (lay.total, triton.cdiv(d_k, m["BK"]) * (CHUNK // SUB), heads)](
            q, k, gc, d_scores, dq_intra, dk_intra, lay.cu, lay.index, *_strides(q), *_strides(k),
            lay.seqlen, lay.n_chunks, heads, K_DIM=d_k, IS_VARLEN=lay.varlen, DOT=dot, BT=CHUNK, BC=SUB)
        kernel = _tuned(gla_bwd_kernel_inter, _DQDK)
        kernel[lambda m: (lay.total, triton.cdiv(d_k, m["BK"]), heads)](
            q, k, v, g, gc, do, hs, dhs, dq_intra, dk_intra, dq, dk, dg, lay.cu, lay.index,
            *_strides(q), *_strides(k), *_strides(v), *_strides(g), *_strides(do), scale, lay.seqlen, lay.n_chunks,
            heads, K_DIM=d_k, V_DIM=d_v, IS_VARLEN=lay.varlen, DOT=dot, BT=CHUNK)
    return dq, dk, dv, dg, dh0


# ------------------------------------------------------------------------------------ non-causal launchers
def _outer_sum(x, y, extra, scale, lay_seg: _Layout):
    """Per sequence: scale * sum_t x_t^T y_t + extra -> fp32 [N, H, X, Y]."""
    heads, d_x, d_y = x.shape[2], x.shape[3], y.shape[3]
    out = torch.empty((lay_seg.n_seq, heads, d_x, d_y), dtype=torch.float32, device=x.device)
    if lay_seg.total == 0:
        return out.copy_(extra) if extra is not None else out.zero_()
    part = torch.empty((lay_seg.total, heads, d_x, d_y), dtype=torch.float32, device=x.device)
    kernel = _tuned(noncausal_kernel_partial_state, _APPLY, ["X_DIM", "Y_DIM", "IS_VARLEN"])
    kernel[lambda m: (lay_seg.total, triton.cdiv(d_x, m["BK"]) * triton.cdiv(d_y, m["BV"]), heads)](
        x, y, part, lay_seg.cu, lay_seg.index, *_strides(x), *_strides(y), lay_seg.seqlen, lay_seg.n_chunks, heads,
        X_DIM=d_x, Y_DIM=d_y, IS_VARLEN=lay_seg.varlen, DOT=dot_precision(x.dtype), SEGMENT=NONCAUSAL_SEGMENT,
        BT=CHUNK)
    kernel = _tuned(noncausal_kernel_reduce_state, _REDUCE, ["X_DIM", "Y_DIM", "IS_VARLEN"])
    kernel[lambda m: (lay_seg.n_seq * heads, triton.cdiv(d_x, m["BK"]), triton.cdiv(d_y, m["BV"]))](
        part, extra if extra is not None else part, out, lay_seg.offsets, lay_seg.n_chunks, heads, scale,
        X_DIM=d_x, Y_DIM=d_y, HAS_EXTRA=extra is not None, IS_VARLEN=lay_seg.varlen)
    return out


def _apply(x, states, scale, lay: _Layout, transpose: bool, out_dim: int, out_dtype):
    """y_t = scale * x_t S_n (or S_n^T) for each sequence n."""
    heads, d_x = x.shape[2], x.shape[3]
    y = torch.empty((*x.shape[:3], out_dim), dtype=out_dtype, device=x.device)
    if lay.total == 0:
        return y
    s_n, s_h, s_r, s_c = states.stride()
    if transpose:
        s_r, s_c = s_c, s_r
    kernel = _tuned(noncausal_kernel_apply, _APPLY, ["X_DIM", "Y_DIM", "IS_VARLEN"])
    kernel[lambda m: (lay.total, triton.cdiv(out_dim, m["BV"]), heads)](
        x, states, y, lay.cu, lay.index, *_strides(x), *_strides(y), s_n, s_h, s_r, s_c, scale, lay.seqlen,
        lay.n_chunks, X_DIM=d_x, Y_DIM=out_dim, IS_VARLEN=lay.varlen, DOT=dot_precision(x.dtype), BT=CHUNK)
    return y


def noncausal_forward(q, k, v, scale, initial_state, cu_seqlens, output_final_state):
    states = _outer_sum(k, v, _contiguous_states(initial_state), 1.0, _Layout(q, cu_seqlens, NONCAUSAL_SEGMENT))
    o = _apply(q, states, scale, _Layout(q, cu_seqlens, CHUNK), False, v.shape[3], q.dtype)
    return o, (states if output_final_state else None)


def noncausal_backward(do, dht, q, k, v, scale, initial_state, cu_seqlens):
    lay_seg = _Layout(q, cu_seqlens, NONCAUSAL_SEGMENT)
    lay = _Layout(q, cu_seqlens, CHUNK)
    states = _outer_sum(k, v, _contiguous_states(initial_state), 1.0, lay_seg)
    d_states = _outer_sum(q, do, _contiguous_states(dht), scale, lay_seg)
    dq = _apply(do, states, scale, lay, True, q.shape[3], q.dtype)
    dk = _apply(v, d_states, 1.0, lay, True, k.shape[3], k.dtype)
    dv = _apply(k, d_states, 1.0, lay, False, v.shape[3], v.dtype)
    return dq, dk, dv, (d_states if initial_state is not None else None)


# ------------------------------------------------------------------------------------------ step launchers
def _step_blocks(d_k: int, d_v: int):
    block_k = max(16, triton.next_power_of_2(d_k))
    block_v = 16 if interpreter_enabled() else max(16, min(triton.next_power_of_2(d_v), 8192 // block_k))
    return block_k, block_v


def step_forward(q, k, v, g, slopes, state, scale):
    b, heads, d_k = q.shape
    d_v = v.shape[2]
    o = torch.empty((b, heads, d_v), dtype=q.dtype, device=q.device)
    new_state = torch.empty((b, heads, d_k, d_v), dtype=torch.float32, device=q.device)
    state = _contiguous_states(state)
    block_k, block_v = _step_blocks(d_k, d_v)
    gate = g if g is not None else q
    recurrent_step_fwd_kernel[(b * heads, triton.cdiv(d_v, block_v))](
        q, k, v, gate, slopes if slopes is not None else q, state if state is not None else new_state, o, new_state,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), gate.stride(0), gate.stride(1),
        o.stride(0), o.stride(1), scale, heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=g is None, HAS_S0=state is not None, BK=block_k, BV=block_v,
        num_warps=4 if block_k * block_v >= 4096 else 2)
    return o, new_state


def step_backward(do, d_new, q, k, v, g, slopes, state, scale):
    b, heads, d_k = q.shape
    d_v = v.shape[2]
    dq = torch.empty((b, heads, d_k), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, heads, d_k), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, heads, d_v), dtype=v.dtype, device=q.device)
    dg = torch.empty((b, heads, d_k), dtype=g.dtype, device=q.device) if g is not None else None
    state_in = _contiguous_states(state)
    d_state = torch.empty((b, heads, d_k, d_v), dtype=torch.float32, device=q.device) if state is not None else None
    d_new = _contiguous_states(d_new)
    do = do.contiguous()
    block_k, block_v = _step_blocks(d_k, d_v)
    gate = g if g is not None else q
    dummy = dq
    recurrent_step_bwd_kernel[(b * heads,)](
        q, k, v, gate, slopes if slopes is not None else q, state_in if state_in is not None else dummy, do,
        d_new if d_new is not None else dummy, dq, dk, dv, dg if dg is not None else dummy,
        d_state if d_state is not None else dummy,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), gate.stride(0), gate.stride(1),
        do.stride(0), do.stride(1), scale, heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=g is None, HAS_S0=state is not None, HAS_DS1=d_new is not None,
        BK=block_k, BV=block_v, num_warps=4 if block_k * block_v >= 4096 else 2)
    if d_state is not None:
        d_state = d_state.to(state.dtype)
    return dq, dk, dv, dg, d_state
