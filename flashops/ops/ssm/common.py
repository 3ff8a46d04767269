"""Shapes that every backend of the ssm family agrees on (the custom ops' fake kernels need them too)."""

from __future__ import annotations

import torch


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def state_spacing(n_state: int) -> int:
    """Every how many steps ``selective_scan`` saves its state for the backward pass: the Triton time tile,
    chosen from N alone so that the saved tensor ``[B, D, N, ceil(L / spacing)]`` has a known shape.
    Larger N gets shorter tiles (the kernels hold ``channels x N x spacing`` values in registers)."""
    block_n = next_power_of_2(n_state)
    return 32 if block_n <= 32 else (16 if block_n <= 64 else 8)


def fresh(t: torch.Tensor) -> torch.Tensor:
    """A custom op must return tensors that own their storage: a view (e.g. ``view_as_real`` of a complex
    result) is rebuilt from its base under AOT tracing with the wrong element size. Copy views only."""
    return t if t._base is None else t.clone()


def contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """A fake kernel's gradient: an empty tensor like ``t``, contiguous."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)
