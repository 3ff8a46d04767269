"""Counter-based dropout mask shared bit-for-bit by every attention backend.

keep(seed, bh, i, j) is a pure function of the seed, the (batch * heads + head) index and the query/key
positions, so the backward pass (and a test building a reference) regenerates exactly the mask the forward
drew without storing it. It is a 32-bit integer hash (Wellons' "lowbias32" finalizer, composed per
coordinate); the Triton kernels compute the same thing in uint32, this file in int64 with explicit masks.
For varlen inputs ``bh`` is ``sequence_index * heads + head`` and positions count from the sequence start.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL_A, MUL_B = 0x7FEB352D, 0x846CA68B
GOLDEN_BH, GOLDEN_ROW, GOLDEN_COL = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
KEEP_BITS = 24


def draw_seed(device, generator=None) -> torch.Tensor:
    """The int64 scalar seed a call draws from ``generator`` (or the default generator of ``device``)."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device)


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK32
    return x ^ (x >> 16)


def drop_threshold(p: float) -> int:
    """Entries whose 24-bit hash is below this are dropped (probability p)."""
    return int(round(p * (1 << KEEP_BITS)))


def keep_mask(seed: int, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask of shape ``bh.shape + (len(rows), len(cols))``; ``bh``, ``rows``, ``cols`` int64."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=bh.device) & MASK32
    base = mix32(seed ^ ((bh.to(torch.int64) * GOLDEN_BH) & MASK32))[..., None, None]
    row = mix32((base + rows.to(torch.int64)[:, None] * GOLDEN_ROW) & MASK32)
    x = mix32(row ^ ((cols.to(torch.int64)[None, :] * GOLDEN_COL) & MASK32))
    return (x >> (32 - KEEP_BITS)) >= drop_threshold(p)


def dense_keep_mask(seed: int, batch: int, heads: int, t_q: int, t_k: int, p: float, device) -> torch.Tensor:
    """The full [B, H, Tq, Tk] keep-mask of a dense call (for tests and the reference)."""
    bh = torch.arange(batch * heads, device=device).reshape(batch, heads)
    return keep_mask(seed, bh, torch.arange(t_q, device=device), torch.arange(t_k, device=device), p)


def varlen_keep_masks(seed: int, heads: int, cu_seqlens_q, cu_seqlens_k, p: float, device) -> list:
    """One [1, H, Tq_n, Tk_n] keep-mask per sequence of a varlen call."""
    masks = []
    for n in range(cu_seqlens_q.numel() - 1):
        t_q = int(cu_seqlens_q[n + 1] - cu_seqlens_q[n])
        t_k = int(cu_seqlens_k[n + 1] - cu_seqlens_k[n])
        bh = (n * heads + torch.arange(heads, device=device)).reshape(1, heads)
        masks.append(keep_mask(seed, bh, torch.arange(t_q, device=device), torch.arange(t_k, device=device), p))
    return masks
