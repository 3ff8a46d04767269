"""The random and discrete choices of HyperAttention, drawn once per call and kept in a ``HyperPlan``.

A plan holds everything that is not differentiable: the LSH hyperplanes, the sort permutations of queries
and keys, the block boundaries and the sampled key indices. Running attention from a plan is then a fixed
composition of exact-attention calls, gathers and merges, so forward and backward see the same samples,
and a plain-PyTorch reference can rebuild the same approximation from the same plan (tests do that).

Non-causal (one ``HyperLevel`` with ``N = B`` problems): queries and keys are hashed with the same angular
LSH, sorted by bucket, and cut into ``nb = ceil(Tk / block_size)`` blocks of (almost) equal size;
sorted query block i is paired with sorted key block i. Each block also gets ``sample_size`` keys drawn
uniformly (with replacement) from the keys OUTSIDE that block, weighted by (keys outside) / (samples);
when the keys outside a block are no more than ``sample_size``, all of them are taken once, weight 1, and
the approximation of that block is exact.

Causal: the sequence is zero-padded at the end to ``base_len * 2**L`` with ``base_len <= min_seq_len``.
Level l (l = 0..L-1) cuts it into ``2**l`` segments per batch row; in each, the second half's queries
against the first half's keys is a non-causal problem (``N = B * 2**l`` problems of ``padded_len / 2**(l+1)``
queries and keys). What remains, the ``2**L`` diagonal segments of length ``base_len``, is exact causal
attention. Padding sits at the end, so a real query never meets a padded key.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Samples are drawn as uniform int64 in [0, 2**62) reduced modulo the range: the bias is below 2**-40.
_DRAW_HIGH = 1 << 62


@dataclass(frozen=True)
class HyperLevel:
    """A batch of ``N`` non-causal problems that share block boundaries.

    q_perm: int64 ``[N, Tq, H]``; sorted slot s of head h holds query ``q_perm[n, s, h]``.
    k_perm: int64 ``[N, Tk, Hkv]``; likewise for keys (and values).
    q_bounds, k_bounds: block i is sorted slots ``[bounds[i], bounds[i + 1])``; ``nb + 1`` entries each.
    samples: int64 ``[N, C, Hkv]`` key positions (unsorted order) sampled for the blocks; block i owns
        columns ``[sample_bounds[i], sample_bounds[i + 1])``. A key never lies in the block it is sampled for.
    log_weights: per block, log((keys outside the block) / (samples of the block)): added to the sampled
        scores so that they estimate the sum over all keys outside the block (0 where all are taken).
    """

    q_perm: Tensor
    k_perm: Tensor
    q_bounds: tuple
    k_bounds: tuple
    samples: Tensor
    sample_bounds: tuple
    log_weights: tuple

    @property
    def num_blocks(self) -> int:
        return len(self.k_bounds) - 1


@dataclass(frozen=True)
class HyperPlan:
    """Everything random or discrete about one HyperAttention call (see the module docstring).

    ``levels`` is empty when the call is exact (T <= min_seq_len). Causal plans have one level per halving,
    the top (longest) first; ``padded_len = base_len * 2**len(levels)``. Non-causal plans have at most one
    level and ``base_len = padded_len = 0``. ``projections`` are the fp32 ``[D, r]`` LSH hyperplanes.
    """

    causal: bool
    batch: int
    seq_len_q: int
    seq_len_k: int
    heads: int
    kv_heads: int
    padded_len: int
    base_len: int
    projections: Optional[Tensor]
    levels: tuple

    @property
    def exact(self) -> bool:
        return len(self.levels) == 0


# ---------------------------------------------------------------------------------------------------- LSH
def inverse_gray(code: Tensor, num_bits: int) -> Tensor:
    """The rank of ``code`` in the reflected Gray sequence (prefix XOR from the top bit). Sorting buckets
    by this rank puts codes that differ in one bit next to each other (Gray(r) and Gray(r+1) differ in
    exactly one bit), so similar vectors land in nearby sorted positions."""
    shift = 1
    while shift < num_bits:
        code = code ^ (code >> shift)
        shift *= 2
    return code


def bucket_ranks(x: Tensor, projections: Tensor) -> Tensor:
    """Angular LSH: ``x`` ``[N, T, Hx, D]`` -> int64 ``[N, T, Hx]`` bucket rank in Hamming (Gray) order."""
    num_bits = projections.shape[1]
    if num_bits == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
    bits = torch.matmul(x.detach(), projections.to(x.dtype)) > 0  # [N, T, Hx, r]
    powers = 2 ** torch.arange(num_bits, device=x.device, dtype=torch.int64)
    return inverse_gray((bits.to(torch.int64) * powers).sum(-1), num_bits)


# ------------------------------------------------------------------------------------------------ blocks
def balanced_bounds(total: int, num_blocks: int) -> tuple:
    """Cut ``total`` slots into ``num_blocks`` blocks whose sizes differ by at most one."""
    return tuple(i * total // num_blocks for i in range(num_blocks + 1))


def segment_ids(bounds: tuple, device) -> Tensor:
    """The block index of every slot ``0 .. bounds[-1] - 1`` (block i = ``[bounds[i], bounds[i + 1])``)."""
    inner = torch.tensor(bounds[1:-1], dtype=torch.int64, device=device)
    return torch.bucketize(torch.arange(bounds[-1], device=device), inner, right=True)


def _draw(shape, high: int, device, generator: Optional[torch.Generator]) -> Tensor:
    where = generator.device if generator is not None else device
    draws = torch.randint(0, high, shape, device=where, generator=generator, dtype=torch.int64)
    return draws.to(device)


def _samples(k_perm: Tensor, k_bounds: tuple, sample_size: int, generator) -> tuple:
    """Per key block, ``min(sample_size, keys outside)`` keys drawn uniformly from outside the block."""
    n, t_k, h_kv = k_perm.shape
    device = k_perm.device
    sizes = [b - a for a, b in zip(k_bounds[:-1], k_bounds[1:])]
    outside = [t_k - s for s in sizes]
    counts = [min(sample_size, o) for o in outside]
    sample_bounds = tuple(itertools.accumulate(counts, initial=0))
    log_weights = tuple(math.log(o / c) if c > 0 else 0.0 for o, c in zip(outside, counts))
    total = sample_bounds[-1]
    if total == 0:
        return k_perm.new_empty(n, 0, h_kv), sample_bounds, log_weights

    blocks = segment_ids(sample_bounds, device)

    def per_slot(values):  # a per-block list -> its value at each of the `total` sample slots
        return torch.tensor(values, dtype=torch.int64, device=device)[blocks]

    slot_outside = per_slot(outside)
    within = torch.arange(total, device=device) - per_slot(list(sample_bounds[:-1]))
    exhaustive = per_slot([int(c == o) for c, o in zip(counts, outside)]).bool()
    drawn = _draw((n, total, h_kv), _DRAW_HIGH, device, generator) % slot_outside[:, None]
    # r counts the keys outside the block in sorted order; skip the block itself to get a sorted slot.
    r = torch.where(exhaustive[:, None], within[:, None], drawn)
    slot = r + (r >= per_slot(list(k_bounds[:-1]))[:, None]) * per_slot(sizes)[:, None]
    return k_perm.gather(1, slot), sample_bounds, log_weights


def _level(q_rank: Tensor, k_rank: Tensor, block_size: int, sample_size: int, generator) -> HyperLevel:
    t_q, t_k = q_rank.shape[1], k_rank.shape[1]
    num_blocks = max(1, -(-t_k // block_size))
    q_perm = torch.argsort(q_rank, dim=1, stable=True)
    k_perm = torch.argsort(k_rank, dim=1, stable=True)
    k_bounds = balanced_bounds(t_k, num_blocks)
    samples, sample_bounds, log_weights = _samples(k_perm, k_bounds, sample_size, generator)
    return HyperLevel(q_perm=q_perm, k_perm=k_perm, q_bounds=balanced_bounds(t_q, num_blocks), k_bounds=k_bounds,
                      samples=samples, sample_bounds=sample_bounds, log_weights=log_weights)


def causal_split(seq_len: int, min_seq_len: int) -> tuple:
    """(levels L, base_len) with base_len = ceil(T / 2**L) <= min_seq_len for the smallest such L."""
    levels = 0
    while -(-seq_len // (1 << levels)) > min_seq_len:
        levels += 1
    return levels, -(-seq_len // (1 << levels))


@torch.no_grad()
def make_plan(q: Tensor, k: Tensor, *, causal: bool, lsh_num_projs: int, block_size: int, sample_size: int,
              min_seq_len: int, generator: Optional[torch.Generator]) -> HyperPlan:
    """Draw a plan for ``q`` ``[B, Tq, H, D]`` and ``k`` ``[B, Tk, Hkv, D]`` (inputs already validated)."""
    b, t_q, h, d = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    common = dict(causal=causal, batch=b, seq_len_q=t_q, seq_len_k=t_k, heads=h, kv_heads=h_kv)
    length = t_q if causal else t_k
    if length <= min_seq_len:
        return HyperPlan(**common, padded_len=length if causal else 0, base_len=length if causal else 0,
                         projections=None, levels=())
    where = generator.device if generator is not None else q.device
    projections = torch.randn(d, lsh_num_projs, device=where, generator=generator).to(q.device)
    q_rank, k_rank = bucket_ranks(q, projections), bucket_ranks(k, projections)
    if not causal:
        level = _level(q_rank, k_rank, block_size, sample_size, generator)
        return HyperPlan(**common, padded_len=0, base_len=0, projections=projections, levels=(level,))
    num_levels, base_len = causal_split(t_q, min_seq_len)
    padded = base_len << num_levels
    # A zero (padding) vector hashes to code 0, whose rank is 0.
    q_rank = torch.nn.functional.pad(q_rank, (0, 0, 0, padded - t_q))
    k_rank = torch.nn.functional.pad(k_rank, (0, 0, 0, padded - t_q))
    levels = []
    for level in range(num_levels):
        pieces, half = b << level, padded >> (level + 1)
        levels.append(_level(q_rank.reshape(pieces, 2, half, h)[:, 1], k_rank.reshape(pieces, 2, half, h_kv)[:, 0],
                             block_size, sample_size, generator))
    return HyperPlan(**common, padded_len=padded, base_len=base_len, projections=projections, levels=tuple(levels))
