"""``LocalLinearAttention``: a multi-head Local Linear Attention layer with a KV cache for generation."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ops.lla import local_linear_attention, local_linear_attention_decode
from .base import KeepsFP32, accepts_aliases, check_input, describe
from .cache import Cache, check_cache


class LLACache(Cache):
    """The KV cache of one layer: ``k``, ``v`` ``[B, max_seqlen, Hkv, D]``, the first ``length`` positions filled.

    LLA's weights depend on each new query (w_j = exp(q . k_j)), so, as for softmax attention, the keys and
    values themselves are the state; each decoding step reads them once and keeps O(D^2) working memory.
    The layer feeds every sequence the same number of tokens, so ``length`` (a Python int, no device sync)
    and ``seqlens`` (int32 ``[B]`` on the device) agree.
    """

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v
        self.length = 0
        self.seqlens = torch.zeros(k.shape[0], dtype=torch.int32, device=k.device)

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def append(self, k: Tensor, v: Tensor) -> None:
        end = self.length + k.shape[1]
        if end > self.max_seqlen:
            raise ValueError(f"the cache holds {self.max_seqlen} positions; {self.length} are filled and "
                             f"{k.shape[1]} more were given")
        self.k[:, self.length:end] = k
        self.v[:, self.length:end] = v
        self.length = end
        self.seqlens += k.shape[1]

    def reset(self) -> None:
        self.length = 0
        self.seqlens.zero_()


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class LocalLinearAttention(KeepsFP32):
    """Multi-head Local Linear Attention over ``[B, T, C]``: q/k/v projections, LLA per head, output projection.

    Args:
        embed_dim: C (``hidden_size=`` is accepted too).
        num_heads: query heads H; ``num_kv_heads`` (default H) key/value heads, H % Hkv == 0 (GQA).
        head_dim: D (default C // H).
        ridge_lambda: initial ridge per head (> 0), in the convention of ``flashops.local_linear_attention``.
        learnable_ridge: learn one ridge per head (kept positive through a softplus; its exact gradient is
            computed by the op), else a fixed buffer. It stays fp32 under ``.to(torch.bfloat16)``.
        softmax_scale, causal, cg_max_iters, cg_tol, backend: passed to the op.
        bias: biases in the projections.

    ``forward(x, cache=None)``: full sequence; with a cache (:meth:`init_cache`), the new keys/values are
    appended first and the queries attend (causally) to everything cached, so a prompt can be fed in one or
    several pieces. ``step(x_t, cache)``: one new token per sequence, ``[B, C]`` (or ``[B, 1, C]``), inference
    only (call it under ``torch.no_grad()``); equals the last row of ``forward`` on the whole sequence.
    """

    fp32_names = ("ridge_raw",)

    @accepts_aliases(hidden_size="embed_dim")
    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 head_dim: Optional[int] = None, ridge_lambda: float = 1.0, learnable_ridge: bool = True,
                 softmax_scale: Optional[float] = None, causal: bool = True, bias: bool = False,
                 cg_max_iters: int = 32, cg_tol: Optional[float] = None, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        head_dim = embed_dim // num_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim} (embed_dim {embed_dim}, num_heads {num_heads})")
        if not (math.isfinite(ridge_lambda) and ridge_lambda > 0):
            raise ValueError(f"ridge_lambda must be finite and > 0, got {ridge_lambda!r}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.softmax_scale, self.causal, self.backend = softmax_scale, causal, backend
        self.cg_max_iters, self.cg_tol = cg_max_iters, cg_tol
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.kv_proj = nn.Linear(embed_dim, 2 * num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        raw = torch.full((num_heads,), _inverse_softplus(float(ridge_lambda)), device=device, dtype=torch.float32)
        self.learnable_ridge = learnable_ridge
        if learnable_ridge:
            self.ridge_raw = nn.Parameter(raw)
        else:
            self.register_buffer("ridge_raw", raw)

    @property
    def ridge_lambda(self) -> Tensor:
        """The ridge per head, [H] fp32."""
        return F.softplus(self.ridge_raw.float())

    def init_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> LLACache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_seqlen`` tokens (default device and
        dtype: the layer's)."""
        weight = self.kv_proj.weight
        shape = (batch_size, max_seqlen, self.num_kv_heads, self.head_dim)
        device, dtype = device or weight.device, dtype or weight.dtype
        return LLACache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def _project(self, x: Tensor):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k, v = self.kv_proj(x).view(b, t, 2, self.num_kv_heads, self.head_dim).unbind(2)
        return q, k, v

    def _check_input(self, x: Tensor, cache: Optional[LLACache]):
        check_input(x, self.embed_dim, (3,), "[B, T, C]")
        if cache is not None:
            check_cache(cache, LLACache, self, x.shape[0])

    def forward(self, x: Tensor, cache: Optional[LLACache] = None) -> Tensor:
        """x ``[B, T, C]`` -> ``[B, T, C]``; with a cache, after the tokens it holds (which it then includes)."""
        self._check_input(x, cache)
        b, t, _ = x.shape
        q, k, v = self._project(x)
        if cache is not None:
            start = cache.length
            cache.append(k.detach(), v.detach())
            if start > 0:  # attend to the cached prefix too (bottom-right causal); gradients reach the new part
                k = torch.cat([cache.k[:, :start], k], dim=1)
                v = torch.cat([cache.v[:, :start], v], dim=1)
        out = local_linear_attention(q, k, v, ridge_lambda=self.ridge_lambda, softmax_scale=self.softmax_scale,
                                     causal=self.causal, cg_max_iters=self.cg_max_iters, cg_tol=self.cg_tol,
                                     backend=self.backend)
        return self.out_proj(out.reshape(b, t, self.num_heads * self.head_dim))

    def step(self, x: Tensor, cache: LLACache) -> Tensor:
        """One token per sequence: x ``[B, C]`` (or ``[B, 1, C]``) -> the output in the same shape."""
        squeeze = x.dim() == 2
        x = x.unsqueeze(1) if squeeze else x
        self._check_input(x, cache)
        if x.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, got x of shape {tuple(x.shape)}; use forward")
        if not self.causal:
            raise ValueError("step needs a causal layer (a non-causal query would also see future tokens)")
        b = x.shape[0]
        q, k, v = self._project(x)
        cache.append(k.detach(), v.detach())
        out = local_linear_attention_decode(q, cache.k[:, :cache.length], cache.v[:, :cache.length],
                                            ridge_lambda=self.ridge_lambda, softmax_scale=self.softmax_scale,
                                            backend=self.backend)
        out = self.out_proj(out.reshape(b, 1, self.num_heads * self.head_dim))
        return out.squeeze(1) if squeeze else out

    def extra_repr(self) -> str:
        low, high = (float(f"{float(r):.4g}") for r in self.ridge_lambda.detach().aminmax())
        ridge = low if low == high else f"{low}..{high}"  # per head, once trained
        return describe(embed_dim=self.embed_dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, ridge_lambda=ridge, learnable_ridge=self.learnable_ridge,
                        causal=self.causal, cg_max_iters=self.cg_max_iters, backend=self.backend)


__all__ = ["LocalLinearAttention", "LLACache"]
