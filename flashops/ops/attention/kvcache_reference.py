"""The oracle for KV-cache attention: append on a copy of the cache, gather each sequence's keys, attend.

Same arguments as ``flashops.flash_attention_with_kvcache`` (plus ``upcast``, as in ``reference.attention``)
but it never writes into the given caches: it returns ``(out, lse, k_cache, v_cache)`` with the caches as they
must look after the call, so tests can compare the op's in-place writes with them element by element.
Sequence by sequence, positions one at a time: obviously right, not fast.
"""

from __future__ import annotations

import torch

from . import reference


def _slot(block_table, page_size, b: int, position: int):
    """(first index, row) of ``position`` of sequence ``b`` in a cache laid out as [B | pages, rows, Hkv, D]."""
    if block_table is None:
        return b, position
    return int(block_table[b, position // page_size]), position % page_size


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, cache_leftpad=None,
                           block_table=None, causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, upcast=True):
    """Returns ``(out [B, Tq, H, D], lse fp32 [B, H, Tq], k_cache, v_cache)`` (caches: appended copies)."""
    b, t_q, h, _ = q.shape
    page_size = k_cache.shape[1]
    seqlens = ([int(cache_seqlens)] * b if isinstance(cache_seqlens, int) else
               [int(n) for n in cache_seqlens.tolist()])
    leftpad = [0] * b if cache_leftpad is None else [int(n) for n in cache_leftpad.tolist()]
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    t_new = 0 if k is None else k.shape[1]
    outs, lses = [], []
    for i in range(b):
        for t in range(t_new):
            first, row = _slot(block_table, page_size, i, seqlens[i] + t)
            k_cache[first, row] = k[i, t]
            v_cache[first, row] = v[i, t]
        slots = [_slot(block_table, page_size, i, p) for p in range(leftpad[i], seqlens[i] + t_new)]
        keys = torch.stack([k_cache[f, r] for f, r in slots]) if slots else k_cache[0, :0]
        values = torch.stack([v_cache[f, r] for f, r in slots]) if slots else v_cache[0, :0]
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = reference.attention(q[i:i + 1], keys[None], values[None], causal=causal,
                                       softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                       alibi_slopes=slopes, upcast=upcast)
        outs.append(out)
        lses.append(lse)
    if b == 0:
        return q.clone(), q.new_empty(0, h, t_q, dtype=torch.float32), k_cache, v_cache
    return torch.cat(outs), torch.cat(lses), k_cache, v_cache
