"""What the test files share: the backends to parametrize over, skipping a backend that declines (with its own
reasons), and comparing an op's outputs and gradients with its reference under the tolerance rule."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from flashops import _dispatch
from flashops.testing import FORWARD_FACTOR, GRAD_FACTOR, assert_close

from .conftest import DEVICE

BACKENDS = ["triton", "torch"]


def require(op: str, backend: str, dtype: torch.dtype = torch.float32, device=DEVICE, **features) -> None:
    """Skip unless ``backend`` of ``op`` accepts (device, dtype, features); the skip names its reasons."""
    reasons = _dispatch.get(op, backend).supports(_dispatch.Request(torch.device(device), dtype, features))
    if reasons:
        pytest.skip(f"{op}/{backend}: " + "; ".join(reasons))


def assert_all_close(actual: dict, oracle: dict, baseline: Optional[dict], dtype: torch.dtype) -> None:
    """Every named output and gradient (names starting with "d") against the fp32 oracle. ``baseline`` is the
    reference run in the input dtype, the tolerance rule's yardstick for half types (None for fp32)."""
    for name, value in actual.items():
        factor = GRAD_FACTOR if name.startswith("d") else FORWARD_FACTOR
        assert_close(name, value, oracle[name], baseline[name] if baseline is not None else None, factor=factor,
                     dtype=dtype)
