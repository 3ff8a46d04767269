"""Ring attention: exact softmax attention over a sequence sharded on the ranks of a group.

Each rank keeps its queries; the key/value blocks travel around the ring (``batch_isend_irecv`` to the next
rank, the next block in flight while the current one is computed). Every step attends the local queries to
the visiting block with the ordinary kernel, which returns a partial output and its log-sum-exp; partials
merge in fp32 (fp64 for fp64 inputs, as every accumulator here) by their log-sum-exp. The backward makes the
same tour: with the merged (global) output and log-sum-exp, the FlashAttention backward of one block gives
exactly that block's share of dq, dk and dv; dq stays, and fp32 dk/dv accumulators travel with the blocks and
make one more step home at the end.

Which local query rows see which rows of a visiting block follows from the global positions of the pieces
(see ``layout.py``): :func:`step_plan` turns that into a few kernel calls per step, each with a window in
the kernel's local coordinates. With the zigzag layout and a causal mask every step is one call of half a
block's work on every rank.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._custom_ops import BACKEND, OpArgs, eager, register_autograd
from . import _comm, _internals
from .layout import check_layout, chunks_of, piece_length


# --------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``q_rows`` against rows ``kv_rows`` of the visiting block, with the
    kernel's window (query i sees key j when ``i + off - window_left <= j <= i + off + window_right``,
    ``off = len(kv_rows) - len(q_rows)``; None = unbounded)."""

    q_rows: tuple[int, int]
    kv_rows: tuple[int, int]
    window_left: Optional[int]
    window_right: Optional[int]


def _pair_window(q_start: int, k_start: int, length: int, left: Optional[int], right: Optional[int]):
    """The kernel window of a query piece against a key piece, both ``length`` long and starting at these
    global positions, for the global rule ``q - left <= k <= q + right``; None when no pair is visible."""
    shift = q_start - k_start  # key offset j - i of the global diagonal
    high = None if right is None else shift + right
    low = None if left is None else shift - left
    if (high is not None and high < -(length - 1)) or (low is not None and low > length - 1):
        return None
    return (None if low is None or low <= -(length - 1) else -low,
            None if high is None or high >= length - 1 else high)


@functools.cache
def step_plan(layout: str, world: int, rank: int, source: int, local_len: int, left: Optional[int],
              right: Optional[int]) -> tuple[BlockCall, ...]:
    """The kernel calls of rank ``rank`` attending to the block of rank ``source``, for the global window
    ``(left, right)`` (causal: right = 0)."""
    length = piece_length("q", local_len, layout)
    mine, theirs = chunks_of(layout, rank, world), chunks_of(layout, source, world)
    if source == rank and left is None and right == 0:
        # Causal over the concatenated pieces: they are in increasing order, so the plain mask is right.
        return (BlockCall((0, local_len), (0, local_len), None, 0),)
    pairs = {}
    for a, qc in enumerate(mine):
        for b, kc in enumerate(theirs):
            window = _pair_window(qc * length, kc * length, length, left, right)
            if window is not None:
                pairs[a, b] = window
    rows = sorted({a for a, _ in pairs})
    cols = sorted({b for _, b in pairs})
    if (pairs and all(w == (None, None) for w in pairs.values()) and len(pairs) == len(rows) * len(cols)
            and rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1))):
        # One unmasked rectangle of consecutive pieces: one call.
        return (BlockCall((rows[0] * length, (rows[-1] + 1) * length), (cols[0] * length, (cols[-1] + 1) * length),
                          None, None),)
    return tuple(BlockCall((a * length, (a + 1) * length), (b * length, (b + 1) * length), *w)
                 for (a, b), w in sorted(pairs.items()))


