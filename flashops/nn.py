"""``flashops.nn``: the torch.nn modules of every op family."""

from .modules.attention import FlashSelfAttention, MultiheadAttention
from .modules.cache import KVCache
from .modules.hyper import HyperAttention
from .modules.linear import GatedLinearAttention, LightningAttention
from .modules.lla import LLACache, LocalLinearAttention
from .modules.ssm import LSSL, S4D

__all__ = ["MultiheadAttention", "FlashSelfAttention", "KVCache", "HyperAttention", "LightningAttention",
           "GatedLinearAttention", "LocalLinearAttention", "LLACache", "LSSL", "S4D"]
