"""What every LLA backend receives and implements: the normalized arguments (validated by the public
functions) and the backend contracts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from torch import Tensor


@dataclass(frozen=True)
class LLAArgs:
    """Fields in the order of the custom ops' schema (flashops::lla_fwd / _bwd take them after the tensors)."""

    softmax_scale: float
    # Causal masks are aligned bottom-right: query i sees keys j <= i + Tk - Tq.
    causal: bool = True
    # Matrix-free conjugate-gradient solve (every backend): iteration cap, relative residual tolerance
    # ||b - A x|| <= cg_tol * ||b|| per query, and a Jacobi (diagonal) preconditioner.
    cg_max_iters: int = 32
    cg_tol: float = 1e-6
    cg_preconditioner: bool = False


class LLABackend(Protocol):
    """A module registered as a ``local_linear_attention`` backend (``_dispatch.Backend.module``)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ridge: Tensor, a: LLAArgs
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(out like q, lse fp32 [B, H, Tq], k_bar fp32 [B, Tq, H, D], z fp32 [B, Tq, H, D]); ridge is an fp32
        view broadcast to [B, Tq, H]."""

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, k_bar: Tensor,
                 z: Tensor, ridge: Tensor, a: LLAArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(dq, dk, dv, dridge fp32 [B, Tq, H])."""


class LLADecodeBackend(Protocol):
    """A module registered as a ``local_linear_attention_decode`` backend."""

    def decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Optional[Tensor], ridge: Tensor,
               a: LLAArgs) -> Tensor:
        """out [B, 1, H, D] in q's dtype."""
