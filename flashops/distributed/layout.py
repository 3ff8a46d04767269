"""How a sequence is split over the ranks of a group, and the conversions between full and sharded tensors.

A layout cuts a sequence of length T into equal chunks and gives each rank some of them, in order:

- ``"zigzag"``: 2P chunks; rank r holds chunks r and 2P - 1 - r. Under a causal mask every rank then has the
  same amount of attention work (an early chunk with little to see, a late one with much).
- ``"contiguous"``: P chunks; rank r holds chunk r.

A rank's local sequence is the concatenation of its chunks ("pieces") in increasing order, so order within a
rank is preserved. Gradient convention (as DDP and every context-parallel library): the loss is the sum of
the ranks' losses; gradients of sharded tensors are exact, gradients of tensors every rank holds (an initial
state, parameters) are this rank's part, to be summed over the group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _comm

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_chunks(layout: str, world: int) -> int:
    """Chunks the full sequence is cut into."""
    return 2 * world if layout == "zigzag" else world


def chunks_of(layout: str, rank: int, world: int) -> tuple[int, ...]:
    """The global chunk indices rank ``rank`` holds, in local order."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def piece_length(name: str, local_len: int, layout: str) -> int:
    """The length of one piece of a local sequence, with a clear error when it does not split."""
    pieces = 2 if layout == "zigzag" else 1
    if local_len % pieces:
        raise ValueError(f"{name} has local sequence length {local_len}, which the zigzag layout cannot split "
                         f"into its 2 pieces (chunks r and 2P-1-r): it must be even")
    return local_len // pieces


def natural_order(layout: str, world: int, local_len: int, device=None) -> Tensor:
    """Index ``idx`` such that ``concat_over_ranks(local)[:, idx]`` is the sequence in its natural order."""
    n = num_chunks(layout, world)
    length = local_len * world // n
    slot = {}  # global chunk -> its position in the rank-major concatenation
    for rank in range(world):
        for piece, chunk in enumerate(chunks_of(layout, rank, world)):
            slot[chunk] = rank * local_len + piece * length
    starts = torch.tensor([slot[c] for c in range(n)], device=device)
    return (starts[:, None] + torch.arange(length, device=device)).reshape(-1)


def shard(x: Tensor, group=None, layout: str = "zigzag", *, dim: int = 1) -> Tensor:
    """This rank's part of a full sequence: ``x [B, T, ...]`` (sequence along ``dim``) -> ``[B, T / P, ...]``.

    Every rank passes the same full tensor (e.g. the token ids of the batch). No communication; the gradient
    of ``x`` is this rank's part (zeros outside its chunks), so that summing over the group gives the full one.

    Raises ValueError when T does not split into the layout's chunks (P for ``"contiguous"``, 2P for
    ``"zigzag"``).
    """
    check_layout(layout)
    _, rank, world = _comm.world_of(group)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = dim % x.dim()
    t, n = x.shape[dim], num_chunks(layout, world)
    if t % n:
        raise ValueError(f"shard: the sequence length {t} (dim {dim} of x) must be divisible by {n}, the number "
                         f"of {layout} chunks for a group of {world} ranks")
    length = t // n
    pieces = [x.narrow(dim, c * length, length) for c in chunks_of(layout, rank, world)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def unshard(x: Tensor, group=None, layout: str = "zigzag", *, dim: int = 1) -> Tensor:
    """The full sequence from every rank's part: ``[B, T / P, ...]`` -> ``[B, T, ...]`` (the inverse of
    :func:`shard`; one all-gather). Differentiable: the gradient of this rank's part sums what every rank's
    loss puts on it (a reduce-scatter)."""
    check_layout(layout)
    group, _, world = _comm.world_of(group)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = dim % x.dim()
    piece_length("x", x.shape[dim], layout)
    gathered = _comm.all_gather(x, group)  # [P, *x.shape]
    order = natural_order(layout, world, x.shape[dim], x.device)
    return _rank_major(gathered, dim).index_select(dim, order)


def _rank_major(gathered: Tensor, dim: int) -> Tensor:
    """``[P, ..., T_local (at dim + 1), ...]`` -> ``[..., P * T_local, ...]``, rank 0's part first."""
    return gathered.movedim(0, dim).flatten(dim, dim + 1)


def global_positions(local_len: int, group=None, layout: str = "zigzag", *, device=None) -> Tensor:
    """int64 ``[local_len]``: the position in the full sequence of each row of this rank's part (what rotary
    embeddings need under the zigzag layout, whose local rows are not consecutive)."""
    check_layout(layout)
    _, rank, world = _comm.world_of(group)
    length = piece_length("the local sequence", local_len, layout)
    starts = torch.tensor([c * length for c in chunks_of(layout, rank, world)], device=device)
    return (starts[:, None] + torch.arange(length, device=device)).reshape(-1)
