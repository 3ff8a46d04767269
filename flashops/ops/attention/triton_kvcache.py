"""Triton split-KV decoding ("flash-decoding") over contiguous or paged KV caches.

Three kernels, launched in order on one stream:

- ``kvcache_append_fwd_kernel`` writes the new keys/values at ``cache_seqlens[b] + t`` (one program per new
  token and K/V head); nothing else in the cache is touched.
- ``kvcache_output_fwd_kernel``, grid (batch * kv heads, splits, row blocks). The ``Tq x G`` query rows that
  share one K/V head (``G = H / Hkv``) are the rows of one tile, so each K/V byte is read once per group.
  A program walks its split's share of the keys the tile can see with an online softmax in the log2 domain;
  in a paged cache a tile lies inside one page (one page id per tile) or spans whole pages (one per key).
  Tiles every row sees completely run without masks; boundary tiles (left padding, window start, causal
  end, sequence end) use masked loads, so slots outside ``[leftpad, seqlen)`` are never read. With one
  split the program writes the output; otherwise an fp32 partial output and its log2-sum-exp.
- ``kvcache_combine_fwd_kernel``, one program per (batch, head, query): ``lse = logsumexp_s lse_s``,
  ``out = sum_s exp(lse_s - lse) * O_s``; a row that saw nothing gets 0 and ``lse = -inf``.

Split boundaries are computed inside the kernel from each sequence's length (every split gets an equal
share of that sequence's tiles), so a launch depends on shapes only: no host synchronization, and a CUDA
graph captured once replays for any ``cache_seqlens``. For the same reason the kernels are never autotuned at
run time (a decode step may be captured on its first call): a GPU runs the default config of its head-dim
bucket, or the one a tuned table (``python -m bench.tune``) gives, or the next candidate if it does not fit.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, dot_precision, launcher, strides
from ..common.triton_math import LN2, LOG2E, tanh
from .args import KVCacheArgs, cache_capacity

# ----------------------------------------------------------------------------------------------- configs
# Output kernel candidates per head-dim bucket: (BLOCK_N keys per tile, num_warps, num_stages), the default
# first. Decoding is bound by memory bandwidth: tiles are sized so that `stages` K and V tiles in flight fit
# in shared memory with room for two programs per SM. The defaults are not yet tuned on a GPU (none was
# available when they were written); the others are smaller tiles or fewer stages, for bench.tune and as
# fallbacks where the default does not fit.
_OUTPUT_CONFIGS = {
    64: [(128, 4, 3), (64, 4, 3), (128, 4, 2), (64, 2, 3)],
    128: [(64, 4, 3), (32, 4, 3), (64, 4, 2), (128, 8, 2)],
    256: [(32, 4, 2), (16, 4, 2), (32, 8, 2), (64, 8, 1)],
}
# Under the interpreter: 32-key tiles, so that short tests cross tiles and split boundaries, and tiles span two
# pages of 16 keys as well as lie inside pages of 32 or more.
_INTERPRETED_BLOCK_N = 32
# No autotuning at run time (see the module docstring): a tuned table or the first candidate that fits.
_NEVER_AUTOTUNE = math.inf
MAX_BLOCK_M = 64  # query rows (Tq x G) per tile; more rows go to further programs (grid axis 2)
COMBINE_SPLITS_PER_STEP = 8  # partial outputs merged per step of the combine kernel's loop

# num_splits=0: about WAVES waves of programs over the SMs, at least MIN_KEYS_PER_SPLIT keys of capacity per
# split, at most MAX_SPLITS splits. The interpreter pretends to have INTERPRETER_SMS.
WAVES = 2
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 128
INTERPRETER_SMS = 4


def _fit_to_pages(block_n: int, page_size: int) -> int:
    """A key tile lies inside one page or spans whole pages: a BLOCK_N that does neither becomes the largest
    power of two dividing the page size (>= 16: pages are multiples of 16). ``page_size`` 1: a contiguous cache."""
    if page_size > 1 and page_size % block_n and block_n % page_size:
        return page_size & -page_size
    return block_n


@functools.cache
def _output_candidates(block_d: int, page_size: int) -> tuple:
    bucket = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    entries = [(_fit_to_pages(n, page_size), w, st) for n, w, st in _OUTPUT_CONFIGS[bucket]]
    return tuple(config(w, st, BLOCK_N=n) for n, w, st in dict.fromkeys(entries))


@functools.cache
def _output_interpreted(page_size: int):
    return config(1, 1, BLOCK_N=_fit_to_pages(_INTERPRETED_BLOCK_N, page_size))


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _output_tile(acc, l_i, m_i, q, k_seq, v_seq, table_row, start_n, offs_n, offs_d, q_pos, slope2, leftpad,
                 seqlen_k, stride_k_cacheb, stride_k_cachet, stride_v_cacheb, stride_v_cachet, qk_scale2, cap_scale,
                 cap2, window_left, window_right, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, MASKED: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) folded into the online softmax of the tile's rows."""
    cols = start_n + offs_n
    col_ok = (cols >= leftpad) & (cols < seqlen_k)
    start = tl.cast(start_n, tl.int64)
    if IS_PAGED and PAGE_SIZE >= BLOCK_N:  # the tile lies in one page: one page id per tile
        page = tl.load(table_row + start_n // PAGE_SIZE).to(tl.int64)
        k_rows = k_seq + page * stride_k_cacheb + (start % PAGE_SIZE + offs_n) * stride_k_cachet
        v_rows = v_seq + page * stride_v_cacheb + (start % PAGE_SIZE + offs_n) * stride_v_cachet
    elif IS_PAGED:  # the tile spans BLOCK_N / PAGE_SIZE pages: a page id per key (entries past the end unread)
        if MASKED:
            pages = tl.load(table_row + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        else:
            pages = tl.load(table_row + cols // PAGE_SIZE).to(tl.int64)
        k_rows = k_seq + pages * stride_k_cacheb + (cols % PAGE_SIZE).to(tl.int64) * stride_k_cachet
        v_rows = v_seq + pages * stride_v_cacheb + (cols % PAGE_SIZE).to(tl.int64) * stride_v_cachet
    else:
        k_rows = k_seq + (start + offs_n) * stride_k_cachet
        v_rows = v_seq + (start + offs_n) * stride_v_cachet
    kt_ptrs = k_rows[None, :] + offs_d[:, None]
    v_ptrs = v_rows[:, None] + offs_d[None, :]
    d_ok = offs_d < HEAD_DIM
    if MASKED:
        kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        s = tanh(qk * cap_scale) * cap2
    else:
        s = qk * qk_scale2
    if HAS_ALIBI:
        s = s - slope2[:, None] * tl.abs(q_pos[:, None] - cols[None, :]).to(tl.float32)
    if MASKED:
        ok = col_ok[None, :]
        if HAS_RIGHT:
            ok = ok & (cols[None, :] <= q_pos[:, None] + window_right)
        if HAS_LEFT:
            ok = ok & (cols[None, :] >= q_pos[:, None] - window_left)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _output_range(acc, l_i, m_i, lo, hi, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
                  seqlen_k, stride_k_cacheb, stride_k_cachet, stride_v_cacheb, stride_v_cachet, qk_scale2, cap_scale,
                  cap2, window_left, window_right, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, MASKED: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _output_tile(
            acc, l_i, m_i, q, k_seq, v_seq, table_row, start_n, offs_n, offs_d, q_pos, slope2, leftpad, seqlen_k,
            stride_k_cacheb, stride_k_cachet, stride_v_cacheb, stride_v_cachet, qk_scale2, cap_scale, cap2,
            window_left, window_right, HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, MASKED, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, DOT_PRECISION)
    return acc, l_i, m_i


# ------------------------------------------------------------------------------------------------ kernels
@launcher(configs=[config(1, 3)])
@triton.jit
def kvcache_append_fwd_kernel(
    # pointers (a paged cache is [pages, page_size, Hkv, D]: its b stride steps pages)
    K_NEW, V_NEW, K_CACHE, V_CACHE, CACHE_SEQLENS, BLOCK_TABLE,
    # strides
    stride_k_newb, stride_k_newt, stride_k_newh, stride_v_newb, stride_v_newt, stride_v_newh,
    stride_k_cacheb, stride_k_cachet, stride_k_cacheh, stride_v_cacheb, stride_v_cachet, stride_v_cacheh,
    stride_block_tableb,
    # sizes
    seqlen_new,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (pid // seqlen_new).to(tl.int64)
    t = (pid % seqlen_new).to(tl.int64)
    position = tl.load(CACHE_SEQLENS + b).to(tl.int64) + t
    if IS_PAGED:
        first = tl.load(BLOCK_TABLE + b * stride_block_tableb + position // PAGE_SIZE).to(tl.int64)
        row = position % PAGE_SIZE
    else:
        first = b
        row = position
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(K_NEW + b * stride_k_newb + t * stride_k_newt + h * stride_k_newh + offs_d, mask=d_ok)
    v = tl.load(V_NEW + b * stride_v_newb + t * stride_v_newt + h * stride_v_newh + offs_d, mask=d_ok)
    tl.store(K_CACHE + first * stride_k_cacheb + row * stride_k_cachet + h * stride_k_cacheh + offs_d,
             k.to(K_CACHE.dtype.element_ty), mask=d_ok)
    tl.store(V_CACHE + first * stride_v_cacheb + row * stride_v_cachet + h * stride_v_cacheh + offs_d,
             v.to(V_CACHE.dtype.element_ty), mask=d_ok)


@launcher(configs=lambda args: _output_candidates(args["BLOCK_D"], args["PAGE_SIZE"]),
          interpreted=lambda args: _output_interpreted(args["PAGE_SIZE"]),
          key=["BLOCK_D", "BLOCK_M", "PAGE_SIZE"], tune_min_work=_NEVER_AUTOTUNE)
@triton.jit
def kvcache_output_fwd_kernel(
    # pointers (O_PART [B, H, Tq, splits, D] and LSE_PART [B, H, Tq, splits] fp32, written with splits > 1)
    Q, K_CACHE, V_CACHE, CACHE_SEQLENS, CACHE_LEFTPAD, BLOCK_TABLE, SLOPES, OUT, LSE, O_PART, LSE_PART,
    # strides
    stride_qb, stride_qt, stride_qh, stride_k_cacheb, stride_k_cachet, stride_k_cacheh,
    stride_v_cacheb, stride_v_cachet, stride_v_cacheh, stride_block_tableb, stride_slopesb, stride_slopesh,
    stride_outb, stride_outt, stride_outh, stride_lseb, stride_lseh,
    stride_o_partb, stride_o_parth, stride_o_partt, stride_o_parts, stride_lse_partb, stride_lse_parth,
    stride_lse_partt,
    # sizes and scalars
    seqlen_q, seqlen_new, num_kv_heads, kv_group, num_splits,
    qk_scale2, cap_scale, cap2, window_left, window_right,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    b64 = b.to(tl.int64)
    seqlen_k = tl.load(CACHE_SEQLENS + b) + seqlen_new
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.load(CACHE_LEFTPAD + b)
    diag = seqlen_k - seqlen_q  # query t sits at position diag + t (bottom-right alignment)

    # Row r of the tile is query t = r // G of head h_kv * G + r % G.
    num_rows = seqlen_q * kv_group
    first_row = pid_m * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    t = rows // kv_group
    head = h_kv * kv_group + rows % kv_group
    q_pos = diag + t
    t_first = first_row // kv_group
    t_last = (tl.minimum(first_row + BLOCK_M, num_rows) - 1) // kv_group

    # Keys some row sees: [lo, hi); keys every row sees: [full_lo, full_hi).
    lo = leftpad
    hi = seqlen_k
    full_lo = leftpad
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(lo, diag + t_first - window_left)
        full_lo = tl.maximum(full_lo, diag + t_last - window_left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, diag + t_last + window_right + 1)
        full_hi = tl.minimum(full_hi, diag + t_first + window_right + 1)
    # This split's equal share of the tiles, then its masked head, unmasked middle and masked tail.
    tile_lo = (lo // BLOCK_N) * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - tile_lo, 0), BLOCK_N), num_splits)
    split_lo = tile_lo + split * tiles_per_split * BLOCK_N
    split_hi = tl.maximum(tl.minimum(split_lo + tiles_per_split * BLOCK_N, hi), split_lo)
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(full_lo, split_lo), split_hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), split_hi)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    t64 = t.to(tl.int64)
    head64 = head.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + (t64 * stride_qt + head64 * stride_qh)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if IS_PAGED:
        k_seq = K_CACHE + h_kv.to(tl.int64) * stride_k_cacheh
        v_seq = V_CACHE + h_kv.to(tl.int64) * stride_v_cacheh
        table_row = BLOCK_TABLE + b64 * stride_block_tableb
    else:
        k_seq = K_CACHE + b64 * stride_k_cacheb + h_kv.to(tl.int64) * stride_k_cacheh
        v_seq = V_CACHE + b64 * stride_v_cacheb + h_kv.to(tl.int64) * stride_v_cacheh
        table_row = BLOCK_TABLE
    slope2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + b * stride_slopesb + head * stride_slopesh, mask=row_ok, other=0.0) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _output_range(
        acc, l_i, m_i, split_lo, mid_lo, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
        seqlen_k, stride_k_cacheb, stride_k_cachet, stride_v_cacheb, stride_v_cachet, qk_scale2, cap_scale, cap2,
        window_left, window_right, HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, True, HAS_LEFT, HAS_RIGHT,
        HAS_SOFTCAP, HAS_ALIBI, DOT_PRECISION)
    acc, l_i, m_i = _output_range(
        acc, l_i, m_i, mid_lo, mid_hi, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
        seqlen_k, stride_k_cacheb, stride_k_cachet, stride_v_cacheb, stride_v_cachet, qk_scale2, cap_scale, cap2,
        window_left, window_right, HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, False, HAS_LEFT, HAS_RIGHT,
        HAS_SOFTCAP, HAS_ALIBI, DOT_PRECISION)
    acc, l_i, m_i = _output_range(
        acc, l_i, m_i, mid_hi, split_hi, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
        seqlen_k, stride_k_cacheb, stride_k_cachet, stride_v_cacheb, stride_v_cachet, qk_scale2, cap_scale, cap2,
        window_left, window_right, HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, True, HAS_LEFT, HAS_RIGHT,
        HAS_SOFTCAP, HAS_ALIBI, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    if SPLIT:
        part = b64 * stride_o_partb + head64 * stride_o_parth + t64 * stride_o_partt + split * stride_o_parts
        tl.store(O_PART + part[:, None] + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + b64 * stride_lse_partb + head64 * stride_lse_parth + t64 * stride_lse_partt + split,
                 lse2, mask=row_ok)
    else:
        tl.store(OUT + b64 * stride_outb + (t64 * stride_outt + head64 * stride_outh)[:, None] + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b64 * stride_lseb + head64 * stride_lseh + t64, lse2 * LN2, mask=row_ok)


@launcher(configs=[config(4, 3, SPLITS_PER_STEP=COMBINE_SPLITS_PER_STEP)])
@triton.jit
def kvcache_combine_fwd_kernel(
    # pointers (O_PART [B, H, Tq, splits, D], LSE_PART [B, H, Tq, splits] fp32; splits contiguous in LSE_PART)
    O_PART, LSE_PART, OUT, LSE,
    # strides
    stride_o_partb, stride_o_parth, stride_o_partt, stride_o_parts, stride_lse_partb, stride_lse_parth,
    stride_lse_partt, stride_outb, stride_outt, stride_outh, stride_lseb, stride_lseh,
    # sizes
    seqlen_q, num_heads, num_splits,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS_PER_STEP: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // (num_heads * seqlen_q)).to(tl.int64)
    h = ((pid // seqlen_q) % num_heads).to(tl.int64)
    t = (pid % seqlen_q).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse_row = LSE_PART + b * stride_lse_partb + h * stride_lse_parth + t * stride_lse_partt
    parts_row = O_PART + b * stride_o_partb + h * stride_o_parth + t * stride_o_partt
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_s - m_safe), 0)
    # The partial outputs, SPLITS_PER_STEP at a time (registers stay bounded for many splits and wide heads).
    acc = tl.zeros([BLOCK_D], tl.float32)
    for first in range(0, num_splits, SPLITS_PER_STEP):
        offs = first + tl.arange(0, SPLITS_PER_STEP)
        ok = offs < num_splits
        weights = tl.exp2(tl.load(lse_row + offs, mask=ok, other=float("-inf")) - m_safe)  # 0: saw nothing
        parts = tl.load(parts_row + offs[:, None] * stride_o_parts + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(weights[:, None] * parts, 0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    tl.store(OUT + b * stride_outb + t * stride_outt + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty),
             mask=d_ok)
    tl.store(LSE + b * stride_lseb + h * stride_lseh + t,
             tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, total))) * LN2))


# ---------------------------------------------------------------------------------------------- launchers
def choose_num_splits(programs: int, capacity: int, num_sms: int) -> int:
    """Splits per (batch, kv head, row block) from shapes only (never from cache_seqlens, so that a CUDA graph
    stays valid): enough programs for about ``WAVES`` waves of ``num_sms``, each split at least
    ``MIN_KEYS_PER_SPLIT`` keys of the cache's ``capacity``."""
    wanted = -(-WAVES * num_sms // max(1, programs))
    return max(1, min(wanted, capacity // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _slope_strides(slopes) -> dict:
    if slopes is not None and slopes.dim() == 2:
        return strides("slopes", slopes, "bh")
    return {"stride_slopesb": 0, **strides("slopes", slopes, "h")}  # [H]: the same slopes for every sequence


def append(k_cache, v_cache, k, v, a: KVCacheArgs) -> None:
    """Write k, v ``[B, Tnew, Hkv, D]`` at positions ``cache_seqlens[b] + t`` of the caches, in place."""
    b, t_new, h_kv, d = k.shape
    if b == 0 or t_new == 0:
        return
    kvcache_append_fwd_kernel.launch(
        (b * t_new, h_kv),
        K_NEW=k, V_NEW=v, K_CACHE=k_cache, V_CACHE=v_cache, CACHE_SEQLENS=a.cache_seqlens,
        BLOCK_TABLE=a.block_table if a.paged else a.cache_seqlens,  # (contiguous: never read)
        **strides("k_new", k, "bth"), **strides("v_new", v, "bth"), **strides("k_cache", k_cache, "bth"),
        **strides("v_cache", v_cache, "bth"), **strides("block_table", a.block_table, "b"),
        seqlen_new=t_new,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), PAGE_SIZE=k_cache.shape[1] if a.paged else 1,
        IS_PAGED=a.paged)


def forward(q, k_cache, v_cache, k, v, a: KVCacheArgs):
    """Append k, v (when given) and attend: out ``[B, Tq, H, D]`` (q's dtype), lse fp32 ``[B, H, Tq]``."""
    if k is not None:
        append(k_cache, v_cache, k, v, a)
    b, t_q, h, d = q.shape
    h_kv = k_cache.shape[2]
    group = h // h_kv
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t_q, device=q.device, dtype=torch.float32)
    if b == 0 or t_q == 0:
        return out, lse
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(t_q * group)))
    row_blocks = triton.cdiv(t_q * group, block_m)
    capacity = cache_capacity(k_cache, a.block_table)
    splits = a.num_splits or choose_num_splits(b * h_kv * row_blocks, capacity, num_sms(q.device))
    block_d = max(16, triton.next_power_of_2(d))
    split = splits > 1
    o_part = torch.empty(b, h, t_q, splits, d, device=q.device, dtype=torch.float32) if split else None
    lse_part = torch.empty(b, h, t_q, splits, device=q.device, dtype=torch.float32) if split else None
    cap = a.softcap if a.softcap > 0 else 1.0
    dummy = a.cache_seqlens  # stands in for absent pointers (never read)
    kvcache_output_fwd_kernel.launch(
        (b * h_kv, splits, row_blocks), work=4.0 * b * h * t_q * capacity * d,
        Q=q, K_CACHE=k_cache, V_CACHE=v_cache, CACHE_SEQLENS=a.cache_seqlens,
        CACHE_LEFTPAD=a.cache_leftpad if a.cache_leftpad is not None else dummy,
        BLOCK_TABLE=a.block_table if a.paged else dummy,
        SLOPES=a.alibi_slopes if a.alibi_slopes is not None else lse, OUT=out, LSE=lse,
        O_PART=o_part if split else out, LSE_PART=lse_part if split else lse,
        **strides("q", q, "bth"), **strides("k_cache", k_cache, "bth"), **strides("v_cache", v_cache, "bth"),
        **strides("block_table", a.block_table, "b"), **_slope_strides(a.alibi_slopes),
        **strides("out", out, "bth"), **strides("lse", lse, "bh"),
        **strides("o_part", o_part, "bhts"), **strides("lse_part", lse_part, "bht"),
        seqlen_q=t_q, seqlen_new=0 if k is None else k.shape[1], num_kv_heads=h_kv, kv_group=group,
        num_splits=splits,
        qk_scale2=a.softmax_scale * LOG2E.value, cap_scale=a.softmax_scale / cap, cap2=cap * LOG2E.value,
        window_left=a.window_left if a.window_left is not None else 0,
        window_right=a.window_right if a.window_right is not None else 0,
        HEAD_DIM=d, BLOCK_D=block_d, PAGE_SIZE=k_cache.shape[1] if a.paged else 1, IS_PAGED=a.paged,
        HAS_LEFTPAD=a.cache_leftpad is not None, HAS_LEFT=a.window_left is not None,
        HAS_RIGHT=a.window_right is not None, HAS_SOFTCAP=a.softcap > 0, HAS_ALIBI=a.alibi_slopes is not None,
        SPLIT=split, DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=block_m)
    if split:
        kvcache_combine_fwd_kernel.launch(
            (b * h * t_q,),
            O_PART=o_part, LSE_PART=lse_part, OUT=out, LSE=lse,
            **strides("o_part", o_part, "bhts"), **strides("lse_part", lse_part, "bht"),
            **strides("out", out, "bth"), **strides("lse", lse, "bh"),
            seqlen_q=t_q, num_heads=h, num_splits=splits,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out, lse
