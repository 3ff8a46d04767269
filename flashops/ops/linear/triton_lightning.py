"""Lightning Attention-2 in Triton: the per-chunk output and gradient kernels of linear attention with a
constant per-head decay (the state walks are in ``triton_chunk.py``).

With slope s and lambda = exp(-s), inside a chunk ``D[r, c] = lambda^(r - c)`` for c <= r, computed from indices:
nothing of size [B, T, H, K] is read for the decay.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..._triton_utils import dot_precision, launcher, strides
from ..common.chunks import (
    ChunkLayout,
    chunk_rows,
    load_tile,
    load_tile_t,
    row_base,
    state_ptrs,
    state_ptrs_t,
    tile_mask,
    tile_mask_t,
)
from ..common.triton_numerics import masked_dot
from .triton_chunk import (
    CHUNK,
    GRAD_CONFIGS,
    OUTPUT_CONFIGS,
    chunk_launch_options,
    decay_slope,
    run_backward,
    run_forward,
)


# ----------------------------------------------------------------------------------------------- kernels
@launcher(**chunk_launch_options(OUTPUT_CONFIGS))
@triton.jit
def lightning_output_fwd_kernel(
    # pointers
    Q, K, V, SLOPES, HS, O, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr,
):
    """o = scale * [(q * lambda^(r+1)) h + ((q k^T) * D) v] with D[r, c] = lambda^(r-c) for c <= r."""
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    q_base = row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        q = load_tile(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        k_t = load_tile_t(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        state = tl.load(state_ptrs(HS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                        mask=tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        acc += tl.dot(q, state.to(q.dtype), input_precision=DOT_PRECISION)
        scores += tl.dot(q, k_t, input_precision=DOT_PRECISION)
    slope = decay_slope(SLOPES, h)
    rows = offs_t.to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, -slope * (rows[:, None] - rows[None, :]), float("-inf")))
    v = load_tile(row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh), stride_vt,
                   offs_t, t_ok, offs_v, v_ok, EVEN_V)
    out = acc * (tl.exp(-slope * (rows + 1.0)) * scale)[:, None]
    # Selects, not products with a 0 mask: a NaN/Inf k or v of a later row must not reach earlier rows.
    out = masked_dot(tl.where(causal, scores * decay * scale, 0.0), v, causal, out, DOT_PRECISION)
    o_base = row_base(O, b, bos, t0, h, stride_ob, stride_ot, stride_oh)
    tl.store(o_base + offs_t[:, None] * stride_ot + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=tile_mask(t_ok, v_ok, EVEN_V))


@launcher(**chunk_launch_options(OUTPUT_CONFIGS))
@triton.jit
def lightning_dv_bwd_kernel(
    # pointers
    Q, K, DO, SLOPES, DHS, DV, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_dob, stride_dot, stride_doh,
    stride_dvb, stride_dvt, stride_dvh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr,
):
    """dv_c = scale * sum_{r>=c} lambda^(r-c) (q_r . k_c) do_r + lambda^(L-1-c) k_c dH."""
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    slope = decay_slope(SLOPES, h)
    rows = offs_t.to(tl.float32)
    to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
    q_base = row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    scores_t = tl.zeros([BT, BT], dtype=tl.float32)  # [c, r]
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        k = load_tile(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        q_t = load_tile_t(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        d_state = tl.load(state_ptrs(DHS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        scores_t += tl.dot(k, q_t, input_precision=DOT_PRECISION)
        acc += tl.dot((k * to_end[:, None]).to(k.dtype), d_state.to(k.dtype), input_precision=DOT_PRECISION)
    causal_t = offs_t[:, None] <= offs_t[None, :]  # c <= r
    decay_t = tl.exp(tl.where(causal_t, -slope * (rows[None, :] - rows[:, None]), float("-inf")))
    do = load_tile(row_base(DO, b, bos, t0, h, stride_dob, stride_dot, stride_doh), stride_dot,
                    offs_t, t_ok, offs_v, v_ok, EVEN_V)
    acc += tl.dot((scores_t * decay_t * scale).to(do.dtype), do, input_precision=DOT_PRECISION)
    dv_base = row_base(DV, b, bos, t0, h, stride_dvb, stride_dvt, stride_dvh)
    tl.store(dv_base + offs_t[:, None] * stride_dvt + offs_v[None, :], acc.to(DV.dtype.element_ty),
             mask=tile_mask(t_ok, v_ok, EVEN_V))


@launcher(**chunk_launch_options(GRAD_CONFIGS))
@triton.jit
def lightning_dqdk_bwd_kernel(
    # pointers (DK is laid out like DQ: fresh [B, T, H, K] buffers)
    Q, K, V, DO, SLOPES, HS, DHS, DQ, DK, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr,
):
    """dq = scale lambda^(r+1) do h^T + dA k,  dk = lambda^(L-1-c) v dH^T + dA^T q,
    with dA = scale * (do v^T) * D."""
    pid_c, pid_k, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    v_base = row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh)
    do_base = row_base(DO, b, bos, t0, h, stride_dob, stride_dot, stride_doh)
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        do = load_tile(do_base, stride_dot, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        v = load_tile(v_base, stride_vt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        state_t = tl.load(state_ptrs_t(HS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)  # [BV, BK]
        d_state_t = tl.load(state_ptrs_t(DHS, pid_c, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                            mask=tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)
        d_scores += tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dq += tl.dot(do, state_t.to(do.dtype), input_precision=DOT_PRECISION)
        dk += tl.dot(v, d_state_t.to(v.dtype), input_precision=DOT_PRECISION)
    slope = decay_slope(SLOPES, h)
    rows = offs_t.to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, -slope * (rows[:, None] - rows[None, :]), float("-inf")))
    d_scores = d_scores * decay * scale
    q = load_tile(row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh), stride_qt,
                   offs_t, t_ok, offs_k, k_ok, EVEN_K)
    k = load_tile(row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh), stride_kt,
                   offs_t, t_ok, offs_k, k_ok, EVEN_K)
    to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
    dq = dq * (tl.exp(-slope * (rows + 1.0)) * scale)[:, None]
    dq += tl.dot(d_scores.to(k.dtype), k, input_precision=DOT_PRECISION)
    dk = dk * to_end[:, None]
    dk += tl.dot(tl.trans(d_scores).to(q.dtype), q, input_precision=DOT_PRECISION)
    mask = tile_mask(t_ok, k_ok, EVEN_K)
    offs = offs_t[:, None] * stride_dqt + offs_k[None, :]
    tl.store(row_base(DQ, b, bos, t0, h, stride_dqb, stride_dqt, stride_dqh) + offs,
             dq.to(DQ.dtype.element_ty), mask=mask)
    tl.store(row_base(DK, b, bos, t0, h, stride_dqb, stride_dqt, stride_dqh) + offs,
             dk.to(DK.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _sizes(q, v, scale, layout: ChunkLayout) -> dict:
    return dict(scale=scale, num_heads=q.shape[2], K_DIM=q.shape[3], V_DIM=v.shape[3],
                DOT_PRECISION=dot_precision(q.dtype), BT=CHUNK, **layout.chunk_args())


def _outputs(o, q, k, v, gc, slopes, hs, scale, layout: ChunkLayout):
    lightning_output_fwd_kernel.launch(
        lambda m: (layout.total, triton.cdiv(v.shape[3], m["BV"]), q.shape[2]),
        Q=q, K=k, V=v, SLOPES=slopes, HS=hs, O=o, **strides("q", q, "bth"), **strides("k", k, "bth"),
        **strides("v", v, "bth"), **strides("o", o, "bth"), **_sizes(q, v, scale, layout))


def _grads(dq, dk, dv, dg, do, q, k, v, g, gc, slopes, hs, dhs, scale, layout: ChunkLayout):
    sizes = _sizes(q, v, scale, layout)
    lightning_dv_bwd_kernel.launch(
        lambda m: (layout.total, triton.cdiv(v.shape[3], m["BV"]), q.shape[2]),
        Q=q, K=k, DO=do, SLOPES=slopes, DHS=dhs, DV=dv, **strides("q", q, "bth"), **strides("k", k, "bth"),
        **strides("do", do, "bth"), **strides("dv", dv, "bth"), **sizes)
    lightning_dqdk_bwd_kernel.launch(
        lambda m: (layout.total, triton.cdiv(q.shape[3], m["BK"]), q.shape[2]),
        Q=q, K=k, V=v, DO=do, SLOPES=slopes, HS=hs, DHS=dhs, DQ=dq, DK=dk, **strides("q", q, "bth"),
        **strides("k", k, "bth"), **strides("v", v, "bth"), **strides("do", do, "bth"), **strides("dq", dq, "bth"),
        **sizes)


def chunk_forward(q, k, v, g, slopes, scale, initial_state, cu_seqlens, output_final_state):
    """See pytorch.chunk_forward: same contract (g is None: the decay is the slopes)."""
    return run_forward(q, k, v, None, slopes, scale, initial_state, cu_seqlens, output_final_state, _outputs)


def chunk_backward(do, dht, q, k, v, g, slopes, scale, initial_state, cu_seqlens):
    """See pytorch.chunk_backward: same contract."""
    return run_backward(do, dht, q, k, v, None, slopes, scale, initial_state, cu_seqlens, _grads)
