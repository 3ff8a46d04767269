"""``swap_attention``: put flashops attention into a model that was built without it."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .attention import MultiheadAttention


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` without torch's fused inference path.

    In eval mode torch's layer hands its attention weights to one fused kernel
    (``torch._transformer_encoder_layer_fwd``) and never calls ``self_attn``, so a flashops attention module
    there would be skipped. This layer always runs the module path: the same math, the same parameters and
    state dict, ``self_attn`` called in training and in eval. :func:`swap_attention` converts layers to it.
    """

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


def _flashops_multihead_attention(old: nn.MultiheadAttention) -> MultiheadAttention:
    """A flashops MultiheadAttention holding ``old``'s parameters (the same Parameter objects, so an optimizer
    made before the swap keeps training them), submodules, hooks and mode."""
    new = MultiheadAttention(old.embed_dim, old.num_heads, dropout=old.dropout, bias=old.in_proj_bias is not None,
                             add_bias_kv=old.bias_k is not None, add_zero_attn=old.add_zero_attn, kdim=old.kdim,
                             vdim=old.vdim, batch_first=old.batch_first, device="meta")
    new.__dict__.update(old.__dict__)
    return new


def swap_attention(model: nn.Module) -> nn.Module:
    """Make ``model`` run its attention on flashops, in place; returns ``model`` (given a bare
    ``nn.MultiheadAttention``, returns its flashops replacement).

    - Every ``torch.nn.MultiheadAttention`` (that exact class; subclasses may have their own forward) becomes
      :class:`flashops.nn.MultiheadAttention`, a drop-in with the same parameters, state dict and results.
    - Every ``torch.nn.TransformerEncoderLayer`` becomes :class:`TransformerEncoderLayer` (no fused fast path
      that would bypass the attention module in eval mode), and every ``torch.nn.TransformerEncoder`` stops
      converting padded batches to nested tensors. ``TransformerDecoderLayer`` has no fast path: its two
      attention modules are swapped like any other.
    - A Hugging Face transformers model (anything with ``set_attn_implementation``) switches to the flashops
      attention function, registered by :func:`flashops.integrations.transformers.register`.

    Example:
        >>> model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 8, batch_first=True), 6)
        >>> model = flashops.nn.swap_attention(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "set_attn_implementation"):
        from ..integrations import transformers as hf

        model.set_attn_implementation(hf.register())
    if type(model) is nn.MultiheadAttention:
        return _flashops_multihead_attention(model)
    for module in list(model.modules()):
        if type(module) is nn.TransformerEncoderLayer:
            module.__class__ = TransformerEncoderLayer  # adds no state: only forward differs
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        for name, child in list(module.named_children()):
            if type(child) is nn.MultiheadAttention:
                setattr(module, name, _flashops_multihead_attention(child))
    return model
