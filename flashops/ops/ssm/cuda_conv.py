"""The CUDA backend of the convolution-kernel generators: Vandermonde (csrc/cuda/ssm/vandermonde.cu) and Cauchy
(csrc/cuda/ssm/cauchy.cu), forward and backward: the ``VandermondeBackend`` and ``CauchyBackend`` contracts
(args.py).

Complex numbers travel as fp32 (re, im) pairs. Backward passes reduce over L in ranges that separate blocks
sum; the launcher adds the partial sums (no atomics: deterministic).
"""

from __future__ import annotations

import torch

from ... import _cuda
from .common import cauchy_dz, multiprocessors, vandermonde_grads

_FLOAT = 4  # bytes
_LANES = 4  # lanes of l per block in the backward kernels (blocks of 32 states x _LANES)
_MIN_L_PER_SPLIT = 256


def _copies_tile(n_copies: int) -> int:
    return 1 if n_copies == 1 else 4


def _splits(length: int, other_blocks: int, device: torch.device) -> tuple:
    """(splits, l_per_split): enough blocks for about four per multiprocessor, no range shorter than 256."""
    want = max(1, -(-4 * multiprocessors(device) // max(1, other_blocks)))
    l_per_split = max(_MIN_L_PER_SPLIT, -(-length // want))
    return -(-length // l_per_split), l_per_split


# -------------------------------------------------------------------------------------------- Vandermonde
_VANDERMONDE_FWD = (128, 8)  # threads, consecutive l per thread


def _vandermonde_expression(kind: str, copies: int) -> str:
    if kind == "fwd":
        return f"flashops::vandermonde_fwd_kernel<{_VANDERMONDE_FWD[0]}, {_VANDERMONDE_FWD[1]}, {copies}>"
    return f"flashops::vandermonde_bwd_kernel<{_LANES}, {copies}>"


VANDERMONDE = _cuda.Program("ssm/vandermonde.cu", [
    _vandermonde_expression(kind, copies) for kind in ("fwd", "bwd") for copies in (1, 4)])


def vandermonde_fwd(x, w, length: int, conj: bool):
    """x [H, N, 2], w [C, H, N, 2] fp32 pairs -> K [C, H, L] fp32."""
    n_copies, n_heads, n_state = w.shape[:3]
    k = torch.empty(n_copies, n_heads, length, device=x.device, dtype=torch.float32)
    if k.numel() == 0:
        return k
    copies = _copies_tile(n_copies)
    threads, span = _VANDERMONDE_FWD
    VANDERMONDE.kernel(_vandermonde_expression("fwd", copies))(
        grid=(-(-length // (threads * span)), n_heads, -(-n_copies // copies)), block=threads,
        shared=(4 + 2 * copies) * n_state * _FLOAT,
        x=x.contiguous(), w=w.contiguous(), k=k, n_copies=n_copies, n_heads=n_heads, n_state=n_state,
        length=length, scale=2.0 if conj else 1.0)
    return k


def vandermonde_bwd(dk, x, w, length: int, conj: bool):
    """Gradients (dx [H, N, 2], dw [C, H, N, 2]) of vandermonde_fwd (torch's conjugate convention)."""
    n_copies, n_heads, n_state = w.shape[:3]
    if dk.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(w)
    state_tiles = -(-n_state // 32)
    splits, l_per_split = _splits(length, state_tiles * n_heads, x.device)
    s0 = torch.empty(splits, n_copies, n_heads, n_state, 2, device=x.device, dtype=torch.float32)
    s1 = torch.empty_like(s0)
    copies = _copies_tile(n_copies)
    VANDERMONDE.kernel(_vandermonde_expression("bwd", copies))(
        grid=(state_tiles, n_heads, splits), block=32 * _LANES,
        x=x.contiguous(), g=dk.float().contiguous(), s0=s0, s1=s1, n_copies=n_copies, n_heads=n_heads,
        n_state=n_state, length=length, l_per_split=l_per_split)
    return vandermonde_grads(s0, s1, w, conj)


# ------------------------------------------------------------------------------------------------ Cauchy
_CAUCHY_THREADS = 128
_ROWS = 4  # rows m per block (the reciprocals are shared by them)


def _cauchy_expression(kind: str, squared: bool = False) -> str:
    if kind == "fwd":
        return f"flashops::cauchy_fwd_kernel<{_CAUCHY_THREADS}, {_ROWS}, {int(squared)}>"
    return f"flashops::cauchy_bwd_kernel<{_LANES}, {_ROWS}>"


CAUCHY = _cuda.Program("ssm/cauchy.cu", [_cauchy_expression("fwd", squared) for squared in (False, True)]
                       + [_cauchy_expression("bwd")])


def _cauchy_forward(v, z, w, squared: bool):
    n_rows, n_groups, n_state = v.shape[:3]
    length = z.shape[0]
    out = torch.empty(n_rows, n_groups, length, 2, device=v.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    CAUCHY.kernel(_cauchy_expression("fwd", squared))(
        grid=(-(-length // _CAUCHY_THREADS), n_groups, -(-n_rows // _ROWS)), block=_CAUCHY_THREADS,
        shared=(2 + 2 * _ROWS) * n_state * _FLOAT,
        v=v.contiguous(), z=z.contiguous(), w=w.contiguous(), out=out, n_rows=n_rows, n_groups=n_groups,
        n_state=n_state, length=length)
    return out


def cauchy_fwd(v, z, w):
    """v [M, G, N, 2], z [L, 2], w [G, N, 2] fp32 pairs -> out [M, G, L, 2]."""
    return _cauchy_forward(v, z, w, squared=False)


def cauchy_bwd(dout, v, z, w, want_dz: bool):
    """Gradients (dv, dz or None, dw) of cauchy_fwd as fp32 pairs."""
    n_rows, n_groups, n_state = v.shape[:3]
    length = z.shape[0]
    dout = dout.float().contiguous()
    if dout.numel() == 0:
        return torch.zeros_like(v), (torch.zeros_like(z) if want_dz else None), torch.zeros_like(w)
    state_tiles, row_tiles = -(-n_state // 32), -(-n_rows // _ROWS)
    splits, l_per_split = _splits(length, state_tiles * n_groups * row_tiles, v.device)
    dv = torch.empty(splits, n_rows, n_groups, n_state, 2, device=v.device, dtype=torch.float32)
    dw = torch.empty_like(dv)
    CAUCHY.kernel(_cauchy_expression("bwd"))(
        grid=(state_tiles, n_groups, row_tiles * splits), block=32 * _LANES,
        grad=dout, v=v.contiguous(), z=z.contiguous(), w=w.contiguous(), dv=dv, dw=dw, n_rows=n_rows,
        n_groups=n_groups, n_state=n_state, length=length, splits=splits, l_per_split=l_per_split)
    dz = cauchy_dz(_cauchy_forward(v, z, w, squared=True), dout) if want_dz else None
    return dv.sum(0), dz, dw.sum((0, 1))
