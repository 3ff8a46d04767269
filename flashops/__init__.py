"""flashops: fast attention and sequence-model kernels with autograd, references, modules and benchmarks."""

from . import nn
from .ops.attention import block_sparse_attention, flash_attention, flash_attention_varlen, sdpa
from .ops.hyper import hyper_attention, hyper_attention_plan

__version__ = "0.1.0"

__all__ = [
    "flash_attention", "flash_attention_varlen", "block_sparse_attention", "sdpa", "hyper_attention",
    "hyper_attention_plan",
]
