"""Triton kernels of ``cauchy_kernel``: sum_n v_n / (z_l - w_n) + conj(v_n) / (z_l - conj(w_n)), S4's DPLR kernel at
the roots of unity.

A compute-bound reduction over the state dimension whose full intermediate is never stored: a program owns a
tile of outputs and recomputes the reciprocals it needs per state block. Complex inputs arrive as interleaved
(re, im) fp32 pairs (``torch.view_as_real``). The backward reduces over L instead, split across programs into
partial sums that the launcher adds (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import launcher, programs_to_fill, strides
from .common import cauchy_dz
from .triton_vandermonde import warps_launch_options


@triton.jit
def _recip(ar, ai):
    inv = 1.0 / (ar * ar + ai * ai)
    return ar * inv, -ai * inv


@launcher(**warps_launch_options(["BLOCK_N", "SQUARED"], ["OUT"]))
@triton.jit
def conv_cauchy_fwd_kernel(
    # pointers ((re, im) pairs: V [M, G, N, 2], Z [L, 2], W [G, N, 2], OUT [M, G, L, 2])
    V, Z, W, OUT,
    # strides
    stride_vm, stride_vg, stride_vn, stride_zl, stride_wg, stride_wn, stride_outm, stride_outg, stride_outl,
    # sizes
    n_groups, n_state, length,
    # meta-parameters
    SQUARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """OUT[m, g, l] = sum_n v r1^p + conj(v) r2^p with r1 = 1/(z_l - w_n), r2 = 1/(z_l - conj(w_n)) and
    p = 1 (the Cauchy product) or p = 2 (SQUARED: minus the derivative in z, for dz)."""
    pid_l = tl.program_id(0)
    pid_mg = tl.program_id(1)
    m = (pid_mg // n_groups).to(tl.int64)
    g = (pid_mg % n_groups).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = offs_l < length
    zr = tl.load(Z + offs_l * stride_zl, mask=l_ok, other=0.0)
    zi = tl.load(Z + offs_l * stride_zl + 1, mask=l_ok, other=0.0)
    acc_r = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    for n0 in range(0, n_state, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_state
        v_ptr = V + m * stride_vm + g * stride_vg + n * stride_vn
        vr = tl.load(v_ptr, mask=n_ok, other=0.0)[:, None]
        vi = tl.load(v_ptr + 1, mask=n_ok, other=0.0)[:, None]
        w_ptr = W + g * stride_wg + n * stride_wn
        wr = tl.load(w_ptr, mask=n_ok, other=0.0)[:, None]
        wi = tl.load(w_ptr + 1, mask=n_ok, other=1.0)[:, None]  # masked states: finite, times v = 0
        dr = zr[None, :] - wr
        r1r, r1i = _recip(dr, zi[None, :] - wi)
        r2r, r2i = _recip(dr, zi[None, :] + wi)
        if SQUARED:
            r1r, r1i = r1r * r1r - r1i * r1i, 2.0 * r1r * r1i
            r2r, r2i = r2r * r2r - r2i * r2i, 2.0 * r2r * r2i
        # v r1 + conj(v) r2
        acc_r += tl.sum(vr * (r1r + r2r) - vi * (r1i - r2i), axis=0)
        acc_i += tl.sum(vr * (r1i + r2i) + vi * (r1r - r2r), axis=0)
    o_ptr = OUT + m * stride_outm + g * stride_outg + offs_l * stride_outl
    tl.store(o_ptr, acc_r, mask=l_ok)
    tl.store(o_ptr + 1, acc_i, mask=l_ok)


@launcher(**warps_launch_options(["BLOCK_N"], ["DV", "DW"]))
@triton.jit
def conv_cauchy_bwd_kernel(
    # pointers (DV, DW: partial sums, contiguous [splits, M * G, N, 2])
    G, V, Z, W, DV, DW,
    # strides
    stride_gm, stride_gg, stride_gl, stride_vm, stride_vg, stride_vn, stride_zl, stride_wg, stride_wn,
    # sizes
    n_groups, n_state, length, l_per_split, n_mg,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Partial sums over an L range of dv = T1 + conj(T2) and dw_m = conj(v) (S1 + conj(S2)), where
    T_k = sum_l G_l conj(r_k), S_k = sum_l G_l conj(r_k)^2 (torch's conjugate gradient convention)."""
    pid_n = tl.program_id(0)
    pid_mg = tl.program_id(1)
    split = tl.program_id(2)
    m = (pid_mg // n_groups).to(tl.int64)
    g = (pid_mg % n_groups).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_state
    w_ptr = W + g * stride_wg + n * stride_wn
    wr = tl.load(w_ptr, mask=n_ok, other=0.0)[:, None]
    wi = tl.load(w_ptr + 1, mask=n_ok, other=1.0)[:, None]
    t1r = tl.zeros([BLOCK_N], dtype=tl.float32)
    t1i = tl.zeros([BLOCK_N], dtype=tl.float32)
    t2r = tl.zeros([BLOCK_N], dtype=tl.float32)
    t2i = tl.zeros([BLOCK_N], dtype=tl.float32)
    q1r = tl.zeros([BLOCK_N], dtype=tl.float32)
    q1i = tl.zeros([BLOCK_N], dtype=tl.float32)
    q2r = tl.zeros([BLOCK_N], dtype=tl.float32)
    q2i = tl.zeros([BLOCK_N], dtype=tl.float32)
    l_lo = split * l_per_split
    l_hi = tl.minimum(l_lo + l_per_split, length)
    for l0 in range(l_lo, l_hi, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_ok = offs_l < l_hi
        zr = tl.load(Z + offs_l * stride_zl, mask=l_ok, other=0.0)[None, :]
        zi = tl.load(Z + offs_l * stride_zl + 1, mask=l_ok, other=0.0)[None, :]
        g_ptr = G + m * stride_gm + g * stride_gg + offs_l * stride_gl
        gr = tl.load(g_ptr, mask=l_ok, other=0.0)[None, :]
        gi = tl.load(g_ptr + 1, mask=l_ok, other=0.0)[None, :]
        dr = zr - wr
        r1r, r1i = _recip(dr, zi - wi)
        r2r, r2i = _recip(dr, zi + wi)
        # G conj(r) and G conj(r)^2
        a1r = gr * r1r + gi * r1i
        a1i = gi * r1r - gr * r1i
        a2r = gr * r2r + gi * r2i
        a2i = gi * r2r - gr * r2i
        t1r += tl.sum(a1r, axis=1)
        t1i += tl.sum(a1i, axis=1)
        t2r += tl.sum(a2r, axis=1)
        t2i += tl.sum(a2i, axis=1)
        q1r += tl.sum(a1r * r1r + a1i * r1i, axis=1)
        q1i += tl.sum(a1i * r1r - a1r * r1i, axis=1)
        q2r += tl.sum(a2r * r2r + a2i * r2i, axis=1)
        q2i += tl.sum(a2i * r2r - a2r * r2i, axis=1)
    v_ptr = V + m * stride_vm + g * stride_vg + n * stride_vn
    vr = tl.load(v_ptr, mask=n_ok, other=0.0)
    vi = tl.load(v_ptr + 1, mask=n_ok, other=0.0)
    sr = q1r + q2r  # S1 + conj(S2)
    si = q1i - q2i
    off = ((split * n_mg + pid_mg).to(tl.int64) * n_state + n) * 2  # [splits, M*G, N, 2]
    tl.store(DV + off, t1r + t2r, mask=n_ok)
    tl.store(DV + off + 1, t1i - t2i, mask=n_ok)
    tl.store(DW + off, vr * sr + vi * si, mask=n_ok)
    tl.store(DW + off + 1, vr * si - vi * sr, mask=n_ok)


_CAUCHY_BLOCKS = (32, 128)  # (BLOCK_N, BLOCK_L)


def _cauchy_launch_fwd(v, z, w, squared: bool):
    n_m, n_groups, n_state = v.shape[:3]
    length = z.shape[0]
    out = torch.empty(n_m, n_groups, length, 2, device=v.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    block_n = min(_CAUCHY_BLOCKS[0], triton.next_power_of_2(max(n_state, 1)))
    block_l = _CAUCHY_BLOCKS[1]
    conv_cauchy_fwd_kernel.launch(
        (triton.cdiv(length, block_l), n_m * n_groups), V=v, Z=z, W=w, OUT=out, **strides("v", v, "mgn"),
        **strides("z", z, "l"), **strides("w", w, "gn"), **strides("out", out, "mgl"),
        n_groups=n_groups, n_state=n_state, length=length, SQUARED=squared, BLOCK_N=block_n, BLOCK_L=block_l)
    return out


def cauchy_fwd(v, z, w):
    """v [M, G, N, 2], z [L, 2], w [G, N, 2] fp32 pairs -> out [M, G, L, 2]."""
    return _cauchy_launch_fwd(v, z, w, squared=False)


def cauchy_bwd(dout, v, z, w, want_dz: bool):
    """Gradients (dv, dz or None, dw) of cauchy_fwd as fp32 pairs."""
    n_m, n_groups, n_state = v.shape[:3]
    length = z.shape[0]
    dout = dout.float().contiguous()
    if dout.numel() == 0:
        return torch.zeros_like(v), (torch.zeros_like(z) if want_dz else None), torch.zeros_like(w)
    block_n = min(_CAUCHY_BLOCKS[0], triton.next_power_of_2(max(n_state, 1)))
    block_l = _CAUCHY_BLOCKS[1] // 2
    n_nblocks = triton.cdiv(n_state, block_n)
    l_blocks = triton.cdiv(length, block_l)
    want = programs_to_fill(v.device)
    splits = max(1, min(l_blocks, triton.cdiv(want, n_m * n_groups * n_nblocks)))
    l_per_split = triton.cdiv(l_blocks, splits) * block_l
    splits = triton.cdiv(length, l_per_split)
    dv = torch.empty(splits, n_m * n_groups, n_state, 2, device=v.device, dtype=torch.float32)
    dw = torch.empty_like(dv)
    conv_cauchy_bwd_kernel.launch(
        (n_nblocks, n_m * n_groups, splits), G=dout, V=v, Z=z, W=w, DV=dv, DW=dw, **strides("g", dout, "mgl"),
        **strides("v", v, "mgn"), **strides("z", z, "l"), **strides("w", w, "gn"),
        n_groups=n_groups, n_state=n_state, length=length, l_per_split=l_per_split, n_mg=n_m * n_groups,
        BLOCK_N=block_n, BLOCK_L=block_l)
    dv = dv.sum(0).reshape(n_m, n_groups, n_state, 2)
    dw = dw.sum(0).reshape(n_m, n_groups, n_state, 2).sum(0)
    dz = cauchy_dz(_cauchy_launch_fwd(v, z, w, squared=True), dout) if want_dz else None
    return dv, dz, dw
