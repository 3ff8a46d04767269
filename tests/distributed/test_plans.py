"""Ring attention's per-step kernel calls (no process group needed): together they cover exactly the global
mask, each visible (query, key) pair once, and with the zigzag layout every rank does the same causal work."""

import itertools

import pytest
import torch

from flashops.distributed.layout import chunks_of, natural_order, num_chunks
from flashops.distributed.ring import step_plan

LENGTH = 3  # rows per piece


def _global_rows(layout, rank, world):
    return [c * LENGTH + i for c in chunks_of(layout, rank, world) for i in range(LENGTH)]


def _call_mask(call):
    """The (query, key) pairs one kernel call computes, in its rows' local coordinates."""
    (q0, q1), (k0, k1) = call.q_rows, call.kv_rows
    i = torch.arange(q1 - q0)[:, None]
    j = torch.arange(k1 - k0)[None, :]
    diagonal = i + (k1 - k0) - (q1 - q0)
    visible = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
    if call.window_left is not None:
        visible &= j >= diagonal - call.window_left
    if call.window_right is not None:
        visible &= j <= diagonal + call.window_right
    return visible


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("window", [(None, None), (None, 0), (4, 0), (2, 3), (0, 0), (7, None), (None, 5)])
def test_step_plans_cover_the_global_mask_once(layout, world, window):
    left, right = window
    t = LENGTH * num_chunks(layout, world)
    position = torch.arange(t)
    expected = torch.ones(t, t, dtype=torch.bool)
    if left is not None:
        expected &= position[None, :] >= position[:, None] - left
    if right is not None:
        expected &= position[None, :] <= position[:, None] + right
    covered = torch.zeros(t, t, dtype=torch.int64)
    local_len = t // world
    for rank, source in itertools.product(range(world), repeat=2):
        rows, cols = _global_rows(layout, rank, world), _global_rows(layout, source, world)
        for call in step_plan(layout, world, rank, source, local_len, left, right):
            q_global = torch.tensor(rows[call.q_rows[0]:call.q_rows[1]])
            k_global = torch.tensor(cols[call.kv_rows[0]:call.kv_rows[1]])
            covered[q_global[:, None], k_global[None, :]] += _call_mask(call).long()
    assert torch.equal(covered, expected.long())


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_causal_steps_do_equal_work(world):
    """Every step of every rank computes half of a (2L x 2L) block (plus the diagonal on its own block):
    causal attention is balanced. The contiguous layout is not (rank r does r + 1/2 blocks)."""
    piece = LENGTH
    for rank, step in itertools.product(range(world), range(world)):
        calls = step_plan("zigzag", world, rank, (rank - step) % world, 2 * piece, None, 0)
        work = sum(int(_call_mask(c).sum()) for c in calls)
        assert 2 * piece * piece <= work <= 2 * piece * piece + 2 * piece, (rank, step, work)
        assert len(calls) == 1
    totals = [sum(int(_call_mask(c).sum()) for s in range(world)
                  for c in step_plan("contiguous", world, r, (r - s) % world, piece, None, 0)) for r in range(world)]
    assert totals == sorted(totals) and totals[-1] > 2 * totals[0]


def test_natural_order_inverts_the_rank_major_concatenation():
    for layout, world in itertools.product(("zigzag", "contiguous"), (1, 2, 3)):
        local_len = LENGTH * num_chunks(layout, world) // world
        concatenated = torch.tensor([p for r in range(world) for p in _global_rows(layout, r, world)])
        assert torch.equal(concatenated[natural_order(layout, world, local_len)], torch.arange(len(concatenated)))
