"""HyperAttention self-attention layer: the projections of FlashSelfAttention, HyperAttention in between."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.hyper import hyper_attention


class HyperAttention(nn.Module):
    """Multi-head self-attention for ``[B, T, C]`` inputs with HyperAttention (sortLSH + sampling).

    Same projections and parameter names as :class:`flashops.nn.FlashSelfAttention` (a fused ``qkv_proj``,
    ``num_kv_heads < num_heads`` for GQA, ``out_proj``), so a state dict moves between the two. Sequences of
    at most ``min_seq_len`` tokens get exact attention; longer ones the approximation, with fresh LSH
    hyperplanes and samples on every call (from ``generator`` when given to ``forward``).
    No positional encoding is applied (rotary embeddings belong to the model).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 head_dim: Optional[int] = None, causal: bool = False, bias: bool = True,
                 softmax_scale: Optional[float] = None, lsh_num_projs: int = 7, block_size: int = 256,
                 sample_size: int = 256, min_seq_len: int = 4096, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                                 f"unless head_dim is given")
            head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.causal, self.softmax_scale = causal, softmax_scale
        self.lsh_num_projs, self.block_size, self.sample_size = lsh_num_projs, block_size, sample_size
        self.min_seq_len = min_seq_len
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``."""
        if x.dim() != 3:
            raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([h * d, h_kv * d, h_kv * d], dim=-1)
        q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (h_kv, d)), v.unflatten(-1, (h_kv, d))
        out = hyper_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                              lsh_num_projs=self.lsh_num_projs, block_size=self.block_size,
                              sample_size=self.sample_size, min_seq_len=self.min_seq_len, generator=generator)
        return self.out_proj(out.reshape(*x.shape[:-1], h * d))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, lsh_num_projs={self.lsh_num_projs}, block_size={self.block_size}, "
                f"sample_size={self.sample_size}, min_seq_len={self.min_seq_len}")
