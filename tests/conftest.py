"""Test setup: Triton runs under its interpreter when there is no GPU; kernels use default configs."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Autotuning every shape of the test matrix would take longer than the tests themselves.
os.environ.setdefault("FLASHOPS_AUTOTUNE", "0")

import pytest  # noqa: E402

if os.environ.get("FLASHOPS_RECORD_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
    from .tools.triton_launches import install_recorder

    install_recorder(os.environ["FLASHOPS_RECORD_LAUNCHES"])

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
if not ON_GPU:
    # Test tensors are small and pytest-xdist runs one worker per core: intra-op threads only contend.
    torch.set_num_threads(1)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
