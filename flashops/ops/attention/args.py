"""The normalized arguments every attention backend receives (validated by the public functions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionArgs:
    softmax_scale: float
    # Visible keys of query i: i + off - window_left <= j <= i + off + window_right, off = Tk - Tq.
    # None = unlimited on that side. window_right may be negative (SDPA's top-left causal when Tq < Tk).
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: Optional[torch.Tensor] = None  # int64 scalar tensor; dropout's counter-based hash seed
    alibi_slopes: Optional[torch.Tensor] = None  # fp32 [H] or [B, H]
    block_mask: Optional[torch.Tensor] = None  # bool [B|1, H|1, ceil(Tq/bm), ceil(Tk/bn)]
    block_m: int = 128
    block_n: int = 128
    bias: Optional[torch.Tensor] = None  # additive, broadcastable to [B, H, Tq, Tk] (dense only)
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None
