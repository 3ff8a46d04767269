"""What every Triton backend shares: is Triton usable here, interpreter mode, autotune config lists."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once at import (without importing triton) so that backend selection stays cheap and
# traceable by torch.compile.
_TRITON_MISSING = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def triton_import_error() -> str | None:
    return _TRITON_MISSING


def triton_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Reasons a Triton kernel cannot run on ``device`` with ``dtype`` (empty: it can)."""
    error = triton_import_error()
    if error:
        return [error]
    device = torch.device(device)
    reasons = []
    if dtype == torch.float64:
        reasons.append("float64 runs on the torch backend (the Triton kernels compute in fp16, bf16 or fp32)")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            reasons.append("bfloat16 needs a GPU of compute capability >= 8.0")
    elif device.type == "cpu":
        if not interpreter_enabled():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
        elif dtype == torch.bfloat16:
            # The interpreter stores bfloat16 as uint16 in numpy and computes garbage with it.
            reasons.append("the Triton interpreter cannot compute in bfloat16")
    else:
        reasons.append(f"device type {device.type!r} is not supported by Triton here")
    return reasons


def configs(full: list, interpreted: list | None = None) -> list:
    """Autotune candidates: the full list on a GPU (its first entry alone when FLASHOPS_AUTOTUNE=0),
    one cheap config under the interpreter."""
    if interpreter_enabled():
        return interpreted if interpreted is not None else full[:1]
    return full if autotune_enabled() else full[:1]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs get 3xTF32 (about fp32 accuracy), half types use tensor cores."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def autotune_enabled() -> bool:
    """FLASHOPS_AUTOTUNE=0 runs each kernel's default config (quick compiles, e.g. for test suites)."""
    return os.environ.get("FLASHOPS_AUTOTUNE", "1") not in ("0", "false", "False")
