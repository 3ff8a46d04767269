"""Shared helpers of the ssm tests: backend skips with the backend's own reasons."""

import pytest
import torch

from flashops import _dispatch

# "cuda" runs csrc/cuda on a GPU, or on the CPU through the host emulator (tests/conftest.py).
BACKENDS = ["cuda", "triton", "torch"]
# The scans also have the C++ CPU backend (csrc/ssm/scan_cpu.cpp).
SCAN_BACKENDS = ["cuda", "triton", "cpp", "torch"]


def require(op: str, backend: str, device, dtype=torch.float32, **features):
    """Skip unless ``backend`` of ``op`` accepts (device, dtype); the skip names its reasons."""
    reasons = _dispatch.get(op, backend).supports(_dispatch.Request(torch.device(device), dtype, features))
    if reasons:
        pytest.skip(f"{op}/{backend}: " + "; ".join(reasons))


def pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x) if x.is_complex() else x
