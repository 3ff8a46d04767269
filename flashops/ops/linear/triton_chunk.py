"""The chunked causal forms of linear attention in Triton (Lightning Attention-2, GLA): the pipeline both share.

Schedule (fla-style, two passes). The sequence is cut into chunks of BT = 64 positions.
1. The state walks (this file), one program per (K tile, V tile, sequence * head), walk the chunks in order
   and write the state *before* each chunk to HBM (``hs`` [chunks, H, K, V]); the walk's loop-carried work is
   one elementwise fma per chunk, the chunk's k^T v product does not depend on it and pipelines.
2. Every chunk's outputs are then computed in parallel (grid over V tiles x chunks x heads), by the algorithm's
   own kernels (``triton_lightning.py``, ``triton_gla.py``): o = scale * (q * decay) @ h + (masked intra-chunk
   scores) @ v.
Parallelism of the heavy part is B * H * T / 64 programs, independent of the batch size, so throughput
stays flat in T and small batches at long T fill the GPU. The single-pass alternative (one program per
(b, h, V tile) that also computes the outputs) has only B * H * V/BV programs.

Gates. Lightning (``SCALAR`` walks): a per-head slope s, log-gate -s at every position, so every decay is
exp(-s * distance) computed from indices; nothing of size [B, T, H, K] is read. GLA: chunk-local inclusive
cumsums of the log-gates ``gc`` are precomputed (fp32, ``ops/common/chunks.gate_cumsum``); exponentials are
re-anchored (chunk start, chunk end, or a 16-row sub-chunk boundary) so that each is exp(x) with x <= 0.

Backward recomputes the states (and, for GLA, the intra scores) instead of storing them, and runs one reverse
walk over the chunks for the state gradients ``dhs`` (gradient of the state *after* each chunk). Nothing uses
atomics: the backward is deterministic.

Varlen: sequences are packed ([1, total, H, D], ``cu_seqlens``); ``ops/common/chunks.ChunkLayout`` maps the
global chunk index to (sequence, chunk in sequence), and chunks never straddle sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, dot_precision, launcher, strides
from ..common.chunks import (
    ChunkLayout,
    buffer_base,
    gate_cumsum,
    load_tile,
    load_tile_t,
    row_base,
    sequence_chunks,
    state_ptrs,
    tile_mask,
)
from .common import LOG_GATE_FLOOR

CHUNK = 64  # BT: positions per chunk
SUB = 16  # BC: rows per sub-chunk of the GLA intra-chunk products (tl.dot needs >= 16)
FLOOR = tl.constexpr(LOG_GATE_FLOOR)  # jit code may only read constexpr globals

# ----------------------------------------------------------------------------------------------- configs
# First entry of each list: the default. Under the interpreter every block is 16 wide so that the small test head
# dims still cross tile boundaries.
STATE_CONFIGS = [config(4, 3, BK=64, BV=64), config(4, 3, BK=32, BV=64), config(4, 3, BK=64, BV=32),
                 config(2, 3, BK=32, BV=32), config(8, 2, BK=64, BV=64), config(4, 4, BK=32, BV=32),
                 config(4, 2, BK=128, BV=64)]
OUTPUT_CONFIGS = [config(4, 2, BK=64, BV=64), config(8, 2, BK=64, BV=128), config(4, 3, BK=32, BV=64),
                  config(4, 3, BK=64, BV=32), config(8, 2, BK=128, BV=64), config(4, 2, BK=128, BV=128),
                  config(8, 3, BK=64, BV=64)]
GRAD_CONFIGS = [config(4, 2, BK=64, BV=64), config(8, 2, BK=64, BV=64), config(4, 3, BK=32, BV=64),
                config(4, 3, BK=64, BV=32), config(8, 2, BK=128, BV=64), config(4, 2, BK=32, BV=32)]
# The diagonal sub-blocks of the GLA intra kernels hold a [16, 16, BK] fp32 product: BK <= 32.
INTRA_CONFIGS = [config(4, 2, BK=32), config(2, 2, BK=32), config(4, 3, BK=16), config(2, 2, BK=16),
                 config(8, 2, BK=32)]
DSCORES_CONFIGS = [config(4, 2, BV=64), config(8, 2, BV=128), config(4, 3, BV=32)]
INTERPRETED_BLOCK = 16
# Derived flags: whether K (V) is a multiple of its block, so that loads along it need no mask. The non-causal
# kernels call their dimensions X and Y.
_EVEN_FLAGS = {
    "K": ("EVEN_K", lambda args: args["K_DIM" if "K_DIM" in args else "X_DIM"] % args["BK"] == 0),
    "V": ("EVEN_V", lambda args: args["V_DIM" if "V_DIM" in args else "Y_DIM"] % args["BV"] == 0),
}


def chunk_launch_options(configs: list, *extra_key: str, key: tuple = ("K_DIM", "V_DIM", "IS_VARLEN"),
                         even: str = "KV") -> dict:
    """Launcher options of a chunked kernel: its configs, the interpreter's 16-wide blocks, the autotune key
    (never T: packed lengths vary call to call) and the EVEN_K / EVEN_V flags it takes (``even``)."""
    return dict(configs=configs, key=(*key, *extra_key),
                interpreted=config(1, 1, **{b: INTERPRETED_BLOCK for b in configs[0].kwargs}),
                heuristics=dict(_EVEN_FLAGS[d] for d in even))


# ---------------------------------------------------------------------------------------------- helpers
@triton.jit
def decay_slope(SLOPES, h):
    # Capped like the log-gates so that exp(-slope * distance) stays finite and never inf * 0; a NaN or
    # negative (out of domain) slope is NaN (selects: tl.minimum would turn NaN into the cap).
    slope = tl.load(SLOPES + h).to(tl.float32)
    slope = tl.where(slope > -FLOOR, -FLOOR, slope)
    return tl.where(slope < 0, float("nan"), slope)


# ------------------------------------------------------------------------------------------- state walks
@launcher(**chunk_launch_options(STATE_CONFIGS, "SCALAR", "HAS_H0", "STORE_FINAL"))
@triton.jit
def linear_state_fwd_kernel(
    # pointers
    K, V, GC, SLOPES, H0, HS, HT, CU, CHUNK_OFF,
    # strides
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    # sizes
    seqlen, n_chunks, num_heads,
    # meta-parameters
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr,
):
    """hs[chunk] = state before the chunk; ht = final state (fp32). S <- decay(chunk) S + (k * decay_to_end)^T v."""
    pid_nh, pid_k, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_nh // num_heads
    h = pid_nh % num_heads
    b, bos, seqlen, first, count = sequence_chunks(n, CU, CHUNK_OFF, seqlen, n_chunks, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < K_DIM
    v_ok = offs_v < V_DIM
    kv_ok = tile_mask(k_ok, v_ok, EVEN_V)
    state_off = offs_k[:, None] * V_DIM + offs_v[None, :]
    seq_state = tl.cast(n * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = tl.load(H0 + seq_state + state_off, mask=kv_ok, other=0.0).to(tl.float32)
    slope = 0.0
    if SCALAR:
        slope = decay_slope(SLOPES, h)
    for i in range(count):
        tl.store(state_ptrs(HS, first + i, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                 state.to(HS.dtype.element_ty), mask=kv_ok)
        t0 = i * BT
        length = tl.minimum(seqlen - t0, BT)
        t_ok = offs_t < length
        k_t = load_tile_t(row_base(K, b, bos, t0, h, stride_kb, stride_kt, stride_kh), stride_kt,
                           offs_t, t_ok, offs_k, k_ok, EVEN_K)  # [BK, BT]
        v = load_tile(row_base(V, b, bos, t0, h, stride_vb, stride_vt, stride_vh), stride_vt,
                       offs_t, t_ok, offs_v, v_ok, EVEN_V)
        if SCALAR:
            to_end = tl.exp(tl.where(t_ok, -slope * (length - 1 - offs_t).to(tl.float32), float("-inf")))
            k_dec = k_t * to_end[None, :]
            state = state * tl.exp(-slope * length.to(tl.float32))
        else:
            gc_base = buffer_base(GC, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM)
            gc_t = load_tile_t(gc_base, num_heads * K_DIM, offs_t, t_ok, offs_k, k_ok, EVEN_K)
            g_last = tl.load(gc_base + (length - 1) * (num_heads * K_DIM) + offs_k, mask=k_ok, other=0.0)
            k_dec = k_t * tl.exp(g_last[:, None] - gc_t)
            state = state * tl.exp(g_last)[:, None]
        state += tl.dot(k_dec.to(v.dtype), v, input_precision=DOT_PRECISION)
    if STORE_FINAL:
        tl.store(HT + seq_state + state_off, state, mask=kv_ok)


@launcher(**chunk_launch_options(STATE_CONFIGS, "SCALAR", "HAS_DHT", "STORE_DH0"))
@triton.jit
def linear_state_bwd_kernel(
    # pointers
    Q, DO, GC, SLOPES, DHT, DHS, DH0, CU, CHUNK_OFF,
    # strides
    stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
    # sizes and scalars
    scale, seqlen, n_chunks, num_heads,
    # meta-parameters
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_V: tl.constexpr,
):
    """Reverse walk: dhs[chunk] = dL/d(state after the chunk); dh0 = dL/d(initial state).
    D <- decay(chunk) D + scale * (q * decay_from_start)^T do."""
    pid_nh, pid_k, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_nh // num_heads
    h = pid_nh % num_heads
    b, bos, seqlen, first, count = sequence_chunks(n, CU, CHUNK_OFF, seqlen, n_chunks, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < K_DIM
    v_ok = offs_v < V_DIM
    kv_ok = tile_mask(k_ok, v_ok, EVEN_V)
    state_off = offs_k[:, None] * V_DIM + offs_v[None, :]
    seq_state = tl.cast(n * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state = tl.load(DHT + seq_state + state_off, mask=kv_ok, other=0.0).to(tl.float32)
    slope = 0.0
    if SCALAR:
        slope = decay_slope(SLOPES, h)
    for j in range(count):
        i = count - 1 - j
        tl.store(state_ptrs(DHS, first + i, h, num_heads, offs_k, offs_v, K_DIM, V_DIM),
                 d_state.to(DHS.dtype.element_ty), mask=kv_ok)
        t0 = i * BT
        length = tl.minimum(seqlen - t0, BT)
        t_ok = offs_t < length
        q_t = load_tile_t(row_base(Q, b, bos, t0, h, stride_qb, stride_qt, stride_qh), stride_qt,
                           offs_t, t_ok, offs_k, k_ok, EVEN_K)  # [BK, BT]
        do = load_tile(row_base(DO, b, bos, t0, h, stride_dob, stride_dot, stride_doh), stride_dot,
                        offs_t, t_ok, offs_v, v_ok, EVEN_V)
        if SCALAR:
            from_start = tl.exp(-slope * (offs_t + 1).to(tl.float32)) * scale
            q_dec = q_t * from_start[None, :]
            d_state = d_state * tl.exp(-slope * length.to(tl.float32))
        else:
            gc_base = buffer_base(GC, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM)
            gc_t = load_tile_t(gc_base, num_heads * K_DIM, offs_t, t_ok, offs_k, k_ok, EVEN_K)
            g_last = tl.load(gc_base + (length - 1) * (num_heads * K_DIM) + offs_k, mask=k_ok, other=0.0)
            q_dec = q_t * (tl.exp(gc_t) * scale)
            d_state = d_state * tl.exp(g_last)[:, None]
        d_state += tl.dot(q_dec.to(do.dtype), do, input_precision=DOT_PRECISION)
    if STORE_DH0:
        tl.store(DH0 + seq_state + state_off, d_state, mask=kv_ok)


# ---------------------------------------------------------------------------------------------- launchers
def contiguous_states(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float().contiguous()


def forward_states(k, v, gc, slopes, initial_state, layout: ChunkLayout, store_final: bool):
    """(hs: the state before every chunk [chunks, H, K, V] in the input dtype (as fla, fp32 stays fp32), final
    state fp32 [N, H, K, V] or None)."""
    heads, d_k, d_v = k.shape[2], k.shape[3], v.shape[3]
    hs = torch.empty((layout.total, heads, d_k, d_v), dtype=k.dtype, device=k.device)
    ht = torch.empty((layout.n_seq, heads, d_k, d_v), dtype=torch.float32, device=k.device) if store_final else hs
    linear_state_fwd_kernel.launch(
        lambda m: (layout.n_seq * heads, triton.cdiv(d_k, m["BK"]), triton.cdiv(d_v, m["BV"])),
        K=k, V=v, GC=gc if gc is not None else hs, SLOPES=slopes if slopes is not None else hs,
        H0=initial_state if initial_state is not None else hs, HS=hs, HT=ht, **layout.sequence_args(),
        **strides("k", k, "bth"), **strides("v", v, "bth"), num_heads=heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=gc is None, HAS_H0=initial_state is not None, STORE_FINAL=store_final,
        DOT_PRECISION=dot_precision(k.dtype), BT=CHUNK)
    return hs, (ht if store_final else None)


def backward_states(q, do, gc, slopes, dht, scale, layout: ChunkLayout, store_dh0: bool):
    """(dhs: the gradient of the state after every chunk [chunks, H, K, V], dh0 fp32 [N, H, K, V] or None)."""
    heads, d_k, d_v = q.shape[2], q.shape[3], do.shape[3]
    dhs = torch.empty((layout.total, heads, d_k, d_v), dtype=q.dtype, device=q.device)
    dh0 = torch.empty((layout.n_seq, heads, d_k, d_v), dtype=torch.float32, device=q.device) if store_dh0 else dhs
    linear_state_bwd_kernel.launch(
        lambda m: (layout.n_seq * heads, triton.cdiv(d_k, m["BK"]), triton.cdiv(d_v, m["BV"])),
        Q=q, DO=do, GC=gc if gc is not None else dhs, SLOPES=slopes if slopes is not None else dhs,
        DHT=dht if dht is not None else dhs, DHS=dhs, DH0=dh0, **layout.sequence_args(),
        **strides("q", q, "bth"), **strides("do", do, "bth"), scale=scale, num_heads=heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=gc is None, HAS_DHT=dht is not None, STORE_DH0=store_dh0,
        DOT_PRECISION=dot_precision(q.dtype), BT=CHUNK)
    return dhs, (dh0 if store_dh0 else None)


def run_forward(q, k, v, g, slopes, scale, initial_state, cu_seqlens, output_final_state, outputs: Callable):
    """The chunked forward: (gate cumsum,) state walk, then ``outputs(o, q, k, v, gc, slopes, hs, scale,
    layout)`` fills o [B, T, H, V] chunk by chunk. Returns (o, final state or None)."""
    heads, d_k, d_v = q.shape[2], q.shape[3], v.shape[3]
    layout = ChunkLayout(q, cu_seqlens, CHUNK)
    o = torch.empty((*q.shape[:3], d_v), dtype=q.dtype, device=q.device)
    initial_state = contiguous_states(initial_state)
    if layout.total == 0:
        if not output_final_state:
            return o, None
        final = initial_state.clone() if initial_state is not None else q.new_zeros(
            (layout.n_seq, heads, d_k, d_v), dtype=torch.float32)
        return o, final
    gc = gate_cumsum(g, layout, CHUNK, LOG_GATE_FLOOR) if g is not None else None
    hs, final = forward_states(k, v, gc, slopes, initial_state, layout, output_final_state)
    outputs(o, q, k, v, gc, slopes, hs, scale, layout)
    return o, final


def run_backward(do, dht, q, k, v, g, slopes, scale, initial_state, cu_seqlens, grads: Callable):
    """The chunked backward: states recomputed, the reverse walk for their gradients, then ``grads(dq, dk, dv,
    dg, do, q, k, v, g, gc, slopes, hs, dhs, scale, layout)`` fills the input gradients chunk by chunk.
    Returns (dq, dk, dv, dg or None, dh0 or None)."""
    layout = ChunkLayout(q, cu_seqlens, CHUNK)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dg = torch.empty(g.shape, dtype=g.dtype, device=g.device) if g is not None else None
    initial_state = contiguous_states(initial_state)
    dht = contiguous_states(dht)
    if layout.total == 0:
        dh0 = None
        if initial_state is not None:
            dh0 = (dht.clone() if dht is not None else torch.zeros_like(initial_state))
        return dq, dk, dv, dg, dh0
    gc = gate_cumsum(g, layout, CHUNK, LOG_GATE_FLOOR) if g is not None else None
    hs, _ = forward_states(k, v, gc, slopes, initial_state, layout, False)
    dhs, dh0 = backward_states(q, do, gc, slopes, dht, scale, layout, initial_state is not None)
    grads(dq, dk, dv, dg, do, q, k, v, g, gc, slopes, hs, dhs, scale, layout)
    return dq, dk, dv, dg, dh0
