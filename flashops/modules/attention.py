"""Attention modules: a drop-in ``nn.MultiheadAttention`` and a fused-projection self-attention layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import flash_attention, flash_attention_varlen, sdpa
from .base import KeepsFP32, accepts_aliases, describe
from .cache import KVCache, check_cache


def _additive(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """nn.MultiheadAttention mask semantics: bool True = do NOT attend; float masks are added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


def _masked_logits(q: Tensor, k: Tensor, bias: Optional[Tensor]) -> Tensor:
    """q k^T / sqrt(D) + bias for the returned weights, with selects where the bias is -inf: a NaN/Inf key
    there must not make the weight NaN, and keys that no query sees (padding) are zeroed before the product,
    so that its backward does not meet them either (0 * NaN)."""
    if bias is None:
        return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    hidden = torch.isneginf(bias)
    unseen = hidden.all(dim=-2, keepdim=True).transpose(-1, -2)  # [B|1, H|1, S, 1]
    k = torch.where(unseen, torch.zeros((), dtype=k.dtype, device=k.device), k)
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.where(hidden, torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device),
                       logits + bias)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in replacement for :class:`torch.nn.MultiheadAttention` running on flashops kernels.

    Same constructor, parameter names (so a torch state dict loads unchanged) and ``forward`` signature
    and results. With ``need_weights=False`` it never materializes the attention matrix; with
    ``need_weights=True`` (PyTorch's default) the output still comes from the flash kernel and the
    returned weights are rebuilt from its log-sum-exp (differentiable), except in training with dropout,
    where it follows PyTorch's materialized path so that the reported weights are the dropped ones.

    Decoding (self-attention, inference only): ``cache = mha.init_cache(B, max_seqlen)``, then
    ``out, _ = mha(x, x, x, cache=cache)`` for a prompt or new tokens (causal over everything cached; the
    weights are not computed and come back as None) and ``mha.step(x_t, cache)`` for one token ``[B, E]``.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, cache: Optional[KVCache] = None) -> tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) or 3-D, got shape {tuple(query.shape)}")
        if cache is not None:
            if key is not query or value is not query or key_padding_mask is not None or attn_mask is not None:
                raise ValueError("with a cache, MultiheadAttention decodes self-attention: pass the same tensor as "
                                 "query, key and value, and no attn_mask or key_padding_mask (attention is causal "
                                 "over the cache; cache.leftpad serves left-padded batches)")
            x = query.unsqueeze(0) if not batched else (query if self.batch_first else query.transpose(0, 1))
            out = self._attend_cached(x, cache)
            out = out[0] if not batched else (out if self.batch_first else out.transpose(0, 1))
            return out, None
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must have the same rank, got {query.dim()}, {key.dim()}, "
                             f"{value.dim()}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as in torch.nn.MultiheadAttention)")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        t_q, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"query has embedding dim {embed_dim}, expected embed_dim={self.embed_dim}")
        q, k, v = self._project(query, key, value)  # [T, B, E] each
        h, d = self.num_heads, self.head_dim

        mask = _additive(attn_mask, "attn_mask", q.dtype)
        padding = _additive(key_padding_mask, "key_padding_mask", q.dtype)
        t_k = k.shape[0]
        if mask is not None:
            want = [(t_q, t_k), (bsz * h, t_q, t_k)]
            if tuple(mask.shape) not in want:
                raise RuntimeError(f"attn_mask has shape {tuple(mask.shape)}, expected {want[0]} or {want[1]}")
            mask = mask.view(1, 1, t_q, t_k) if mask.dim() == 2 else mask.view(bsz, h, t_q, t_k)
        if padding is not None:
            if tuple(padding.shape) != (bsz, t_k):
                raise RuntimeError(f"key_padding_mask has shape {tuple(padding.shape)}, expected {(bsz, t_k)}")
            padding = padding.view(bsz, 1, 1, t_k)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        # [T, B, E] -> [B, H, T, D] views (stride(-1) == 1, no copy)
        q = q.view(t_q, bsz, h, d).permute(1, 2, 0, 3)
        k = k.view(k.shape[0], bsz, h, d).permute(1, 2, 0, 3)
        v = v.view(v.shape[0], bsz, h, d).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            zeros = q.new_zeros(bsz, h, 1, d)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        bias = padding if mask is None else (mask if padding is None else mask + padding)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights and dropout_p > 0.0:
            logits = _masked_logits(q, k, bias)
            weights = F.dropout(torch.softmax(logits, dim=-1), p=dropout_p)
            out = torch.matmul(weights, v).transpose(1, 2)  # [B, T, H, D]
        elif need_weights:
            out, lse = sdpa(q, k, v, attn_mask=bias, return_lse=True)
            out = out.transpose(1, 2)
            logits = _masked_logits(q, k, bias)
            # softmax rebuilt from the kernel's log-sum-exp: one matmul, no second normalization pass.
            weights = torch.exp(logits - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        else:
            # Only without a mask can the causal hint use the causal kernel (a padding mask breaks it).
            use_causal = is_causal and padding is None
            out = sdpa(q, k, v, attn_mask=None if use_causal else bias, dropout_p=dropout_p,
                       is_causal=use_causal).transpose(1, 2)
        out = out.reshape(bsz, t_q, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        out = out.transpose(0, 1) if not (batched and self.batch_first) else out  # [T, B, E] or [B, T, E]
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def init_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None,
                   page_size: Optional[int] = None) -> KVCache:
        """A :class:`KVCache` for decoding self-attention (see ``flashops/modules/cache.py``)."""
        if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn:
            raise ValueError("decoding with a cache needs plain self-attention: kdim == vdim == embed_dim, no "
                             "add_bias_kv, no add_zero_attn")
        weight = self.in_proj_weight
        return KVCache.allocate(batch_size, max_seqlen, self.num_heads, self.head_dim, page_size=page_size,
                                device=device or weight.device, dtype=dtype or weight.dtype)

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """One token per sequence: ``x`` ``[B, E]`` -> the output ``[B, E]`` (the cache appended)."""
        return self._attend_cached(x.unsqueeze(1), cache).squeeze(1)

    def _attend_cached(self, x: Tensor, cache: KVCache) -> Tensor:
        """``x`` ``[B, T, E]``: causal self-attention of the T new tokens over the cache, appended in place.
        The returned weights of ``forward`` are None: the cache's length lives on the device."""
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"query has embedding dim {x.shape[-1]}, expected embed_dim={self.embed_dim}")
        check_cache(cache, KVCache, self, x.shape[0])
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, self.num_heads, self.head_dim)
                   for y in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        out = cache.attend(q, k, v, causal=True)
        return F.linear(out.reshape(b, t, self.embed_dim), self.out_proj.weight, self.out_proj.bias)

    def _project(self, query, key, value):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:
                return F.linear(query, w, b).chunk(3, dim=-1)
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return F.linear(query, w[:e], bq), F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
        bq, bk, bv = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def extra_repr(self) -> str:
        fields = dict(embed_dim=self.embed_dim, num_heads=self.num_heads, dropout=self.dropout,
                      bias=self.in_proj_bias is not None, batch_first=self.batch_first)
        if not self._qkv_same_embed_dim:
            fields.update(kdim=self.kdim, vdim=self.vdim)
        if self.bias_k is not None or self.add_zero_attn:
            fields.update(add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn)
        return describe(**fields)


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi paper's head slopes: a geometric sequence starting at 2^(-8/n) for the nearest power of
    two n >= num_heads, interleaved as in the paper when num_heads is not a power of two."""
    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(n)
    if n < num_heads:
        slopes += powers(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


class SelfAttentionProjections(KeepsFP32):
    """The projections shared by the ``[B, T, C]`` self-attention layers: a fused ``qkv_proj`` with
    ``num_heads`` query heads and ``num_kv_heads`` key/value heads (GQA/MQA), and ``out_proj``. Layers with
    these parameter names exchange state dicts."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int], head_dim: Optional[int],
                 bias: bool, factory: dict):
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
        self.qkv_proj = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [..., C]`` -> q ``[..., H, D]``, k and v ``[..., H_kv, D]``."""
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([h * d, h_kv * d, h_kv * d], dim=-1)
        return q.unflatten(-1, (h, d)), k.unflatten(-1, (h_kv, d)), v.unflatten(-1, (h_kv, d))

    def merge(self, out: Tensor) -> Tensor:
        """Attention output ``[..., H, D]`` -> ``[..., C]``."""
        return self.out_proj(out.flatten(-2))

    def projection_repr(self) -> dict:
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim)

    def init_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None,
                   page_size: Optional[int] = None) -> KVCache:
        """A :class:`KVCache` of ``max_seqlen`` tokens per sequence for ``forward(x, cache=...)`` and ``step``
        (paged when ``page_size`` is given); device and dtype default to the parameters'."""
        weight = self.qkv_proj.weight
        return KVCache.allocate(batch_size, max_seqlen, self.num_kv_heads, self.head_dim, page_size=page_size,
                                device=device or weight.device, dtype=dtype or weight.dtype)

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """One token per sequence: ``x`` ``[B, C]`` -> ``[B, C]``, same as ``self(x[:, None], cache=cache)[:, 0]``."""
        return self(x.unsqueeze(1), cache=cache).squeeze(1)


