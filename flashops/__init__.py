"""flashops: fast attention and sequence-model kernels with autograd, references, modules and benchmarks."""

import importlib

from . import nn  # noqa: F401  (flashops.nn: the modules)
from .ops.attention import (
    block_sparse_attention,
    flash_attention,
    flash_attention_varlen,
    flash_attention_with_kvcache,
    sdpa,
)
from .ops.hyper import hyper_attention, hyper_attention_plan
from .ops.linear import (
    gated_linear_attention,
    gated_linear_attention_step,
    lightning_attention,
    lightning_attention_step,
    lightning_slopes,
    linear_attention,
)
from .ops.lla import local_linear_attention, local_linear_attention_decode
from .ops.ssm import (
    cauchy_kernel,
    dplr_kernel,
    fft_conv,
    krylov_kernel,
    linear_scan,
    s4d_kernel,
    selective_scan,
    selective_state_update,
    vandermonde_kernel,
)

__version__ = "0.1.0"


__all__ = [
    "flash_attention", "flash_attention_varlen", "block_sparse_attention", "sdpa", "flash_attention_with_kvcache",
    "hyper_attention", "hyper_attention_plan",
    "lightning_attention", "gated_linear_attention", "linear_attention", "lightning_attention_step",
    "gated_linear_attention_step", "lightning_slopes",
    "local_linear_attention", "local_linear_attention_decode",
    "linear_scan", "selective_scan", "selective_state_update", "vandermonde_kernel", "s4d_kernel",
    "cauchy_kernel", "dplr_kernel", "krylov_kernel", "fft_conv",
]


def __getattr__(name: str):
    # Subpackages load on first access: flashops.integrations (optional dependencies such as transformers) and
    # flashops.distributed (it imports torch.distributed).
    if name in ("integrations", "distributed"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
