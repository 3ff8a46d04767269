"""Shared helpers of the ssm tests."""

import torch

from ..helpers import BACKENDS as TRITON_AND_TORCH

# "cuda" runs csrc/cuda on a GPU, or on the CPU through the host emulator (tests/conftest.py).
BACKENDS = ["cuda", *TRITON_AND_TORCH]
# The scans also have the C++ CPU backend (csrc/ssm/scan_cpu.cpp).
SCAN_BACKENDS = ["cuda", "triton", "cpp", "torch"]


def pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x) if x.is_complex() else x
