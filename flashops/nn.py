"""``flashops.nn``: the torch.nn modules of every op family."""

from .modules.lla import LLACache, LocalLinearAttention

__all__: list = ["LocalLinearAttention", "LLACache"]
