"""State-space models: HiPPO matrices, discretization, LSSL / S4 / S4D convolution kernels, FFT convolution,
linear and selective scans, and the recurrent step API.

Dispatched ops with Triton and PyTorch backends (forward and backward as custom ops): ``linear_scan``,
``selective_scan``, ``vandermonde_kernel`` and ``cauchy_kernel``. Everything else is plain differentiable
PyTorch built on them. See docs/ssm.md.
"""

from .convolution import cauchy_kernel, dplr_kernel, fft_conv, krylov, krylov_kernel, s4d_kernel, vandermonde_kernel
from .discretization import METHODS, discretize
from .hippo import (
                          MEASURES,
                          S4D_INITS,
                          basis_kernels,
                          init_dt_bias,
                          init_log_dt,
                          inverse_softplus,
                          nplr,
                          rank_correction,
                          s4d_init,
                          transition,
)
from .scans import linear_scan, selective_scan, selective_state_update
from .step import SSMStep, default_state, forward_state, setup_step, state_output, step

__all__ = [
    "linear_scan", "selective_scan", "selective_state_update",
    "vandermonde_kernel", "s4d_kernel", "cauchy_kernel", "dplr_kernel", "krylov", "krylov_kernel", "fft_conv",
    "transition", "rank_correction", "nplr", "s4d_init", "basis_kernels", "init_log_dt", "init_dt_bias",
    "inverse_softplus", "MEASURES", "S4D_INITS",
    "discretize", "METHODS",
    "SSMStep", "setup_step", "default_state", "step", "forward_state", "state_output",
]
