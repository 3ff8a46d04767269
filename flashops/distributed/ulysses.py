"""Ulysses (DeepSpeed-Ulysses) attention: trade the sequence split for a head split with all-to-all.

One all-to-all turns every rank's ``[B, T/P, H, D]`` into ``[B, T, H/P, D]`` (all positions, a group of
heads), the ordinary kernel attends over the whole sequence, and one all-to-all turns the output back.
q, k and v travel in one all-to-all. Each rank sends 3 (or fewer with GQA) of its P pieces of size
``B T/P H/P D`` away and the output back: a volume that does not grow with P, against the ring's P - 1 whole
K/V blocks, but the head count must divide by P.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..ops.attention import flash_attention
from . import _comm, _internals
from .layout import natural_order
from .ring import check_self_attention


def _kv_repeats(heads: int, kv_heads: int, world: int) -> int:
    """The smallest factor by which the K/V heads are repeated so that P divides them (GQA)."""
    if heads % world:
        raise ValueError(f"ulysses_attention splits the heads over the ranks: the number of query heads ({heads}) "
                         f"must be divisible by the group size ({world}); use ring_attention otherwise")
    group = heads // kv_heads
    repeats = world // math.gcd(kv_heads, world)
    if group % repeats:
        raise ValueError(f"ulysses_attention cannot split {kv_heads} key/value heads over {world} ranks while "
                         f"keeping each query head with its key/value head (query heads {heads})")
    return repeats


def _heads_to_sequence(x: Tensor, world: int) -> Tensor:
    """``[B, T/P, H, D]`` -> ``[P, B, T/P, H/P, D]``: piece p holds head group p (to be sent to rank p)."""
    b, t, h, d = x.shape
    return x.reshape(b, t, world, h // world, d).permute(2, 0, 1, 3, 4)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False,
                      softmax_scale: Optional[float] = None, window_size: Sequence[int] = (-1, -1),
                      softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
                      layout: str = "zigzag", backend: Optional[str] = None):
    """Exact attention over a sharded sequence by all-to-all over heads (Ulysses); same arguments, shapes and
    results as :func:`ring_attention`, plus ``alibi_slopes``.

    Needs ``H`` divisible by the group size P; K/V heads are repeated as needed so that P divides them
    (``H/Hkv`` must allow it). Communication: two all-to-alls forward (q/k/v in, output back), two backward.
    ``alibi_slopes`` (fp32 ``[H]`` or ``[B, H]``, the same on every rank, as :func:`flashops.flash_attention`'s)
    bias by global positions: each rank attends over the whole sequence for its group of heads, so it takes
    that group's slopes.
    """
    check_self_attention(q, k, v, layout)
    pg, rank, world = _comm.world_of(group)
    b, t_local, h, d = q.shape
    repeats = _kv_repeats(h, k.shape[2], world)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    h_kv = k.shape[2]
    scale, softcap = _internals.softmax_scale(softmax_scale, d, softcap)
    # Checked whole: a slice of slopes for more heads than q's would pass flash_attention's own check.
    alibi_slopes = _internals.check_alibi_slopes(alibi_slopes, b, h, q.device)
    if alibi_slopes is not None:
        heads_per_rank = h // world
        alibi_slopes = alibi_slopes[..., rank * heads_per_rank:(rank + 1) * heads_per_rank]
    sent = [_heads_to_sequence(x, world) for x in (q, k, v)]
    received = _comm.all_to_all(torch.cat(sent, dim=3), pg)  # [P (source rank), B, T/P, (H + 2 Hkv)/P, D]
    heads_here = (h + 2 * h_kv) // world
    sequence = received.permute(1, 0, 2, 3, 4).reshape(b, world * t_local, heads_here, d)  # rank-major rows
    needs_order = causal or tuple(window_size) != (-1, -1) or alibi_slopes is not None
    if needs_order:
        order = natural_order(layout, world, t_local, q.device)
        sequence = sequence.index_select(1, order)
    q_all, k_all, v_all = sequence.split([h // world, h_kv // world, h_kv // world], dim=2)
    out, lse = flash_attention(q_all, k_all, v_all, causal=causal, softmax_scale=scale, window_size=window_size,
                               softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True, backend=backend)
    if needs_order:
        rank_major = order.argsort()
        out = out.index_select(1, rank_major)
        lse = lse.index_select(2, rank_major) if return_lse else lse
    back = _comm.all_to_all(out.reshape(b, world, t_local, h // world, d).permute(1, 0, 2, 3, 4), pg)
    out = back.permute(1, 2, 0, 3, 4).reshape(b, t_local, h, d)
    if not return_lse:
        return out
    # [B, H/P, T] (rank-major rows) -> piece p: rows of rank p -> [P (head group), B, H/P, T/P] -> [B, H, T/P]
    lse_back = _comm.all_to_all(lse.reshape(b, h // world, world, t_local).permute(2, 0, 1, 3).contiguous(), pg)
    return out, lse_back.permute(1, 0, 2, 3).reshape(b, h, t_local)
