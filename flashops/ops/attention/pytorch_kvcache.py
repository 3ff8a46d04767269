"""KV-cache attention in pure PyTorch: the CPU path and the fallback on any device.

The new keys/values are written with one indexed store per cache. Attention then walks the cache in key
chunks with an online softmax, all sequences at once (paged caches are gathered chunk by chunk through the
block table), and the queries in chunks, so the largest temporary is one ``[B, H, Cq, Ck]`` score tile of at
most TILE_ELEMENTS: memory is linear in the cache length, whatever Tq is. Slots outside a sequence's
``[leftpad, seqlen)`` are replaced by zeros before any arithmetic (select, not multiply), so garbage or NaN
there never reaches an output.

On the CPU the loops stop at the longest sequence (reading the lengths is free there); on other devices they
cover the whole capacity, so that no call synchronizes with the host.
"""

from __future__ import annotations

import torch

from .args import KVCacheArgs, cache_capacity

# One [B, H, Cq, Ck] score tile stays within this many elements. Decode steps (few queries) take the keys in
# chunks as long as that allows (one chunk for most caches: fewer, larger matmuls); long query blocks take
# MIN_KEY_CHUNK keys at a time and as many queries as fit.
TILE_ELEMENTS = 1 << 21
MIN_KEY_CHUNK = 512


