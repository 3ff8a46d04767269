"""Lightning Attention-2 in Triton: the per-chunk output and gradient kernels of linear attention with a
constant per-head decay (the state walks are in ``triton_chunk.py``).

With slope s and lambda = exp(-s), inside a chunk ``D[r, c] = lambda^(r - c)`` for c <= r, computed from indices:
nothing of size [B, T, H, K] is read for the decay. GQA: the forward runs one program per query head; the
gradient kernels one per kv head, looping over the states (one per slope) and query heads of its group, so that
dk and dv are summed over the group in registers (``triton_chunk.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..._triton_utils import dot_precision, launcher
from ..common.chunks import (
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
    Call,
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
    GROUP: tl.constexpr, HEADS_PER_STATE: tl.constexpr,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    """o = scale * [(q * lambda^(r+1)) h + ((q k^T) * D) v] with D[r, c] = lambda^(r-c) for c <= r; one program
    per query head h (kv head h // GROUP, state head h // HEADS_PER_STATE)."""
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, origin, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks,
                                                                  IS_VARLEN, REVERSE, BT)
    kv = h // GROUP
    s = h // HEADS_PER_STATE
    num_state_heads = num_heads // HEADS_PER_STATE
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    q_base = row_base(Q, b, origin, t0, h, stride_qb, stride_qt, stride_qh)
    k_base = row_base(K, b, origin, t0, kv, stride_kb, stride_kt, stride_kh)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for kt in range(tl.cdiv(K_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < K_DIM
        q = load_tile(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        k_t = load_tile_t(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        state = tl.load(state_ptrs(HS, pid_c, s, num_state_heads, offs_k, offs_v, K_DIM, V_DIM),
                        mask=tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
        acc += tl.dot(q, state.to(q.dtype), input_precision=DOT_PRECISION)
        scores += tl.dot(q, k_t, input_precision=DOT_PRECISION)
    slope = decay_slope(SLOPES, s)
    rows = offs_t.to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, -slope * (rows[:, None] - rows[None, :]), float("-inf")))
    v = load_tile(row_base(V, b, origin, t0, kv, stride_vb, stride_vt, stride_vh), stride_vt,
                  offs_t, t_ok, offs_v, v_ok, EVEN_V)
    out = acc * (tl.exp(-slope * (rows + 1.0)) * scale)[:, None]
    # Selects, not products with a 0 mask: a NaN/Inf k or v of a later row must not reach earlier rows.
    out = masked_dot(tl.where(causal, scores * decay * scale, 0.0), v, causal, out, DOT_PRECISION)
    o_base = row_base(O, b, origin, t0, h, stride_ob, stride_ot, stride_oh)
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
    GROUP: tl.constexpr, HEADS_PER_STATE: tl.constexpr,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    """dv_c = sum over the states s of kv head c's group [lambda_s^(L-1-c) k_c dH_s + sum over the query heads h
    of s: scale * sum_{r>=c} lambda_s^(r-c) (q_hr . k_c) do_hr]; one program per kv head."""
    pid_c, pid_v, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, origin, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks,
                                                                  IS_VARLEN, REVERSE, BT)
    num_state_heads = num_heads // HEADS_PER_STATE
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < V_DIM
    rows = offs_t.to(tl.float32)
    k_base = row_base(K, b, origin, t0, kv, stride_kb, stride_kt, stride_kh)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    # Loops of one iteration unless GQA: the states of kv head kv (one per slope), the query heads of each.
    for si in range(GROUP // HEADS_PER_STATE):
        s = kv * (GROUP // HEADS_PER_STATE) + si
        slope = decay_slope(SLOPES, s)
        to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
        for r in range(HEADS_PER_STATE):
            h = s * HEADS_PER_STATE + r
            q_base = row_base(Q, b, origin, t0, h, stride_qb, stride_qt, stride_qh)
            scores_t = tl.zeros([BT, BT], dtype=tl.float32)  # [c, r]
            for kt in range(tl.cdiv(K_DIM, BK)):
                offs_k = kt * BK + tl.arange(0, BK)
                k_ok = offs_k < K_DIM
                k = load_tile(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
                q_t = load_tile_t(q_base, stride_qt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
                scores_t += tl.dot(k, q_t, input_precision=DOT_PRECISION)
                if r == 0:  # the state's own term, once per state (fused into its first head's K loop)
                    d_state = tl.load(state_ptrs(DHS, pid_c, s, num_state_heads, offs_k, offs_v, K_DIM, V_DIM),
                                      mask=tile_mask(k_ok, v_ok, EVEN_V), other=0.0)
                    acc += tl.dot((k * to_end[:, None]).to(k.dtype), d_state.to(k.dtype),
                                  input_precision=DOT_PRECISION)
            causal_t = offs_t[:, None] <= offs_t[None, :]  # c <= r
            decay_t = tl.exp(tl.where(causal_t, -slope * (rows[None, :] - rows[:, None]), float("-inf")))
            do = load_tile(row_base(DO, b, origin, t0, h, stride_dob, stride_dot, stride_doh), stride_dot,
                           offs_t, t_ok, offs_v, v_ok, EVEN_V)
            # A select, not the zero decay: a NaN/Inf q_r must not reach dv of the later positions c > r.
            scores_t = tl.where(causal_t, scores_t * decay_t * scale, 0.0)
            acc += tl.dot(scores_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dv_base = row_base(DV, b, origin, t0, kv, stride_dvb, stride_dvt, stride_dvh)
    tl.store(dv_base + offs_t[:, None] * stride_dvt + offs_v[None, :], acc.to(DV.dtype.element_ty),
             mask=tile_mask(t_ok, v_ok, EVEN_V))


@triton.jit
def _dqdk_head(dk, Q, DO, DQ, k_base, v_base, HS, DHS, b, origin, t0, h, pid_c, s, num_state_heads, slope, scale,
               offs_t, t_ok, length, offs_k, k_ok, mask, stride_qb, stride_qt, stride_qh, stride_kt, stride_vt,
               stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
               K_DIM: tl.constexpr, V_DIM: tl.constexpr, FIRST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr):
    """Query head h of state s: stores its dq and returns dk plus its dA^T q, and for the state's FIRST head also
    the state's own term lambda^(L-1-c) v dH^T (computed in the same V loop: v is read once per head)."""
    do_base = row_base(DO, b, origin, t0, h, stride_dob, stride_dot, stride_doh)
    rows = offs_t.to(tl.float32)
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk_state = tl.zeros([BT, BK], dtype=tl.float32)
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        do = load_tile(do_base, stride_dot, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        v = load_tile(v_base, stride_vt, offs_t, t_ok, offs_v, v_ok, EVEN_V)
        state_t = tl.load(state_ptrs_t(HS, pid_c, s, num_state_heads, offs_k, offs_v, K_DIM, V_DIM),
                          mask=tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)  # [BV, BK]
        d_scores += tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dq += tl.dot(do, state_t.to(do.dtype), input_precision=DOT_PRECISION)
        if FIRST:
            d_state_t = tl.load(state_ptrs_t(DHS, pid_c, s, num_state_heads, offs_k, offs_v, K_DIM, V_DIM),
                                mask=tile_mask_t(k_ok, v_ok, EVEN_V), other=0.0)
            dk_state += tl.dot(v, d_state_t.to(v.dtype), input_precision=DOT_PRECISION)
    if FIRST:
        to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
        dk += dk_state * to_end[:, None]
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, -slope * (rows[:, None] - rows[None, :]), float("-inf")))
    d_scores = tl.where(causal, d_scores * decay * scale, 0.0)  # no 0 * NaN from a later v
    q = load_tile(row_base(Q, b, origin, t0, h, stride_qb, stride_qt, stride_qh), stride_qt, offs_t, t_ok, offs_k,
                  k_ok, EVEN_K)
    k = load_tile(k_base, stride_kt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
    dq = dq * (tl.exp(-slope * (rows + 1.0)) * scale)[:, None]
    # A NaN/Inf k (q) reaches only dq (dk) of the rows that see it.
    dq = masked_dot(d_scores, k, causal, dq, DOT_PRECISION)
    tl.store(row_base(DQ, b, origin, t0, h, stride_dqb, stride_dqt, stride_dqh) + offs_t[:, None] * stride_dqt
             + offs_k[None, :], dq.to(DQ.dtype.element_ty), mask=mask)
    return masked_dot(tl.trans(d_scores), q, tl.trans(causal), dk, DOT_PRECISION)


@launcher(**chunk_launch_options(GRAD_CONFIGS))
@triton.jit
def lightning_dqdk_bwd_kernel(
    # pointers
    Q, K, V, DO, SLOPES, HS, DHS, DQ, DK, CU, CHUNK_IDX,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh, stride_dkb, stride_dkt, stride_dkh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    GROUP: tl.constexpr, HEADS_PER_STATE: tl.constexpr,
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    """dq_h = scale lambda^(r+1) do_h h_s^T + dA_h k,  dk = sum over the group [lambda_s^(L-1-c) v dH_s^T +
    dA_h^T q_h], with dA_h = scale * (do_h v^T) * D_s; one program per kv head (writes dq of its query heads)."""
    pid_c, pid_k, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, bos, origin, seqlen, t0, length, offs_t, t_ok = chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks,
                                                                  IS_VARLEN, REVERSE, BT)
    num_state_heads = num_heads // HEADS_PER_STATE
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    mask = tile_mask(t_ok, k_ok, EVEN_K)
    v_base = row_base(V, b, origin, t0, kv, stride_vb, stride_vt, stride_vh)
    k_base = row_base(K, b, origin, t0, kv, stride_kb, stride_kt, stride_kh)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    # The states of kv head kv (one per slope), then the query heads of each; only dk is carried from one head to
    # the next, so a group costs the registers of a single head. The first head of a state also adds the state's
    # own term (peeled, so that its V loop has no branch).
    for si in range(GROUP // HEADS_PER_STATE):
        s = kv * (GROUP // HEADS_PER_STATE) + si
        slope = decay_slope(SLOPES, s)
        h = s * HEADS_PER_STATE
        dk = _dqdk_head(dk, Q, DO, DQ, k_base, v_base, HS, DHS, b, origin, t0, h, pid_c, s, num_state_heads, slope,
                        scale, offs_t, t_ok, length, offs_k, k_ok, mask, stride_qb, stride_qt, stride_qh, stride_kt,
                        stride_vt, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh, K_DIM, V_DIM,
                        True, DOT_PRECISION, BT, BK, BV, EVEN_K, EVEN_V)
        for r in range(1, HEADS_PER_STATE):
            dk = _dqdk_head(dk, Q, DO, DQ, k_base, v_base, HS, DHS, b, origin, t0, h + r, pid_c, s,
                            num_state_heads, slope, scale, offs_t, t_ok, length, offs_k, k_ok, mask, stride_qb,
                            stride_qt, stride_qh, stride_kt, stride_vt, stride_dob, stride_dot, stride_doh,
                            stride_dqb, stride_dqt, stride_dqh, K_DIM, V_DIM, False, DOT_PRECISION, BT, BK, BV,
                            EVEN_K, EVEN_V)
    tl.store(row_base(DK, b, origin, t0, kv, stride_dkb, stride_dkt, stride_dkh)
             + offs_t[:, None] * stride_dkt + offs_k[None, :], dk.to(DK.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _sizes(q, v, scale, call: Call) -> dict:
    return dict(scale=scale, **call.heads.args(), K_DIM=q.shape[3], V_DIM=v.shape[3], REVERSE=call.reverse,
                DOT_PRECISION=dot_precision(q.dtype), BT=CHUNK, **call.layout.chunk_args())


def _outputs(o, q, k, v, gc, slopes, hs, scale, call: Call):
    lightning_output_fwd_kernel.launch(
        lambda m: (call.layout.total, triton.cdiv(v.shape[3], m["BV"]), call.heads.q),
        Q=q, K=k, V=v, SLOPES=slopes, HS=hs, O=o, **call.strides(q=q, k=k, v=v, o=o),
        **_sizes(q, v, scale, call))


def _grads(dq, dk, dv, dg, do, q, k, v, g, gc, slopes, hs, dhs, scale, call: Call):
    sizes = _sizes(q, v, scale, call)
    lightning_dv_bwd_kernel.launch(
        lambda m: (call.layout.total, triton.cdiv(v.shape[3], m["BV"]), call.heads.kv),
        Q=q, K=k, DO=do, SLOPES=slopes, DHS=dhs, DV=dv, **call.strides(q=q, k=k, do=do, dv=dv), **sizes)
    lightning_dqdk_bwd_kernel.launch(
        lambda m: (call.layout.total, triton.cdiv(q.shape[3], m["BK"]), call.heads.kv),
        Q=q, K=k, V=v, DO=do, SLOPES=slopes, HS=hs, DHS=dhs, DQ=dq, DK=dk,
        **call.strides(q=q, k=k, v=v, do=do, dq=dq, dk=dk), **sizes)


def chunk_forward(q, k, v, g, slopes, scale, initial_state, cu_seqlens, output_final_state, reverse=False):
    """See pytorch.chunk_forward: same contract (g is None: the decay is the slopes)."""
    return run_forward(q, k, v, None, slopes, scale, initial_state, cu_seqlens, output_final_state, reverse,
                       _outputs)


def chunk_backward(do, dht, q, k, v, g, slopes, scale, initial_state, cu_seqlens, reverse=False):
    """See pytorch.chunk_backward: same contract."""
    return run_backward(do, dht, q, k, v, None, slopes, scale, initial_state, cu_seqlens, reverse, _grads)
