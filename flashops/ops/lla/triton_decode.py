"""LLA decode in Triton: one new query per sequence against its KV cache, split across programs.

Each program accumulates the exact D x D statistics of its split of the keys (sum w k k^T, sum w v k^T, ...)
with online max rescaling; ``state.py`` merges the splits and solves the D x D system directly (no CG).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._numerics import finite_or_zero
from ..._triton_utils import config, dot_precision, launcher, strides
from ..common.triton_math import LOG2E
from .args import LLAArgs
from .state import combine_partials

BLOCK_N = 32  # keys per step; every split holds a multiple of it


@functools.cache
def _configs(block_d: int) -> tuple:
    return (config(4 if block_d <= 64 else 8, 3, BLOCK_N=BLOCK_N),)


@launcher(configs=lambda args: _configs(args["BLOCK_D"]))
@triton.jit
def lla_decode_fwd_kernel(
    # pointers (the *_OUT partials are contiguous [B, H, splits, ...] fp32)
    Q, K, V, LENGTHS, M_OUT, L_OUT, KSUM_OUT, VSUM_OUT, KK_OUT, VK_OUT,
    # strides
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    # sizes and scalars
    seqlen_k, num_heads, kv_group, num_splits, keys_per_split, qk_scale2,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial D x D statistics of one query against one split of the KV cache, with online max rescaling.
    Key moments are taken about the cache's first key (the covariance is shift-invariant; a shared offset of
    the keys then costs no precision)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // kv_group
    b64 = b.to(tl.int64)
    length = seqlen_k
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(LENGTHS + b), seqlen_k)
    start = pid_s * keys_per_split
    stop = tl.minimum(start + keys_per_split, length)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh
    # The first key is the origin if the sequence has one and it is finite (a cache row past the length may
    # hold anything), else 0: the same rule as the launcher's.
    shift = tl.load(k_base + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    shift = tl.where((length > 0) & (tl.abs(shift) < float("inf")), shift, 0.0)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    k_sum = tl.zeros([BLOCK_D], tl.float32)
    v_sum = tl.zeros([BLOCK_D], tl.float32)
    kk = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    vk = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < stop
        ok = col_ok[:, None] & d_ok[None, :]
        col64 = cols.to(tl.int64)
        k = tl.load(k_base + col64[:, None] * stride_kt + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(v_base + col64[:, None] * stride_vt + offs_d[None, :], mask=ok, other=0.0)
        x = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale2
        x = tl.where(col_ok, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(x - m_ref)
        alpha = tl.exp2(m - m_ref)
        k_shifted = k.to(tl.float32) - shift[None, :]
        wk = k_shifted * w[:, None]
        wv = v.to(tl.float32) * w[:, None]
        k_shifted = k_shifted.to(k.dtype)
        l = l * alpha + tl.sum(w, 0)
        k_sum = k_sum * alpha + tl.sum(wk, 0)
        v_sum = v_sum * alpha + tl.sum(wv, 0)
        kk = tl.dot(tl.trans(wk.to(k.dtype)), k_shifted, kk * alpha, input_precision=DOT_PRECISION)
        vk = tl.dot(tl.trans(wv.to(v.dtype)), k_shifted, vk * alpha, input_precision=DOT_PRECISION)
        m = m_new
    part = pid_bh.to(tl.int64) * num_splits + pid_s
    tl.store(M_OUT + part, m)
    tl.store(L_OUT + part, l)
    tl.store(KSUM_OUT + part * BLOCK_D + offs_d, k_sum)
    tl.store(VSUM_OUT + part * BLOCK_D + offs_d, v_sum)
    square = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(KK_OUT + part * BLOCK_D * BLOCK_D + square, kk)
    tl.store(VK_OUT + part * BLOCK_D * BLOCK_D + square, vk)


def _num_splits(batch_heads: int, t_k: int) -> int:
    """Enough programs to fill a GPU (about 2 waves of 132 SMs), at least 256 keys per split, at most 32."""
    if t_k <= 0:
        return 1
    return max(1, min(triton.cdiv(t_k, 256), triton.cdiv(264, batch_heads), 32))


def decode(q, k_cache, v_cache, cache_seqlens, ridge, a: LLAArgs):
    """q [B, 1, H, D] against the first cache_seqlens[b] (default: all) keys of k/v_cache [B, Tk, Hkv, D]."""
    b, _, h, d = q.shape
    t_k, h_kv = k_cache.shape[1], k_cache.shape[2]
    if t_k == 0 or b * h == 0:
        return torch.zeros_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    splits = _num_splits(b * h, t_k)
    keys_per_split = triton.cdiv(triton.cdiv(max(t_k, 1), splits), BLOCK_N) * BLOCK_N
    f32 = dict(device=q.device, dtype=torch.float32)
    m = torch.empty(b, h, splits, **f32)
    l = torch.empty(b, h, splits, **f32)
    k_sum = torch.empty(b, h, splits, block_d, **f32)
    v_sum = torch.empty(b, h, splits, block_d, **f32)
    kk = torch.empty(b, h, splits, block_d, block_d, **f32)
    vk = torch.empty(b, h, splits, block_d, block_d, **f32)
    q_rows = q[:, 0]
    lengths = cache_seqlens if cache_seqlens is not None else q.new_empty(1, dtype=torch.int32)
    lla_decode_fwd_kernel.launch(
        (b * h, splits),
        Q=q_rows, K=k_cache, V=v_cache, LENGTHS=lengths, M_OUT=m, L_OUT=l, KSUM_OUT=k_sum, VSUM_OUT=v_sum,
        KK_OUT=kk, VK_OUT=vk, **strides("q", q_rows, "bh"), **strides("k", k_cache, "bth"),
        **strides("v", v_cache, "bth"), seqlen_k=t_k, num_heads=h, kv_group=h // h_kv, num_splits=splits,
        keys_per_split=keys_per_split, qk_scale2=a.softmax_scale * LOG2E.value,
        HEAD_DIM=d, BLOCK_D=block_d, HAS_LENGTHS=cache_seqlens is not None, DOT_PRECISION=dot_precision(q.dtype))
    lam = ridge[:, 0, :]
    # the kernel's key origin [B, H, D]: the first key where the sequence has one and it is finite, else 0
    origin = finite_or_zero(k_cache[:, 0].float())
    if cache_seqlens is not None:
        origin = torch.where((cache_seqlens > 0)[:, None, None], origin, torch.zeros((), device=q.device))
    shift = origin.repeat_interleave(h // h_kv, dim=1)
    out = combine_partials(q_rows.float() - shift, m, l, k_sum[..., :d], v_sum[..., :d], kk[..., :d, :d],
                           vk[..., :d, :d], lam, log2=True)
    return out.unsqueeze(1).to(q.dtype)