def append(k_cache, v_cache, k, v, a: KVCacheArgs) -> None:
    """Write k, v ``[B, Tnew, Hkv, D]`` at positions ``cache_seqlens[b] + t`` (nothing else is touched)."""
    positions = a.cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=k.device)  # [B, Tnew]
    if a.block_table is None:
        first, rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(positions), positions
    else:
        page_size = k_cache.shape[1]
        first, rows = a.block_table.long().gather(1, positions // page_size), positions % page_size
    k_cache[first, rows] = k.to(k_cache.dtype)
    v_cache[first, rows] = v.to(v_cache.dtype)


def _key_bounds(a: KVCacheArgs, seqlen_k, leftpad, diag, t0: int, t1: int, capacity: int) -> tuple[int, int]:
    """Keys any query in [t0, t1) of any sequence can see: exact on the CPU, the whole capacity elsewhere."""
    if seqlen_k.device.type != "cpu" or seqlen_k.numel() == 0:
        return 0, capacity
    lo = leftpad if a.window_left is None else torch.maximum(leftpad, diag + t0 - a.window_left)
    hi = seqlen_k if a.window_right is None else torch.minimum(seqlen_k, diag + t1 + a.window_right)
    return max(0, int(lo.min())), min(capacity, int(hi.max()))


def _gather(cache, a: KVCacheArgs, j0: int, j1: int, valid, seqlen_k, leftpad, compute_dtype):
    """Keys or values of positions [j0, j1) of every sequence, [B, Hkv, C, D], zero where not ``valid``.
    Paged caches are gathered page by page; block-table entries of pages a sequence does not use (they may
    hold anything) are replaced by page 0 before indexing."""
    if a.block_table is None:
        chunk = cache[:, j0:j1]
    else:
        page_size = cache.shape[1]
        p0, p1 = j0 // page_size, -(-j1 // page_size)
        pages = torch.arange(p0, p1, device=cache.device)
        used = (pages * page_size < seqlen_k[:, None]) & ((pages + 1) * page_size > leftpad[:, None])
        ids = torch.where(used, a.block_table[:, p0:p1].long(), 0)
        chunk = cache[ids].flatten(1, 2)[:, j0 - p0 * page_size:j1 - p0 * page_size]
    if valid.device.type != "cpu" or not bool(valid.all()):  # (reading `valid` is free on the CPU only)
        chunk = torch.where(valid[:, :, None, None], chunk, 0)
    return chunk.to(compute_dtype).permute(0, 2, 1, 3)


def forward(q, k_cache, v_cache, k, v, a: KVCacheArgs):
    """q [B, Tq, H, D]; caches [B, Tmax, Hkv, D] or paged [pages, page_size, Hkv, D]; k, v [B, Tnew, Hkv, D]
    or None. Appends k, v in place, then returns out [B, Tq, H, D] (q's dtype) and lse fp32 [B, H, Tq]."""
    if k is not None:
        append(k_cache, v_cache, k, v, a)
    b, t_q, h, d = q.shape
    h_kv = k_cache.shape[2]
    g = h // h_kv
    dev = q.device
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    t_new = 0 if k is None else k.shape[1]
    seqlen_k = a.cache_seqlens.long() + t_new
    leftpad = a.cache_leftpad.long() if a.cache_leftpad is not None else torch.zeros_like(seqlen_k)
    diag = seqlen_k - t_q  # bottom-right: query t sits at position diag + t
    capacity = cache_capacity(k_cache, a.block_table)
    key_chunk = max(1, min(capacity, max(MIN_KEY_CHUNK, TILE_ELEMENTS // max(1, b * h * t_q))))
    query_chunk = max(1, min(t_q, TILE_ELEMENTS // max(1, b * h * key_chunk)))
    slopes = None if a.alibi_slopes is None else a.alibi_slopes.to(compute).reshape(-1, h_kv, g, 1, 1)

    qg = q.to(compute).reshape(b, t_q, h_kv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
    out = torch.zeros(b, h_kv, g, t_q, d, device=dev, dtype=compute)
    lse = torch.full((b, h_kv, g, t_q), float("-inf"), device=dev)
    for t0 in range(0, t_q, query_chunk):
        t1 = min(t0 + query_chunk, t_q)
        lo, hi = _key_bounds(a, seqlen_k, leftpad, diag, t0, t1, capacity)
        q_pos = (diag[:, None] + torch.arange(t0, t1, device=dev))[:, None, None, :, None]  # [B, 1, 1, tc, 1]
        m = torch.full((b, h_kv, g, t1 - t0, 1), float("-inf"), device=dev, dtype=compute)
        l = torch.zeros_like(m)
        acc = torch.zeros(b, h_kv, g, t1 - t0, d, device=dev, dtype=compute)
        q_rows = qg[..., t0:t1, :].reshape(b, h_kv, g * (t1 - t0), d)
        for j0 in range(lo, hi, key_chunk):
            j1 = min(j0 + key_chunk, hi)
            cols = torch.arange(j0, j1, device=dev)
            valid = (cols >= leftpad[:, None]) & (cols < seqlen_k[:, None])  # [B, C]
            # The G heads x tc queries of a K/V head are the rows of one matmul: [B, Hkv, G * tc, C].
            keys = _gather(k_cache, a, j0, j1, valid, seqlen_k, leftpad, compute)
            s = torch.matmul(q_rows, keys.transpose(-1, -2))
            s = s.view(b, h_kv, g, t1 - t0, j1 - j0)
            if a.softcap > 0:
                s = s.mul_(a.softmax_scale / a.softcap).tanh_().mul_(a.softcap)
            else:
                s = s.mul_(a.softmax_scale)
            if slopes is not None:
                s.sub_(slopes * (q_pos - cols).abs().to(compute))
            visible = valid[:, None, None, None, :]
            if a.window_right is not None:
                visible = visible & (cols <= q_pos + a.window_right)
            if a.window_left is not None:
                visible = visible & (cols >= q_pos - a.window_left)
            s = s.masked_fill_(~visible, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            p = s.sub_(m_safe).exp_()
            alpha = torch.exp(m - m_safe)
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            values = _gather(v_cache, a, j0, j1, valid, seqlen_k, leftpad, compute)
            pv = torch.matmul(p.view(b, h_kv, g * (t1 - t0), j1 - j0), values)
            acc = pv.view_as(acc).add_(acc.mul_(alpha))
            m = m_new
        empty = l == 0
        out[..., t0:t1, :] = acc / l.masked_fill(empty, 1.0)
        lse[..., t0:t1] = (m + torch.log(l)).masked_fill(empty, float("-inf")).squeeze(-1).float()
    result = torch.empty_like(q)  # q's layout, as the Triton backend and the fake kernel give
    result.copy_(out.permute(0, 3, 1, 2, 4).reshape(b, t_q, h, d))
    return result, lse.reshape(b, h, t_q)
