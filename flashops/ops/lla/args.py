"""The normalized arguments every LLA backend receives (validated by the public functions)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LLAArgs:
    softmax_scale: float
    # Causal masks are aligned bottom-right: query i sees keys j <= i + Tk - Tq.
    causal: bool = True
    # Matrix-free conjugate-gradient solve (every backend): iteration cap, relative residual tolerance
    # ||b - A x|| <= cg_tol * ||b|| per query, and a Jacobi (diagonal) preconditioner.
    cg_max_iters: int = 32
    cg_tol: float = 1e-6
    cg_preconditioner: bool = False
