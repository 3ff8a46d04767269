"""Gated linear attention (GLA) in Triton: the per-chunk kernels of linear attention with data-dependent per-key
decay (the gate cumsum is ``ops/common/chunks.gate_cumsum``, the state walks are in ``triton_chunk.py``).

The intra-chunk scores A[r, c] = scale sum_k q_rk k_ck exp(gc_rk - gc_ck), c <= r, are computed per 16 x 16
sub-block: off-diagonal blocks as tensor-core matmuls of operands anchored at a sub-chunk boundary (so that every
exponential is exp(x) with x <= 0), the diagonal blocks elementwise in fp32. The gate gradient is dg =
reverse-cumsum over the chunk of (q*dq - k*dk) plus, at the chunk's last row, sum_v(dH * h_next) (docs/linear.md).

GQA: gates follow the keys, so the state belongs to a kv head. Kernels whose result is per query head (the scores,
the output, dA) run one program per query head; dv, the intra and inter gradient kernels run one per kv head and
loop over its group (dk, dg and the group's dq share the key and gate tiles they load).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import dot_precision, launcher
from ..common.chunks import (
    buffer_base,
    chunk_coords,
    chunk_rows,
    load_tile,
    load_tile_t,
    row_base,
    sequence_origin,
    state_ptrs,
    state_ptrs_t,
    tile_mask,
    tile_mask_t,
)
from ..common.triton_numerics import masked_dot
from .triton_chunk import (
    CHUNK,
    DSCORES_CONFIGS,
    FLOOR,
    GRAD_CONFIGS,
    INTRA_CONFIGS,
    OUTPUT_CONFIGS,
    SUB,
    Call,
    chunk_launch_options,
    run_backward,
    run_forward,
)


# ----------------------------------------------------------------------------------------------- forward
@launcher(**chunk_launch_options(INTRA_CONFIGS, key=("K_DIM", "IS_VARLEN"), even="K"))
@triton.jit
def gla_intra_fwd_kernel(
    # pointers
    Q, K, GC, A, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    GROUP: tl.constexpr, K_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Rows of sub-chunk s of the intra-chunk scores A[r, c] = scale sum_k q_rk k_ck exp(gc_rk - gc_ck), c <= r
    ([B, T, H, BT] fp32; every column of a valid row is written, zeros above the diagonal); one program per
    query head h, reading the keys and gates of kv head h // GROUP."""
    pid_c, s, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, b, bos, seqlen, i = chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    length = tl.minimum(seqlen - t0, BT)
    if s * BC >= length:
        return
    origin = sequence_origin(bos, seqlen, REVERSE)
    kv = h // GROUP
    num_kv_heads = num_heads // GROUP
    gc_stride = num_kv_heads * K_DIM
    a_stride = num_heads * BT
    offs_c = tl.arange(0, BC)
    rows = s * BC + offs_c
    r_ok = rows < length
    q_base = row_base(Q, b, origin, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = row_base(K, b, origin, t0, kv, stride_kb, stride_kt, stride_kh)
    gc_base = buffer_base(GC, b, bos, t0, kv, seqlen, gc_stride, K_DIM)
    a_ptrs = buffer_base(A, b, bos, t0, h, seqlen, a_stride, BT) + rows[:, None] * a_stride + offs_c[None, :]
    # Off-diagonal blocks j < s: anchored at the first row of sub-chunk s (gc_c >= gc_anchor >= gc_r).
    for j in range(s):
        cols = j * BC + offs_c
        acc = tl.zeros([BC, BC], dtype=tl.float32)
        for kt in range(tl.cdiv(K_DIM, BK)):
            offs_k = kt * BK + tl.arange(0, BK)
            k_ok = offs_k < K_DIM
            q = load_tile(q_base, stride_qt, rows, r_ok, offs_k, k_ok, EVEN_K)
            g_r = load_tile(gc_base, gc_stride, rows, r_ok, offs_k, k_ok, EVEN_K)
            g_anchor = tl.load(gc_base + (s * BC) * gc_stride + offs_k, mask=k_ok, other=0.0)
            k_t = load_tile_t(k_base, stride_kt, cols, cols < length, offs_k, k_ok, EVEN_K)
            g_c = load_tile_t(gc_base, gc_stride, cols, cols < length, offs_k, k_ok, EVEN_K)
            q_scaled = q * tl.exp(tl.where(r_ok[:, None], g_r - g_anchor[None, :], float("-inf")))
            k_scaled = k_t * tl.exp(g_anchor[:, None] - g_c)
            acc += tl.dot(q_scaled.to(q.dtype), k_scaled.to(q.dtype), input_precision=DOT_PRECISION)
        tl.store(a_ptrs + j * BC, acc * scale, mask=r_ok[:, None])
    # Diagonal block, elementwise in fp32 as one [r, c, k] product per K tile (c <= r; invalid rows masked).
    causal = (offs_c[:, None] >= offs_c[None, :]) & r_ok[:, None]
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        q = load_tile(q_base, stride_qt, rows, r_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
        k = load_tile(k_base, stride_kt, rows, r_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
        g = load_tile(gc_base, gc_stride, rows, r_ok, offs_k, k_ok, EVEN_K)
        weight = tl.exp(tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], float("-inf")))
        # a select, not 0 * k: a NaN/Inf key of a later row must not reach earlier rows
        acc += tl.sum(tl.where(causal[:, :, None], q[:, None, :] * k[None, :, :] * weight, 0.0), axis=2)
    tl.store(a_ptrs + s * BC, acc * scale, mask=r_ok[:, None])
    zeros = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(s + 1, BT // BC):
        tl.store(a_ptrs + j * BC, zeros, mask=r_ok[:, None])


@launcher(**chunk_launch_options(OUTPUT_CONFIGS))
@triton.jit
def gla_output_fwd_kernel(
    # pointers
    Q, V, GC, A, HS, O, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    GROUP: tl.constexpr, K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    """o = scale * (q * exp(gc)) h + A v; one program per query head h (values, gates and state of kv head
    h // GROUP)."""
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, origin, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks,
                                                                  IS_VARLEN, REVERSE, BT)
    kv = h // GROUP
    num_kv_heads = num_heads // GROUP
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    gc_stride = num_kv_heads * K_DIM
    q_base = row_base(Q, b, origin, t0, h, stride_qb, stride_qt, stride_qh)
    gc_base = buffer_base(GC, b, bos, t0, kv, seqlen, gc_stride, K_DIM)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        q = load_tile(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        g = load_tile(gc_base, gc_stride, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        state = tl.load(state_ptrs(HS, pid_c, kv, num_kv_heads, offs_k, offs_v, K_DIM, V_DIM),
                        mask=tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        acc += tl.dot((q * tl.exp(g)).to(q.dtype), state.to(q.dtype), input_precision=DOT_PRECISION)
    a_stride = num_heads * BT
    scores = load_tile(buffer_base(A, b, bos, t0, h, seqlen, a_stride, BT), a_stride,
                       offs_t, t_ok, offs_t, offs_t < BT, True)
    v = load_tile(row_base(V, b, origin, t0, kv, stride_vb, stride_vt, stride_vh), stride_vt,
                  offs_t, t_ok, offs_v, v_ok, EVEN_V)
    # scores are 0 above the diagonal; a NaN/Inf v of a later row must still not reach earlier rows
    out = masked_dot(scores, v, offs_t[:, None] >= offs_t[None, :], acc * scale, DOT_PRECISION)
    o_base = row_base(O, b, origin, t0, h, stride_ob, stride_ot, stride_oh)
    tl.store(o_base + offs_t[:, None] * stride_ot + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=tile_mask(t_ok, v_ok, EVEN_V))


# ---------------------------------------------------------------------------------------------- backward
@launcher(**chunk_launch_options(OUTPUT_CONFIGS))
@triton.jit
def gla_dv_bwd_kernel(
    # pointers
    K, DO, GC, A, DHS, DV, CU, CHUNK_IDX,
    # strides
    stride_kb, stride_kt, stride_kh, stride_dob, stride_dot, stride_doh, stride_dvb, stride_dvt, stride_dvh,
    # sizes
    seqlen, n_chunks, num_heads,
    # meta-parameters
    GROUP: tl.constexpr, K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    """dv = (k * exp(gl - gc)) dH + sum over the group's query heads h of A_h^T do_h; one program per kv head."""
    pid_c, pid_v, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, origin, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks,
                                                                  IS_VARLEN, REVERSE, BT)
    num_kv_heads = num_heads // GROUP
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    gc_stride = num_kv_heads * K_DIM
    k_base = row_base(K, b, origin, t0, kv, stride_kb, stride_kt, stride_kh)
    gc_base = buffer_base(GC, b, bos, t0, kv, seqlen, gc_stride, K_DIM)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        k = load_tile(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        g = load_tile(gc_base, gc_stride, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        g_last = tl.load(gc_base + (length - 1) * gc_stride + offs_k, mask=k_ok, other=0.0)
        d_state = tl.load(state_ptrs(DHS, pid_c, kv, num_kv_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        k_dec = k * tl.exp(tl.where(t_ok[:, None], g_last[None, :] - g, float("-inf")))
        acc += tl.dot(k_dec.to(k.dtype), d_state.to(k.dtype), input_precision=DOT_PRECISION)
    a_stride = num_heads * BT
    for r in range(GROUP):
        h = kv * GROUP + r
        scores_t = load_tile_t(buffer_base(A, b, bos, t0, h, seqlen, a_stride, BT), a_stride, offs_t, t_ok, offs_t,
                               offs_t < BT, True)  # [c, r]
        do = load_tile(row_base(DO, b, origin, t0, h, stride_dob, stride_dot, stride_doh), stride_dot,
                       offs_t, t_ok, offs_v, v_ok, EVEN_V)
        acc += tl.dot(scores_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dv_base = row_base(DV, b, origin, t0, kv, stride_dvb, stride_dvt, stride_dvh)
    tl.store(dv_base + offs_t[:, None] * stride_dvt + offs_v[None, :], acc.to(DV.dtype.element_ty),
             mask=tile_mask(t_ok, v_ok, EVEN_V))


@launcher(**chunk_launch_options(DSCORES_CONFIGS, key=("V_DIM", "IS_VARLEN"), even="V"))
@triton.jit
def gla_dscores_bwd_kernel(
    # pointers
    V, DO, DA, CU, CHUNK_IDX,
    # strides
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    GROUP: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, EVEN_V: tl.constexpr,
):
    """dA[r, c] = scale * do_r . v_c for c <= r (fp32 [B, T, H, BT]); one program per query head."""
    pid_c, h = tl.program_id(0), tl.program_id(1)
    b, bos, origin, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks,
                                                                  IS_VARLEN, REVERSE, BT)
    kv = h // GROUP
    v_base = row_base(V, b, origin, t0, kv, stride_vb, stride_vt, stride_vh)
    do_base = row_base(DO, b, origin, t0, h, stride_dob, stride_dot, stride_doh)
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        do = load_tile(do_base, stride_dot, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        v_t = load_tile_t(v_base, stride_vt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        acc += tl.dot(do, v_t, input_precision=DOT_PRECISION)
    acc = tl.where(offs_t[:, None] >= offs_t[None, :], acc * scale, 0.0)
    a_stride = num_heads * BT
    da_base = buffer_base(DA, b, bos, t0, h, seqlen, a_stride, BT)
    tl.store(da_base + offs_t[:, None] * a_stride + offs_t[None, :], acc, mask=t_ok[:, None])


@launcher(**chunk_launch_options(INTRA_CONFIGS, key=("K_DIM", "IS_VARLEN"), even="K"))
@triton.jit
def gla_intra_bwd_kernel(
    # pointers (DQ: fp32 [B, T, H, K], DK: fp32 [B, T, H_kv, K], both contiguous, in processing order)
    Q, K, GC, DA, DQ, DK, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    # sizes
    seqlen, n_chunks, num_heads,
    # meta-parameters
    GROUP: tl.constexpr, K_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Intra-chunk parts for sub-chunk s, one program per kv head looping over its group's query heads h:
    dq_hr = sum_{c<=r} dA_hrc k_c exp(gc_r - gc_c),  dk_c = sum_h sum_{r>=c} dA_hrc q_hr exp(gc_r - gc_c)."""
    pid_c, pid_ks, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_sub: tl.constexpr = BT // BC
    pid_k = pid_ks // n_sub
    s = pid_ks % n_sub
    n, b, bos, seqlen, i = chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    length = tl.minimum(seqlen - t0, BT)
    if s * BC >= length:
        return
    origin = sequence_origin(bos, seqlen, REVERSE)
    num_kv_heads = num_heads // GROUP
    gc_stride = num_kv_heads * K_DIM
    a_stride = num_heads * BT
    offs_c = tl.arange(0, BC)
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    rows = s * BC + offs_c
    r_ok = rows < length
    k_base = row_base(K, b, origin, t0, kv, stride_kb, stride_kt, stride_kh)
    gc_base = buffer_base(GC, b, bos, t0, kv, seqlen, gc_stride, K_DIM)
    g_s = load_tile(gc_base, gc_stride, rows, r_ok, offs_k, k_ok, EVEN_K)
    k_s = load_tile(k_base, stride_kt, rows, r_ok, offs_k, k_ok, EVEN_K)
    g_first = tl.load(gc_base + (s * BC) * gc_stride + offs_k, mask=k_ok, other=0.0)
    last = tl.minimum(s * BC + BC, length) - 1
    g_last = tl.load(gc_base + last * gc_stride + offs_k, mask=k_ok, other=0.0)
    causal = (offs_c[:, None] >= offs_c[None, :]) & r_ok[:, None]
    dk_off = tl.zeros([BC, BK], dtype=tl.float32)  # rows of later sub-chunks, anchored at the last row of s
    dk_diag = tl.zeros([BC, BK], dtype=tl.float32)
    for r in range(GROUP):
        h = kv * GROUP + r
        q_base = row_base(Q, b, origin, t0, h, stride_qb, stride_qt, stride_qh)
        da_base = buffer_base(DA, b, bos, t0, h, seqlen, a_stride, BT)
        q_s = load_tile(q_base, stride_qt, rows, r_ok, offs_k, k_ok, EVEN_K)
        # dq, off-diagonal (columns of earlier sub-chunks), anchored at the first row of s.
        dq = tl.zeros([BC, BK], dtype=tl.float32)
        for j in range(s):
            cols = j * BC + offs_c
            k_j = load_tile(k_base, stride_kt, cols, cols < length, offs_k, k_ok, EVEN_K)
            g_j = load_tile(gc_base, gc_stride, cols, cols < length, offs_k, k_ok, EVEN_K)
            d_scores = tl.load(da_base + rows[:, None] * a_stride + cols[None, :], mask=r_ok[:, None], other=0.0)
            k_scaled = k_j * tl.exp(g_first[None, :] - g_j)
            dq += tl.dot(d_scores.to(k_j.dtype), k_scaled.to(k_j.dtype), input_precision=DOT_PRECISION)
        dq = dq * tl.exp(tl.where(r_ok[:, None], g_s - g_first[None, :], float("-inf")))
        for m in range(s + 1, tl.cdiv(length, BC)):
            later = m * BC + offs_c
            l_ok = later < length
            q_m = load_tile(q_base, stride_qt, later, l_ok, offs_k, k_ok, EVEN_K)
            g_m = load_tile(gc_base, gc_stride, later, l_ok, offs_k, k_ok, EVEN_K)
            d_scores_t = tl.load(da_base + later[None, :] * a_stride + rows[:, None], mask=l_ok[None, :], other=0.0)
            q_scaled = q_m * tl.exp(tl.where(l_ok[:, None], g_m - g_last[None, :], float("-inf")))
            dk_off += tl.dot(d_scores_t.to(q_m.dtype), q_scaled.to(q_m.dtype), input_precision=DOT_PRECISION)
        # Diagonal block, elementwise in fp32: dq sums over c, dk over r. The weights w[r, c, k] = exp(gc_r - gc_c)
        # are the group's, but recomputed per head: [16, 16, BK] fp32 is too large to keep across the loop.
        weight = tl.exp(tl.where(causal[:, :, None], g_s[:, None, :] - g_s[None, :, :], float("-inf")))
        d_scores = tl.load(da_base + rows[:, None] * a_stride + rows[None, :], mask=r_ok[:, None], other=0.0)
        d_weighted = d_scores[:, :, None] * weight
        # Selects: a NaN/Inf k_c (q_r) must not reach dq (dk) of the rows (columns) that do not see it.
        dq += tl.sum(tl.where(causal[:, :, None], d_weighted * k_s.to(tl.float32)[None, :, :], 0.0), axis=1)
        dk_diag += tl.sum(tl.where(causal[:, :, None], d_weighted * q_s.to(tl.float32)[:, None, :], 0.0), axis=0)
        tl.store(buffer_base(DQ, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM)
                 + rows[:, None] * (num_heads * K_DIM) + offs_k[None, :], dq, mask=tile_mask(r_ok, k_ok, EVEN_K))
    dk = dk_off * tl.exp(tl.where(r_ok[:, None], g_last[None, :] - g_s, float("-inf"))) + dk_diag
    tl.store(buffer_base(DK, b, bos, t0, kv, seqlen, gc_stride, K_DIM) + rows[:, None] * gc_stride + offs_k[None, :],
             dk, mask=tile_mask(r_ok, k_ok, EVEN_K))


@triton.jit
def _inter_head(dk, d_last, d_cum, Q, DO, DQ, DQ_INTRA, HS, DHS, v_base, gc_base, gc_stride, b, bos, origin, t0, h, kv,
                pid_c, num_heads, num_kv_heads, seqlen, scale, offs_t, t_ok, offs_k, k_ok, mask, stride_qb, stride_qt,
                stride_qh, stride_vt, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
                K_DIM: tl.constexpr, V_DIM: tl.constexpr, FIRST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr):
    """Query head h: stores dq_h = scale exp(gc) do_h h^T + dq_intra_h and adds q_h dq_h to d_cum; the FIRST head of
    the group also the kv head's v dH^T (to dk) and sum_v(h dH) (to d_last) from the same V loop. Returns
    (dk, d_last, d_cum, the chunk's gates gc)."""
    do_base = row_base(DO, b, origin, t0, h, stride_dob, stride_dot, stride_doh)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        do = load_tile(do_base, stride_dot, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        state_t = tl.load(state_ptrs_t(HS, pid_c, kv, num_kv_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)  # [BV, BK]
        dq += tl.dot(do, state_t.to(do.dtype), input_precision=DOT_PRECISION)
        if FIRST:
            v = load_tile(v_base, stride_vt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
            d_state_t = tl.load(state_ptrs_t(DHS, pid_c, kv, num_kv_heads, offs_k, offs_v, K_DIM, V_DIM),
                                mask=tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)
            dk += tl.dot(v, d_state_t.to(v.dtype), input_precision=DOT_PRECISION)
            d_last += tl.sum(state_t.to(tl.float32) * d_state_t.to(tl.float32), axis=0)
    g = load_tile(gc_base, gc_stride, offs_t, t_ok, offs_k, k_ok, EVEN_K)
    q = load_tile(row_base(Q, b, origin, t0, h, stride_qb, stride_qt, stride_qh), stride_qt,
                  offs_t, t_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
    intra_off = offs_t[:, None] * (num_heads * K_DIM) + offs_k[None, :]
    dq = dq * tl.exp(g) * scale + tl.load(
        buffer_base(DQ_INTRA, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM) + intra_off, mask=mask, other=0.0)
    tl.store(row_base(DQ, b, origin, t0, h, stride_dqb, stride_dqt, stride_dqh)
             + offs_t[:, None] * stride_dqt + offs_k[None, :], dq.to(DQ.dtype.element_ty), mask=mask)
    return dk, d_last, d_cum + q * dq, g


@launcher(**chunk_launch_options(GRAD_CONFIGS))
@triton.jit
def gla_inter_bwd_kernel(
    # pointers (DQ_INTRA [B, T, H, K], DK_INTRA [B, T, H_kv, K]: fp32 contiguous in processing order; DG is laid
    # out like DK: fresh [B, T, H_kv, K] buffers)
    Q, K, V, G, GC, DO, HS, DHS, DQ_INTRA, DK_INTRA, DQ, DK, DG, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_dkb, stride_dkt, stride_dkh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    GROUP: tl.constexpr, K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    """dq_h = scale exp(gc) do_h h^T + dq_intra_h,  dk = exp(gl - gc) v dH^T + dk_intra, and dg = reverse cumsum
    over the chunk of (sum_h q_h dq_h - k dk), with exp(gl) sum_v(h dH) + sum_c k_c dk_inter_c added at the last
    row (the chunk's gates also scale the state it hands on); one program per kv head and its group."""
    pid_c, pid_k, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, origin, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks,
                                                                  IS_VARLEN, REVERSE, BT)
    num_kv_heads = num_heads // GROUP
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    mask = tile_mask(t_ok, k_ok, EVEN_K)
    v_base = row_base(V, b, origin, t0, kv, stride_vb, stride_vt, stride_vh)
    gc_stride = num_kv_heads * K_DIM
    gc_base = buffer_base(GC, b, bos, t0, kv, seqlen, gc_stride, K_DIM)
    zeros = tl.zeros([BT, BK], dtype=tl.float32)
    # d_cum = dL/dgc: sum_h q_h dq_h - k dk. The group's first head also takes the kv head's own terms (peeled, so
    # that its V loop has no branch); the chunk's gates it loads serve the kv head's terms below.
    dk, d_last, d_cum, g = _inter_head(
        zeros, tl.zeros([BK], dtype=tl.float32), zeros, Q, DO, DQ, DQ_INTRA, HS, DHS, v_base, gc_base, gc_stride, b,
        bos, origin, t0, kv * GROUP, kv, pid_c, num_heads, num_kv_heads, seqlen, scale, offs_t, t_ok, offs_k, k_ok,
        mask, stride_qb, stride_qt, stride_qh, stride_vt, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt,
        stride_dqh, K_DIM, V_DIM, True, DOT_PRECISION, BT, BK, BV, EVEN_K, EVEN_V)
    for r in range(1, GROUP):
        dk, d_last, d_cum, _ = _inter_head(
            dk, d_last, d_cum, Q, DO, DQ, DQ_INTRA, HS, DHS, v_base, gc_base, gc_stride, b, bos, origin, t0,
            kv * GROUP + r, kv, pid_c, num_heads, num_kv_heads, seqlen, scale, offs_t, t_ok, offs_k, k_ok, mask,
            stride_qb, stride_qt, stride_qh, stride_vt, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt,
            stride_dqh, K_DIM, V_DIM, False, DOT_PRECISION, BT, BK, BV, EVEN_K, EVEN_V)
    g_last = tl.load(gc_base + (length - 1) * gc_stride + offs_k, mask=k_ok, other=0.0)
    k = load_tile(row_base(K, b, origin, t0, kv, stride_kb, stride_kt, stride_kh), stride_kt,
                  offs_t, t_ok, offs_k, k_ok, EVEN_K).to(tl.float32)
    tile_off = offs_t[:, None] * gc_stride + offs_k[None, :]
    dk_inter = dk * tl.exp(tl.where(t_ok[:, None], g_last[None, :] - g, float("-inf")))
    dk = dk_inter + tl.load(buffer_base(DK_INTRA, b, bos, t0, kv, seqlen, gc_stride, K_DIM) + tile_off,
                            mask=mask, other=0.0)
    d_cum -= k * dk
    d_last = d_last * tl.exp(g_last) + tl.sum(k * dk_inter, axis=0)
    d_cum += tl.where(offs_t[:, None] == length - 1, d_last[None, :], 0.0)
    dg = tl.cumsum(d_cum, axis=0, reverse=True)
    g_raw = load_tile(row_base(G, b, origin, t0, kv, stride_gb, stride_gt, stride_gh), stride_gt,
                      offs_t, t_ok, offs_k, k_ok, EVEN_K)
    dg = tl.where(g_raw < FLOOR, 0.0, dg)
    out_off = offs_t[:, None] * stride_dkt + offs_k[None, :]
    tl.store(row_base(DK, b, origin, t0, kv, stride_dkb, stride_dkt, stride_dkh) + out_off,
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(row_base(DG, b, origin, t0, kv, stride_dkb, stride_dkt, stride_dkh) + out_off,
             dg.to(DG.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _layout_args(q, call: Call) -> dict:
    return dict(num_heads=call.heads.q, GROUP=call.heads.q // call.heads.kv, REVERSE=call.reverse,
                DOT_PRECISION=dot_precision(q.dtype), BT=CHUNK, **call.layout.chunk_args())


def _intra_scores(q, k, gc, scale, call: Call):
    """The intra-chunk scores A (fp32 [B, T, H, BT] in processing order; zeros above the diagonal)."""
    scores = torch.empty((*q.shape[:3], CHUNK), dtype=torch.float32, device=q.device)
    gla_intra_fwd_kernel.launch(
        (call.layout.total, CHUNK // SUB, call.heads.q),
        Q=q, K=k, GC=gc, A=scores, **call.strides(q=q, k=k), scale=scale, K_DIM=q.shape[3], BC=SUB,
        **_layout_args(q, call))
    return scores


def _outputs(o, q, k, v, gc, slopes, hs, scale, call: Call):
    scores = _intra_scores(q, k, gc, scale, call)
    gla_output_fwd_kernel.launch(
        lambda m: (call.layout.total, triton.cdiv(v.shape[3], m["BV"]), call.heads.q),
        Q=q, V=v, GC=gc, A=scores, HS=hs, O=o, **call.strides(q=q, v=v, o=o), scale=scale, K_DIM=q.shape[3],
        V_DIM=v.shape[3], **_layout_args(q, call))


def _grads(dq, dk, dv, dg, do, q, k, v, g, gc, slopes, hs, dhs, scale, call: Call):
    d_k, d_v = q.shape[3], v.shape[3]
    total, heads = call.layout.total, call.heads
    common = _layout_args(q, call)
    scores = _intra_scores(q, k, gc, scale, call)
    gla_dv_bwd_kernel.launch(
        lambda m: (total, triton.cdiv(d_v, m["BV"]), heads.kv),
        K=k, DO=do, GC=gc, A=scores, DHS=dhs, DV=dv, **call.strides(k=k, do=do, dv=dv), K_DIM=d_k, V_DIM=d_v,
        **common)
    d_scores = scores  # the scores are no longer needed: reuse their buffer
    gla_dscores_bwd_kernel.launch(
        (total, heads.q),
        V=v, DO=do, DA=d_scores, **call.strides(v=v, do=do), scale=scale, V_DIM=d_v, **common)
    dq_intra = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk_intra = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    gla_intra_bwd_kernel.launch(
        lambda m: (total, triton.cdiv(d_k, m["BK"]) * (CHUNK // SUB), heads.kv),
        Q=q, K=k, GC=gc, DA=d_scores, DQ=dq_intra, DK=dk_intra, **call.strides(q=q, k=k), K_DIM=d_k, BC=SUB,
        **common)
    gla_inter_bwd_kernel.launch(
        lambda m: (total, triton.cdiv(d_k, m["BK"]), heads.kv),
        Q=q, K=k, V=v, G=g, GC=gc, DO=do, HS=hs, DHS=dhs, DQ_INTRA=dq_intra, DK_INTRA=dk_intra, DQ=dq, DK=dk, DG=dg,
        **call.strides(q=q, k=k, v=v, g=g, do=do, dq=dq, dk=dk), scale=scale, K_DIM=d_k, V_DIM=d_v, **common)


def chunk_forward(q, k, v, g, slopes, scale, initial_state, cu_seqlens, output_final_state, reverse=False):
    """See pytorch.chunk_forward: same contract (slopes is None: the decay is the gates)."""
    return run_forward(q, k, v, g, None, scale, initial_state, cu_seqlens, output_final_state, reverse, _outputs)


def chunk_backward(do, dht, q, k, v, g, slopes, scale, initial_state, cu_seqlens, reverse=False):
    """See pytorch.chunk_backward: same contract."""
    return run_backward(do, dht, q, k, v, g, None, scale, initial_state, cu_seqlens, reverse, _grads)
