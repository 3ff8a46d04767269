"""``flashops.nn``: the torch.nn modules of every op family."""

from .modules.linear import GatedLinearAttention, LightningAttention

__all__: list = ["LightningAttention", "GatedLinearAttention"]
