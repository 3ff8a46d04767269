"""``flashops.nn``: the torch.nn modules of every op family."""

from .modules.attention import FlashSelfAttention, MultiheadAttention

__all__ = ["MultiheadAttention", "FlashSelfAttention"]
