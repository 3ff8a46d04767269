"""Shared helpers of the ssm tests."""

import torch

# The scans also have the C++ CPU backend (csrc/ssm/scan_cpu.cpp).
SCAN_BACKENDS = ["triton", "cpp", "torch"]


def pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x) if x.is_complex() else x
