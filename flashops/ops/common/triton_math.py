"""Constants and elementwise functions for Triton kernels.

Compiled Triton reads no Python globals except ``tl.constexpr`` ones, and libdevice calls do not run in the
interpreter: everything here is built from ``tl.exp2`` / ``tl.log2`` with exact limits at +-inf.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2


@triton.jit
def tanh(x):
    # 1 - 2 / (e^{2x} + 1)
    return 1.0 - 2.0 / (tl.exp2(x * (2 * LOG2E)) + 1.0)


@triton.jit
def softplus(x):
    # max(x, 0) + log(1 + exp(-|x|)): no overflow.
    return tl.maximum(x, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(x) * LOG2E)) * LN2


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))
