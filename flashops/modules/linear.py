"""Linear-attention layers: TransNormerLLM's Lightning Attention block and the GLA layer.

Both map ``x [B, T, C]`` (or packed ``[1, total_T, C]`` / ``[total_T, C]`` with ``cu_seqlens``) to ``y`` of
the same shape and follow the decoding convention of :mod:`flashops.modules.cache`: ``init_cache`` gives a
:class:`RecurrentCache` holding the fp32 state ``[N, H_state, K, V]``, ``layer(x, cache)`` continues from it (a
prompt in one or several pieces) and ``layer.step(x_t, cache)`` feeds one token through the recurrent op. Both
take ``num_kv_heads`` (GQA/MQA: keys, values and GLA's gates projected to fewer heads than the queries).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.linear import (
    gated_linear_attention,
    gated_linear_attention_step,
    lightning_attention,
    lightning_attention_step,
    lightning_slopes,
)
from .base import KeepsFP32, accepts_aliases, check_input, describe
from .cache import RecurrentCache, check_cache


class _LinearAttentionLayer(KeepsFP32):
    """The cache, packing and step logic the two layers share; subclasses project, run the op and finish."""

    embed_dim: int
    num_heads: int
    num_kv_heads: int
    state_heads: int  # of the state [N, H_state, K, V]: one per decay
    state_dims: tuple[int, int]  # (K, V) of the state

    def _project(self, x: Tensor) -> tuple:
        raise NotImplementedError

    def _attend(self, projected: tuple, initial_state, output_final_state: bool, cu_seqlens):
        raise NotImplementedError

    def _attend_step(self, projected: tuple, state: Tensor):
        raise NotImplementedError

    def _finish(self, o: Tensor, projected: tuple) -> Tensor:
        raise NotImplementedError

    def init_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                   dtype=None) -> RecurrentCache:
        """A zero state for ``batch_size`` sequences (fp32 ``[B, H_state, K, V]``, on the layer's device unless
        ``device`` is given). The state does not grow: ``max_seqlen`` and ``dtype`` are accepted so that a
        model can make every layer's cache with one call, and bound nothing."""
        del max_seqlen, dtype
        device = device if device is not None else next(self.parameters()).device
        state = torch.zeros(batch_size, self.state_heads, *self.state_dims, device=device, dtype=torch.float32)
        return RecurrentCache(state)

    def forward(self, x: Tensor, cache: Optional[RecurrentCache] = None, *,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x ``[B, T, C]`` -> y ``[B, T, C]``. Packed sequences: x ``[1, total_T, C]`` or ``[total_T, C]`` with
        ``cu_seqlens`` ``[N + 1]`` (int32 or int64); each sequence starts from its own state. With a cache
        (of N sequences), the tokens continue from its state, which then holds the state after them."""
        packed_2d = cu_seqlens is not None and isinstance(x, Tensor) and x.dim() == 2
        if cu_seqlens is not None:
            check_input(x, self.embed_dim, (2, 3), "[1, total_T, C] or [total_T, C] (packed, with cu_seqlens)")
            x = x.unsqueeze(0) if packed_2d else x
        else:
            check_input(x, self.embed_dim, (3,), "[B, T, C]")
        initial_state = None
        if cache is not None:
            check_cache(cache, RecurrentCache, self, x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1)
            initial_state = cache.state
        projected = self._project(x)
        o, final = self._attend(projected, initial_state, cache is not None, cu_seqlens)
        if cache is not None:
            cache.advance(final, x.shape[1] if cu_seqlens is None else cu_seqlens[1:] - cu_seqlens[:-1])
        y = self._finish(o, projected)
        return y.squeeze(0) if packed_2d else y

    def step(self, x_t: Tensor, cache: RecurrentCache) -> Tensor:
        """One token per sequence: x_t ``[B, C]`` -> y_t ``[B, C]``, equal to ``forward`` on that token with the
        same cache; the cache's state advances by one token. Differentiable."""
        check_input(x_t, self.embed_dim, (2,), "[B, C] (one token per sequence)")
        check_cache(cache, RecurrentCache, self, x_t.shape[0])
        projected = self._project(x_t)
        o, state = self._attend_step(projected, cache.state)
        cache.advance(state, 1)
        return self._finish(o, projected)


def _kv_heads(num_heads: int, num_kv_heads: Optional[int]) -> int:
    """num_kv_heads checked: a divisor of num_heads (default: num_heads)."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    return num_kv_heads


def _lasp2(cp_group, cu_seqlens, q, k, v, **kwargs):
    """The layers' context-parallel path (torch.distributed is imported only when it is used)."""
    from ..distributed import lasp2_attention

    if cu_seqlens is not None:
        raise ValueError("a layer with cp_group takes [B, T/P, C] shards, not packed input (cu_seqlens)")
    return lasp2_attention(q, k, v, group=cp_group, **kwargs)


class LightningAttention(_LinearAttentionLayer):
    """TransNormerLLM's token mixer (NormLinearAttention) on Lightning Attention-2.

    ``q = silu(x Wq)``, ``k = silu(x Wk)``, ``v = x Wv``, ``o = lightning_attention(q, k, v, slopes, scale=1)``;
    instead of scaling by a normalizer (q . sum k), the output is RMS-normalized over the heads ("The Devil
    in Linear Transformer"), multiplied by the output gate ``u = x Wu`` and projected: ``y = (norm(o) * u) Wo``.
    The per-head decay is fixed (an fp32 buffer, no gradient): :func:`flashops.lightning_slopes` for this layer.

    Args:
        embed_dim: model width C (``hidden_size=`` as in fla is accepted too). num_heads: query heads.
        num_kv_heads: key/value heads (GQA/MQA; a divisor of num_heads, default num_heads; ``num_heads_kv=`` is
            accepted too). The decay stays per query head, so the state keeps num_heads heads.
        head_dim: per-head width (default embed_dim / num_heads).
        layer_idx, num_layers: scale the decay per layer as TransNormerLLM does (later layers decay less).
        output_gate: multiply by ``x Wu`` before the output projection.
        norm_eps: RMSNorm epsilon. bias: biases in the projections.
        backend: forwarded to the ops (``"triton"``, ``"torch"`` or None for automatic).
        cp_group: a process group over which the sequence is sharded (context parallelism): ``forward`` then
            takes this rank's part ``[B, T/P, C]`` (zigzag layout) and runs LASP-2
            (:func:`flashops.distributed.lasp2_attention`).
    """

    fp32_names = ("slopes",)

    @accepts_aliases(hidden_size="embed_dim", num_heads_kv="num_kv_heads")
    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, layer_idx: int = 0,
                 num_layers: int = 1, output_gate: bool = True, norm_eps: float = 1e-5, bias: bool = False,
                 backend: Optional[str] = None, cp_group=None, device=None, dtype=None):
        super().__init__()
        self.cp_group = cp_group
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), "
                                 f"or pass head_dim")
            head_dim = embed_dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.num_kv_heads = _kv_heads(num_heads, num_kv_heads)
        self.state_heads = num_heads
        self.state_dims = (head_dim, head_dim)
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.output_gate = output_gate
        self.backend = backend
        inner = num_heads * head_dim
        # q, k, v (k and v with num_kv_heads heads) and the output gate u, in one projection
        self.split_sizes = (inner, *(2 * (self.num_kv_heads * head_dim,)), *((inner,) if output_gate else ()))
        self.qkvu_proj = nn.Linear(embed_dim, sum(self.split_sizes), bias=bias, **factory)
        self.norm = nn.RMSNorm(inner, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **factory)
        self.register_buffer("slopes", lightning_slopes(num_heads, layer_idx=layer_idx, num_layers=num_layers,
                                                        device=device), persistent=False)

    def _project(self, x: Tensor):
        parts = self.qkvu_proj(x).split(self.split_sizes, dim=-1)
        q = F.silu(parts[0]).unflatten(-1, (self.num_heads, self.head_dim))
        k = F.silu(parts[1]).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = parts[2].unflatten(-1, (self.num_kv_heads, self.head_dim))
        return q, k, v, (parts[3] if self.output_gate else None)

    def _attend(self, projected, initial_state, output_final_state, cu_seqlens):
        q, k, v, _ = projected
        options = dict(scale=1.0, initial_state=initial_state, output_final_state=output_final_state,
                       backend=self.backend)
        if self.cp_group is not None:
            return _lasp2(self.cp_group, cu_seqlens, q, k, v, slopes=self.slopes, **options)
        return lightning_attention(q, k, v, self.slopes, cu_seqlens=cu_seqlens, **options)

    def _attend_step(self, projected, state):
        q, k, v, _ = projected
        return lightning_attention_step(q, k, v, slopes=self.slopes, state=state, scale=1.0, backend=self.backend)

    def _finish(self, o: Tensor, projected) -> Tensor:
        gate = projected[3]
        o = self.norm(o.flatten(-2))
        if gate is not None:
            o = o * gate
        return self.out_proj(o)

    def extra_repr(self) -> str:
        return describe(embed_dim=self.embed_dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, layer_idx=self.layer_idx, num_layers=self.num_layers,
                        output_gate=self.output_gate, backend=self.backend)


