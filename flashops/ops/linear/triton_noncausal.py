"""Non-causal linear attention in Triton: o_t = scale * q_t (S_0 + K^T V) per sequence.

Two passes: partial states ``x^T y`` summed over segments of 512 positions in parallel, reduced per sequence in
segment order (deterministic), then applied to every chunk of 64 rows. The backward runs the same kernels on
the transposed problem (dS = scale * Q^T dO; dq = scale * dO S^T, dk = V dS^T, dv = K dS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, dot_precision, launcher, strides
from ..common.chunks import ChunkLayout, chunk_coords, load_tile, load_tile_t, row_base, state_ptrs, tile_mask
from .triton_chunk import CHUNK, chunk_launch_options, contiguous_states

SEGMENT = 512  # positions summed by one program of the partial-state kernel
APPLY_CONFIGS = [config(4, 2, BK=64, BV=64), config(8, 2, BK=64, BV=128), config(4, 3, BK=32, BV=64)]
REDUCE_CONFIGS = [config(4, 1, BK=64, BV=64), config(4, 1, BK=32, BV=64)]
_KEY = ("X_DIM", "Y_DIM", "IS_VARLEN")


# ----------------------------------------------------------------------------------------------- kernels
@launcher(**chunk_launch_options(APPLY_CONFIGS, key=_KEY))
@triton.jit
def noncausal_partial_fwd_kernel(
    # pointers
    X, Y, PART, CU, SEG_IDX,
    # strides
    stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
    # sizes
    seqlen, n_segments, num_heads,
    # meta-parameters
    X_DIM: tl.constexpr, Y_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SEGMENT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
):
    """part[segment, h] = sum over the segment's positions of x_t^T y_t (fp32 [segments, H, X, Y])."""
    pid_s, pid_kv, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_v = tl.cdiv(Y_DIM, BV)
    offs_k = (pid_kv // n_v) * BK + tl.arange(0, BK)
    offs_v = (pid_kv % n_v) * BV + tl.arange(0, BV)
    k_ok = offs_k < X_DIM
    v_ok = offs_v < Y_DIM
    n, b, bos, seqlen, i = chunk_coords(pid_s, CU, SEG_IDX, seqlen, n_segments, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(SEGMENT // BT):
        t0 = i * SEGMENT + j * BT
        t_ok = t0 + offs_t < seqlen
        x_t = load_tile_t(row_base(X, b, bos, t0, h, stride_xb, stride_xt, stride_xh), stride_xt,
                           offs_t, t_ok, offs_k, k_ok, EVEN_K)
        y = load_tile(row_base(Y, b, bos, t0, h, stride_yb, stride_yt, stride_yh), stride_yt,
                       offs_t, t_ok, offs_v, v_ok, EVEN_V)
        acc += tl.dot(x_t, y, input_precision=DOT_PRECISION)
    tl.store(state_ptrs(PART, pid_s, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM), acc,
             mask=tile_mask(k_ok, v_ok, EVEN_V))


@launcher(**chunk_launch_options(REDUCE_CONFIGS, key=_KEY, even="V"))
@triton.jit
def noncausal_reduce_fwd_kernel(
    # pointers
    PART, EXTRA, S, SEG_OFF,
    # sizes and scalars
    n_segments, num_heads, scale,
    # meta-parameters
    X_DIM: tl.constexpr, Y_DIM: tl.constexpr, HAS_EXTRA: tl.constexpr, IS_VARLEN: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, EVEN_V: tl.constexpr,
):
    """S[n, h] = scale * sum of the sequence's partial states + extra[n, h] (fp32), in segment order."""
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
    kv_ok = tile_mask(offs_k < X_DIM, offs_v < Y_DIM, EVEN_V)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(count):
        acc += tl.load(state_ptrs(PART, first + j, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM), mask=kv_ok, other=0.0)
    acc = acc * scale
    ptrs = state_ptrs(S, n, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM)
    if HAS_EXTRA:
        acc += tl.load(state_ptrs(EXTRA, n, h, num_heads, offs_k, offs_v, X_DIM, Y_DIM), mask=kv_ok,
                       other=0.0).to(tl.float32)
    tl.store(ptrs, acc, mask=kv_ok)


@launcher(**chunk_launch_options(APPLY_CONFIGS, key=_KEY))
@triton.jit
def noncausal_apply_fwd_kernel(
    # pointers
    X, S, Y, CU, CHUNK_IDX,
    # strides
    stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh, stride_sn, stride_sh, stride_sr, stride_sc,
    # sizes and scalars
    scale, seqlen, n_chunks,
    # meta-parameters
    X_DIM: tl.constexpr, Y_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr,
):
    """y_t = scale * x_t M_n with M_n [X, Y] a (possibly transposed, by its strides) fp32 state of sequence n."""
    pid_c, pid_v, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, b, bos, seqlen, i = chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    offs_t = tl.arange(0, BT)
    t_ok = t0 + offs_t < seqlen
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < Y_DIM
    x_base = row_base(X, b, bos, t0, h, stride_xb, stride_xt, stride_xh)
    s_base = S + tl.cast(n, tl.int64) * stride_sn + h * stride_sh
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for kt in range(tl.cdiv(X_DIM, BK)):
        offs_k = kt * BK + tl.arange(0, BK)
        k_ok = offs_k < X_DIM
        x = load_tile(x_base, stride_xt, offs_t, t_ok, offs_k, k_ok, EVEN_K)
        m = tl.load(s_base + offs_k[:, None] * stride_sr + offs_v[None, :] * stride_sc,
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        acc += tl.dot(x, m.to(x.dtype), input_precision=DOT_PRECISION)
    y_base = row_base(Y, b, bos, t0, h, stride_yb, stride_yt, stride_yh)
    tl.store(y_base + offs_t[:, None] * stride_yt + offs_v[None, :], (acc * scale).to(Y.dtype.element_ty),
             mask=tile_mask(t_ok, v_ok, EVEN_V))


# ---------------------------------------------------------------------------------------------- launchers
def _outer_sum(x, y, extra, scale, segments: ChunkLayout):
    """Per sequence: scale * sum_t x_t^T y_t + extra -> fp32 [N, H, X, Y]."""
    heads, d_x, d_y = x.shape[2], x.shape[3], y.shape[3]
    out = torch.empty((segments.n_seq, heads, d_x, d_y), dtype=torch.float32, device=x.device)
    if segments.total == 0:
        return out.copy_(extra) if extra is not None else out.zero_()
    part = torch.empty((segments.total, heads, d_x, d_y), dtype=torch.float32, device=x.device)
    noncausal_partial_fwd_kernel.launch(
        lambda m: (segments.total, triton.cdiv(d_x, m["BK"]) * triton.cdiv(d_y, m["BV"]), heads),
        X=x, Y=y, PART=part, CU=segments.cu, SEG_IDX=segments.index, **strides("x", x, "bth"),
        **strides("y", y, "bth"), seqlen=segments.seqlen, n_segments=segments.n_chunks, num_heads=heads,
        X_DIM=d_x, Y_DIM=d_y, IS_VARLEN=segments.varlen, DOT_PRECISION=dot_precision(x.dtype), SEGMENT=SEGMENT,
        BT=CHUNK)
    noncausal_reduce_fwd_kernel.launch(
        lambda m: (segments.n_seq * heads, triton.cdiv(d_x, m["BK"]), triton.cdiv(d_y, m["BV"])),
        PART=part, EXTRA=extra if extra is not None else part, S=out, SEG_OFF=segments.offsets,
        n_segments=segments.n_chunks, num_heads=heads, scale=scale, X_DIM=d_x, Y_DIM=d_y,
        HAS_EXTRA=extra is not None, IS_VARLEN=segments.varlen)
    return out


def _apply(x, states, scale, layout: ChunkLayout, transpose: bool, out_dim: int, out_dtype):
    """y_t = scale * x_t S_n (or S_n^T) for each sequence n."""
    heads, d_x = x.shape[2], x.shape[3]
    y = torch.empty((*x.shape[:3], out_dim), dtype=out_dtype, device=x.device)
    if layout.total == 0:
        return y
    noncausal_apply_fwd_kernel.launch(
        lambda m: (layout.total, triton.cdiv(out_dim, m["BV"]), heads),
        X=x, S=states, Y=y, CU=layout.cu, CHUNK_IDX=layout.index, **strides("x", x, "bth"), **strides("y", y, "bth"),
        **strides("s", states.transpose(2, 3) if transpose else states, "nhrc"), scale=scale,
        seqlen=layout.seqlen, n_chunks=layout.n_chunks, X_DIM=d_x, Y_DIM=out_dim, IS_VARLEN=layout.varlen,
        DOT_PRECISION=dot_precision(x.dtype), BT=CHUNK)
    return y


def noncausal_forward(q, k, v, scale, initial_state, cu_seqlens, output_final_state):
    """See pytorch.noncausal_forward: same contract."""
    states = _outer_sum(k, v, contiguous_states(initial_state), 1.0, ChunkLayout(q, cu_seqlens, SEGMENT))
    o = _apply(q, states, scale, ChunkLayout(q, cu_seqlens, CHUNK), False, v.shape[3], q.dtype)
    return o, (states if output_final_state else None)


def noncausal_backward(do, dht, q, k, v, scale, initial_state, cu_seqlens):
    """See pytorch.noncausal_backward: same contract."""
    segments = ChunkLayout(q, cu_seqlens, SEGMENT)
    layout = ChunkLayout(q, cu_seqlens, CHUNK)
    states = _outer_sum(k, v, contiguous_states(initial_state), 1.0, segments)
    d_states = _outer_sum(q, do, contiguous_states(dht), scale, segments)
    dq = _apply(do, states, scale, layout, True, q.shape[3], q.dtype)
    dk = _apply(v, d_states, 1.0, layout, True, k.shape[3], k.dtype)
    dv = _apply(k, d_states, 1.0, layout, False, v.shape[3], v.dtype)
    return dq, dk, dv, (d_states if initial_state is not None else None)
