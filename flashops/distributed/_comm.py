"""Everything ``flashops.distributed`` sends goes through this file, on torch.distributed only.

- process groups: resolved from ``group=`` arguments and passed to custom ops by name (a custom op's
  schema takes strings, not ProcessGroup objects), so that torch.compile traces the ops as opaque calls;
- the ring exchange (``batch_isend_irecv``: send to the next rank, receive from the previous one, without
  waiting, so that the caller computes while the block travels);
- differentiable collectives as custom ops: all-gather (its gradient is a reduce-scatter) and all-to-all (its
  own transpose);
- the traffic log: the bytes every call hands to other ranks and receives from them, which the benchmark
  reports next to the formulas (logical volumes, independent of how the backend routes them).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .._custom_ops import eager, register_autograd

# torch 2.13 renamed the flat collectives (the old names still work but warn).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ------------------------------------------------------------------------------------------- groups
def resolve_group(group) -> dist.ProcessGroup:
    """``group`` or the default group, with a clear error when torch.distributed is not set up."""
    if not dist.is_available():
        raise RuntimeError("flashops.distributed needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError("flashops.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (e.g. under torchrun)")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


def world_of(group) -> tuple[dist.ProcessGroup, int, int]:
    """(the resolved group, this rank in it, its size)."""
    group = resolve_group(group)
    return group, group.rank(), group.size()


def group_name(group: dist.ProcessGroup) -> str:
    return group.group_name


def group_by_name(name: str) -> dist.ProcessGroup:
    # Private in torch, but it is how torch's own functional collectives find a group from their schema.
    return dist.distributed_c10d._resolve_process_group(name)


# ------------------------------------------------------------------------------------------- traffic
@dataclass
class Traffic:
    """Bytes this rank handed to other ranks (``sent``) and got from them (``received``) inside a
    :func:`traffic` block, and the number of calls per kind (``"p2p"``, ``"all_gather"``, ...)."""

    sent: int = 0
    received: int = 0
    calls: Counter = field(default_factory=Counter)


_LOGS: list = []


@contextlib.contextmanager
def traffic():
    """Count what ``flashops.distributed`` communicates in this block, on this rank::

        with flashops.distributed.traffic() as t:
            out = ring_attention(q, k, v)
        print(t.sent, t.received, t.calls)

    Volumes are logical (an all-gather of P pieces of n bytes: (P - 1) n each way, whatever algorithm the
    backend uses). Only eager calls are counted."""
    log = Traffic()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(kind: str, sent: int, received: int) -> None:
    for log in _LOGS:
        log.sent += sent
        log.received += received
        log.calls[kind] += 1


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------- ring
class RingShift:
    """Sends ``tensors`` to the next rank of ``group`` and receives same-shaped ones from the previous rank.
    Started on construction; :meth:`wait` returns the received tensors."""

    def __init__(self, tensors, group: dist.ProcessGroup):
        rank, world = group.rank(), group.size()
        to_next = dist.get_global_rank(group, (rank + 1) % world)
        from_prev = dist.get_global_rank(group, (rank - 1) % world)
        tensors = [t.contiguous() for t in tensors]
        self.received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, to_next, group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, from_prev, group) for t in self.received]
        self._works = dist.batch_isend_irecv(ops)
        _record("p2p", _nbytes(tensors), _nbytes(self.received))

    def wait(self) -> list:
        for work in self._works:
            work.wait()
        return self.received


# --------------------------------------------------------------------------------- all-gather op
def all_gather_impl(x: Tensor, group: str) -> Tensor:
    """``[P, *x.shape]`` (no autograd: the plain implementation, also for use inside other custom ops)."""
    pg = group_by_name(group)
    world = pg.size()
    flat = x.contiguous().view(-1)
    out = flat.new_empty(world * flat.numel())
    _all_gather_flat(out, flat, group=pg)
    _record("all_gather", (world - 1) * _nbytes([flat]), (world - 1) * _nbytes([flat]))
    return out.view(world, *x.shape)


_all_gather_op = torch.library.custom_op("flashops::cp_all_gather", all_gather_impl, mutates_args=())


@_all_gather_op.register_fake
def _all_gather_fake(x, group):
    return x.new_empty((group_by_name(group).size(), *x.shape))


def reduce_scatter_impl(x: Tensor, group: str) -> Tensor:
    """``x [P, ...]`` -> ``[...]``: the sum over ranks of their piece for this rank (no autograd)."""
    pg = group_by_name(group)
    world = pg.size()
    flat = x.contiguous().view(-1)
    out = flat.new_empty(flat.numel() // world)
    _reduce_scatter_flat(out, flat, group=pg)
    _record("reduce_scatter", (world - 1) * _nbytes([out]), (world - 1) * _nbytes([out]))
    return out.view(x.shape[1:])


_reduce_scatter_op = torch.library.custom_op("flashops::cp_reduce_scatter", reduce_scatter_impl, mutates_args=())


@_reduce_scatter_op.register_fake
def _reduce_scatter_fake(x, group):
    return x.new_empty(x.shape[1:])


_reduce_scatter = eager(_reduce_scatter_op, reduce_scatter_impl)


def _save_group(ctx, inputs, output):
    ctx.group = inputs[1]


def _all_gather_backward(ctx, grad):
    # Every rank used every gathered piece: piece r's gradient is the sum of all ranks' gradients for it.
    return _reduce_scatter(grad, ctx.group), None


_all_gather = register_autograd(_all_gather_op, all_gather_impl, _all_gather_backward, _save_group)


def all_gather(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``[P, *x.shape]``: every rank's ``x`` (rank order of ``group``); differentiable."""
    return _all_gather(x, group_name(group))


# ------------------------------------------------------------------------------------- all-to-all op
def _all_to_all_impl(x: Tensor, group: str) -> Tensor:
    pg = group_by_name(group)
    world = pg.size()
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=pg)
    moved = _nbytes([x]) * (world - 1) // world
    _record("all_to_all", moved, moved)
    return out


_all_to_all_op = torch.library.custom_op("flashops::cp_all_to_all", _all_to_all_impl, mutates_args=())


@_all_to_all_op.register_fake
def _all_to_all_fake(x, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _all_to_all_backward(ctx, grad):
    # Piece i went to rank i as its piece r: the transpose sends each gradient piece back the same way.
    return _all_to_all(grad, ctx.group), None


_all_to_all = register_autograd(_all_to_all_op, _all_to_all_impl, _all_to_all_backward, _save_group)


def all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``x [P, ...]``: piece i goes to rank i; returns ``[P, ...]`` with piece j from rank j; differentiable."""
    return _all_to_all(x, group_name(group))