class GatedLinearAttention(_LinearAttentionLayer):
    """The GLA layer (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training").

    ``q = x Wq``, ``k = x Wk`` (key width ``expand_k * C``), ``v = x Wv`` (``expand_v * C``), log-gates from a
    rank-``gate_low_rank_dim`` projection ``g = logsigmoid(x W1 W2 + b) / gate_logit_normalizer`` (computed
    in fp32), ``o = gated_linear_attention(q, k, v, g)`` with scale ``1/sqrt(head_k_dim)``, then a per-head
    RMSNorm, the swish output gate ``silu(x Wr)`` and the output projection.

    Args:
        embed_dim: model width C (``hidden_size=`` as in fla is accepted too). num_heads: query heads (key and
            value widths must divide by it).
        num_kv_heads: key, value and gate heads (GQA/MQA, as fla's ``num_kv_heads``: k, v and the gates are
            projected to ``num_kv_heads`` heads of the same head dims; a divisor of num_heads, default
            num_heads). The state follows the gates: ``[N, num_kv_heads, K, V]``.
        expand_k, expand_v: key / value widths (of the queries) as fractions of embed_dim.
        gate_low_rank_dim: rank of the gate projection. gate_logit_normalizer: divides the log-gates (16 keeps
            the gates close to 1 at initialization).
        norm_eps: RMSNorm epsilon. backend: forwarded to the ops.
        cp_group: shard the sequence over this process group (LASP-2), as in :class:`LightningAttention`.
    """

    @accepts_aliases(hidden_size="embed_dim", num_heads_kv="num_kv_heads")
    def __init__(self, embed_dim: int, num_heads: int = 4, *, num_kv_heads: Optional[int] = None,
                 expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5,
                 backend: Optional[str] = None, cp_group=None, device=None, dtype=None):
        super().__init__()
        self.cp_group = cp_group
        key_dim, value_dim = int(embed_dim * expand_k), int(embed_dim * expand_v)
        if embed_dim <= 0 or num_heads <= 0 or key_dim % num_heads or value_dim % num_heads or key_dim == 0:
            raise ValueError(f"key width {key_dim} and value width {value_dim} (embed_dim * expand_k/v) must be "
                             f"positive multiples of num_heads={num_heads}")
        if gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_kv_heads = self.state_heads = _kv_heads(num_heads, num_kv_heads)
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.state_dims = (self.head_k_dim, self.head_v_dim)
        kv_key_dim, kv_value_dim = self.num_kv_heads * self.head_k_dim, self.num_kv_heads * self.head_v_dim
        self.gate_low_rank_dim = gate_low_rank_dim
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.backend = backend
        self.q_proj = nn.Linear(embed_dim, key_dim, bias=False, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_key_dim, bias=False, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_value_dim, bias=False, **factory)
        self.g_proj = nn.Linear(embed_dim, value_dim, bias=False, **factory)
        self.gk_proj = nn.Sequential(nn.Linear(embed_dim, gate_low_rank_dim, bias=False, **factory),
                                     nn.Linear(gate_low_rank_dim, kv_key_dim, bias=True, **factory))
        self.g_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps, **factory)
        self.o_proj = nn.Linear(value_dim, embed_dim, bias=False, **factory)

    def _project(self, x: Tensor):
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_k_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_k_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_v_dim))
        g = F.logsigmoid(self.gk_proj(x).float()).unflatten(-1, (self.num_kv_heads, self.head_k_dim))
        g = g / self.gate_logit_normalizer
        return q, k, v, g, x

    def _attend(self, projected, initial_state, output_final_state, cu_seqlens):
        q, k, v, g, _ = projected
        options = dict(scale=self.head_k_dim ** -0.5, initial_state=initial_state,
                       output_final_state=output_final_state, backend=self.backend)
        if self.cp_group is not None:
            return _lasp2(self.cp_group, cu_seqlens, q, k, v, g=g, **options)
        return gated_linear_attention(q, k, v, g, cu_seqlens=cu_seqlens, **options)

    def _attend_step(self, projected, state):
        q, k, v, g, _ = projected
        return gated_linear_attention_step(q, k, v, g_t=g, state=state, scale=self.head_k_dim ** -0.5,
                                           backend=self.backend)

    def _finish(self, o: Tensor, projected) -> Tensor:
        x = projected[-1]
        o = self.g_norm(o) * F.silu(self.g_proj(x)).view(o.shape)
        return self.o_proj(o.flatten(-2))

    def extra_repr(self) -> str:
        return describe(embed_dim=self.embed_dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        head_k_dim=self.head_k_dim,
                        head_v_dim=self.head_v_dim, gate_low_rank_dim=self.gate_low_rank_dim,
                        gate_logit_normalizer=self.gate_logit_normalizer, backend=self.backend)


__all__ = ["LightningAttention", "GatedLinearAttention"]