# ---------------------------------------------------------------------------------------------- merging
def merge_partial(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """Fold a partial result (out ``[B, T, H, D]``, lse fp32 ``[B, H, T]``) into the accumulators in place:
    ``out_acc - sigmoid(lse - lse_acc) * (out_acc - out)``, which never takes exp of a large number. Rows the
    partial does not reach (lse = -inf) keep their accumulator, also when that is still empty."""
    diff = torch.where(torch.isneginf(lse), lse, lse - lse_acc)
    weight = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
    out_acc.sub_(weight * (out_acc - out.to(out_acc.dtype)))
    lse_acc.copy_(torch.logaddexp(lse_acc, lse))


def _rows(x: Tensor, rows: tuple[int, int]) -> Tensor:
    return x[:, rows[0]:rows[1]]


# ------------------------------------------------------------------------------------ forward, backward
# The custom ops' argument lists, written once.
_QKV = OpArgs(("q", Tensor), ("k", Tensor), ("v", Tensor))
_SETTINGS = OpArgs(("group", str), ("scale", float), ("softcap", float), ("window_left", Optional[int]),
                   ("window_right", Optional[int]), ("layout", str)) + BACKEND
FWD_ARGS = _QKV + _SETTINGS
BWD_ARGS = (OpArgs(("dout", Tensor), ("dlse", Optional[Tensor])) + _QKV + OpArgs(("out", Tensor), ("lse", Tensor))
            + _SETTINGS)


def _ring_forward(a) -> tuple[Tensor, Tensor]:
    q, k, v, scale, layout, backend = a.q, a.k, a.v, a.scale, a.layout, a.backend
    pg = _comm.group_by_name(a.group)
    rank, world = pg.rank(), pg.size()
    b, t, h, _ = q.shape
    acc = _internals.compute_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
    if q.numel() == 0:  # every rank has the same shapes: all of them skip the ring
        return out.to(q.dtype), lse
    block = (k.contiguous(), v.contiguous())
    for step in range(world):
        source = (rank - step) % world
        incoming = _comm.RingShift(block, pg) if step + 1 < world else None
        for call in step_plan(layout, world, rank, source, t, a.window_left, a.window_right):
            part, part_lse = _internals.block_forward(
                _rows(q, call.q_rows), _rows(block[0], call.kv_rows), _rows(block[1], call.kv_rows), scale=scale,
                softcap=a.softcap, window_left=call.window_left, window_right=call.window_right, backend=backend)
            merge_partial(_rows(out, call.q_rows), lse[..., call.q_rows[0]:call.q_rows[1]], part, part_lse)
        if incoming is not None:
            block = tuple(incoming.wait())
    return out.to(q.dtype), lse


def _ring_backward(a) -> tuple[Tensor, Tensor, Tensor]:
    dout, dlse, q, k, v, out, lse = a.dout, a.dlse, a.q, a.k, a.v, a.out, a.lse
    pg = _comm.group_by_name(a.group)
    rank, world = pg.rank(), pg.size()
    t = q.shape[1]
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    acc = _internals.compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    block = (k.contiguous(), v.contiguous())
    travelling = None  # fp32 (dk, dv) of the block held, summed over the ranks it has visited
    for step in range(world):
        source = (rank - step) % world
        # One batch per step: the next block, and the accumulators of this block from the previous rank.
        outgoing = (list(block) if step + 1 < world else []) + (list(travelling) if step > 0 else [])
        exchange = _comm.RingShift(outgoing, pg) if outgoing else None
        dk = torch.zeros(block[0].shape, dtype=acc, device=q.device)
        dv = torch.zeros_like(dk)
        for call in step_plan(a.layout, world, rank, source, t, a.window_left, a.window_right):
            rows = slice(*call.q_rows)
            dq_c, dk_c, dv_c = _internals.block_backward(
                dout[:, rows], None if dlse is None else dlse[..., rows], q[:, rows],
                _rows(block[0], call.kv_rows), _rows(block[1], call.kv_rows), out[:, rows], lse[..., rows],
                scale=a.scale, softcap=a.softcap, window_left=call.window_left, window_right=call.window_right,
                backend=a.backend)
            dq[:, rows] += dq_c
            _rows(dk, call.kv_rows).add_(dk_c)
            _rows(dv, call.kv_rows).add_(dv_c)
        received = exchange.wait() if exchange is not None else []
        if step > 0:
            dk, dv = dk.add_(received[-2]), dv.add_(received[-1])
        travelling = (dk, dv)
        if step + 1 < world:
            block = tuple(received[:2])
    if world > 1:  # the accumulators of rank r's block are one step short of home
        travelling = _comm.RingShift(travelling, pg).wait()
    return dq.to(q.dtype), travelling[0].to(k.dtype), travelling[1].to(v.dtype)


# ------------------------------------------------------------------------------------------ custom ops
def _ring_fwd_fake(a) -> tuple[Tensor, Tensor]:
    return torch.empty_like(a.q), a.q.new_empty((a.q.shape[0], a.q.shape[2], a.q.shape[1]),
                                                dtype=_internals.compute_dtype(a.q.dtype))


def _ring_bwd_fake(a) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(a.q), torch.empty_like(a.k), torch.empty_like(a.v)


_ring_fwd, _ring_fwd_impl = FWD_ARGS.custom_op("flashops::ring_attention_fwd", _ring_forward, fake=_ring_fwd_fake,
                                               returns=tuple[Tensor, Tensor])
_ring_bwd, _ring_bwd_impl = BWD_ARGS.custom_op("flashops::ring_attention_bwd", _ring_backward, fake=_ring_bwd_fake,
                                               returns=tuple[Tensor, Tensor, Tensor])
_ring_bwd_call = eager(_ring_bwd, _ring_bwd_impl)


def _setup_context(ctx, inputs, output):
    FWD_ARGS.save(ctx, inputs, output)


def _backward(ctx, dout, dlse):
    a, (out, lse) = FWD_ARGS.saved(ctx)
    dq, dk, dv = _ring_bwd_call(*BWD_ARGS.values(dout=dout.contiguous(), dlse=dlse, out=out, lse=lse,
                                                 **FWD_ARGS.pick(a)))
    return FWD_ARGS.grads(q=dq, k=dk, v=dv)


_ring = register_autograd(_ring_fwd, _ring_fwd_impl, _backward, _setup_context)


# ------------------------------------------------------------------------------------------ public API
def check_self_attention(q: Tensor, k: Tensor, v: Tensor, layout: str) -> None:
    """q, k, v are this rank's shards of one sequence: ``[B, T/P, H|Hkv, D]`` with the same local length."""
    _internals.check_attention_inputs(q, k, v, layout="[B, T/P, H, D] (this rank's shard)")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q and k must hold the same shard of the sequence, got local lengths {q.shape[1]} "
                         f"and {k.shape[1]}")
    check_layout(layout)
    piece_length("q", q.shape[1], layout)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False,
                   softmax_scale: Optional[float] = None, window_size: Sequence[int] = (-1, -1),
                   softcap: float = 0.0, return_lse: bool = False, layout: str = "zigzag",
                   backend: Optional[str] = None):
    """Exact attention over a sequence sharded on the ranks of ``group`` (ring attention).

    Args:
        q: ``[B, T/P, H, D]``; k, v: ``[B, T/P, Hkv, D]`` (``H % Hkv == 0``): this rank's part of the sequence in
            ``layout`` (see :func:`shard`). Every rank passes the same shapes. dtypes and head dims as in
            :func:`flashops.flash_attention`.
        group: the process group (default: the default group); NCCL on GPUs, gloo on CPUs.
        causal: causal mask over global positions. softmax_scale: default ``1/sqrt(D)``.
        window_size: ``(left, right)`` sliding window over global positions (-1: unlimited); with ``causal``
            the right side is at most 0.
        softcap: if > 0, logits become ``softcap * tanh(logits / softcap)`` (as :func:`flashops.flash_attention`;
            elementwise, so every block applies it and the partials merge as usual).
        return_lse: also return the log-sum-exp of this rank's rows, ``[B, H, T/P]`` (fp32, fp64 for fp64
            inputs; natural log; -inf for a row that sees no key), as :func:`flashops.flash_attention`'s; it is
            differentiable (a loss on it reaches q, k and v).
        layout: ``"zigzag"`` (default; equal causal work on every rank) or ``"contiguous"``.
        backend: the attention backend that runs each block (``"triton"``, ``"torch"``); default: automatic.

    Returns:
        ``out [B, T/P, H, D]``, this rank's rows of the output, or ``(out, lse)`` with ``return_lse``.
        Differentiable in q, k, v.

    Each rank sends its K/V block around the ring: P - 1 steps forward, each overlapped with one block of
    compute; the backward sends the blocks P - 1 steps and fp32 dK/dV accumulators P steps.

    Example (under ``torchrun --nproc-per-node 4``)::

        q, k, v = (flashops.distributed.shard(x) for x in (q_full, k_full, v_full))
        out = flashops.distributed.ring_attention(q, k, v, causal=True)
    """
    check_self_attention(q, k, v, layout)
    pg = _comm.resolve_group(group)
    left, right = _internals.parse_window(causal, window_size)
    scale, softcap = _internals.softmax_scale(softmax_scale, q.shape[-1], softcap)
    name = _internals.attention_backend(q, backend)
    out, lse = _ring(*FWD_ARGS.values(q=q, k=k, v=v, group=_comm.group_name(pg), scale=scale, softcap=softcap,
                                      window_left=left, window_right=right, layout=layout, backend=name))
    return (out, lse) if return_lse else out
