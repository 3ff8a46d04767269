"""The tolerance rule shared by tests and benchmarks.

Low precision (fp16/bf16): a kernel's error against the fp32 reference may be at most ``factor`` times the
error of the same reference run in the input dtype, plus a tiny absolute floor. The factor is 2 for forward
outputs and 3-5 for gradients (DESIGN.md). fp32 inputs: a tight absolute + relative bound.

Errors are max-abs over the tensor. NaN or Inf where the reference is finite always fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 4.0
# Scaled by max|reference| so that the floor means the same for tiny and large outputs.
FLOORS = {torch.float16: 1e-4, torch.bfloat16: 5e-4, torch.float32: 2e-5, torch.float64: 1e-10}
FP32_RTOL = 1e-4


@dataclass
class Comparison:
    name: str
    error: float  # max |actual - reference|
    bound: float
    baseline_error: float | None  # max |lowp reference - reference|, when the rule uses one

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        base = "" if self.baseline_error is None else f", same-dtype reference error {self.baseline_error:.3g}"
        return f"{self.name}: error {self.error:.3g} vs bound {self.bound:.3g}{base}"


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| in float64; inf when actual is non-finite where the reference is finite."""
    a = actual.detach().to(torch.float64)
    r = reference.detach().to(torch.float64)
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: actual {tuple(a.shape)} vs reference {tuple(r.shape)}")
    if a.numel() == 0:
        return 0.0
    bad = ~torch.isfinite(a) & torch.isfinite(r)
    if bool(bad.any()):
        return float("inf")
    both = torch.isfinite(a) & torch.isfinite(r)
    # Non-finite in both (e.g. -inf log-sum-exp of an empty row) must agree exactly.
    if bool((~both & (a != r) & ~(a.isnan() & r.isnan())).any()):
        return float("inf")
    if not bool(both.any()):
        return 0.0
    return float((a - r)[both].abs().max())


def compare(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    factor: float = FORWARD_FACTOR,
    dtype: torch.dtype | None = None,
) -> Comparison:
    """Apply the rule. ``reference`` is the fp32/fp64 oracle; ``baseline`` the same oracle in the input dtype."""
    dtype = dtype or actual.dtype
    error = max_abs_error(actual, reference)
    finite = reference.detach()[torch.isfinite(reference.detach())]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    floor = FLOORS.get(dtype, 1e-5) * max(scale, 1.0)
    if dtype in (torch.float32, torch.float64) or baseline is None:
        rtol = FP32_RTOL if dtype == torch.float32 else (1e-9 if dtype == torch.float64 else 1e-2)
        return Comparison(name, error, floor + rtol * scale, None)
    baseline_error = max_abs_error(baseline, reference)
    return Comparison(name, error, factor * baseline_error + floor, baseline_error)


def assert_close(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    factor: float = FORWARD_FACTOR,
    dtype: torch.dtype | None = None,
) -> Comparison:
    """``compare`` and raise AssertionError with the numbers when the rule fails."""
    result = compare(name, actual, reference, baseline, factor=factor, dtype=dtype)
    if not result.ok:
        raise AssertionError(str(result))
    return result
