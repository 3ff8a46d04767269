"""Linear-attention layers: TransNormerLLM's Lightning Attention block and the GLA layer.

Both take ``x [B, T, hidden]`` (or packed ``[1, total_T, hidden]`` with ``cu_seqlens``), return
``(y, final_state)`` (final_state None unless asked for) and have a ``step`` method for generation that
feeds one token per call through the recurrent op and gives the same outputs as ``forward``.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.linear import (gated_linear_attention, gated_linear_attention_step, lightning_attention,
                          lightning_attention_step, lightning_slopes)


def _check_hidden(x: Tensor, hidden_size: int, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[-1] != hidden_size:
        raise ValueError(f"x must have shape {layout} with hidden={hidden_size}, got {tuple(x.shape)}")


def _lasp2(cp_group, cu_seqlens, q, k, v, **kwargs):
    """The layers' context-parallel path (torch.distributed is imported only when it is used)."""
    from ..distributed import lasp2_attention

    if cu_seqlens is not None:
        raise ValueError("a layer with cp_group takes [B, T/P, hidden] shards, not packed input (cu_seqlens)")
    return lasp2_attention(q, k, v, group=cp_group, **kwargs)


class LightningAttention(nn.Module):
    """TransNormerLLM's token mixer (NormLinearAttention) on Lightning Attention-2.

    ``q = silu(x Wq)``, ``k = silu(x Wk)``, ``v = x Wv``, ``o = lightning_attention(q, k, v, slopes, scale=1)``;
    instead of scaling by a normalizer (q . sum k), the output is RMS-normalized over the heads ("The Devil
    in Linear Transformer"), multiplied by the output gate ``u = x Wu`` and projected: ``y = (norm(o) * u) Wo``.
    The per-head decay is fixed (a buffer, no gradient): :func:`flashops.lightning_slopes` for this layer.

    Args:
        hidden_size: model width. num_heads: heads. head_dim: per-head width (default hidden_size / num_heads).
        layer_idx, num_layers: scale the decay per layer as TransNormerLLM does (later layers decay less).
        output_gate: multiply by ``x Wu`` before the output projection.
        norm_eps: RMSNorm epsilon. bias: biases in the projections.
        backend: forwarded to the ops (``"triton"``, ``"torch"`` or None for automatic).
        cp_group: a process group over which the sequence is sharded (context parallelism): ``forward`` then
            takes this rank's part ``[B, T/P, hidden]`` (zigzag layout) and runs LASP-2
            (:func:`flashops.distributed.lasp2_attention`).
    """

    def __init__(self, hidden_size: int, num_heads: int, *, head_dim: Optional[int] = None, layer_idx: int = 0,
                 num_layers: int = 1, output_gate: bool = True, norm_eps: float = 1e-5, bias: bool = False,
                 backend: Optional[str] = None, cp_group=None, device=None, dtype=None):
        super().__init__()
        self.cp_group = cp_group
        if hidden_size <= 0 or num_heads <= 0:
            raise ValueError(f"hidden_size and num_heads must be positive, got {hidden_size} and {num_heads}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), "
                                 f"or pass head_dim")
            head_dim = hidden_size // num_heads
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.output_gate = output_gate
        self.backend = backend
        inner = num_heads * head_dim
        self.qkvu_proj = nn.Linear(hidden_size, (4 if output_gate else 3) * inner, bias=bias, **factory)
        self.norm = nn.RMSNorm(inner, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(inner, hidden_size, bias=bias, **factory)
        self.register_buffer("slopes", lightning_slopes(num_heads, layer_idx=layer_idx, num_layers=num_layers,
                                                        device=device), persistent=False)

    def _project(self, x: Tensor):
        parts = self.qkvu_proj(x).chunk(4 if self.output_gate else 3, dim=-1)
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        q = F.silu(parts[0]).view(shape)
        k = F.silu(parts[1]).view(shape)
        v = parts[2].view(shape)
        return q, k, v, (parts[3] if self.output_gate else None)

    def _finish(self, o: Tensor, gate: Optional[Tensor]) -> Tensor:
        o = self.norm(o.flatten(-2))
        if gate is not None:
            o = o * gate
        return self.out_proj(o)

    def forward(self, x: Tensor, *, initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """x ``[B, T, hidden]`` -> ``(y [B, T, hidden], final_state fp32 [N, H, D, D] or None)``."""
        _check_hidden(x, self.hidden_size, 3, "[B, T, hidden]")
        q, k, v, gate = self._project(x)
        if self.cp_group is not None:
            o, state = _lasp2(self.cp_group, cu_seqlens, q, k, v, slopes=self.slopes, scale=1.0,
                              initial_state=initial_state, output_final_state=output_final_state, backend=self.backend)
        else:
            o, state = lightning_attention(q, k, v, self.slopes, scale=1.0, initial_state=initial_state,
                                           output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                           backend=self.backend)
        return self._finish(o, gate), state

    def step(self, x_t: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One token: x_t ``[B, hidden]``, state fp32 ``[B, H, D, D]`` (None = empty) -> ``(y_t, new_state)``."""
        _check_hidden(x_t, self.hidden_size, 2, "[B, hidden]")
        q, k, v, gate = self._project(x_t)
        o, state = lightning_attention_step(q, k, v, state, self.slopes, scale=1.0, backend=self.backend)
        return self._finish(o, gate), state


class GatedLinearAttention(nn.Module):
    """The GLA layer (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training").

    ``q = x Wq``, ``k = x Wk`` (key width ``expand_k * hidden``), ``v = x Wv`` (``expand_v * hidden``),
    log-gates from a rank-``gate_low_rank_dim`` projection ``g = logsigmoid(x W1 W2 + b) / gate_logit_normalizer``
    (computed in fp32), ``o = gated_linear_attention(q, k, v, g)`` with scale ``1/sqrt(head_k_dim)``, then a
    per-head RMSNorm, the swish output gate ``silu(x Wr)`` and the output projection.

    Args:
        hidden_size: model width. num_heads: heads (key and value widths must divide by it).
        expand_k, expand_v: key / value widths as fractions of hidden_size.
        gate_low_rank_dim: rank of the gate projection. gate_logit_normalizer: divides the log-gates (16 keeps
            the gates close to 1 at initialization).
        norm_eps: RMSNorm epsilon. backend: forwarded to the ops.
        cp_group: shard the sequence over this process group (LASP-2), as in :class:`LightningAttention`.
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, *, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5,
                 backend: Optional[str] = None, cp_group=None, device=None, dtype=None):
        super().__init__()
        self.cp_group = cp_group
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if hidden_size <= 0 or num_heads <= 0 or key_dim % num_heads or value_dim % num_heads or key_dim == 0:
            raise ValueError(f"key width {key_dim} and value width {value_dim} (hidden_size * expand_k/v) must be "
                             f"positive multiples of num_heads={num_heads}")
        if gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False, **factory)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False, **factory)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False, **factory),
                                     nn.Linear(gate_low_rank_dim, key_dim, bias=True, **factory))
        self.g_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps, **factory)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False, **factory)

    def _project(self, x: Tensor):
        heads = (*x.shape[:-1], self.num_heads)
        q = self.q_proj(x).view(*heads, self.head_k_dim)
        k = self.k_proj(x).view(*heads, self.head_k_dim)
        v = self.v_proj(x).view(*heads, self.head_v_dim)
        g = F.logsigmoid(self.gk_proj(x).float()).view(*heads, self.head_k_dim) / self.gate_logit_normalizer
        return q, k, v, g

    def _finish(self, o: Tensor, x: Tensor) -> Tensor:
        o = self.g_norm(o) * F.silu(self.g_proj(x)).view(o.shape)
        return self.o_proj(o.flatten(-2))

    def forward(self, x: Tensor, *, initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """x ``[B, T, hidden]`` -> ``(y [B, T, hidden], final_state fp32 [N, H, Dk, Dv] or None)``."""
        _check_hidden(x, self.hidden_size, 3, "[B, T, hidden]")
        q, k, v, g = self._project(x)
        if self.cp_group is not None:
            o, state = _lasp2(self.cp_group, cu_seqlens, q, k, v, g=g, scale=self.head_k_dim ** -0.5,
                              initial_state=initial_state, output_final_state=output_final_state, backend=self.backend)
        else:
            o, state = gated_linear_attention(q, k, v, g, scale=self.head_k_dim ** -0.5, initial_state=initial_state,
                                              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                              backend=self.backend)
        return self._finish(o, x), state

    def step(self, x_t: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One token: x_t ``[B, hidden]``, state fp32 ``[B, H, Dk, Dv]`` (None = empty) -> ``(y_t, new_state)``."""
        _check_hidden(x_t, self.hidden_size, 2, "[B, hidden]")
        q, k, v, g = self._project(x_t)
        o, state = gated_linear_attention_step(q, k, v, state, g, scale=self.head_k_dim ** -0.5,
                                               backend=self.backend)
        return self._finish(o, x_t), state


__all__ = ["LightningAttention", "GatedLinearAttention"]
