"""Linear-attention decoding in Triton: one token of the recurrence S1 = diag(exp(g)) S0 + k^T v, o = scale * q S1
(Lightning: g = -slope for every key), forward and backward. GQA as in the chunked kernels: query head h reads
kv head h // (H / H_kv) and state h // (H / H_state)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, launcher, strides
from .triton_chunk import FLOOR, contiguous_states, decay_slope


@functools.cache
def _step_configs(d_k: int, d_v: int, interpreted: bool) -> tuple:
    """One config: the whole key dimension per program and as wide a V tile as 8K elements allow (16 under the
    interpreter, so that tests cross V tiles)."""
    block_k = max(16, triton.next_power_of_2(d_k))
    block_v = 16 if interpreted else max(16, min(triton.next_power_of_2(d_v), 8192 // block_k))
    return (config(4 if block_k * block_v >= 4096 else 2, 3, BK=block_k, BV=block_v),)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _step_decay(G, SLOPES, b, h, stride_gb, stride_gh, offs_k, k_ok, SCALAR: tl.constexpr):
    """Per-key decay exp(g) [BK] of one step (the slope broadcast over K for Lightning) and the raw log-gate."""
    if SCALAR:
        g = tl.zeros_like(offs_k.to(tl.float32)) - decay_slope(SLOPES, h)
    else:
        g = tl.load(G + b * stride_gb + h * stride_gh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.where(g > 0, float("nan"), g)  # out of domain, as in the chunked kernels
    return tl.exp(tl.where(g < FLOOR, FLOOR, g)), g


@launcher(configs=lambda args: _step_configs(args["K_DIM"], args["V_DIM"], False),
          interpreted=lambda args: _step_configs(args["K_DIM"], args["V_DIM"], True)[0])
@triton.jit
def recurrent_step_fwd_kernel(
    # pointers
    Q, K, V, G, SLOPES, S0, O, S1,
    # strides
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh, stride_ob, stride_oh,
    # sizes and scalars
    scale, num_heads, num_kv_heads, num_state_heads,
    # meta-parameters
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_S0: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """S1 = diag(exp(g)) S0 + k^T v, o_h = scale * q_h S1 for one token; one program per (b * state head, V tile)
    writes its state and the outputs of the query heads that read it (GQA)."""
    pid_bs, pid_v = tl.program_id(0), tl.program_id(1)
    b = pid_bs // num_state_heads
    s = pid_bs % num_state_heads
    kv = s // (num_state_heads // num_kv_heads)
    heads_per_state = num_heads // num_state_heads
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < K_DIM
    v_ok = offs_v < V_DIM
    kv_ok = k_ok[:, None] & v_ok[None, :]
    k = tl.load(K + b * stride_kb + kv * stride_kh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.load(V + b * stride_vb + kv * stride_vh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    decay, _ = _step_decay(G, SLOPES, b, s, stride_gb, stride_gh, offs_k, k_ok, SCALAR)
    state_off = tl.cast(pid_bs, tl.int64) * (K_DIM * V_DIM) + offs_k[:, None] * V_DIM + offs_v[None, :]
    state = k[:, None] * v[None, :]
    if HAS_S0:
        state += decay[:, None] * tl.load(S0 + state_off, mask=kv_ok, other=0.0).to(tl.float32)
    tl.store(S1 + state_off, state, mask=kv_ok)
    for r in range(heads_per_state):
        h = s * heads_per_state + r
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        o = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(O + b * stride_ob + h * stride_oh + offs_v, o.to(O.dtype.element_ty), mask=v_ok)


@launcher(configs=lambda args: _step_configs(args["K_DIM"], args["V_DIM"], False),
          interpreted=lambda args: _step_configs(args["K_DIM"], args["V_DIM"], True)[0])
@triton.jit
def recurrent_step_bwd_kernel(
    # pointers (the gradients are fresh contiguous buffers: [B, heads, D] and [B, H_state, K, V])
    Q, K, V, G, SLOPES, S0, DO, DS1, DQ, DK, DV, DG, DS0,
    # strides
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh, stride_dob, stride_doh,
    # sizes and scalars
    scale, num_heads, num_kv_heads, num_state_heads,
    # meta-parameters
    K_DIM: tl.constexpr, V_DIM: tl.constexpr, SCALAR: tl.constexpr, HAS_S0: tl.constexpr, HAS_DS1: tl.constexpr,
    SINGLE_HEAD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Gradients of one step; one program per (b, kv head) walks the V tiles (dq, dk, dg need all of V) and the
    states and query heads of its group (dk, dv are their sums: no atomics). Gates imply one state per kv head,
    so dg sums a single state's terms. A group's dq accumulators do not all fit in registers, so with GQA dq
    takes a walk of its own (reading the state twice); SINGLE_HEAD (one query head per kv head and state) folds
    it into the one walk."""
    pid_bkv = tl.program_id(0)
    b = pid_bkv // num_kv_heads
    kv = pid_bkv % num_kv_heads
    states_per_kv = num_state_heads // num_kv_heads
    heads_per_state = num_heads // num_state_heads
    offs_k = tl.arange(0, BK)
    k_ok = offs_k < K_DIM
    k = tl.load(K + b * stride_kb + kv * stride_kh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    state_base = tl.cast(b * num_state_heads, tl.int64) * (K_DIM * V_DIM)
    # dq_h = scale * S1 do_h, for every query head (S1 recomputed tile by tile).
    if not SINGLE_HEAD:
        for si in range(states_per_kv):
            s = kv * states_per_kv + si
            decay, _ = _step_decay(G, SLOPES, b, s, stride_gb, stride_gh, offs_k, k_ok, SCALAR)
            for r in range(heads_per_state):
                h = s * heads_per_state + r
                dq = tl.zeros([BK], dtype=tl.float32)
                for vt in range(tl.cdiv(V_DIM, BV)):
                    offs_v = vt * BV + tl.arange(0, BV)
                    v_ok = offs_v < V_DIM
                    v = tl.load(V + b * stride_vb + kv * stride_vh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
                    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
                    new = k[:, None] * v[None, :]
                    if HAS_S0:
                        new += decay[:, None] * tl.load(S0 + state_base + s * (K_DIM * V_DIM) + offs_k[:, None] * V_DIM
                                                        + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :],
                                                        other=0.0).to(tl.float32)
                    dq += tl.sum(new * do[None, :], axis=1)
                tl.store(DQ + (b * num_heads + h) * K_DIM + offs_k, (dq * scale).to(DQ.dtype.element_ty), mask=k_ok)
    # dS1 total per state: the upstream state gradient plus scale * q_h^T do_h of its query heads.
    dk = tl.zeros([BK], dtype=tl.float32)
    dg = tl.zeros([BK], dtype=tl.float32)
    dq = tl.zeros([BK], dtype=tl.float32)  # SINGLE_HEAD only
    for vt in range(tl.cdiv(V_DIM, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < V_DIM
        kv_ok = k_ok[:, None] & v_ok[None, :]
        v = tl.load(V + b * stride_vb + kv * stride_vh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        dv = tl.zeros([BV], dtype=tl.float32)
        for si in range(states_per_kv):
            s = kv * states_per_kv + si
            decay, _ = _step_decay(G, SLOPES, b, s, stride_gb, stride_gh, offs_k, k_ok, SCALAR)
            state_off = state_base + s * (K_DIM * V_DIM) + offs_k[:, None] * V_DIM + offs_v[None, :]
            d_new = tl.zeros([BK, BV], dtype=tl.float32)
            if HAS_DS1:
                d_new += tl.load(DS1 + state_off, mask=kv_ok, other=0.0).to(tl.float32)
            if HAS_S0:
                prev = tl.load(S0 + state_off, mask=kv_ok, other=0.0).to(tl.float32)
            if SINGLE_HEAD:  # S1, as in dq's own walk
                new = k[:, None] * v[None, :]
                if HAS_S0:
                    new += decay[:, None] * prev
            for r in range(heads_per_state):
                h = s * heads_per_state + r
                q = tl.load(Q + b * stride_qb + h * stride_qh + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                do = tl.load(DO + b * stride_dob + h * stride_doh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
                d_new += (scale * q)[:, None] * do[None, :]
                if SINGLE_HEAD:
                    dq += tl.sum(new * do[None, :], axis=1)
            dk += tl.sum(d_new * v[None, :], axis=1)
            dv += tl.sum(d_new * k[:, None], axis=0)
            if HAS_S0:
                dg += tl.sum(d_new * prev, axis=1)
                tl.store(DS0 + state_off, decay[:, None] * d_new, mask=kv_ok)
        tl.store(DV + pid_bkv * V_DIM + offs_v, dv.to(DV.dtype.element_ty), mask=v_ok)
    tl.store(DK + pid_bkv * K_DIM + offs_k, dk.to(DK.dtype.element_ty), mask=k_ok)
    if SINGLE_HEAD:
        tl.store(DQ + pid_bkv * K_DIM + offs_k, (dq * scale).to(DQ.dtype.element_ty), mask=k_ok)
    if not SCALAR:
        decay, g = _step_decay(G, SLOPES, b, kv, stride_gb, stride_gh, offs_k, k_ok, SCALAR)
        dg = tl.where(g < FLOOR, 0.0, dg * decay)
        tl.store(DG + pid_bkv * K_DIM + offs_k, dg.to(DG.dtype.element_ty), mask=k_ok)


# ---------------------------------------------------------------------------------------------- launchers
def _heads(q, k, slopes) -> dict:
    """Query, kv and state heads of a step (one state per slope for Lightning, per kv head for gates)."""
    return dict(num_heads=q.shape[1], num_kv_heads=k.shape[1],
                num_state_heads=slopes.shape[0] if slopes is not None else k.shape[1])


def step_forward(q, k, v, g, slopes, state, scale):
    """See pytorch.step_forward: same contract."""
    b, d_k, d_v = q.shape[0], q.shape[2], v.shape[2]
    heads = _heads(q, k, slopes)
    o = torch.empty((b, heads["num_heads"], d_v), dtype=q.dtype, device=q.device)
    new_state = torch.empty((b, heads["num_state_heads"], d_k, d_v), dtype=torch.float32, device=q.device)
    state = contiguous_states(state)
    gate = g if g is not None else k
    recurrent_step_fwd_kernel.launch(
        lambda m: (b * heads["num_state_heads"], triton.cdiv(d_v, m["BV"])),
        Q=q, K=k, V=v, G=gate, SLOPES=slopes if slopes is not None else q,
        S0=state if state is not None else new_state, O=o, S1=new_state,
        **strides("q", q, "bh"), **strides("k", k, "bh"), **strides("v", v, "bh"), **strides("g", gate, "bh"),
        **strides("o", o, "bh"), scale=scale, **heads, K_DIM=d_k, V_DIM=d_v, SCALAR=g is None,
        HAS_S0=state is not None)
    return o, new_state


def step_backward(do, d_new, q, k, v, g, slopes, state, scale):
    """See pytorch.step_backward: same contract."""
    b, d_k, d_v = q.shape[0], q.shape[2], v.shape[2]
    heads = _heads(q, k, slopes)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    dg = torch.empty(g.shape, dtype=g.dtype, device=q.device) if g is not None else None
    state_in = contiguous_states(state)
    d_state = (torch.empty((b, heads["num_state_heads"], d_k, d_v), dtype=torch.float32, device=q.device)
               if state is not None else None)
    d_new = contiguous_states(d_new)
    do = do.contiguous()
    gate = g if g is not None else k
    dummy = dq
    recurrent_step_bwd_kernel.launch(
        (b * heads["num_kv_heads"],),
        Q=q, K=k, V=v, G=gate, SLOPES=slopes if slopes is not None else q,
        S0=state_in if state_in is not None else dummy, DO=do, DS1=d_new if d_new is not None else dummy,
        DQ=dq, DK=dk, DV=dv, DG=dg if dg is not None else dummy, DS0=d_state if d_state is not None else dummy,
        **strides("q", q, "bh"), **strides("k", k, "bh"), **strides("v", v, "bh"), **strides("g", gate, "bh"),
        **strides("do", do, "bh"), scale=scale, **heads, K_DIM=d_k, V_DIM=d_v, SCALAR=g is None,
        HAS_S0=state is not None, HAS_DS1=d_new is not None,
        SINGLE_HEAD=heads["num_heads"] == heads["num_kv_heads"] == heads["num_state_heads"])
    if d_state is not None:
        d_state = d_state.to(state.dtype)
    return dq, dk, dv, dg, d_state
