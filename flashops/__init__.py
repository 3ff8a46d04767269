"""flashops: fast attention and sequence-model kernels with autograd, references, modules and benchmarks."""

from .ops.attention import block_sparse_attention, flash_attention, flash_attention_varlen, sdpa
from .ops.linear import (gated_linear_attention, gated_linear_attention_step, lightning_attention,
                         lightning_attention_step, lightning_slopes, linear_attention)

__version__ = "0.1.0"

__all__ = ["flash_attention", "flash_attention_varlen", "block_sparse_attention", "sdpa",
           "lightning_attention", "gated_linear_attention", "linear_attention", "lightning_attention_step",
           "gated_linear_attention_step", "lightning_slopes"]
