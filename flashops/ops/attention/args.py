"""What every attention backend receives and implements: the normalized arguments (validated by the public
functions) and the backend contracts, of the attention ops and of KV-cache decoding."""

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


@dataclass(frozen=True, kw_only=True)
class KVCacheArgs:
    """Fields in the order of flashops::attention_kvcache's schema (after q, k_cache, v_cache, k, v)."""

    cache_seqlens: torch.Tensor  # int32 [B]: tokens cached before this call (the append position)
    cache_leftpad: Optional[torch.Tensor] = None  # int32 [B]: first valid slot of each sequence
    block_table: Optional[torch.Tensor] = None  # int32 [B, max_pages]: paged caches only
    alibi_slopes: Optional[torch.Tensor] = None  # fp32 [H] or [B, H]
    softmax_scale: float
    # Visible keys of query t: diag + t - window_left <= j <= diag + t + window_right, where
    # diag = cache_seqlens + Tnew - Tq (bottom-right alignment). None = unlimited on that side.
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: float = 0.0
    num_splits: int = 0  # 0: the Triton backend chooses from the shapes

    @property
    def paged(self) -> bool:
        return self.block_table is not None


def cache_capacity(k_cache: Tensor, block_table: Optional[Tensor]) -> int:
    """Positions one sequence can hold: Tmax of a contiguous cache, max_pages * page_size of a paged one."""
    if block_table is None:
        return k_cache.shape[1]
    return block_table.shape[1] * k_cache.shape[1]


class KVCacheBackend(Protocol):
    """A module registered as a ``flash_attention_with_kvcache`` backend (op ``attention_kvcache``)."""

    def forward(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                a: KVCacheArgs) -> tuple[Tensor, Tensor]:
        """Write k, v (when given) into the caches in place at ``cache_seqlens[b] + t``, then attend:
        (out like q, lse fp32 [B, H, Tq], natural log, -inf for a query that sees no key)."""
