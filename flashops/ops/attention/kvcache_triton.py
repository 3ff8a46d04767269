"""Triton split-KV decoding ("flash-decoding") over contiguous or paged KV caches.

Three kernels, launched in order on one stream:

- ``attention_decode_append_kernel`` writes the new keys/values at ``cache_seqlens[b] + t`` (one program per
  new token and K/V head); nothing else in the cache is touched.
- ``attention_decode_split_kernel``, grid (batch * kv heads, splits, row blocks). The ``Tq x G`` query rows
  that share one K/V head (``G = H / Hkv``) are the rows of one tile, so each K/V byte is read once per group.
  A program walks its split's share of the keys the tile can see with an online softmax in the log2 domain;
  in a paged cache a tile lies inside one page (one page id per tile) or spans whole pages (one per key).
  Tiles every row sees completely run without masks; boundary tiles (left padding, window start, causal
  end, sequence end) use masked loads, so slots outside ``[leftpad, seqlen)`` are never read. With one
  split the program writes the output; otherwise an fp32 partial output and its log2-sum-exp.
- ``attention_decode_combine_kernel``, one program per (batch, head, query): ``lse = logsumexp_s lse_s``,
  ``out = sum_s exp(lse_s - lse) * O_s``; a row that saw nothing gets 0 and ``lse = -inf``.

Split boundaries are computed inside the kernel from each sequence's length (every split gets an equal
share of that sequence's tiles), so a launch depends on shapes only: no host synchronization, and a CUDA
graph captured once replays for any ``cache_seqlens``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._triton_numerics import masked_dot
from ..._triton_utils import dot_precision, interpreter_enabled
from .kvcache_args import KVCacheArgs, cache_capacity

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits at +-inf, no libdevice call (works in the interpreter).
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _decode_tile(acc, l_i, m_i, q, k_seq, v_seq, table_row, start_n, offs_n, offs_d, q_pos, slope2, leftpad,
                 seqlen_k, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale2, cap_scale, cap2, window_left,
                 window_right, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) folded into the online softmax of the tile's rows."""
    cols = start_n + offs_n
    col_ok = (cols >= leftpad) & (cols < seqlen_k)
    start = tl.cast(start_n, tl.int64)
    if IS_PAGED and PAGE_SIZE >= BLOCK_N:  # the tile lies in one page: one page id per tile
        page = tl.load(table_row + start_n // PAGE_SIZE).to(tl.int64)
        k_rows = k_seq + page * stride_kb + (start % PAGE_SIZE + offs_n) * stride_kt
        v_rows = v_seq + page * stride_vb + (start % PAGE_SIZE + offs_n) * stride_vt
    elif IS_PAGED:  # the tile spans BLOCK_N / PAGE_SIZE pages: a page id per key (entries past the end unread)
        if MASKED:
            pages = tl.load(table_row + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        else:
            pages = tl.load(table_row + cols // PAGE_SIZE).to(tl.int64)
        k_rows = k_seq + pages * stride_kb + (cols % PAGE_SIZE).to(tl.int64) * stride_kt
        v_rows = v_seq + pages * stride_vb + (cols % PAGE_SIZE).to(tl.int64) * stride_vt
    else:
        k_rows = k_seq + (start + offs_n) * stride_kt
        v_rows = v_seq + (start + offs_n) * stride_vt
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
        s = _tanh(qk * cap_scale) * cap2
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
    if MASKED:  # a NaN/Inf value of a key hidden from some rows must not reach them (0 * NaN)
        acc = masked_dot(p, v, s != float("-inf"), acc * alpha[:, None], DOT_PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _decode_range(acc, l_i, m_i, lo, hi, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
                  seqlen_k, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale2, cap_scale, cap2, window_left,
                  window_right, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _decode_tile(
            acc, l_i, m_i, q, k_seq, v_seq, table_row, start_n, offs_n, offs_d, q_pos, slope2, leftpad, seqlen_k,
            stride_kb, stride_kt, stride_vb, stride_vt, qk_scale2, cap_scale, cap2, window_left, window_right,
            HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
            DOT_PRECISION)
    return acc, l_i, m_i


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def attention_decode_append_kernel(
    # pointers
    K_NEW, V_NEW, K_CACHE, V_CACHE, CACHE_SEQLENS, BLOCK_TABLE,
    # strides
    stride_nkb, stride_nkt, stride_nkh, stride_nvb, stride_nvt, stride_nvh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_btb,
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
        first = tl.load(BLOCK_TABLE + b * stride_btb + position // PAGE_SIZE).to(tl.int64)
        row = position % PAGE_SIZE
    else:
        first = b
        row = position
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(K_NEW + b * stride_nkb + t * stride_nkt + h * stride_nkh + offs_d, mask=d_ok)
    v = tl.load(V_NEW + b * stride_nvb + t * stride_nvt + h * stride_nvh + offs_d, mask=d_ok)
    tl.store(K_CACHE + first * stride_kb + row * stride_kt + h * stride_kh + offs_d, k.to(K_CACHE.dtype.element_ty),
             mask=d_ok)
    tl.store(V_CACHE + first * stride_vb + row * stride_vt + h * stride_vh + offs_d, v.to(V_CACHE.dtype.element_ty),
             mask=d_ok)


@triton.jit
def attention_decode_split_kernel(
    # pointers
    Q, K_CACHE, V_CACHE, CACHE_SEQLENS, CACHE_LEFTPAD, BLOCK_TABLE, SLOPES, OUT, LSE, O_PART, LSE_PART,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb, stride_sb, stride_sh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pt, stride_ps, stride_plb, stride_plh, stride_plt,
    # sizes
    seqlen_q, seqlen_new, num_kv_heads, kv_group, num_splits,
    # scalars
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
        k_seq = K_CACHE + h_kv.to(tl.int64) * stride_kh
        v_seq = V_CACHE + h_kv.to(tl.int64) * stride_vh
        table_row = BLOCK_TABLE + b64 * stride_btb
    else:
        k_seq = K_CACHE + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
        v_seq = V_CACHE + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh
        table_row = BLOCK_TABLE
    slope2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + b * stride_sb + head * stride_sh, mask=row_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _decode_range(
        acc, l_i, m_i, split_lo, mid_lo, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
        seqlen_k, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale2, cap_scale, cap2, window_left, window_right,
        HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        DOT_PRECISION)
    acc, l_i, m_i = _decode_range(
        acc, l_i, m_i, mid_lo, mid_hi, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
        seqlen_k, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale2, cap_scale, cap2, window_left, window_right,
        HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        DOT_PRECISION)
    acc, l_i, m_i = _decode_range(
        acc, l_i, m_i, mid_hi, split_hi, q, k_seq, v_seq, table_row, offs_n, offs_d, q_pos, slope2, leftpad,
        seqlen_k, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale2, cap_scale, cap2, window_left, window_right,
        HEAD_DIM, EVEN_D, BLOCK_N, PAGE_SIZE, IS_PAGED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    if SPLIT:
        part = b64 * stride_pb + head64 * stride_ph + t64 * stride_pt + split * stride_ps
        tl.store(O_PART + part[:, None] + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + b64 * stride_plb + head64 * stride_plh + t64 * stride_plt + split, lse2, mask=row_ok)
    else:
        tl.store(OUT + b64 * stride_ob + (t64 * stride_ot + head64 * stride_oh)[:, None] + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b64 * stride_lb + head64 * stride_lh + t64, lse2 * 0.6931471805599453, mask=row_ok)


@triton.jit
def attention_decode_combine_kernel(
    # pointers
    O_PART, LSE_PART, OUT, LSE,
    # strides
    stride_pb, stride_ph, stride_pt, stride_ps, stride_plb, stride_plh, stride_plt,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
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
    lse_row = LSE_PART + b * stride_plb + h * stride_plh + t * stride_plt
    parts_row = O_PART + b * stride_pb + h * stride_ph + t * stride_pt
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
        parts = tl.load(parts_row + offs[:, None] * stride_ps + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                        other=0.0)
        acc += tl.sum(weights[:, None] * parts, 0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    tl.store(OUT + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE + b * stride_lb + h * stride_lh + t,
             tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453))


# ---------------------------------------------------------------------------------------------- launchers
# Split kernel configs per head-dim bucket: (BLOCK_N keys per tile, num_warps, num_stages). Decoding is bound by
# memory bandwidth: tiles are sized so that `stages` K and V tiles in flight fit in shared memory with room for
# two programs per SM. Not yet tuned on a GPU (no device was available when they were written).
SPLIT_CONFIGS = {64: (128, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)}
# Under the interpreter: 32-key tiles, so that short tests cross tiles and split boundaries, and tiles span two
# pages of 16 keys as well as lie inside pages of 32 or more.
INTERPRETED_CONFIG = (32, 1, 1)
MAX_BLOCK_M = 64  # query rows (Tq x G) per tile; more rows go to further programs (grid axis 2)
APPEND_WARPS = 1
COMBINE_WARPS = 4
COMBINE_SPLITS_PER_STEP = 8  # partial outputs merged per step of the combine kernel's loop

# num_splits=0: about WAVES waves of programs over the SMs, at least MIN_KEYS_PER_SPLIT keys of capacity per
# split, at most MAX_SPLITS splits. The interpreter pretends to have INTERPRETER_SMS.
WAVES = 2
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 128
INTERPRETER_SMS = 4


def choose_num_splits(programs: int, capacity: int, num_sms: int) -> int:
    """Splits per (batch, kv head, row block) from shapes only (never from cache_seqlens, so that a CUDA graph
    stays valid): enough programs for about ``WAVES`` waves of ``num_sms``, each split at least
    ``MIN_KEYS_PER_SPLIT`` keys of the cache's ``capacity``."""
    wanted = -(-WAVES * num_sms // max(1, programs))
    return max(1, min(wanted, capacity // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _split_config(head_dim: int, page_size: int | None) -> tuple[int, int, int]:
    if interpreter_enabled():
        block_n, warps, stages = INTERPRETED_CONFIG
    else:
        bucket = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
        block_n, warps, stages = SPLIT_CONFIGS[bucket]
    if page_size is not None and page_size % block_n and block_n % page_size:
        # Neither inside one page nor a whole number of pages: the largest power of two dividing the page size
        # (>= 16, pages are multiples of 16).
        block_n = page_size & -page_size
    return block_n, warps, stages


def _slope_strides(slopes):
    if slopes is None:
        return 0, 0
    return (0, slopes.stride(0)) if slopes.dim() == 1 else (slopes.stride(0), slopes.stride(1))


def append(k_cache, v_cache, k, v, a: KVCacheArgs) -> None:
    """Write k, v ``[B, Tnew, Hkv, D]`` at positions ``cache_seqlens[b] + t`` of the caches, in place."""
    b, t_new, h_kv, d = k.shape
    if b == 0 or t_new == 0:
        return
    table = a.block_table if a.paged else a.cache_seqlens
    attention_decode_append_kernel[(b * t_new, h_kv)](
        K_NEW=k, V_NEW=v, K_CACHE=k_cache, V_CACHE=v_cache, CACHE_SEQLENS=a.cache_seqlens, BLOCK_TABLE=table,
        stride_nkb=k.stride(0), stride_nkt=k.stride(1), stride_nkh=k.stride(2),
        stride_nvb=v.stride(0), stride_nvt=v.stride(1), stride_nvh=v.stride(2),
        stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_btb=table.stride(0),
        seqlen_new=t_new,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), PAGE_SIZE=k_cache.shape[1] if a.paged else 1,
        IS_PAGED=a.paged, num_warps=APPEND_WARPS,
    )


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
    page_size = k_cache.shape[1] if a.paged else None
    block_n, warps, stages = _split_config(d, page_size)
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(t_q * group)))
    row_blocks = triton.cdiv(t_q * group, block_m)
    splits = a.num_splits or choose_num_splits(b * h_kv * row_blocks, cache_capacity(k_cache, a.block_table),
                                               num_sms(q.device))
    block_d = max(16, triton.next_power_of_2(d))
    if splits > 1:
        o_part = torch.empty(b, h, t_q, splits, d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(b, h, t_q, splits, device=q.device, dtype=torch.float32)
    else:
        o_part, lse_part = out, lse  # not written
    cap = a.softcap if a.softcap > 0 else 1.0
    dummy = a.cache_seqlens
    attention_decode_split_kernel[(b * h_kv, splits, row_blocks)](
        Q=q, K_CACHE=k_cache, V_CACHE=v_cache, CACHE_SEQLENS=a.cache_seqlens,
        CACHE_LEFTPAD=a.cache_leftpad if a.cache_leftpad is not None else dummy,
        BLOCK_TABLE=a.block_table if a.paged else dummy,
        SLOPES=a.alibi_slopes if a.alibi_slopes is not None else lse, OUT=out, LSE=lse, O_PART=o_part,
        LSE_PART=lse_part,
        stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_btb=a.block_table.stride(0) if a.paged else 0,
        stride_sb=_slope_strides(a.alibi_slopes)[0], stride_sh=_slope_strides(a.alibi_slopes)[1],
        stride_ob=out.stride(0), stride_ot=out.stride(1), stride_oh=out.stride(2),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        stride_pb=o_part.stride(0), stride_ph=o_part.stride(1), stride_pt=o_part.stride(2),
        stride_ps=o_part.stride(3) if splits > 1 else 0,
        stride_plb=lse_part.stride(0), stride_plh=lse_part.stride(1), stride_plt=lse_part.stride(2),
        seqlen_q=t_q, seqlen_new=0 if k is None else k.shape[1], num_kv_heads=h_kv, kv_group=group,
        num_splits=splits,
        qk_scale2=a.softmax_scale * LOG2E, cap_scale=a.softmax_scale / cap, cap2=cap * LOG2E,
        window_left=a.window_left if a.window_left is not None else 0,
        window_right=a.window_right if a.window_right is not None else 0,
        HEAD_DIM=d, BLOCK_D=block_d, PAGE_SIZE=page_size or 1, IS_PAGED=a.paged,
        HAS_LEFTPAD=a.cache_leftpad is not None, HAS_LEFT=a.window_left is not None,
        HAS_RIGHT=a.window_right is not None, HAS_SOFTCAP=a.softcap > 0, HAS_ALIBI=a.alibi_slopes is not None,
        SPLIT=splits > 1, DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        attention_decode_combine_kernel[(b * h * t_q,)](
            O_PART=o_part, LSE_PART=lse_part, OUT=out, LSE=lse,
            stride_pb=o_part.stride(0), stride_ph=o_part.stride(1), stride_pt=o_part.stride(2),
            stride_ps=o_part.stride(3), stride_plb=lse_part.stride(0), stride_plh=lse_part.stride(1),
            stride_plt=lse_part.stride(2),
            stride_ob=out.stride(0), stride_ot=out.stride(1), stride_oh=out.stride(2),
            stride_lb=lse.stride(0), stride_lh=lse.stride(1),
            seqlen_q=t_q, num_heads=h, num_splits=splits,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            SPLITS_PER_STEP=COMBINE_SPLITS_PER_STEP, num_warps=COMBINE_WARPS,
        )
    return out, lse
