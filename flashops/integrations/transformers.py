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

import weakref
from typing import Optional

import torch

from ..ops.attention import flash_attention, flash_attention_with_kvcache, sdpa

# Not "flashops": transformers sends every implementation whose name contains "flash" to its flash-attn
# kernel loader (seen with transformers 5.23).
NAME = "fops"
# Calls with at most this many queries after a cached prefix are decode steps (plain, assisted or speculative
# decoding) and run on flash_attention_with_kvcache; longer ones are prefills.
DECODE_MAX_QUERIES = 16


def _visible_ranges(mask: torch.Tensor, t_q: int, t_k: int):
    """(first visible key of the first query, last visible key + 1 of the last query), int32 [B] each, of a
    bool ``[B, 1, Tq, >= Tk]`` mask; None for other masks."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] not in (1, t_q):
        return None
    first, last = mask[:, 0, 0, :t_k], mask[:, 0, -1, :t_k]
    leftpad = first.to(torch.int32).argmax(-1).to(torch.int32)
    end = (t_k - last.flip(-1).to(torch.int32).argmax(-1)).to(torch.int32)
    return leftpad, end


def _implied_mask(leftpad, end, t_q: int, t_k: int, window_left: int):
    """[B, Tq, Tk]: what flash_attention_with_kvcache attends to for these ranges (causal, bottom-right)."""
    j = torch.arange(t_k, device=end.device)
    position = (end[:, None] - t_q + torch.arange(t_q, device=end.device))[:, :, None]  # [B, Tq, 1]
    visible = (j >= leftpad[:, None, None]) & (j <= position)
    return visible & (j >= position - window_left) if window_left >= 0 else visible


# The last mask checked per window: transformers builds one mask per step and hands it to every layer, so the
# check (a host synchronization on a GPU) runs once per step, not once per layer.
_CHECKED: dict = {}


def _mask_is_ranges(mask, leftpad, end, t_q: int, t_k: int, window_left: int) -> bool:
    """Whether ``mask`` is exactly the implied mask of the ranges. Skipped (trusted) while tracing or capturing
    a CUDA graph, where it would need a host synchronization; generate()'s masks (causal, left padding,
    sliding window) always are."""
    if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    key = (window_left, t_q, t_k)
    seen = _CHECKED.get(key)
    if seen is not None and seen[0]() is mask and seen[1] == mask._version:
        return seen[2]
    verdict = bool(torch.equal(mask[:, 0, :, :t_k].expand(-1, t_q, -1), _implied_mask(leftpad, end, t_q, t_k,
                                                                                           window_left)))
    _CHECKED[key] = (weakref.ref(mask), mask._version, verdict)
    return verdict


def _decode_step(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, softcap):
    """A decode step (at most DECODE_MAX_QUERIES queries after a cached prefix, causal, inference) through
    flash_attention_with_kvcache: out ``[B, Tq, H, D]``. None when the call is not one, or when its mask is not
    "left padding + causal (+ sliding window)", which the op expresses as per-sequence key ranges."""
    t_q, t_k = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if not causal or dropout or needs_grad or t_q > DECODE_MAX_QUERIES or t_k <= t_q:
        return None
    window_left = sliding_window - 1 if sliding_window else -1
    leftpad, end = None, t_k
    if attention_mask is not None:
        ranges = _visible_ranges(attention_mask, t_q, t_k)
        if ranges is None or not _mask_is_ranges(attention_mask, *ranges, t_q, t_k, window_left):
            return None
        leftpad, end = ranges
    # The keys are already in the cache (transformers updated it): nothing to append.
    return flash_attention_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                        cache_seqlens=end, cache_leftpad=leftpad, softmax_scale=scaling,
                                        window_size=(window_left, -1), softcap=softcap or 0.0)


def flashops_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. ``query`` ``[B, H, T, D]``, ``key``/``value`` ``[B, Hkv, S, D]``.

    Returns ``(out [B, T, H, D], None)`` like the built-in implementations. Decode steps (a few queries after
    the cached keys, with no mask or a causal + left-padding + sliding-window one) run on
    :func:`flashops.flash_attention_with_kvcache` over the cache buffers transformers passes (dynamic or
    static). Otherwise: with an ``attention_mask`` (bool True = attend, or additive float, ``[B, 1, T, S]``)
    the mask carries causality, padding and the sliding window, as for SDPA; logit soft-capping still applies.
    Without one, causal attention is aligned bottom-right (correct with a KV cache, as in the flash-attention
    integration), with ``sliding_window`` and ``softcap`` passed to the kernel. Query rows that see no key
    (padding) give zeros.
    """
    decoded = _decode_step(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window,
                           softcap)
    if decoded is not None:
        return decoded, None
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
