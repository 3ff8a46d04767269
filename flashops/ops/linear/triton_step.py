"""Linear-attention decoding in Triton: one token of the recurrence S1 = diag(exp(g)) S0 + k^T v, o = scale * q S1
(Lightning: g = -slope for every key), forward and backward."""

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
    scale, num_heads,
    # meta-parameters
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


@launcher(configs=lambda args: _step_configs(args["K_DIM"], args["V_DIM"], False),
          interpreted=lambda args: _step_configs(args["K_DIM"], args["V_DIM"], True)[0])
@triton.jit
def recurrent_step_bwd_kernel(
    # pointers (the gradients are fresh contiguous buffers: [B, H, D] and [B, H, K, V])
    Q, K, V, G, SLOPES, S0, DO, DS1, DQ, DK, DV, DG, DS0,
    # strides
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh, stride_dob, stride_doh,
    # sizes and scalars
    scale, num_heads,
    # meta-parameters
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
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_v, mask=v_ok, other=0.0).to(tl.float32)
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
        dg = tl.where(g < FLOOR, 0.0, dg * decay)
        tl.store(DG + pid_bh * K_DIM + offs_k, dg.to(DG.dtype.element_ty), mask=k_ok)


# ---------------------------------------------------------------------------------------------- launchers
def step_forward(q, k, v, g, slopes, state, scale):
    """See pytorch.step_forward: same contract."""
    b, heads, d_k = q.shape
    d_v = v.shape[2]
    o = torch.empty((b, heads, d_v), dtype=q.dtype, device=q.device)
    new_state = torch.empty((b, heads, d_k, d_v), dtype=torch.float32, device=q.device)
    state = contiguous_states(state)
    gate = g if g is not None else q
    recurrent_step_fwd_kernel.launch(
        lambda m: (b * heads, triton.cdiv(d_v, m["BV"])),
        Q=q, K=k, V=v, G=gate, SLOPES=slopes if slopes is not None else q,
        S0=state if state is not None else new_state, O=o, S1=new_state,
        **strides("q", q, "bh"), **strides("k", k, "bh"), **strides("v", v, "bh"), **strides("g", gate, "bh"),
        **strides("o", o, "bh"), scale=scale, num_heads=heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=g is None, HAS_S0=state is not None)
    return o, new_state


def step_backward(do, d_new, q, k, v, g, slopes, state, scale):
    """See pytorch.step_backward: same contract."""
    b, heads, d_k = q.shape
    d_v = v.shape[2]
    dq = torch.empty((b, heads, d_k), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, heads, d_k), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, heads, d_v), dtype=v.dtype, device=q.device)
    dg = torch.empty((b, heads, d_k), dtype=g.dtype, device=q.device) if g is not None else None
    state_in = contiguous_states(state)
    d_state = torch.empty((b, heads, d_k, d_v), dtype=torch.float32, device=q.device) if state is not None else None
    d_new = contiguous_states(d_new)
    do = do.contiguous()
    gate = g if g is not None else q
    dummy = dq
    recurrent_step_bwd_kernel.launch(
        (b * heads,),
        Q=q, K=k, V=v, G=gate, SLOPES=slopes if slopes is not None else q,
        S0=state_in if state_in is not None else dummy, DO=do, DS1=d_new if d_new is not None else dummy,
        DQ=dq, DK=dk, DV=dv, DG=dg if dg is not None else dummy, DS0=d_state if d_state is not None else dummy,
        **strides("q", q, "bh"), **strides("k", k, "bh"), **strides("v", v, "bh"), **strides("g", gate, "bh"),
        **strides("do", do, "bh"), scale=scale, num_heads=heads,
        K_DIM=d_k, V_DIM=d_v, SCALAR=g is None, HAS_S0=state is not None, HAS_DS1=d_new is not None)
    if d_state is not None:
        d_state = d_state.to(state.dtype)
    return dq, dk, dv, dg, d_state
