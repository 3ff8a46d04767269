"""Test setup: Triton runs under its interpreter when there is no GPU; kernels use default configs; tests
parametrized with backend="cuda" run the CUDA kernels through the host emulator when there is no GPU."""

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


@pytest.fixture(autouse=True)
def _cuda_kernels_on_the_cpu(request, monkeypatch):
    """On a machine without a GPU, a test parametrized with backend="cuda" runs the CUDA kernels' own sources on
    CPU tensors through tests/tools/cuda_emulator (compiled by the host C++ compiler); on a GPU nothing changes."""
    callspec = getattr(request.node, "callspec", None)
    if ON_GPU or callspec is None or callspec.params.get("backend") != "cuda":
        return
    from flashops import _cuda

    from .tools import cuda_emulator

    reason = cuda_emulator.unavailable_reason()
    if reason:
        pytest.skip(f"cuda backend without a GPU needs the host emulator: {reason}")
    monkeypatch.setattr(_cuda, "_launch", cuda_emulator.shared().launch)
    real_reasons = _cuda.device_reasons
    monkeypatch.setattr(_cuda, "device_reasons",
                        lambda device: [] if torch.device(device).type == "cpu" else real_reasons(device))
