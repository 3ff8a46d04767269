"""HyperAttention self-attention layer: the projections of FlashSelfAttention, HyperAttention in between."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.hyper import hyper_attention
from .attention import SelfAttentionProjections
from .base import accepts_aliases, describe
from .cache import KVCache, check_cache


class HyperAttention(SelfAttentionProjections):
    """Multi-head self-attention for ``[B, T, C]`` inputs with HyperAttention (sortLSH + sampling).

    Same projections and parameter names as :class:`flashops.nn.FlashSelfAttention` (a fused ``qkv_proj``,
    ``num_kv_heads < num_heads`` for GQA, ``out_proj``), so a state dict moves between the two. Sequences of
    at most ``min_seq_len`` tokens get exact attention; longer ones the approximation, with fresh LSH
    hyperplanes and samples on every call (from ``generator`` when given to ``forward``).
    No positional encoding is applied (rotary embeddings belong to the model). Constructor aliases as in
    :class:`flashops.nn.FlashSelfAttention`.
    """

    @accepts_aliases(hidden_size="embed_dim", num_heads_kv="num_kv_heads")
    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 head_dim: Optional[int] = None, causal: bool = False, bias: bool = True,
                 softmax_scale: Optional[float] = None, lsh_num_projs: int = 7, block_size: int = 256,
                 sample_size: int = 256, min_seq_len: int = 4096, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, bias, {"device": device, "dtype": dtype})
        self.causal, self.softmax_scale = causal, softmax_scale
        self.lsh_num_projs, self.block_size, self.sample_size = lsh_num_projs, block_size, sample_size
        self.min_seq_len = min_seq_len

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, *,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``. With a ``cache`` (from ``init_cache``; inference only) the new
        tokens are appended and attend exactly to everything cached: a decode step reads every cached key
        anyway, so the approximation has nothing to save there (prefill through the cache is exact too)."""
        if x.dim() != 3:
            raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
        q, k, v = self.project(x)
        if cache is not None:
            check_cache(cache, KVCache, self, x.shape[0])
            return self.merge(cache.attend(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale))
        out = hyper_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                              lsh_num_projs=self.lsh_num_projs, block_size=self.block_size,
                              sample_size=self.sample_size, min_seq_len=self.min_seq_len, generator=generator)
        return self.merge(out)

    def extra_repr(self) -> str:
        return describe(**self.projection_repr(), causal=self.causal, lsh_num_projs=self.lsh_num_projs,
                        block_size=self.block_size, sample_size=self.sample_size, min_seq_len=self.min_seq_len)
