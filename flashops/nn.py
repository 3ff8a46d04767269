"""``flashops.nn``: the torch.nn modules of every op family."""

from .modules.attention import FlashSelfAttention, MultiheadAttention
from .modules.hyper import HyperAttention

__all__ = ["MultiheadAttention", "FlashSelfAttention", "HyperAttention"]
