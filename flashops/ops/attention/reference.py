"""The oracle for exact attention: plain PyTorch, everything materialized, no tricks.

Same arguments as ``flashops.flash_attention`` plus ``dropout_mask`` (the keep-mask the kernels drew) and
``upcast``: with ``upcast=True`` (default) it computes in fp32 from the given values; with ``upcast=False``
it computes in the input dtype, which gives the "same reference in low precision" baseline of the
tolerance rule. It imports nothing from flashops.

``attention_with_kvcache`` is the oracle of ``flashops.flash_attention_with_kvcache``: it appends on a copy of
the cache, gathers each sequence's keys position by position and attends with ``attention``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat


def allowed_mask(t_q: int, t_k: int, window_left, window_right, device) -> torch.Tensor:
    """[t_q, t_k] bool: key j is visible to query i. Windows are measured from the bottom-right diagonal
    i + (t_k - t_q); ``None`` (or a negative left) means unlimited on that side."""
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    j = torch.arange(t_k, device=device)[None, :]
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if window_right is not None:
        mask &= j <= i + window_right
    if window_left is not None and window_left >= 0:
        mask &= j >= i - window_left
    return mask


def _dense(q, k, v, *, softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p,
           dropout_mask, block_mask, block_size, attn_bias, upcast):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> out [B, Tq, H, D], lse [B, H, Tq] (fp32)."""
    dtype = torch.float32 if upcast else q.dtype
    b, t_q, h, d = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv  # GQA: query head h uses key/value head h // group
    qh = rearrange(q.to(dtype), "b t h d -> b h t d")
    kh = repeat(k.to(dtype), "b t h d -> b (h g) t d", g=group)
    vh = repeat(v.to(dtype), "b t h d -> b (h g) t d", g=group)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().reshape(-1 if alibi_slopes.dim() == 2 else 1, h, 1, 1)
        i = torch.arange(t_q, device=q.device)[:, None] + (t_k - t_q)
        j = torch.arange(t_k, device=q.device)[None, :]
        scores = scores - (slopes * (i - j).abs()).to(dtype)
    if attn_bias is not None:
        scores = scores + attn_bias.to(dtype)
    mask = allowed_mask(t_q, t_k, window_left, window_right, q.device)
    if block_mask is not None:
        bm, bn = block_size
        blocks = block_mask.bool().repeat_interleave(bm, dim=-2)[..., :t_q, :]
        blocks = blocks.repeat_interleave(bn, dim=-1)[..., :t_k]
        mask = mask & blocks
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.to(dtype)[..., None].masked_fill(empty[..., None], 0.0))
    probs = probs.masked_fill(empty[..., None], 0.0)
    if dropout_p > 0:
        if dropout_mask is None:
            raise ValueError("the reference needs dropout_mask when dropout_p > 0")
        probs = probs * dropout_mask.to(dtype) / (1.0 - dropout_p)
    out = rearrange(torch.matmul(probs, vh), "b h t d -> b t h d")
    return out, lse


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, dropout_p=0.0, dropout_mask=None, block_mask=None, block_size=(128, 128),
              attn_bias=None, cu_seqlens_q=None, cu_seqlens_k=None, upcast=True):
    """Exact attention. Returns ``(out, lse)``: out in the input dtype, lse fp32 [B, H, Tq]
    (varlen: [H, total_q]). A row with no visible key gives out 0 and lse -inf.

    ``window_size=(left, right)`` counts keys from the bottom-right diagonal; -1 is unlimited.
    ``causal`` sets right to 0. ``dropout_mask``: keep-mask [B, H, Tq, Tk] (varlen: a list, one per sequence).
    """
    softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = window_size
    window_left = None if left < 0 else left
    window_right = None if right < 0 else right
    if causal:
        window_right = 0 if window_right is None else min(window_right, 0)
    kwargs = dict(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
                  softcap=softcap, dropout_p=dropout_p, block_size=block_size, upcast=upcast)
    if cu_seqlens_q is None:
        out, lse = _dense(q, k, v, alibi_slopes=alibi_slopes, dropout_mask=dropout_mask,
                          block_mask=block_mask, attn_bias=attn_bias, **kwargs)
        return out.to(q.dtype), lse
    outs, lses = [], []
    for n in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[n]), int(cu_seqlens_q[n + 1])
        ks, ke = int(cu_seqlens_k[n]), int(cu_seqlens_k[n + 1])
        slopes = alibi_slopes[n] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, l = _dense(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], alibi_slopes=slopes,
                      dropout_mask=None if dropout_mask is None else dropout_mask[n],
                      block_mask=None if block_mask is None else block_mask[n : n + 1],
                      attn_bias=None, **kwargs)
        outs.append(o)
        lses.append(l[0])
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=-1)


# ------------------------------------------------------------------------------------------- KV-cache decoding
def _slot(block_table, page_size, b: int, position: int):
    """(first index, row) of ``position`` of sequence ``b`` in a cache laid out as [B | pages, rows, Hkv, D]."""
    if block_table is None:
        return b, position
    return int(block_table[b, position // page_size]), position % page_size


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, cache_leftpad=None,
                           block_table=None, causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, upcast=True):
    """Same arguments as ``flashops.flash_attention_with_kvcache`` (plus ``upcast``, as in :func:`attention`),
    but it never writes into the given caches: returns ``(out [B, Tq, H, D], lse fp32 [B, H, Tq], k_cache,
    v_cache)`` with the caches as they must look after the call (appended copies), so tests can compare the
    op's in-place writes with them element by element. Sequence by sequence, positions one at a time."""
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
        out, lse = attention(q[i:i + 1], keys[None], values[None], causal=causal, softmax_scale=softmax_scale,
                             window_size=window_size, softcap=softcap, alibi_slopes=slopes, upcast=upcast)
        outs.append(out)
        lses.append(lse)
    if b == 0:
        return q.clone(), q.new_empty(0, h, t_q, dtype=torch.float32), k_cache, v_cache
    return torch.cat(outs), torch.cat(lses), k_cache, v_cache
