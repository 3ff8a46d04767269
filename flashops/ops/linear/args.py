"""The backend contracts of the linear-attention family: what a module registered as a backend of its ops
implements (``_dispatch.Backend.module``). Shapes: q, k, g [B, T, H, K], v [B, T, H, V], states fp32
[N, H, K, V] (N = B, or the number of packed sequences with cu_seqlens); steps drop T."""

from __future__ import annotations

from typing import Optional, Protocol

from torch import Tensor


class ChunkBackend(Protocol):
    """``lightning_attention`` (g is None, slopes [H]) and ``gated_linear_attention`` (slopes is None)."""

    def chunk_forward(self, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], slopes: Optional[Tensor],
                      scale: float, initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                      output_final_state: bool) -> tuple[Tensor, Optional[Tensor]]:
        """(o [B, T, H, V] in q's dtype, final state fp32 or None)."""

    def chunk_backward(self, do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                       g: Optional[Tensor], slopes: Optional[Tensor], scale: float, initial_state: Optional[Tensor],
                       cu_seqlens: Optional[Tensor]
                       ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """(dq, dk, dv, dg or None, d initial_state or None)."""


class NoncausalBackend(Protocol):
    """``linear_attention(causal=False)``."""

    def noncausal_forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float, initial_state: Optional[Tensor],
                          cu_seqlens: Optional[Tensor], output_final_state: bool) -> tuple[Tensor, Optional[Tensor]]:
        """(o, S_0 + K^T V fp32 or None)."""

    def noncausal_backward(self, do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, scale: float,
                           initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor]
                           ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(dq, dk, dv, d initial_state or None)."""


class StepBackend(Protocol):
    """``lightning_attention_step`` and ``gated_linear_attention_step``: q, k, g [B, H, K], v [B, H, V]."""

    def step_forward(self, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], slopes: Optional[Tensor],
                     state: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
        """(o [B, H, V], new state fp32 [B, H, K, V])."""

    def step_backward(self, do: Tensor, d_new: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                      g: Optional[Tensor], slopes: Optional[Tensor], state: Optional[Tensor], scale: float
                      ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """(dq, dk, dv, dg or None, d state or None)."""
