"""Triton FlashAttention-2 kernels: forward, and a backward without atomics (deterministic).

Forward: one program per (query tile, batch * head) streams key/value tiles through an online softmax in
the log2 domain (exp2 with log2(e) folded into the scale). Key tiles are visited in three ranges: the
masked head of the window, the unmasked middle and the masked tail; tiles outside the causal / sliding
window range are never touched, and masks are only evaluated on the two boundary ranges.
Backward: ``attention_dkdv_bwd_kernel`` (one program per key tile, looping over the query tiles of every
query head of its GQA group) and ``attention_dq_bwd_kernel`` (one program per query tile), so nothing is
accumulated with atomics. Features (causal/window, softcap, ALiBi, dropout, block-sparse mask, additive
bias, varlen, GQA) are constexpr switches: a plain call compiles none of their code.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, dot_precision, launcher, strides
from ..common.triton_math import LN2, LOG2E, tanh
from ..common.triton_numerics import masked_dot
from . import dropout
from .args import AttentionArgs
from .dropout import drop_threshold

# The dropout hash constants, as constexpr globals (compiled Triton reads no other globals).
_MUL_A = tl.constexpr(dropout.MUL_A)
_MUL_B = tl.constexpr(dropout.MUL_B)
_GOLDEN_BH = tl.constexpr(dropout.GOLDEN_BH)
_GOLDEN_ROW = tl.constexpr(dropout.GOLDEN_ROW)
_GOLDEN_COL = tl.constexpr(dropout.GOLDEN_COL)
_HASH_SHIFT = tl.constexpr(32 - dropout.KEEP_BITS)


# ----------------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, warps, stages) per head-dim bucket; the first entry of each list is the default.
_FWD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
# dK/dV: BLOCK_N keys held, BLOCK_M queries streamed.
_DKDV_CONFIGS = {
    64: [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2)],
    128: [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
    256: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)],
}
_DQ_CONFIGS = {
    64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)],
    128: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)],
}
# Under the interpreter: small, unequal tiles so that short tests still cross tile and mask boundaries.
_INTERPRETED = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
_TABLES = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}
# Autotune only on calls this large (forward FLOPs): below it, launch overhead hides the differences
# between configs and the tuner would pick one at random; small calls take the first config that fits.
_TUNE_MIN_FLOPS = 2**35
_KEY = ["BLOCK_D", "HAS_RIGHT", "IS_VARLEN"]


def _tile(block_m, block_n, warps, stages):
    return config(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n)


def _mask_block(args: dict):
    return (args["mask_block_m"], args["mask_block_n"]) if args["HAS_BLOCK_MASK"] else None


@functools.cache
def _candidates(kind: str, block_d: int, elem_size: int, mask_block) -> tuple:
    """Configs to try for one kernel, best first. 4-byte inputs also get halved tiles with one pipeline stage
    less, so that fp32 fits in shared memory; with a block mask, a tile must sit inside one mask block."""
    bucket = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    entries = list(_TABLES[kind][bucket])
    if elem_size == 4:
        entries += [(max(16, m // 2), max(16, n // 2), w, max(1, st - 1)) for m, n, w, st in entries]
        entries += [(16, 16, 4, 1)]
    if mask_block is not None:
        entries = [e for e in entries if mask_block[0] % e[0] == 0 and mask_block[1] % e[1] == 0] or [
            (math.gcd(mask_block[0], 64), math.gcd(mask_block[1], 64), 4, 1)]
    return tuple(_tile(*e) for e in dict.fromkeys(entries))


@functools.cache
def _interpreted(kind: str, mask_block):
    block_m, block_n = _INTERPRETED[kind]
    if mask_block is not None:
        block_m, block_n = math.gcd(mask_block[0], block_m), math.gcd(mask_block[1], block_n)
    return _tile(block_m, block_n, 1, 1)


def _launch_options(kind: str) -> dict:
    return dict(
        configs=lambda args: _candidates(kind, args["BLOCK_D"], args["Q"].element_size(), _mask_block(args)),
        interpreted=lambda args: _interpreted(kind, _mask_block(args)), key=_KEY, tune_min_work=_TUNE_MIN_FLOPS)


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * tl.full([], _MUL_A, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], _MUL_B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _dropout_row_hash(seed, bh, rows):
    base = _mix32(seed.to(tl.uint32) ^ (bh.to(tl.uint32) * tl.full([], _GOLDEN_BH, tl.uint32)))
    return _mix32(base + rows.to(tl.uint32) * tl.full([], _GOLDEN_ROW, tl.uint32))


@triton.jit
def _dropout_keep(row_hash, cols, threshold):
    """row_hash and cols are broadcastable index tensors ([M, 1] x [1, N] or transposed)."""
    x = _mix32(row_hash ^ (cols.to(tl.uint32) * tl.full([], _GOLDEN_COL, tl.uint32)))
    return (x >> _HASH_SHIFT) >= threshold


@triton.jit
def _sequence_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first query row, query count, first key row, key count) of batch entry b: read from cu_seqlens for
    packed sequences; dense ones start at row 0 with the given lengths."""
    q_start = 0
    k_start = 0
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _logits(qk, rows, cols, diag, qk_scale2, cap_scale, cap2, slope2,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """log2-domain logits from raw q.k and the tanh of the capped score (or qk when no softcap)."""
    if HAS_SOFTCAP:
        t = tanh(qk * cap_scale)
        s = t * cap2
    else:
        t = qk
        s = qk * qk_scale2
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(rows + diag - cols).to(tl.float32)
    return s, t


@triton.jit
def _add_bias(s, bias):
    """s + bias (log2 domain); a -inf (masked) bias entry stays -inf even where s is NaN."""
    return tl.where(bias == float("-inf"), float("-inf"), s + bias.to(tl.float32) * LOG2E)


@triton.jit
def _mask_logits(s, rows, cols, seqlen_k, diag, window_left, window_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    ok = cols < seqlen_k
    if HAS_RIGHT:
        ok = ok & (cols <= rows + diag + window_right)
    if HAS_LEFT:
        ok = ok & (cols >= rows + diag - window_left)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _key_ranges(start_m, seqlen_k, diag, window_left, window_right, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key tiles for query rows [start_m, start_m + BLOCK_M): [lo, a) masked, [a, b) unmasked, [b, end) masked."""
    lo = 0
    hi = seqlen_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag + window_right)
    if HAS_LEFT:
        lo = tl.maximum(0, start_m + diag - window_left)
    lo = (lo // BLOCK_N) * BLOCK_N
    end = tl.cdiv(tl.maximum(hi, 0), BLOCK_N) * BLOCK_N
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + diag - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + diag + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    a = tl.minimum(tl.maximum(full_lo, lo), end)
    b = tl.minimum(tl.maximum(full_hi, a), end)
    return lo, a, b, end


@triton.jit
def _query_ranges(start_n, seqlen_q, diag, window_left, window_right, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query tiles that see keys [start_n, start_n + BLOCK_N): [lo, a) masked, [a, b) unmasked, [b, end) masked."""
    lo = 0
    hi = seqlen_q
    if HAS_RIGHT:
        lo = tl.maximum(0, start_n - diag - window_right)
    if HAS_LEFT:
        hi = tl.minimum(hi, start_n + BLOCK_N - diag + window_left)
    lo = (lo // BLOCK_M) * BLOCK_M
    end = tl.cdiv(tl.maximum(hi, 0), BLOCK_M) * BLOCK_M
    full_lo = lo
    if HAS_RIGHT:
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - window_right, 0), BLOCK_M) * BLOCK_M
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        full_hi = tl.minimum(full_hi, (tl.maximum(start_n - diag + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    a = tl.minimum(tl.maximum(full_lo, lo), end)
    b = tl.minimum(tl.maximum(full_hi, a), end)
    return lo, a, b, end


# ----------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, bias_base, start_n, rows, offs_n, offs_d, row_ok,
              seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn,
              qk_scale2, cap_scale, cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale,
              HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kt + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        col_ok = cols < seqlen_k
        if EVEN_D:
            kt = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            kt = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    s, _ = _logits(qk, rows[:, None], cols[None, :], diag, qk_scale2, cap_scale, cap2, slope2,
                   HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        bias = tl.load(bias_base + rows[:, None] * stride_biasm + cols[None, :] * stride_biasn,
                       mask=row_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
        s = _add_bias(s, bias)
    if MASKED:
        s = _mask_logits(s, rows[:, None], cols[None, :], seqlen_k, diag, window_left, window_right,
                         HAS_LEFT, HAS_RIGHT)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED or HAS_BIAS:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        keep = _dropout_keep(drop_rows[:, None], cols[None, :], drop_threshold)
        p = tl.where(keep, p * drop_scale, 0.0)
    if MASKED or HAS_BIAS:  # a NaN/Inf value of a masked-out key must not reach the rows that hide it
        acc = masked_dot(p, v, s != float("-inf"), acc, DOT_PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_range(acc, l_i, m_i, lo, hi, q, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn, mask_block_n,
               rows, offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn,
               qk_scale2, cap_scale, cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale,
               HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        visible = True  # unless the block mask skips this tile
        if HAS_BLOCK_MASK:
            visible = tl.load(mask_row_ptr + (start_n // mask_block_n) * stride_block_maskn) != 0
        if visible:
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, bias_base, start_n, rows, offs_n, offs_d, row_ok,
                seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale, cap2,
                slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D,
                MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, DOT_PRECISION)
    return acc, l_i, m_i


@launcher(**_launch_options("fwd"))
@triton.jit
def attention_output_fwd_kernel(
    # pointers
    Q, K, V, O, LSE, SEED, SLOPES, BLOCK_MASK, BIAS, CU_Q, CU_K,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_lseb, stride_lseh,
    stride_slopesb, stride_slopesh, stride_block_maskb, stride_block_maskh, stride_block_maskm, stride_block_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    # sizes and scalars
    seqlen_q, seqlen_k, num_heads, kv_group, mask_block_m, mask_block_n,
    qk_scale2, cap_scale, cap2, window_left, window_right, drop_threshold, drop_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // kv_group
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    # Heaviest query tiles first when the mask is causal-like: better tail balance.
    if HAS_RIGHT:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + (q_start + start_m).to(tl.int64) * stride_qt
    q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vt

    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + b * stride_slopesb + h * stride_slopesh) * LOG2E
    bias_base = BIAS
    if HAS_BIAS:
        bias_base = BIAS + b64 * stride_biasb + h.to(tl.int64) * stride_biash
    mask_row_ptr = BLOCK_MASK
    if HAS_BLOCK_MASK:
        mask_row_ptr = (BLOCK_MASK + b * stride_block_maskb + h * stride_block_maskh
                        + (start_m // mask_block_m) * stride_block_maskm)
    drop_rows = rows
    if HAS_DROPOUT:
        drop_rows = _dropout_row_hash(tl.load(SEED), b * num_heads + h, rows)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, a, bnd, end = _key_ranges(start_m, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                  HAS_LEFT, HAS_RIGHT)
    acc, l_i, m_i = _fwd_range(
        acc, l_i, m_i, lo, a, q, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn, mask_block_n, rows,
        offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale,
        cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D, BLOCK_N, True,
        HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)
    acc, l_i, m_i = _fwd_range(
        acc, l_i, m_i, a, bnd, q, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn, mask_block_n, rows,
        offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale,
        cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D, BLOCK_N,
        False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)
    acc, l_i, m_i = _fwd_range(
        acc, l_i, m_i, bnd, end, q, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn, mask_block_n, rows,
        offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale,
        cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D, BLOCK_N,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    o_ptrs = (O + b64 * stride_ob + h.to(tl.int64) * stride_oh + (q_start + start_m).to(tl.int64) * stride_ot
              + offs_m[:, None] * stride_ot + offs_d[None, :])
    if EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse_ptrs = LSE + b64 * stride_lseb + h.to(tl.int64) * stride_lseh + q_start + rows
    tl.store(lse_ptrs, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------- backward
@launcher(configs=lambda args: _delta_configs(args["HEAD_DIM"]))
@triton.jit
def attention_delta_bwd_kernel(
    # pointers
    O, DO, DLSE, DELTA, CU_Q,
    # strides
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lseb, stride_lseh,
    # sizes
    seqlen_q, num_heads,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) - dLSE_i (fp32, laid out like LSE)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start = 0
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b64 = b.to(tl.int64)
    row64 = (q_start + rows).to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + row64[:, None] * stride_ot + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + row64[:, None] * stride_dot + offs_d[None, :], mask=ok,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_off = b64 * stride_lseb + h * stride_lseh + q_start + rows
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + lse_off, mask=rows < seqlen_q, other=0.0)
    tl.store(DELTA + lse_off, delta, mask=rows < seqlen_q)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, start_m, cols, offs_m, offs_d,
                   seqlen_q, seqlen_k, diag, stride_qt, stride_dot, stride_biasm, stride_biasn,
                   qk_scale2, cap_scale, cap2, slope2, window_left, window_right, seed, bh, drop_threshold,
                   drop_scale, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One query tile's contribution to dK, dV of a key tile; works on transposed scores [BLOCK_N, BLOCK_M]."""
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    q_ptrs = q_base + tl.cast(start_m, tl.int64) * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = do_base + tl.cast(start_m, tl.int64) * stride_dot + offs_m[:, None] * stride_dot + offs_d[None, :]
    if MASKED:
        if EVEN_D:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_ptrs, mask=ok, other=0.0)
            do = tl.load(do_ptrs, mask=ok, other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        if EVEN_D:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            ok = offs_d[None, :] < HEAD_DIM
            q = tl.load(q_ptrs, mask=ok, other=0.0)
            do = tl.load(do_ptrs, mask=ok, other=0.0)
        lse2 = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    # log2-domain lse; a row with nothing visible (-inf) gets +inf so that its probabilities are 0.
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2 * LOG2E)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    s_t, t_t = _logits(qk_t, rows[None, :], cols[:, None], diag, qk_scale2, cap_scale, cap2, slope2,
                       HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        bias = tl.load(bias_base + rows[None, :] * stride_biasm + cols[:, None] * stride_biasn,
                       mask=row_ok[None, :] & (cols[:, None] < seqlen_k), other=0.0)
        s_t = _add_bias(s_t, bias)
    if MASKED:
        s_t = _mask_logits(s_t, rows[None, :], cols[:, None], seqlen_k, diag, window_left, window_right,
                           HAS_LEFT, HAS_RIGHT)
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASKED or HAS_BIAS:  # masked entries and rows past the end are exact zeros, even for a NaN lse or key
        visible_t = (s_t != float("-inf")) & row_ok[None, :]
        p_t = tl.where(visible_t, p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep_t = _dropout_keep(_dropout_row_hash(seed, bh, rows)[None, :], cols[:, None], drop_threshold)
        dv = tl.dot(tl.where(keep_t, p_t * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    if MASKED or HAS_BIAS:  # 0 * NaN: select the masked entries to 0 and keep a masked-out NaN q out of dk
        dk = masked_dot(tl.where(visible_t, ds_t, 0.0), q, visible_t, dk, DOT_PRECISION)
    else:
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_range(dk, dv, lo, hi, k, v, q_base, do_base, lse_base, delta_base, bias_base, mask_col_ptr,
                    stride_block_maskm, mask_block_m, cols, offs_m, offs_d, seqlen_q, seqlen_k, diag, stride_qt,
                    stride_dot, stride_biasm, stride_biasn, qk_scale2, cap_scale, cap2, slope2, window_left,
                    window_right, seed, bh, drop_threshold, drop_scale, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        visible = True  # unless the block mask skips this tile
        if HAS_BLOCK_MASK:
            visible = tl.load(mask_col_ptr + (start_m // mask_block_m) * stride_block_maskm) != 0
        if visible:
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, start_m, cols, offs_m, offs_d,
                seqlen_q, seqlen_k, diag, stride_qt, stride_dot, stride_biasm, stride_biasn, qk_scale2, cap_scale,
                cap2, slope2, window_left, window_right, seed, bh, drop_threshold, drop_scale, HEAD_DIM,
                EVEN_D, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT,
                DOT_PRECISION)
    return dk, dv


@launcher(**_launch_options("dkdv"))
@triton.jit
def attention_dkdv_bwd_kernel(
    # pointers
    Q, K, V, DO, LSE, DELTA, DK, DV, SEED, SLOPES, BLOCK_MASK, BIAS, CU_Q, CU_K,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_lseb, stride_lseh,
    stride_slopesb, stride_slopesh, stride_block_maskb, stride_block_maskh, stride_block_maskm, stride_block_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    # sizes and scalars
    seqlen_q, seqlen_k, num_heads, kv_group, mask_block_m, mask_block_n,
    sm_scale, qk_scale2, cap_scale, cap2, window_left, window_right, drop_threshold, drop_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    num_kv_heads = num_heads // kv_group
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    diag = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    col_ok = cols < seqlen_k
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    kv_ok = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    row64 = (k_start + start_n).to(tl.int64)
    k = tl.load(K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh + row64 * stride_kt
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh + row64 * stride_vt
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, a, bnd, end = _query_ranges(start_n, seqlen_q, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                    HAS_LEFT, HAS_RIGHT)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    for g in range(0, kv_group):
        h = h_kv * kv_group + g
        h64 = h.to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qt
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start.to(tl.int64) * stride_dot
        lse_base = LSE + b64 * stride_lseb + h64 * stride_lseh + q_start
        delta_base = DELTA + b64 * stride_lseb + h64 * stride_lseh + q_start
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + b * stride_slopesb + h * stride_slopesh) * LOG2E
        bias_base = BIAS
        if HAS_BIAS:
            bias_base = BIAS + b64 * stride_biasb + h64 * stride_biash
        mask_col_ptr = BLOCK_MASK
        if HAS_BLOCK_MASK:
            mask_col_ptr = (BLOCK_MASK + b * stride_block_maskb + h * stride_block_maskh
                            + (start_n // mask_block_n) * stride_block_maskn)
        bh = b * num_heads + h
        dk, dv = _bwd_dkdv_range(
            dk, dv, lo, a, k, v, q_base, do_base, lse_base, delta_base, bias_base, mask_col_ptr, stride_block_maskm,
            mask_block_m, cols, offs_m, offs_d, seqlen_q, seqlen_k, diag, stride_qt, stride_dot, stride_biasm,
            stride_biasn, qk_scale2, cap_scale, cap2, slope2, window_left, window_right, seed, bh, drop_threshold,
            drop_scale, HEAD_DIM, EVEN_D, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
            HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)
        dk, dv = _bwd_dkdv_range(
            dk, dv, a, bnd, k, v, q_base, do_base, lse_base, delta_base, bias_base, mask_col_ptr, stride_block_maskm,
            mask_block_m, cols, offs_m, offs_d, seqlen_q, seqlen_k, diag, stride_qt, stride_dot, stride_biasm,
            stride_biasn, qk_scale2, cap_scale, cap2, slope2, window_left, window_right, seed, bh, drop_threshold,
            drop_scale, HEAD_DIM, EVEN_D, BLOCK_M, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
            HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)
        dk, dv = _bwd_dkdv_range(
            dk, dv, bnd, end, k, v, q_base, do_base, lse_base, delta_base, bias_base, mask_col_ptr, stride_block_maskm,
            mask_block_m, cols, offs_m, offs_d, seqlen_q, seqlen_k, diag, stride_qt, stride_dot, stride_biasm,
            stride_biasn, qk_scale2, cap_scale, cap2, slope2, window_left, window_right, seed, bh, drop_threshold,
            drop_scale, HEAD_DIM, EVEN_D, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
            HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + h_kv.to(tl.int64) * stride_dkh + row64 * stride_dkt
             + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b64 * stride_dvb + h_kv.to(tl.int64) * stride_dvh + row64 * stride_dvt
             + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, bias_base, start_n, rows, offs_n, offs_d, row_ok,
                 seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale, cap2, slope2,
                 window_left, window_right, drop_rows, drop_threshold, drop_scale,
                 HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kt + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vt + offs_n[None, :] * stride_vt + offs_d[:, None]
    if MASKED:
        ok = (cols < seqlen_k)[None, :] & (offs_d < HEAD_DIM)[:, None]
        kt = tl.load(k_ptrs, mask=ok, other=0.0)
        vt = tl.load(v_ptrs, mask=ok, other=0.0)
    else:
        if EVEN_D:
            kt = tl.load(k_ptrs)
            vt = tl.load(v_ptrs)
        else:
            ok = (offs_d < HEAD_DIM)[:, None]
            kt = tl.load(k_ptrs, mask=ok, other=0.0)
            vt = tl.load(v_ptrs, mask=ok, other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    s, t = _logits(qk, rows[:, None], cols[None, :], diag, qk_scale2, cap_scale, cap2, slope2,
                   HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        bias = tl.load(bias_base + rows[:, None] * stride_biasm + cols[None, :] * stride_biasn,
                       mask=row_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
        s = _add_bias(s, bias)
    if MASKED:
        s = _mask_logits(s, rows[:, None], cols[None, :], seqlen_k, diag, window_left, window_right,
                         HAS_LEFT, HAS_RIGHT)
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(drop_rows[:, None], cols[None, :], drop_threshold)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    if MASKED or HAS_BIAS:  # 0 * NaN: select the masked entries to 0 and keep a masked-out NaN k out of dq
        visible = s != float("-inf")
        dq = masked_dot(tl.where(visible, ds, 0.0), tl.trans(kt), visible, dq, DOT_PRECISION)
    else:
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_range(dq, lo, hi, q, do, lse2, delta, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn,
                  mask_block_n, rows, offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm,
                  stride_biasn, qk_scale2, cap_scale, cap2, slope2, window_left, window_right, drop_rows,
                  drop_threshold, drop_scale, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  HAS_BLOCK_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        visible = True  # unless the block mask skips this tile
        if HAS_BLOCK_MASK:
            visible = tl.load(mask_row_ptr + (start_n // mask_block_n) * stride_block_maskn) != 0
        if visible:
            dq = _bwd_dq_tile(
                dq, q, do, lse2, delta, k_base, v_base, bias_base, start_n, rows, offs_n, offs_d, row_ok,
                seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale, cap2, slope2,
                window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D, MASKED,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, DOT_PRECISION)
    return dq


@launcher(**_launch_options("dq"))
@triton.jit
def attention_dq_bwd_kernel(
    # pointers
    Q, K, V, DO, LSE, DELTA, DQ, SEED, SLOPES, BLOCK_MASK, BIAS, CU_Q, CU_K,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_lseb, stride_lseh,
    stride_slopesb, stride_slopesh, stride_block_maskb, stride_block_maskh, stride_block_maskm, stride_block_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    # sizes and scalars
    seqlen_q, seqlen_k, num_heads, kv_group, mask_block_m, mask_block_n,
    sm_scale, qk_scale2, cap_scale, cap2, window_left, window_right, drop_threshold, drop_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // kv_group
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    if HAS_RIGHT:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    row64 = (q_start + start_m).to(tl.int64)
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row64 * stride_qt + offs_m[:, None] * stride_qt
                + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + row64 * stride_dot + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=ok, other=0.0)
    lse_off = b64 * stride_lseb + h64 * stride_lseh + q_start + rows
    lse2 = tl.load(LSE + lse_off, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2 * LOG2E)
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vt
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + b * stride_slopesb + h * stride_slopesh) * LOG2E
    bias_base = BIAS
    if HAS_BIAS:
        bias_base = BIAS + b64 * stride_biasb + h64 * stride_biash
    mask_row_ptr = BLOCK_MASK
    if HAS_BLOCK_MASK:
        mask_row_ptr = (BLOCK_MASK + b * stride_block_maskb + h * stride_block_maskh
                        + (start_m // mask_block_m) * stride_block_maskm)
    drop_rows = rows
    if HAS_DROPOUT:
        drop_rows = _dropout_row_hash(tl.load(SEED), b * num_heads + h, rows)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, a, bnd, end = _key_ranges(start_m, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                  HAS_LEFT, HAS_RIGHT)
    dq = _bwd_dq_range(
        dq, lo, a, q, do, lse2, delta, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn, mask_block_n, rows,
        offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale,
        cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D, BLOCK_N,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)
    dq = _bwd_dq_range(
        dq, a, bnd, q, do, lse2, delta, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn, mask_block_n, rows,
        offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2, cap_scale,
        cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D, BLOCK_N,
        False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, HAS_BLOCK_MASK, DOT_PRECISION)
    dq = _bwd_dq_range(
        dq, bnd, end, q, do, lse2, delta, k_base, v_base, bias_base, mask_row_ptr, stride_block_maskn, mask_block_n,
        rows, offs_n, offs_d, row_ok, seqlen_k, diag, stride_kt, stride_vt, stride_biasm, stride_biasn, qk_scale2,
        cap_scale, cap2, slope2, window_left, window_right, drop_rows, drop_threshold, drop_scale, HEAD_DIM, EVEN_D,
        BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, HAS_BLOCK_MASK,
        DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row64 * stride_dqt + offs_m[:, None] * stride_dqt
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------- launchers
@functools.cache
def _delta_configs(head_dim: int) -> tuple:
    return (config(4, 3, BLOCK_M=64 if head_dim <= 128 else 32),)


def _features(q: torch.Tensor, a: AttentionArgs) -> dict:
    d = q.shape[-1]
    return dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), IS_VARLEN=a.varlen,
        HAS_LEFT=a.window_left is not None, HAS_RIGHT=a.window_right is not None, HAS_SOFTCAP=a.softcap > 0,
        HAS_ALIBI=a.alibi_slopes is not None, HAS_BIAS=a.bias is not None, HAS_DROPOUT=a.dropout_p > 0,
        HAS_BLOCK_MASK=a.block_mask is not None, DOT_PRECISION=dot_precision(q.dtype),
    )


def _scalars(a: AttentionArgs) -> dict:
    cap = a.softcap if a.softcap > 0 else 1.0
    return dict(
        qk_scale2=a.softmax_scale * LOG2E.value, cap_scale=a.softmax_scale / cap, cap2=cap * LOG2E.value,
        window_left=a.window_left if a.window_left is not None else 0,
        window_right=a.window_right if a.window_right is not None else 0,
        drop_threshold=drop_threshold(a.dropout_p), drop_scale=1.0 / (1.0 - a.dropout_p),
    )


def _optional_inputs(q: torch.Tensor, a: AttentionArgs) -> dict:
    """Pointers and strides of the optional inputs (a dummy tensor stands in for absent ones)."""
    dummy = q.new_empty(1)
    slopes = a.alibi_slopes
    if slopes is not None and slopes.dim() == 2:
        slope_strides = strides("slopes", slopes, "bh")
    else:  # [H]: the same slopes for every batch entry
        slope_strides = {"stride_slopesb": 0, **strides("slopes", slopes, "h")}
    return dict(
        SEED=a.seed.reshape(1) if a.seed is not None else dummy,
        SLOPES=slopes if slopes is not None else dummy, BLOCK_MASK=a.block_mask if a.block_mask is not None else dummy,
        BIAS=a.bias if a.bias is not None else dummy,
        CU_Q=a.cu_seqlens_q if a.varlen else dummy, CU_K=a.cu_seqlens_k if a.varlen else dummy,
        **slope_strides, **strides("block_mask", a.block_mask, "bhmn", broadcast=True),
        **strides("bias", a.bias, "bhmn", broadcast=True),
    )


def _token_strides(a: AttentionArgs, **tensors: torch.Tensor) -> dict:
    """(batch, token, head) strides of [B, T, H, D] tensors. Varlen inputs are packed [1, total, H, D]: the
    kernels' batch index is then the sequence index, which selects rows through cu_seqlens: batch stride 0."""
    out = {}
    for name, t in tensors.items():
        out.update(strides(name, t, "bth", zero="b" if a.varlen else ""))
    return out


def _lse_strides(lse: torch.Tensor, varlen: bool) -> dict:
    # LSE is [B, H, Tq] (dense) or [H, total_q] (varlen, batch stride 0); rows are contiguous.
    if varlen:
        return {"stride_lseb": 0, **strides("lse", lse, "h")}
    return strides("lse", lse, "bh")


def _lengths(q, k, a: AttentionArgs):
    if a.varlen:
        return a.cu_seqlens_q.numel() - 1, a.max_seqlen_q, a.max_seqlen_k
    return q.shape[0], q.shape[1], k.shape[1]


def _forward_flops(q, a: AttentionArgs, batch: int, max_q: int, max_k: int) -> float:
    flops = 4.0 * batch * q.shape[2] * max_q * max_k * q.shape[-1]
    return flops / 2 if a.window_right is not None else flops


def _sizes(a: AttentionArgs, h: int, h_kv: int, max_q: int, max_k: int) -> dict:
    return dict(seqlen_q=max_q, seqlen_k=max_k, num_heads=h, kv_group=h // h_kv, mask_block_m=a.block_m,
                mask_block_n=a.block_n)


def forward(q, k, v, a: AttentionArgs):
    batch, max_q, max_k = _lengths(q, k, a)
    h, h_kv = q.shape[2], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((h, q.shape[1]) if a.varlen else (batch, h, max_q), device=q.device, dtype=torch.float32)
    if max_q == 0 or batch == 0:
        return out, lse
    attention_output_fwd_kernel.launch(
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch * h),
        work=_forward_flops(q, a, batch, max_q, max_k),
        Q=q, K=k, V=v, O=out, LSE=lse, **_optional_inputs(q, a),
        **_token_strides(a, q=q, k=k, v=v, o=out), **_lse_strides(lse, a.varlen),
        **_sizes(a, h, h_kv, max_q, max_k), **_scalars(a), **_features(q, a))
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, a: AttentionArgs, want_dbias: bool = False):
    if want_dbias:
        raise NotImplementedError("the triton backend does not compute attn_mask gradients (use backend='torch')")
    batch, max_q, max_k = _lengths(q, k, a)
    h, h_kv = q.shape[2], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if batch == 0 or max_q == 0 or max_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), None
    features = _features(q, a)
    optional = _optional_inputs(q, a)
    lse_strides = _lse_strides(lse, a.varlen)
    delta = torch.empty_like(lse)
    attention_delta_bwd_kernel.launch(
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch * h),
        O=out, DO=dout, DLSE=dlse.contiguous() if dlse is not None else lse, DELTA=delta, CU_Q=optional["CU_Q"],
        **_token_strides(a, o=out, do=dout), **lse_strides, seqlen_q=max_q, num_heads=h,
        HEAD_DIM=features["HEAD_DIM"], BLOCK_D=features["BLOCK_D"], IS_VARLEN=a.varlen, HAS_DLSE=dlse is not None)
    common = dict(Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, **optional,
                  **_token_strides(a, q=q, k=k, v=v, do=dout), **lse_strides, **_sizes(a, h, h_kv, max_q, max_k),
                  sm_scale=a.softmax_scale, **_scalars(a), **features)
    flops = 2.5 * _forward_flops(q, a, batch, max_q, max_k)
    attention_dkdv_bwd_kernel.launch(
        lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), batch * h_kv), work=flops,
        DK=dk, DV=dv, **_token_strides(a, dk=dk, dv=dv), **common)
    attention_dq_bwd_kernel.launch(
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch * h), work=flops,
        DQ=dq, **_token_strides(a, dq=dq), **common)
    return dq, dk, dv, None
