"""HyperAttention from a plan: exact-attention calls on gathered pieces, merged by their log-sum-exps.

Every attention piece is one call of the exact op (its Triton kernel on a GPU), batched over all problems,
blocks and heads: blocks are folded into the batch dimension when they all have the same size, otherwise
packed as variable-length sequences. The exact op's log-sum-exp is differentiable, so the gradient flows
through the merge weights too. Merged partial results are kept in fp32 (fp64 for fp64 inputs) and cast once
at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._numerics import compute_dtype
from ..attention import flash_attention, flash_attention_varlen
from .plan import HyperLevel, HyperPlan, segment_ids


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``[N, T, Hx, D]``, ``index`` ``[N, M, Hx]`` token positions per head -> ``[N, M, Hx, D]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def _inverse(perm: Tensor) -> Tensor:
    positions = torch.arange(perm.shape[1], device=perm.device).view(1, -1, 1).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, positions)


def _sizes(bounds: tuple) -> list:
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _blockwise(q: Tensor, k: Tensor, v: Tensor, q_bounds: tuple, k_bounds: tuple, scale: float,
               backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """Exact attention of query block i against key block i, for every block of every problem at once.

    q ``[N, Tq, H, D]``, k/v ``[N, Tk, Hkv, D]`` -> out ``[N, Tq, H, D]``, lse fp32 ``[N, Tq, H]``."""
    n, t_q, h, d = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    blocks = len(q_bounds) - 1
    q_sizes, k_sizes = _sizes(q_bounds), _sizes(k_bounds)
    if len(set(q_sizes)) == 1 and len(set(k_sizes)) == 1:
        bq, bk = q_sizes[0], k_sizes[0]
        out, lse = flash_attention(
            q.reshape(n * blocks, bq, h, d), k.reshape(n * blocks, bk, h_kv, d), v.reshape(n * blocks, bk, h_kv, d),
            softmax_scale=scale, return_lse=True, backend=backend)
        lse = lse.view(n, blocks, h, bq).transpose(2, 3).reshape(n, t_q, h)
        return out.view(n, t_q, h, d), lse

    def cumulative(bounds, length):  # block starts of every problem, then the packed total
        starts = torch.arange(n, device=q.device)[:, None] * length + torch.tensor(bounds[:-1], device=q.device)
        return F.pad(starts.flatten(), (0, 1), value=n * length).to(torch.int32)

    out, lse = flash_attention_varlen(
        q.reshape(1, n * t_q, h, d), k.reshape(1, n * t_k, h_kv, d), v.reshape(1, n * t_k, h_kv, d),
        cumulative(q_bounds, t_q), cumulative(k_bounds, t_k), max(q_sizes), max(k_sizes),
        softmax_scale=scale, return_lse=True, backend=backend)
    return out.view(n, t_q, h, d), lse.view(h, n, t_q).permute(1, 2, 0)


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the union of two disjoint key sets from the two partial results (out ``[..., T, H, D]``,
    lse ``[..., T, H]``): weights exp(lse_x - lse). Result in fp32 (fp64 for fp64 parts). A part with lse -inf
    weighs 0."""
    lse = torch.logaddexp(lse_a, lse_b)
    dt = compute_dtype(out_a.dtype)
    out = out_a.to(dt) * torch.exp(lse_a - lse).unsqueeze(-1) + out_b.to(dt) * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


def approximate(q: Tensor, k: Tensor, v: Tensor, level: HyperLevel, scale: float,
                backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """One level's non-causal problems: q ``[N, Tq, H, D]``, k/v ``[N, Tk, Hkv, D]`` -> out fp32
    ``[N, Tq, H, D]``, lse ``[N, Tq, H]``: sorted block-diagonal part plus the sampled residual."""
    q_sorted = _gather_rows(q, level.q_perm)
    out, lse = _blockwise(q_sorted, _gather_rows(k, level.k_perm), _gather_rows(v, level.k_perm),
                          level.q_bounds, level.k_bounds, scale, backend)
    if level.samples.shape[1] > 0:
        res_out, res_lse = _blockwise(q_sorted, _gather_rows(k, level.samples), _gather_rows(v, level.samples),
                                      level.q_bounds, level.sample_bounds, scale, backend)
        # The sampling-rate correction of block i, at each sorted query slot of block i.
        correction = torch.tensor(level.log_weights, device=q.device)[segment_ids(level.q_bounds, q.device)]
        out, lse = merge(out, lse, res_out, res_lse + correction[:, None])
    else:
        out = out.to(compute_dtype(q.dtype))
    unsort = _inverse(level.q_perm)
    return _gather_rows(out, unsort), torch.gather(lse, 1, unsort)


def run(q: Tensor, k: Tensor, v: Tensor, plan: HyperPlan, scale: float,
        backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """HyperAttention of validated inputs under ``plan`` -> out ``[B, T, H, D]`` (input dtype), lse
    ``[B, H, T]`` (fp32)."""
    if plan.exact:
        return flash_attention(q, k, v, causal=plan.causal, softmax_scale=scale, return_lse=True, backend=backend)
    if not plan.causal:
        out, lse = approximate(q, k, v, plan.levels[0], scale, backend)
        return out.to(q.dtype), lse.transpose(1, 2)

    b, t, h, d = q.shape
    h_kv = k.shape[2]
    padded, base = plan.padded_len, plan.base_len
    if padded != t:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, padded - t)) for x in (q, k, v))
    segments = padded // base
    out, lse = flash_attention(q.reshape(b * segments, base, h, d), k.reshape(b * segments, base, h_kv, d),
                               v.reshape(b * segments, base, h_kv, d), causal=True, softmax_scale=scale,
                               return_lse=True, backend=backend)
    out, lse = out.to(compute_dtype(q.dtype)), lse.transpose(1, 2)
    # Bottom-up: at level l the segments of length 2*half get their lower-left (second-half queries,
    # first-half keys) non-causal part merged into the second half's causal result.
    for depth in reversed(range(len(plan.levels))):
        pieces, half = b << depth, padded >> (depth + 1)
        second_q = q.reshape(pieces, 2, half, h, d)[:, 1]
        first_k, first_v = (x.reshape(pieces, 2, half, h_kv, d)[:, 0] for x in (k, v))
        low_out, low_lse = approximate(second_q, first_k, first_v, plan.levels[depth], scale, backend)
        out, lse = out.view(pieces, 2, half, h, d), lse.reshape(pieces, 2, half, h)
        second_out, second_lse = merge(out[:, 1], lse[:, 1], low_out, low_lse)
        out = torch.stack((out[:, 0], second_out), dim=1).view(pieces, 2 * half, h, d)
        lse = torch.stack((lse[:, 0], second_lse), dim=1).view(pieces, 2 * half, h)
    return out[:, :t].to(q.dtype), lse[:, :t].transpose(1, 2)
