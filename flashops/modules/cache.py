"""The decoding convention every flashops module follows.

    cache = layer.init_cache(batch_size, max_seqlen, device=..., dtype=...)   # one cache per layer
    y = layer(x, cache=cache)        # x [B, T, C]: T new tokens after what the cache holds (prefill or step)
    y_t = layer.step(x_t, cache)     # one token per sequence, [B, C]; same as layer(x_t[:, None], cache=cache)[:, 0]

A call with a cache reads it and updates it in place (appends keys/values or advances the recurrent state) and
returns what the same call returns without one. Each family subclasses :class:`Cache` with the tensors it
needs (keys and values for softmax attention and LLA, a fixed-size state for the recurrent families).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
