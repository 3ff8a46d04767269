"""``flashops.nn``: the torch.nn modules of every op family, their decoding caches, and ``swap_attention``."""

from .modules.attention import FlashSelfAttention, MultiheadAttention
from .modules.cache import Cache, KVCache, RecurrentCache
from .modules.hyper import HyperAttention
from .modules.linear import GatedLinearAttention, LightningAttention
from .modules.lla import LLACache, LocalLinearAttention
from .modules.ssm import LSSL, S4D, SSMCache
from .modules.swap import swap_attention

__all__ = ["MultiheadAttention", "FlashSelfAttention", "HyperAttention", "LightningAttention",
           "GatedLinearAttention", "LocalLinearAttention", "LSSL", "S4D",
           "Cache", "KVCache", "RecurrentCache", "LLACache", "SSMCache", "swap_attention"]
