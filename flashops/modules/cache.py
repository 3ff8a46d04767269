"""The decoding convention every flashops module follows.

    cache = layer.init_cache(batch_size, max_seqlen, device=..., dtype=...)   # one cache per layer
    y = layer(x, cache=cache)        # x [B, T, C]: T new tokens after what the cache holds (prefill or step)
    y_t = layer.step(x_t, cache)     # one token per sequence, [B, C]; same as layer(x_t[:, None], cache=cache)[:, 0]

A call with a cache reads it and updates it in place (appends keys/values or advances the recurrent state) and
returns what the same call returns without one. Each family subclasses :class:`Cache` with the tensors it
needs (keys and values for softmax attention and LLA, a fixed-size state for the recurrent families);
:class:`KVCache` is the one of the softmax-attention layers (FlashSelfAttention, MultiheadAttention,
HyperAttention).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.attention import flash_attention_with_kvcache


class Cache:
    """Base of every module's decoding state. ``seqlens`` (int32 ``[B]``, on the cache's device) counts the
    tokens each sequence has consumed; it stays on the device so that decode steps need no host sync."""

    seqlens: Tensor

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def reset(self) -> None:
        """Forget every sequence (the cache can be reused for a new batch of the same size)."""
        raise NotImplementedError


def check_cache(cache, cache_type: type, layer, sequences: int) -> None:
    """The cache given to ``layer``: one its ``init_cache`` makes, for as many sequences as the input has."""
    if not isinstance(cache, cache_type):
        raise TypeError(f"cache must come from {type(layer).__name__}.init_cache, got {type(cache).__name__}")
    if cache.batch_size != sequences:
        raise ValueError(f"the cache holds {cache.batch_size} sequences but x has {sequences}")


class RecurrentCache(Cache):
    """The decoding state of a recurrent layer (linear attention, state-space models): a fixed-size ``state``
    ``[B, ...]`` that each call replaces by the state after its tokens, whatever the sequence length.

    The state is rebound, not overwritten: a call under autograd keeps the previous state alive for its
    backward, so chunked training (truncated backpropagation through time) works with a cache too; cut the
    graph between chunks with ``cache.state = cache.state.detach()``.
    """

    def __init__(self, state: Tensor):
        self.state = state
        self.seqlens = torch.zeros(state.shape[0], dtype=torch.int32, device=state.device)

    def advance(self, state: Tensor, num_tokens) -> None:
        """Store the state after ``num_tokens`` more tokens per sequence (an int, or an int tensor ``[B]``)."""
        self.state = state
        self.seqlens += num_tokens

    def reset(self) -> None:
        self.state = torch.zeros_like(self.state)
        self.seqlens.zero_()


class KVCache(Cache):
    """The keys and values of one softmax-attention layer: contiguous ``k``, ``v`` ``[B, Tmax, Hkv, D]``, or
    paged ``[num_pages, page_size, Hkv, D]`` with ``block_table`` int32 ``[B, max_pages]`` (sequence b's
    position p lives in page ``block_table[b, p // page_size]``; pages may be shared between sequences).

    ``seqlens`` counts the tokens each sequence holds; ``leftpad`` (optional int32 ``[B]``) is the first valid
    slot of each sequence, for left-padded batches: slots before it are never attended to. Both live on the
    cache's device, so steps need no host synchronization. Build one with :meth:`allocate` (or a layer's
    ``init_cache``), or wrap existing buffers.
    """

    def __init__(self, k: Tensor, v: Tensor, *, block_table: Optional[Tensor] = None,
                 seqlens: Optional[Tensor] = None, leftpad: Optional[Tensor] = None):
        batch = k.shape[0] if block_table is None else block_table.shape[0]
        self.k, self.v, self.block_table, self.leftpad = k, v, block_table, leftpad
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=k.device) if seqlens is None else seqlens

    @classmethod
    def allocate(cls, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int, *,
                 page_size: Optional[int] = None, device=None, dtype=None) -> KVCache:
        """Zero-filled buffers for ``max_seqlen`` tokens per sequence; with ``page_size`` (a multiple of 16) a
        paged cache in which each sequence owns ``ceil(max_seqlen / page_size)`` pages."""
        if page_size is None:
            shape = (batch_size, max_seqlen, num_kv_heads, head_dim)
            table = None
        else:
            pages = -(-max_seqlen // page_size)
            shape = (batch_size * pages, page_size, num_kv_heads, head_dim)
            table = torch.arange(batch_size * pages, dtype=torch.int32, device=device).reshape(batch_size, pages)
        k = torch.zeros(shape, device=device, dtype=dtype)
        return cls(k, torch.zeros_like(k), block_table=table)

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold."""
        return self.k.shape[1] * (1 if self.block_table is None else self.block_table.shape[1])

    def reset(self) -> None:
        self.seqlens.zero_()
        if self.leftpad is not None:
            self.leftpad.zero_()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
        """Append ``k, v`` ``[B, T, Hkv, D]``, attend ``q`` ``[B, T, H, D]`` to everything cached (options of
        :func:`flashops.flash_attention_with_kvcache`: causal, window_size, softcap, ...), then advance
        ``seqlens`` by T. Inference only."""
        out = flash_attention_with_kvcache(q, self.k, self.v, k, v, cache_seqlens=self.seqlens,
                                           cache_leftpad=self.leftpad, block_table=self.block_table, **options)
        self.seqlens.add_(k.shape[1])
        return out
