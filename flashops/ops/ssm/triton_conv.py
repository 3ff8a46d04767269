"""Triton kernels for the convolution-kernel generators: Vandermonde (diagonal SSMs) and Cauchy (DPLR).

Both are compute-bound reductions over the state dimension whose full intermediate ([H, N, L]) is never
stored: a program owns a tile of outputs and recomputes the powers / reciprocals it needs per state block.
Complex inputs arrive as interleaved (re, im) fp32 pairs (``torch.view_as_real``). Backward passes reduce
over L instead, split across programs into partial sums that the launcher adds (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import configs, interpreter_enabled
from .common import cauchy_dz, multiprocessors, vandermonde_grads


# -------------------------------------------------------------------------------------- Vandermonde
@triton.jit
def _powers(xr, xi, l_f):
    """exp(x l) = exp(xr l) (cos(xi l) + i sin(xi l)) for x [N] and l [L] -> two [N, L] tiles."""
    mag = tl.exp2((xr[:, None] * l_f[None, :]) * 1.4426950408889634)
    phase = xi[:, None] * l_f[None, :]
    return mag * tl.cos(phase), mag * tl.sin(phase)


@triton.jit
def vandermonde_fwd_kernel(
    X, W, K, n_copies, n_state, length,
    s_xh, s_xn, s_wc, s_wh, s_wn, s_kc, s_kh,
    scale, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
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
        x_ptr = X + h * s_xh + n * s_xn
        xr = tl.load(x_ptr, mask=n_ok, other=0.0)
        xi = tl.load(x_ptr + 1, mask=n_ok, other=0.0)
        vr, vi = _powers(xr, xi, l_f)
        w_ptr = W + c[:, None].to(tl.int64) * s_wc + h * s_wh + n[None, :] * s_wn
        w_ok = c_ok[:, None] & n_ok[None, :]
        wr = tl.load(w_ptr, mask=w_ok, other=0.0)
        wi = tl.load(w_ptr + 1, mask=w_ok, other=0.0)
        acc += tl.sum(wr[:, :, None] * vr[None, :, :] - wi[:, :, None] * vi[None, :, :], axis=1)
    k_ptr = K + c[:, None].to(tl.int64) * s_kc + h * s_kh + offs_l[None, :]
    tl.store(k_ptr, acc * scale, mask=c_ok[:, None] & (offs_l < length)[None, :])


@triton.jit
def vandermonde_bwd_kernel(
    X, G, S0, S1, n_copies, n_state, length, l_per_split,
    s_xh, s_xn, s_gc, s_gh, n_heads,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Partial sums over this program's L range, for every copy c:
    S0[c, h, n] = sum_l G[c, h, l] conj(z^l) and S1[c, h, n] = sum_l G[c, h, l] l conj(z^l), z = exp(X)."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_state
    x_ptr = X + h * s_xh + n * s_xn
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
            g = tl.load(G + c[:, None].to(tl.int64) * s_gc + h * s_gh + offs_l[None, :],
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


def _vand_blocks(n_copies: int, n_state: int, budget: int = 8192):
    block_c = min(triton.next_power_of_2(max(n_copies, 1)), 4)
    block_n = min(triton.next_power_of_2(max(n_state, 1)), 32)
    block_l = max(16, min(256, budget // (block_c * block_n)))
    return block_c, block_n, block_l


def _cfg(warps):
    return triton.Config({}, num_warps=warps, num_stages=1)


_TUNED: dict = {}


def _tuned(name, fn, key, restore):
    if name not in _TUNED:
        candidates = configs([_cfg(w) for w in (4, 8)], [_cfg(1)])
        _TUNED[name] = triton.autotune(configs=candidates, key=key,
                                       restore_value=restore if len(candidates) > 1 else [])(fn)
    return _TUNED[name]


def vandermonde_fwd(x, w, length: int, conj: bool):
    """x [H, N, 2], w [C, H, N, 2] fp32 pairs -> K [C, H, L] fp32."""
    n_copies, n_heads, n_state = w.shape[:3]
    k = torch.empty(n_copies, n_heads, length, device=x.device, dtype=torch.float32)
    if k.numel() == 0:
        return k
    block_c, block_n, block_l = _vand_blocks(n_copies, n_state)
    grid = (triton.cdiv(length, block_l), n_heads, triton.cdiv(n_copies, block_c))
    _tuned("vand_fwd", vandermonde_fwd_kernel, ["BLOCK_C", "BLOCK_N", "BLOCK_L"], ["K"])[grid](
        x, w, k, n_copies, n_state, length, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        k.stride(0), k.stride(1), 2.0 if conj else 1.0, BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_L=block_l)
    return k


def vandermonde_bwd(dk, x, w, length: int, conj: bool):
    """Gradients (dx [H, N, 2], dw [C, H, N, 2]) of vandermonde_fwd (torch's conjugate convention)."""
    n_copies, n_heads, n_state = w.shape[:3]
    dk = dk.float().contiguous()
    if dk.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(w)
    block_c, block_n, block_l = _vand_blocks(n_copies, n_state, budget=4096)
    n_nblocks = triton.cdiv(n_state, block_n)
    l_blocks = triton.cdiv(length, block_l)
    # Enough programs to fill the GPU: split L into chunks of whole tiles, summed below.
    want = 2 if interpreter_enabled() else 4 * multiprocessors(x.device)
    splits = max(1, min(l_blocks, triton.cdiv(want, n_heads * n_nblocks)))
    l_per_split = triton.cdiv(l_blocks, splits) * block_l
    splits = triton.cdiv(length, l_per_split)
    s0 = torch.empty(splits, n_copies, n_heads, n_state, 2, device=x.device, dtype=torch.float32)
    s1 = torch.empty_like(s0)
    _tuned("vand_bwd", vandermonde_bwd_kernel, ["BLOCK_C", "BLOCK_N", "BLOCK_L"], ["S0", "S1"])[
        (n_nblocks, n_heads, splits)](
        x, dk, s0, s1, n_copies, n_state, length, l_per_split, x.stride(0), x.stride(1), dk.stride(0),
        dk.stride(1), n_heads, BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_L=block_l)
    return vandermonde_grads(s0, s1, w, conj)


# ------------------------------------------------------------------------------------------- Cauchy
@triton.jit
def _recip(ar, ai):
    inv = 1.0 / (ar * ar + ai * ai)
    return ar * inv, -ai * inv


@triton.jit
def cauchy_fwd_kernel(
    V, Z, W, OUT, n_groups, n_state, length,
    s_vm, s_vg, s_vn, s_z, s_wg, s_wn, s_om, s_og, s_ol,
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
    zr = tl.load(Z + offs_l * s_z, mask=l_ok, other=0.0)
    zi = tl.load(Z + offs_l * s_z + 1, mask=l_ok, other=0.0)
    acc_r = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    for n0 in range(0, n_state, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_state
        v_ptr = V + m * s_vm + g * s_vg + n * s_vn
        vr = tl.load(v_ptr, mask=n_ok, other=0.0)[:, None]
        vi = tl.load(v_ptr + 1, mask=n_ok, other=0.0)[:, None]
        w_ptr = W + g * s_wg + n * s_wn
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
    o_ptr = OUT + m * s_om + g * s_og + offs_l * s_ol
    tl.store(o_ptr, acc_r, mask=l_ok)
    tl.store(o_ptr + 1, acc_i, mask=l_ok)


@triton.jit
def cauchy_bwd_kernel(
    G, V, Z, W, DV, DW, n_groups, n_state, length, l_per_split, n_mg,
    s_gm, s_gg, s_gl, s_vm, s_vg, s_vn, s_z, s_wg, s_wn,
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
    w_ptr = W + g * s_wg + n * s_wn
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
        zr = tl.load(Z + offs_l * s_z, mask=l_ok, other=0.0)[None, :]
        zi = tl.load(Z + offs_l * s_z + 1, mask=l_ok, other=0.0)[None, :]
        g_ptr = G + m * s_gm + g * s_gg + offs_l * s_gl
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
    v_ptr = V + m * s_vm + g * s_vg + n * s_vn
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
    _tuned("cauchy_fwd", cauchy_fwd_kernel, ["BLOCK_N", "SQUARED"], ["OUT"])[
        (triton.cdiv(length, block_l), n_m * n_groups)](
        v, z, w, out, n_groups, n_state, length, v.stride(0), v.stride(1), v.stride(2), z.stride(0),
        w.stride(0), w.stride(1), out.stride(0), out.stride(1), out.stride(2),
        SQUARED=squared, BLOCK_N=block_n, BLOCK_L=block_l)
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
    want = 2 if interpreter_enabled() else 4 * multiprocessors(v.device)
    splits = max(1, min(l_blocks, triton.cdiv(want, n_m * n_groups * n_nblocks)))
    l_per_split = triton.cdiv(l_blocks, splits) * block_l
    splits = triton.cdiv(length, l_per_split)
    dv = torch.empty(splits, n_m * n_groups, n_state, 2, device=v.device, dtype=torch.float32)
    dw = torch.empty_like(dv)
    _tuned("cauchy_bwd", cauchy_bwd_kernel, ["BLOCK_N"], ["DV", "DW"])[(n_nblocks, n_m * n_groups, splits)](
        dout, v, z, w, dv, dw, n_groups, n_state, length, l_per_split, n_m * n_groups,
        dout.stride(0), dout.stride(1), dout.stride(2), v.stride(0), v.stride(1), v.stride(2), z.stride(0),
        w.stride(0), w.stride(1), BLOCK_N=block_n, BLOCK_L=block_l)
    dv = dv.sum(0).reshape(n_m, n_groups, n_state, 2)
    dw = dw.sum(0).reshape(n_m, n_groups, n_state, 2).sum(0)
    dz = cauchy_dz(_cauchy_launch_fwd(v, z, w, squared=True), dout) if want_dz else None
    return dv, dz, dw
