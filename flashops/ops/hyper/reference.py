"""The oracle for HyperAttention under a given plan: everything materialized, no tricks.

The approximation of a plan is a softmax whose terms carry multiplicities: query i gives weight
``W[i, j] * exp(s_ij)`` to key j, where W is 1 for the keys of the query's own block, (keys outside the
block) / (samples) for each time j was sampled for that block, and 0 otherwise. Causal plans add the exact
causal diagonal segments (weight 1 for j <= i) and place each level's non-causal problems in the lower-left
quarters. This module builds W densely, ``[B, H, T, T]``, and computes
``out = softmax(s + log W) @ v`` and ``lse = logsumexp(s + log W)``. It reads the plan's attributes only
and imports nothing from flashops.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat


def _block_of_slot(bounds, device) -> torch.Tensor:
    sizes = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(bounds) - 1, device=device), sizes)


def _block_of_position(perm: torch.Tensor, bounds) -> torch.Tensor:
    """perm ``[N, T, Hx]`` (sorted slot -> position) -> block id of each position ``[N, T, Hx]``."""
    blocks = _block_of_slot(bounds, perm.device).view(1, -1, 1).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, blocks)


def level_weights(level, heads: int) -> torch.Tensor:
    """W of one level's non-causal problems: ``[N, H, Tq, Tk]`` float64."""
    n, t_q, _ = level.q_perm.shape
    t_k, h_kv = level.k_perm.shape[1], level.k_perm.shape[2]
    group = heads // h_kv
    q_block = _block_of_position(level.q_perm, level.q_bounds)  # [N, Tq, H]
    k_block = _block_of_position(level.k_perm, level.k_bounds).repeat_interleave(group, dim=2)  # [N, Tk, H]
    weights = (q_block.permute(0, 2, 1)[..., None] == k_block.permute(0, 2, 1)[:, :, None, :]).double()
    # counts[n, hkv, b, j]: how often key j was sampled for block b
    blocks = len(level.k_bounds) - 1
    counts = torch.zeros(n, h_kv, blocks, t_k, dtype=torch.float64, device=weights.device)
    for b in range(blocks):
        lo, hi = level.sample_bounds[b], level.sample_bounds[b + 1]
        picked = level.samples[:, lo:hi, :].permute(0, 2, 1)  # [N, Hkv, S_b]
        counts[:, :, b].scatter_add_(-1, picked, torch.ones_like(picked, dtype=torch.float64))
    rate = torch.tensor([math.exp(w) for w in level.log_weights], dtype=torch.float64, device=weights.device)
    counts = (counts * rate[:, None]).repeat_interleave(group, dim=1)  # [N, H, nb, Tk]
    sampled = torch.gather(counts, 2, q_block.permute(0, 2, 1)[..., None].expand(-1, -1, -1, t_k))
    return weights + sampled


def plan_weights(plan, heads: int, device) -> torch.Tensor:
    """The full W of a plan: ``[B, H, Tq, Tk]`` float64 (exact plans: all ones, causal: lower triangle)."""
    b, t_q, t_k = plan.batch, plan.seq_len_q, plan.seq_len_k
    if not plan.causal:
        if not plan.levels:
            return torch.ones(b, heads, t_q, t_k, dtype=torch.float64, device=device)
        return level_weights(plan.levels[0], heads)
    padded, base = plan.padded_len, plan.base_len
    weights = torch.zeros(b, heads, padded, padded, dtype=torch.float64, device=device)
    causal = torch.ones(base, base, dtype=torch.float64, device=device).tril()
    for s in range(0, padded, base):
        weights[..., s:s + base, s:s + base] = causal
    for depth, level in enumerate(plan.levels):
        segment = padded >> depth
        half = segment // 2
        low = level_weights(level, heads).view(b, 1 << depth, heads, half, half)
        for s in range(1 << depth):
            start = s * segment
            weights[..., start + half:start + segment, start:start + half] = low[:, s]
    return weights[..., :t_q, :t_q]


def _heads_first(q, k, v, dtype):
    """q [B, Tq, H, D] -> [B, H, Tq, D]; k/v [B, Tk, Hkv, D] -> [B, H, Tk, D] (GQA groups repeated)."""
    group = q.shape[2] // k.shape[2]
    return (rearrange(q.to(dtype), "b t h d -> b h t d"), repeat(k.to(dtype), "b t h d -> b (h g) t d", g=group),
            repeat(v.to(dtype), "b t h d -> b (h g) t d", g=group))


def hyper_attention(q, k, v, plan, *, softmax_scale=None, dtype=torch.float64):
    """HyperAttention under ``plan``, materialized. q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hkv, D]`` ->
    ``(out [B, Tq, H, D] in q's dtype, lse fp32 [B, H, Tq])``; computed in ``dtype`` (default float64)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    heads = q.shape[2]
    qh, kh, vh = _heads_first(q, k, v, dtype)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    log_weights = torch.log(plan_weights(plan, heads, q.device)).to(dtype)
    scores = scores + log_weights
    lse = torch.logsumexp(scores, dim=-1)
    out = rearrange(torch.matmul(torch.exp(scores - lse[..., None]), vh), "b h t d -> b t h d")
    return out.to(q.dtype), lse.float()


def exact_attention(q, k, v, *, causal=False, softmax_scale=None, dtype=torch.float64):
    """Plain softmax attention (causal: top-left aligned, Tq == Tk), for measuring the approximation error."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = _heads_first(q, k, v, dtype)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = rearrange(torch.matmul(torch.exp(scores - lse[..., None]), vh), "b h t d -> b t h d")
    return out.to(q.dtype), lse.float()
