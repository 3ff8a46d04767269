"""LASP-2: linear attention with decay (Lightning, GLA) over a sequence sharded on the ranks of a group.

The recurrence ``S_t = diag(a_t) S_{t-1} + k_t^T v_t`` is linear in the state, so a chunk of the sequence
acts on the state entering it as ``S_out = Lambda S_in + M``: ``M`` is the state the chunk builds from zero
and ``Lambda`` its total decay (Lightning: ``exp(-slope * length)`` per head; GLA: the product of the chunk's
gates per key dimension). Each rank computes ``(M, Lambda)`` of its chunks from its own rows, ONE all-gather
shares them, every rank folds the prefix ``S_{c+1} = Lambda_c S_c + M_c`` from the initial state, and runs
the ordinary chunked kernel on each of its chunks from the state that enters it. The backward is autograd's
transpose of the same steps: the kernel's backward (which gives the gradient of its initial state), the
fold's, then ONE reduce-scatter of the states' gradients (the all-gather's transpose), then the state
computation's. Communication: one ``[B, H, K, V]`` state per chunk each way, independent of the sequence
length.

Why the kernel runs from the folded state rather than from zero plus an inter-chunk correction
``scale (q_t exp(G_t)) S_in``: both cost one kernel call and one extra ``O(T K V)`` pass each way (here the
state ``M``, there the correction), but running the kernel on the true initial state makes the output exactly
the single-device computation (one rounding to the input dtype, the kernel's own re-anchored gate sums)
instead of a kernel output plus an fp32 correction rounded twice.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._custom_ops import OpArgs, eager, register_autograd
from ..ops.linear import gated_linear_attention, lightning_attention
from . import _comm, _internals
from .layout import check_layout, chunks_of, num_chunks, piece_length


def _lightning_state(k: Tensor, v: Tensor, slopes: Tensor) -> tuple[Tensor, Tensor]:
    """M ``[B, S, K, V]`` (fp32; fp64 for fp64 inputs) of a chunk under a constant decay per state head (one per
    slope, S = len(slopes); state s reads kv head ``s // (S / H_kv)``), and its decay ``[S]``."""
    length, kv_heads, acc = k.shape[1], k.shape[2], _internals.compute_dtype(k.dtype)
    rate = slopes.to(acc).clamp(max=-_internals.LOG_GATE_FLOOR)  # the kernels cap the decay likewise
    steps_left = torch.arange(length - 1, -1, -1, device=k.device, dtype=acc)
    weight = torch.exp(-steps_left[:, None] * rate[None, :])  # [L, S]: decay from t to the chunk's end
    per_kv = slopes.shape[0] // kv_heads
    weighted = k.to(acc)[:, :, :, None, :] * weight.view(1, length, kv_heads, per_kv, 1)  # [B, L, H_kv, S/H_kv, K]
    state = torch.einsum("btgjk,btgv->bgjkv", weighted, v.to(acc)).flatten(1, 2)
    return state, torch.exp(-rate * length)


def _gated_state(k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """M ``[B, H, K, V]`` (fp32; fp64 for fp64 inputs) of a chunk under log-gates g ``[B, L, H, K]``, and its
    decay ``[B, H, K]``."""
    floor, acc = _internals.LOG_GATE_FLOOR, _internals.compute_dtype(k.dtype)
    g = torch.where(g < floor, torch.full_like(g, floor, dtype=acc), g.to(acc))
    suffix = g.flip(1).cumsum(1).flip(1)  # sum over s >= t
    after = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)  # sum over s > t (<= 0)
    state = torch.einsum("bthk,bthv->bhkv", k.to(acc) * after.exp(), v.to(acc))
    return state, g.sum(1).exp()


# ------------------------------------------------------------------------------ the fold (custom ops)
def _chunk(entry: Tensor, decay: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(decay, state) of one gathered chunk: Lightning's decay ``[H]`` is known on every rank; GLA's
    ``[B, H, K]`` travels as the last column of the state."""
    if decay is not None:
        return decay[None, :, None, None], entry
    return entry[..., -1:], entry[..., :-1]


def _chunks(layout: str, rank: int, world: int, reverse: bool) -> tuple[int, ...]:
    """The chunks of ``rank``'s pieces in processing order. With reverse, the shard is flipped in time: its
    pieces come in the other order, and chunk c of the sequence is chunk N - 1 - c of the flipped one."""
    chunks = chunks_of(layout, rank, world)
    if not reverse:
        return chunks
    last = num_chunks(layout, world) - 1
    return tuple(last - c for c in reversed(chunks))


def _plan(layout: str, rank: int, world: int, output_final_state: bool, reverse: bool):
    """(owner of every chunk in processing order as (rank, piece), this rank's chunks, the last chunk the fold
    crosses)."""
    owner = [None] * num_chunks(layout, world)
    for r in range(world):
        for a, c in enumerate(_chunks(layout, r, world, reverse)):
            owner[c] = (r, a)
    mine = _chunks(layout, rank, world, reverse)
    return owner, mine, (len(owner) if output_final_state else max(mine)) - 1


def _prefix_states(gathered, initial_state, decay, owner, last):
    """``S[c]`` entering chunk c for c = 0 .. last + 1 (``S[0]`` the initial state)."""
    entry = _chunk(gathered[owner[0]], decay)[1]
    states = [initial_state if initial_state is not None else entry.new_zeros(entry.shape)]
    for c in range(last + 1):
        chunk_decay, chunk_state = _chunk(gathered[owner[c]], decay)
        states.append(chunk_decay * states[-1] + chunk_state)
    return states


# The fold's custom ops: their argument lists, written once.
_SETTINGS = OpArgs(("group", str), ("layout", str), ("output_final_state", bool), ("reverse", bool))
_STATE_DECAY = OpArgs(("initial_state", Optional[Tensor]), ("decay", Optional[Tensor]))
FOLD_ARGS = OpArgs(("local", Tensor)) + _STATE_DECAY + _SETTINGS
FOLD_BWD_ARGS = (OpArgs(("d_entering", Tensor), ("d_final", Optional[Tensor]), ("gathered", Tensor)) + _STATE_DECAY
                 + _SETTINGS)


def _fold_forward(a) -> tuple[Tensor, Tensor, Tensor]:
    pg = _comm.group_by_name(a.group)
    gathered = _comm.all_gather_impl(a.local, a.group)  # [P, pieces, B, H, K, V (+1)]
    owner, mine, last = _plan(a.layout, pg.rank(), pg.size(), a.output_final_state, a.reverse)
    states = _prefix_states(gathered, a.initial_state, a.decay, owner, last)
    entering = torch.stack([states[c] for c in mine])
    final = states[-1] if a.output_final_state else entering.new_empty(0)
    return entering, final, gathered


def _fold_backward_impl(a) -> tuple[Tensor, Tensor]:
    d_entering, d_final, gathered, initial_state, decay = a.d_entering, a.d_final, a.gathered, a.initial_state, a.decay
    output_final_state = a.output_final_state
    pg = _comm.group_by_name(a.group)
    owner, mine, last = _plan(a.layout, pg.rank(), pg.size(), output_final_state, a.reverse)
    states = _prefix_states(gathered, initial_state, decay, owner, last)
    uses = {c: piece for piece, c in enumerate(mine)}  # chunk -> the piece whose kernel starts from its state
    grad = d_final.clone() if output_final_state and d_final is not None else torch.zeros_like(states[-1])
    if last + 1 in uses:
        grad += d_entering[uses[last + 1]]
    d_gathered = torch.zeros_like(gathered)
    for c in range(last, -1, -1):  # S[c+1] = decay_c S[c] + M_c, backwards
        chunk_decay, _ = _chunk(gathered[owner[c]], decay)
        slot = d_gathered[owner[c]]
        if decay is None:
            slot[..., :-1] = grad
            slot[..., -1:] = (grad * states[c]).sum(-1, keepdim=True)
        else:
            slot.copy_(grad)
        grad = chunk_decay * grad
        if c in uses:
            grad += d_entering[uses[c]]
    # Every rank's fold used every rank's chunks: this rank's chunks get the sum of all ranks' gradients.
    d_local = _comm.reduce_scatter_impl(d_gathered, a.group)
    return d_local, grad if initial_state is not None else d_local.new_empty(0)


def _fold_fwd_fake(a) -> tuple[Tensor, Tensor, Tensor]:
    local = a.local
    state_shape = (*local.shape[1:-1], local.shape[-1] - (0 if a.decay is not None else 1))
    entering = local.new_empty((local.shape[0], *state_shape))
    final = local.new_empty(state_shape if a.output_final_state else (0,))
    return entering, final, local.new_empty((_comm.group_by_name(a.group).size(), *local.shape))


def _fold_bwd_fake(a) -> tuple[Tensor, Tensor]:
    return (a.gathered.new_empty(a.gathered.shape[1:]),
            torch.empty_like(a.initial_state) if a.initial_state is not None else a.gathered.new_empty(0))


_fold_fwd, _fold_fwd_impl = FOLD_ARGS.custom_op("flashops::lasp2_fold_fwd", _fold_forward, fake=_fold_fwd_fake,
                                                returns=tuple[Tensor, Tensor, Tensor])
_fold_bwd, _fold_bwd_impl = FOLD_BWD_ARGS.custom_op("flashops::lasp2_fold_bwd", _fold_backward_impl,
                                                    fake=_fold_bwd_fake, returns=tuple[Tensor, Tensor])
_fold_bwd_call = eager(_fold_bwd, _fold_bwd_impl)


def _fold_setup(ctx, inputs, output):
    FOLD_ARGS.save(ctx, inputs, output[2:], skip=("local",))  # the backward needs the gathered pieces


def _fold_backward(ctx, d_entering, d_final, d_gathered):
    a, (gathered,) = FOLD_ARGS.saved(ctx)
    d_local, d_initial = _fold_bwd_call(*FOLD_BWD_ARGS.values(
        d_entering=d_entering, d_final=d_final, gathered=gathered, **_STATE_DECAY.pick(a), **_SETTINGS.pick(a)))
    return FOLD_ARGS.grads(local=d_local, initial_state=d_initial if a.initial_state is not None else None)


# The states entering this rank's chunks (and the final one) from the local (M, decay) of every rank: one
# all-gather forward, one reduce-scatter backward, on every rank whichever chunks its own outputs depend on.
_fold = register_autograd(_fold_fwd, _fold_fwd_impl, _fold_backward, _fold_setup)


def _check(q, k, v, g, slopes, initial_state, layout) -> tuple[Optional[Tensor], int]:
    """(Lightning's slopes or None with g, the piece length): the single-device ops' checks, run before any
    communication so that a bad input fails on its rank without leaving the peers waiting."""
    if g is not None and slopes is not None:
        raise ValueError("pass slopes (Lightning: a constant decay per head) or g (GLA: log-gates), not both")
    slopes = _internals.check_linear_inputs(q, k, v, g, slopes, initial_state, "[B, T/P, H, D] (this rank's shard)")
    check_layout(layout)
    return slopes, piece_length("q", q.shape[1], layout)


def lasp2_attention(q: Tensor, k: Tensor, v: Tensor, *, slopes: Optional[Tensor] = None, g: Optional[Tensor] = None,
                    group=None, scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                    output_final_state: bool = False, layout: str = "zigzag", reverse: bool = False,
                    backend: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Causal linear attention with decay over a sequence sharded on the ranks of ``group`` (LASP-2).

    Lightning (``S_t = exp(-slopes[h]) S_{t-1} + k_t^T v_t``) unless ``g`` is given, then GLA
    (``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``); ``o_t = scale * q_t S_t``. The same results as
    :func:`flashops.lightning_attention` / :func:`flashops.gated_linear_attention` on the full sequence.

    Args:
        q: ``[B, T/P, H, K]``; k: ``[B, T/P, H_kv, K]``; v: ``[B, T/P, H_kv, V]``: this rank's part of the
            sequence in ``layout`` (see :func:`shard`); every rank passes the same shapes. H_kv divides H (GQA/MQA
            as in the single-device ops: query head h reads kv head ``h // (H / H_kv)``).
        slopes: Lightning's decay rates ``[H]`` (one per query head) or ``[H_kv]`` (default
            :func:`flashops.lightning_slopes` ``(H)``; zeros give plain causal linear attention). g: GLA log-gates
            ``[B, T/P, H_kv, K]`` (this rank's part).
        group: the process group (default: the default group). scale: default ``1/sqrt(K)``.
        initial_state: fp32 ``[B, H_state, K, V]`` (fp64 with fp64 inputs; H_state = len(slopes), or H_kv with
            g), the same on every rank (its gradient is this rank's part).
        output_final_state: also return the state after the last position of the whole sequence (fp32
            ``[B, H_state, K, V]``, fp64 with fp64 inputs; the same on every rank).
        layout: ``"zigzag"`` (default, as :func:`ring_attention`, so a hybrid model shards once) or
            ``"contiguous"``.
        reverse: run the recurrence from the sequence's last position to its first, as the single-device ops'
            ``reverse`` (the initial state enters after the last position, the final state is the one at the
            first). The shard is flipped in time (one copy of q, k, v, g and o each way) and the chunks are
            folded from the last.
        backend: the linear-attention backend (``"triton"``, ``"torch"``).

    Returns:
        ``(o [B, T/P, H, V], final_state or None)``.
    """
    slopes, length = _check(q, k, v, g, slopes, initial_state, layout)
    pg, rank, world = _comm.world_of(group)
    if reverse:  # the flipped sequence's shard (see _chunks)
        q, k, v, g = (None if t is None else t.flip(1) for t in (q, k, v, g))
    pieces = [slice(a * length, (a + 1) * length) for a in range(len(chunks_of(layout, rank, world)))]

    if g is None:
        states, decays = zip(*(_lightning_state(k[:, rows], v[:, rows], slopes) for rows in pieces))
        local, decay = torch.stack(states), decays[0]  # every chunk has the same length, so the same decay
    else:
        packed = []
        for rows in pieces:
            state, chunk_decay = _gated_state(k[:, rows], v[:, rows], g[:, rows])
            packed.append(torch.cat([state, chunk_decay[..., None]], dim=-1))
        local, decay = torch.stack(packed), None
    acc = _internals.compute_dtype(q.dtype)
    entering, final, _ = _fold(*FOLD_ARGS.values(
        local=local, initial_state=None if initial_state is None else initial_state.to(acc), decay=decay,
        group=_comm.group_name(pg), layout=layout, output_final_state=bool(output_final_state),
        reverse=bool(reverse)))

    outs = []
    for a, rows in enumerate(pieces):
        if g is None:
            o, _ = lightning_attention(q[:, rows], k[:, rows], v[:, rows], slopes, scale=scale,
                                       initial_state=entering[a], backend=backend)
        else:
            o, _ = gated_linear_attention(q[:, rows], k[:, rows], v[:, rows], g[:, rows], scale=scale,
                                          initial_state=entering[a], backend=backend)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o.flip(1) if reverse else o, (final if output_final_state else None)