class FlashSelfAttention(SelfAttentionProjections):
    """Multi-head self-attention for ``[B, T, C]`` inputs on the flashops kernel.

    A fused QKV projection (``num_kv_heads < num_heads`` gives GQA, 1 gives MQA), exact attention with
    the kernel's options (causal, sliding window, softcap, ALiBi, dropout) and an output projection.
    ``forward(x, cu_seqlens=..., max_seqlen=...)`` takes packed variable-length batches ``[total, C]``.
    No positional encoding is applied (rotary embeddings belong to the model). ``hidden_size=`` (fla) and
    ``num_heads_kv=`` (flash-attn's ``MHA``) are accepted for ``embed_dim`` and ``num_kv_heads``.
    Decoding: ``cache = layer.init_cache(B, max_seqlen)``, then ``layer(x, cache=cache)`` and ``layer.step``
    (``flashops/modules/cache.py``).

    ``cp_group``: a process group over which the sequence is sharded (context parallelism): ``x`` is then this
    rank's part ``[B, T/P, C]`` in the zigzag layout (:func:`flashops.distributed.shard`) and attention runs
    as :func:`flashops.distributed.ring_attention` (softcap passes on; no ALiBi, dropout or packed input there).
    """

    fp32_names = ("alibi_slopes",)

    @accepts_aliases(hidden_size="embed_dim", num_heads_kv="num_kv_heads")
    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 head_dim: Optional[int] = None, causal: bool = False, bias: bool = True, dropout: float = 0.0,
                 softmax_scale: Optional[float] = None, window_size: Sequence[int] = (-1, -1),
                 softcap: float = 0.0, alibi: bool = False, cp_group=None, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, bias, {"device": device, "dtype": dtype})
        if cp_group is not None and (alibi or dropout):
            raise ValueError("cp_group (ring attention) does not support alibi or dropout")
        self.cp_group = cp_group
        self.causal, self.dropout, self.softmax_scale = causal, dropout, softmax_scale
        self.window_size, self.softcap = tuple(window_size), softcap
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads).to(device) if alibi else None,
                             persistent=False)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, *, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tensor:
        """``x`` ``[B, T, C]``, or packed ``[total, C]`` with ``cu_seqlens`` (int32, ``[N + 1]``). With a
        ``cache`` (from :meth:`init_cache`; inference only) the T new tokens are appended to it and attend to
        everything it holds (causal layers: bottom-right causal among themselves)."""
        packed = cu_seqlens is not None
        if packed and (x.dim() != 2 or cache is not None):
            raise ValueError(f"with cu_seqlens, x must be packed [total, C] and no cache is used, got shape "
                             f"{tuple(x.shape)}")
        if not packed and x.dim() != 3:
            raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
        q, k, v = self.project(x)
        options = dict(causal=self.causal, softmax_scale=self.softmax_scale, window_size=self.window_size,
                       softcap=self.softcap, alibi_slopes=self.alibi_slopes)
        if cache is not None:
            check_cache(cache, KVCache, self, x.shape[0])
            return self.merge(cache.attend(q, k, v, **options))
        options["dropout_p"] = self.dropout if self.training else 0.0
        if self.cp_group is not None:
            from ..distributed import ring_attention  # torch.distributed is imported only when used

            if packed:
                raise ValueError("a layer with cp_group takes [B, T/P, C] shards, not packed input (cu_seqlens)")
            out = ring_attention(q, k, v, group=self.cp_group, causal=self.causal, softmax_scale=self.softmax_scale,
                                 window_size=self.window_size, softcap=self.softcap)
        elif packed:
            out = flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)
        else:
            out = flash_attention(q, k, v, **options)
        return self.merge(out)

    def extra_repr(self) -> str:
        return describe(**self.projection_repr(), causal=self.causal, dropout=self.dropout,
                        window_size=self.window_size, softcap=self.softcap, alibi=self.alibi_slopes is not None)
