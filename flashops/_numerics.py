"""Numerics shared by the PyTorch paths: the compute dtype, and products that keep NaN/Inf contained.

A masked-out entry must never enter arithmetic: ``0 * nan`` is ``nan`` and ``0 * inf`` is ``nan``, so a
product ``p @ v`` whose masked entries of ``p`` are exact zeros still spreads a non-finite ``v_j`` into every
row, including the rows that must not see ``j``. :func:`masked_matmul` multiplies by ``v`` with its non-finite
entries zeroed and then marks NaN exactly the outputs whose row sees such an entry, so the other outputs are
bitwise those of an input without it. The paths call it only when an input is not all finite
(:func:`all_finite`): finite inputs take the plain product.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 stays fp64 (gradcheck runs the PyTorch paths in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(*tensors) -> bool:
    """Whether every given tensor (``None`` skipped) holds only finite values.

    A finite sum proves it in one reduction (a NaN or an Inf makes the sum NaN or Inf); only a sum that is not
    finite (a non-finite entry, or an overflow of finite ones) needs the entry-wise check."""
    def finite(t):
        total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())

    return all(finite(t) for t in tensors if t is not None)


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its NaN/Inf entries replaced by 0 (a select: no arithmetic touches them)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_matmul(p: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``p @ v`` where ``p`` is zero outside ``visible`` (broadcastable to ``p``) and a non-finite ``v[..., j, d]``
    reaches only the outputs ``[..., i, d]`` of rows i that see j; those become NaN."""
    finite = torch.isfinite(v)
    out = torch.matmul(p, torch.where(finite, v, torch.zeros((), dtype=v.dtype, device=v.device)))
    hits = torch.matmul(visible.to(v.dtype), (~finite).to(v.dtype))
    return out.masked_fill_(hits > 0, float("nan"))
