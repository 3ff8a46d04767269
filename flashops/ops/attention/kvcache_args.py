"""The normalized arguments every KV-cache attention backend receives (validated by the public function)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class KVCacheArgs:
    softmax_scale: float
    cache_seqlens: torch.Tensor  # int32 [B]: tokens cached before this call (the append position)
    cache_leftpad: Optional[torch.Tensor] = None  # int32 [B]: first valid slot of each sequence
    block_table: Optional[torch.Tensor] = None  # int32 [B, max_pages]: paged caches only
    # Visible keys of query t: diag + t - window_left <= j <= diag + t + window_right, where
    # diag = cache_seqlens + Tnew - Tq (bottom-right alignment). None = unlimited on that side.
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None  # fp32 [H] or [B, H]
    num_splits: int = 0  # 0: the Triton backend chooses from the shapes

    @property
    def paged(self) -> bool:
        return self.block_table is not None


def cache_capacity(k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    """Positions one sequence can hold: Tmax of a contiguous cache, max_pages * page_size of a paged one."""
    if block_table is None:
        return k_cache.shape[1]
    return block_table.shape[1] * k_cache.shape[1]
