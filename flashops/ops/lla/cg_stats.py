"""What the conjugate-gradient solves of the LLA backends cost: iterations run, per query tile.

Off unless a :func:`record_cg` block is open (the benchmark opens one to turn iterations into LLA's own FLOP
count; docs/lla.md). Inside it, every solve reports one :class:`CGSolve`: per unit of work (a query tile, a block
of rows that iterates together until its slowest row has converged; or a query row, carrying its tile's count),
the iterations it ran and the (query, key) pairs one pass over its keys streams, so that work is weighted by
what each unit costs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_OPEN: list = []  # the lists of the open record_cg blocks


@dataclass(frozen=True)
class CGSolve:
    stage: str  # "fwd": A z = k_bar - q; "bwd": the adjoint A r = c
    backend: str
    iterations: torch.Tensor  # int64 [units]: iterations each unit's tile ran (its slowest row's)
    pairs: torch.Tensor  # int64 [units]: visible (query, key) pairs of each unit


@contextlib.contextmanager
def record_cg():
    """Collect the :class:`CGSolve` of every LLA forward and backward run inside the block (in call order)."""
    solves: list = []
    _OPEN.append(solves)
    try:
        yield solves
    finally:
        _OPEN.remove(solves)


def recording() -> bool:
    return bool(_OPEN)


def report(stage: str, backend: str, iterations, pairs) -> None:
    """Called by the backends after a solve when :func:`recording`; iterations/pairs: ints or int tensors."""
    solve = CGSolve(stage, backend, torch.as_tensor(iterations, dtype=torch.int64).reshape(-1).cpu(),
                    torch.as_tensor(pairs, dtype=torch.int64).reshape(-1).cpu())
    for solves in _OPEN:
        solves.append(solve)


def visible_keys(t_q: int, t_k: int, causal: bool) -> torch.Tensor:
    """Keys each query row sees, int64 [Tq] (causal is bottom-right aligned: row i sees j <= i + Tk - Tq)."""
    if not causal:
        return torch.full((t_q,), t_k, dtype=torch.int64)
    return (torch.arange(t_q, dtype=torch.int64) + (t_k - t_q + 1)).clamp(0, t_k)


def report_rows(stage: str, backend: str, iterations: torch.Tensor, t_k: int, causal: bool) -> None:
    """Report a solve from ``iterations`` [..., Tq]: every query row with its tile's iterations."""
    keys = visible_keys(iterations.shape[-1], t_k, causal)
    report(stage, backend, iterations.reshape(-1), keys.repeat(iterations.numel() // max(1, keys.numel())))


def mean_iterations(solves, stage: str) -> float:
    """Iterations per pass-pair: the tiles' iterations weighted by their pairs (0.0 when nothing was solved)."""
    chosen = [s for s in solves if s.stage == stage]
    pairs = sum(int(s.pairs.sum()) for s in chosen)
    work = sum(int((s.pairs * s.iterations).sum()) for s in chosen)
    return work / pairs if pairs else 0.0
