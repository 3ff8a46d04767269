"""Triton kernels of ``vandermonde_kernel``: K[c, h, l] = scale * Re(sum_n W[c, h, n] z_n^l) with z = exp(X), the
convolution kernel of a diagonal SSM.

A compute-bound reduction over the state dimension whose full intermediate ([H, N, L]) is never stored: a program
owns a tile of outputs and recomputes the powers it needs per state block. Complex inputs arrive as interleaved
(re, im) fp32 pairs (``torch.view_as_real``). The backward reduces over L instead, split across programs into
partial sums that the launcher adds (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, launcher, programs_to_fill, strides
from ..common.triton_math import LOG2E
from .common import vandermonde_grads


def warps_launch_options(key: list, outputs: list) -> dict:
    """The convolution kernels' block sizes follow from the shapes (the launchers choose them); only warps are
    tuned."""
    return dict(configs=[config(4, 1), config(8, 1)], interpreted=config(1, 1), key=key, restore_value=outputs)


@triton.jit
def _powers(xr, xi, l_f):
    """exp(x l) = exp(xr l) (cos(xi l) + i sin(xi l)) for x [N] and l [L] -> two [N, L] tiles."""
    mag = tl.exp2((xr[:, None] * l_f[None, :]) * LOG2E)
    phase = xi[:, None] * l_f[None, :]
    return mag * tl.cos(phase), mag * tl.sin(phase)


@launcher(**warps_launch_options(["BLOCK_C", "BLOCK_N", "BLOCK_L"], ["K"]))
@triton.jit
def conv_vandermonde_fwd_kernel(
    # pointers (X [H, N, 2] and W [C, H, N, 2] as (re, im) pairs)
    X, W, K,
    # strides
    stride_xh, stride_xn, stride_wc, stride_wh, stride_wn, stride_kc, stride_kh,
    # sizes and scalars
    n_copies, n_state, length, scale,
    # meta-parameters
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """K[c, h, l] = scale * Re(sum_n W[c, h, n] exp(X[h, n] l)) for one (L tile, h, C tile)."""
    pid_l = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < n_copies
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_f = offs_l.to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for n0 in range(0, n_state, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_state
        x_ptr = X + h * stride_xh + n * stride_xn
        xr = tl.load(x_ptr, mask=n_ok, other=0.0)
        xi = tl.load(x_ptr + 1, mask=n_ok, other=0.0)
        vr, vi = _powers(xr, xi, l_f)
        w_ptr = W + c[:, None].to(tl.int64) * stride_wc + h * stride_wh + n[None, :] * stride_wn
        w_ok = c_ok[:, None] & n_ok[None, :]
        wr = tl.load(w_ptr, mask=w_ok, other=0.0)
        wi = tl.load(w_ptr + 1, mask=w_ok, other=0.0)
        acc += tl.sum(wr[:, :, None] * vr[None, :, :] - wi[:, :, None] * vi[None, :, :], axis=1)
    k_ptr = K + c[:, None].to(tl.int64) * stride_kc + h * stride_kh + offs_l[None, :]
    tl.store(k_ptr, acc * scale, mask=c_ok[:, None] & (offs_l < length)[None, :])


@launcher(**warps_launch_options(["BLOCK_C", "BLOCK_N", "BLOCK_L"], ["S0", "S1"]))
@triton.jit
def conv_vandermonde_bwd_kernel(
    # pointers (S0, S1: partial sums, contiguous [splits, C, H, N, 2])
    X, G, S0, S1,
    # strides
    stride_xh, stride_xn, stride_gc, stride_gh,
    # sizes
    n_copies, n_state, length, l_per_split, n_heads,
    # meta-parameters
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Partial sums over this program's L range, for every copy c:
    S0[c, h, n] = sum_l G[c, h, l] conj(z^l) and S1[c, h, n] = sum_l G[c, h, l] l conj(z^l), z = exp(X)."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_state
    x_ptr = X + h * stride_xh + n * stride_xn
    xr = tl.load(x_ptr, mask=n_ok, other=0.0)
    xi = tl.load(x_ptr + 1, mask=n_ok, other=0.0)
    l_lo = split * l_per_split
    l_hi = tl.minimum(l_lo + l_per_split, length)
    for c0 in range(0, n_copies, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < n_copies
        s0r = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        s0i = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        s1r = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        s1i = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        for l0 in range(l_lo, l_hi, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            l_ok = offs_l < l_hi
            l_f = offs_l.to(tl.float32)
            vr, vi = _powers(xr, xi, l_f)
            g = tl.load(G + c[:, None].to(tl.int64) * stride_gc + h * stride_gh + offs_l[None, :],
                        mask=c_ok[:, None] & l_ok[None, :], other=0.0)
            gv_r = g[:, None, :] * vr[None, :, :]
            gv_i = g[:, None, :] * vi[None, :, :]
            s0r += tl.sum(gv_r, axis=2)
            s0i -= tl.sum(gv_i, axis=2)
            s1r += tl.sum(gv_r * l_f[None, None, :], axis=2)
            s1i -= tl.sum(gv_i * l_f[None, None, :], axis=2)
        # partial buffers [splits, C, H, N, 2]
        off = (((split * n_copies + c[:, None]).to(tl.int64) * n_heads + h) * n_state + n[None, :]) * 2
        ok = c_ok[:, None] & n_ok[None, :]
        tl.store(S0 + off, s0r, mask=ok)
        tl.store(S0 + off + 1, s0i, mask=ok)
        tl.store(S1 + off, s1r, mask=ok)
        tl.store(S1 + off + 1, s1i, mask=ok)


def _blocks(n_copies: int, n_state: int, budget: int = 8192):
    block_c = min(triton.next_power_of_2(max(n_copies, 1)), 4)
    block_n = min(triton.next_power_of_2(max(n_state, 1)), 32)
    block_l = max(16, min(256, budget // (block_c * block_n)))
    return block_c, block_n, block_l


def vandermonde_fwd(x, w, length: int, conj: bool):
    """x [H, N, 2], w [C, H, N, 2] fp32 pairs -> K [C, H, L] fp32."""
    n_copies, n_heads, n_state = w.shape[:3]
    k = torch.empty(n_copies, n_heads, length, device=x.device, dtype=torch.float32)
    if k.numel() == 0:
        return k
    block_c, block_n, block_l = _blocks(n_copies, n_state)
    grid = (triton.cdiv(length, block_l), n_heads, triton.cdiv(n_copies, block_c))
    conv_vandermonde_fwd_kernel.launch(
        grid, X=x, W=w, K=k, **strides("x", x, "hn"), **strides("w", w, "chn"), **strides("k", k, "ch"),
        n_copies=n_copies, n_state=n_state, length=length, scale=2.0 if conj else 1.0,
        BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_L=block_l)
    return k


def vandermonde_bwd(dk, x, w, length: int, conj: bool):
    """Gradients (dx [H, N, 2], dw [C, H, N, 2]) of vandermonde_fwd (torch's conjugate convention)."""
    n_copies, n_heads, n_state = w.shape[:3]
    dk = dk.float().contiguous()
    if dk.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(w)
    block_c, block_n, block_l = _blocks(n_copies, n_state, budget=4096)
    n_nblocks = triton.cdiv(n_state, block_n)
    l_blocks = triton.cdiv(length, block_l)
    # Enough programs to fill the GPU: split L into chunks of whole tiles, summed below.
    want = programs_to_fill(x.device)
    splits = max(1, min(l_blocks, triton.cdiv(want, n_heads * n_nblocks)))
    l_per_split = triton.cdiv(l_blocks, splits) * block_l
    splits = triton.cdiv(length, l_per_split)
    s0 = torch.empty(splits, n_copies, n_heads, n_state, 2, device=x.device, dtype=torch.float32)
    s1 = torch.empty_like(s0)
    conv_vandermonde_bwd_kernel.launch(
        (n_nblocks, n_heads, splits), X=x, G=dk, S0=s0, S1=s1, **strides("x", x, "hn"), **strides("g", dk, "ch"),
        n_copies=n_copies, n_state=n_state, length=length, l_per_split=l_per_split, n_heads=n_heads,
        BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_L=block_l)
    return vandermonde_grads(s0, s1, w, conj)
