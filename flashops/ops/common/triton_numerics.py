"""Triton counterparts of ``flashops._numerics``: a product that keeps NaN/Inf out of masked-out entries.

Inside a tile that straddles a mask, the masked entries of ``p`` are exact zeros, yet ``tl.dot(p, v)`` still
computes ``0 * v_j``, which is NaN for a NaN or infinite ``v_j``, in every row. :func:`masked_dot` runs the
product on ``v`` with its non-finite entries zeroed (a select) and, only when the tile has one, marks NaN
exactly the outputs whose row sees it; all other outputs are bitwise those of an input without it.
"""

import triton
import triton.language as tl


@triton.jit
def masked_dot(p, v, visible, acc, DOT: tl.constexpr):
    """``acc + p @ v`` for ``p`` [M, N] that is 0 outside ``visible`` [M, N] and ``v`` [N, D]: a non-finite
    ``v[j, d]`` reaches only ``out[i, d]`` of rows i that see j (as NaN), never the other rows."""
    finite = tl.abs(v.to(tl.float32)) < float("inf")
    acc = tl.dot(p.to(v.dtype), tl.where(finite, v, 0.0).to(v.dtype), acc, input_precision=DOT)
    if tl.min(finite.to(tl.int32)) == 0:  # rare: the tile holds a NaN/Inf
        hits = tl.dot(visible.to(v.dtype), tl.where(finite, 0.0, 1.0).to(v.dtype), input_precision=DOT)
        acc = tl.where(hits > 0, float("nan"), acc)
    return acc
