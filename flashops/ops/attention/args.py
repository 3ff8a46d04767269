"""What every attention backend receives and implements: the normalized arguments (validated by the public
functions) and the backend contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class AttentionArgs:
    """Fields in the order of the custom ops' schema (flashops::attention_fwd / _bwd take them after q, k, v)."""

    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    alibi_slopes: Optional[torch.Tensor] = None  # fp32 [H] or [B, H]
    block_mask: Optional[torch.Tensor] = None  # bool [B|1, H|1, ceil(Tq/bm), ceil(Tk/bn)]
    block_m: int = 128
    block_n: int = 128
    bias: Optional[torch.Tensor] = None  # additive, broadcastable to [B, H, Tq, Tk] (dense only)
    seed: Optional[torch.Tensor] = None  # int64 scalar tensor; dropout's counter-based hash seed
    softmax_scale: float
    # Visible keys of query i: i + off - window_left <= j <= i + off + window_right, off = Tk - Tq.
    # None = unlimited on that side. window_right may be negative (SDPA's top-left causal when Tq < Tk).
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: float = 0.0
    dropout_p: float = 0.0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


class AttentionBackend(Protocol):
    """A module registered as an attention backend (``_dispatch.Backend.module``)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, a: AttentionArgs) -> tuple[Tensor, Tensor]:
        """(out like q, lse fp32 [B, H, Tq] or [H, total_q] for varlen, natural log, -inf for empty rows)."""

    def backward(self, dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                 lse: Tensor, a: AttentionArgs, want_dbias: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(dq, dk, dv, dbias or None); dbias only when ``want_dbias``."""
