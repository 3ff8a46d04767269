"""Hugging Face transformers integration: an attention function with the ``AttentionInterface`` signature.

    import flashops.integrations.transformers as fo_hf
    fo_hf.register()                      # registers "fops"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fops")

transformers builds attention masks only for implementations registered in its ``AttentionMaskInterface``;
:func:`register` registers ours there with SDPA's mask builder, so a padded batch reaches the function as a
boolean ``[B, 1, T, S]`` mask (causality, padding and any sliding window in it), and plain causal attention
as no mask at all. transformers is optional: this module imports it only inside :func:`register`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.attention import flash_attention, sdpa

# Not "flashops": transformers sends every implementation whose name contains "flash" to its flash-attn
# kernel loader (seen with transformers 5.23).
NAME = "fops"


def flashops_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. ``query`` ``[B, H, T, D]``, ``key``/``value`` ``[B, Hkv, S, D]``.

    Returns ``(out [B, T, H, D], None)`` like the built-in implementations. With an ``attention_mask`` (bool
    True = attend, or additive float, ``[B, 1, T, S]``) the mask carries causality, padding and the sliding
    window, as for SDPA; logit soft-capping still applies. Without one, causal attention is aligned
    bottom-right (correct with a KV cache, as in the flash-attention integration), with ``sliding_window``
    and ``softcap`` passed to the kernel. Query rows that see no key (padding) give zeros.
    """
    if attention_mask is not None:
        return _masked_attention(query, key, value, attention_mask, dropout, scaling, softcap), None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(is_causal) and query.shape[2] > 1
    window = (sliding_window - 1, -1) if sliding_window else (-1, -1)
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                          softmax_scale=scaling, window_size=window, softcap=softcap or 0.0, dropout_p=dropout)
    return out, None


def _masked_attention(query, key, value, attention_mask, dropout, scaling, softcap) -> torch.Tensor:
    """Attention under transformers' 4-D mask (bool or additive float, ``[B, 1|H, T, >=S]``), logits
    soft-capped before the mask is added (as in transformers' eager Gemma-2) -> ``[B, T, H, D]``."""
    mask = attention_mask[:, :, :, : key.shape[-2]]  # a static cache's mask may be longer than its keys
    out = sdpa(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
               enable_gqa=key.shape[1] != query.shape[1], softcap=softcap or 0.0)
    return out.transpose(1, 2).contiguous()


def register(name: str = NAME) -> str:
    """Register :func:`flashops_attention_forward` in transformers' ``AttentionInterface`` under ``name``, and
    SDPA's mask builder for ``name`` in its ``AttentionMaskInterface`` (without it transformers passes no mask
    at all, and a padded batch would attend to its padding)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, flashops_attention_forward)
    try:  # transformers >= 4.53 builds no mask at all for an implementation without a mask function
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        pass
    else:  # the function above takes SDPA's masks (bool, True = attend; None = plain causal)
        AttentionMaskInterface.register(name, sdpa_mask)
    return name
