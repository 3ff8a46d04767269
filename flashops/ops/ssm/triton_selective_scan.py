"""Triton kernels of ``selective_scan`` (Mamba-1), forward and backward.

One program holds ``BLOCK_D`` channels of one (batch, group) with all N states and walks time in tiles of
``BLOCK_T`` steps (``tl.associative_scan`` inside a tile, the fp32 state carried across tiles). The forward saves
the state before every tile; the backward goes from the last tile to the first, recomputes a tile's states from
its checkpoint and runs the adjoint recurrence through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, launcher, strides
from ..common.triton_math import LOG2E, sigmoid, softplus
from .common import selective_scan_grads, state_spacing
from .triton_linear_scan import affine_combine


def _launch_options(outputs: list) -> dict:
    """The block sizes fix the saved states' shape, so the launcher chooses them; only warps are tuned."""
    return dict(configs=[config(warps, 1) for warps in (4, 8, 2)], interpreted=config(1, 1),
                key=["BLOCK_D", "BLOCK_N", "HAS_Z", "HAS_INIT"], restore_value=outputs)


@triton.jit
def _adjoint_combine(f2, p2, s2, f1, p1, s1):
    """Reverse scan of the adjoint lambda_t = g_t + a_{t+1} lambda_{t+1} without shifting the gates.

    A segment [t, e] is (first gate a_t, product of its other gates, lambda_t restricted to the segment);
    the scan runs from the end, so the accumulated later segment is the left operand."""
    return f1, p1 * f2 * p2, s1 + p1 * f2 * s2


@triton.jit
def _step_inputs(u_row, dl_row, stride_ut, stride_deltat, t, t_ok, bias, A2,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, raw delta + bias, dt (0 on padding) [R, T] and the gate exp(dt A) [R, N, T] of one time tile."""
    u = tl.load(u_row[:, None] + t.to(tl.int64)[None, :] * stride_ut, mask=t_ok, other=0.0).to(tl.float32)
    raw = tl.load(dl_row[:, None] + t.to(tl.int64)[None, :] * stride_deltat, mask=t_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = softplus(raw)
    dt = tl.where(t_ok, dt, 0.0)  # padding steps are identity maps
    gate = tl.exp2(dt[:, None, :] * A2[:, :, None])
    return u, raw, dt, gate


@triton.jit
def _program_channels(pid_d, pid_bg, n_groups, group_dim, n_state, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(batch, group, channels [BLOCK_D], their mask, states [BLOCK_N], their mask) of a program."""
    b = pid_bg // n_groups
    g = pid_bg % n_groups
    local = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = local < group_dim
    d = (g * group_dim + local).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < n_state
    return b.to(tl.int64), g.to(tl.int64), d, d_ok, n, n_ok


@triton.jit
def _channel_parameters(A, DBIAS, DSKIP, d, n, d_ok, dn_ok, stride_ad, stride_an, HAS_BIAS: tl.constexpr,
                        HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A [BLOCK_D, BLOCK_N], delta_bias and D [BLOCK_D] of the program's channels (fp32; 0 where absent)."""
    a_dn = tl.load(A + d[:, None] * stride_ad + n[None, :] * stride_an, mask=dn_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + d, mask=d_ok, other=0.0).to(tl.float32)
    skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        skip = tl.load(DSKIP + d, mask=d_ok, other=0.0).to(tl.float32)
    return a_dn, bias, skip


@launcher(**_launch_options(["OUT", "LAST", "CKPT"]))
@triton.jit
def scan_selective_fwd_kernel(
    # pointers (B, C: [B, G, N, L]; LAST, CKPT: contiguous fp32 [B, D, N] and [B, D, N, n_tiles])
    U, DELTA, A, B, C, DSKIP, Z, DBIAS, H0, OUT, LAST, CKPT,
    # strides
    stride_ub, stride_ud, stride_ut, stride_deltab, stride_deltad, stride_deltat, stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bt, stride_cb, stride_cg, stride_cn, stride_ct,
    stride_zb, stride_zd, stride_zt, stride_h0b, stride_h0d, stride_h0n, stride_outb, stride_outd, stride_outt,
    # sizes
    dim, n_groups, group_dim, n_state, length,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: BLOCK_D channels of one (batch, group), all N states, time in tiles of BLOCK_T.
    Writes out [B, D, L], the last state and the state before every tile (CKPT [B, D, N, n_tiles])."""
    b, g, d, d_ok, n, n_ok = _program_channels(tl.program_id(0), tl.program_id(1), n_groups, group_dim, n_state,
                                               BLOCK_D, BLOCK_N)
    dn_ok = d_ok[:, None] & n_ok[None, :]
    a_dn, bias, skip = _channel_parameters(A, DBIAS, DSKIP, d, n, d_ok, dn_ok, stride_ad, stride_an, HAS_BIAS, HAS_D,
                                           BLOCK_D)
    A2 = a_dn * LOG2E
    state_off = (b * dim + d)[:, None] * n_state + n[None, :]  # [B, D, N] contiguous fp32 buffers
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_INIT:
        h0_ptrs = H0 + b * stride_h0b + d[:, None] * stride_h0d + n[None, :] * stride_h0n
        h = tl.load(h0_ptrs, mask=dn_ok, other=0.0).to(tl.float32)
    u_row = U + b * stride_ub + d * stride_ud
    dl_row = DELTA + b * stride_deltab + d * stride_deltad
    z_row = Z + b * stride_zb + d * stride_zd
    o_row = OUT + b * stride_outb + d * stride_outd
    b_col = B + b * stride_bb + g * stride_bg + n * stride_bn
    c_col = C + b * stride_cb + g * stride_cg + n * stride_cn
    cols = tl.arange(0, BLOCK_T)
    n_tiles = tl.cdiv(length, BLOCK_T)
    for k in range(0, n_tiles):
        tl.store(CKPT + state_off * n_tiles + k, h, mask=dn_ok)
        t = k * BLOCK_T + cols
        t_in = t < length
        t_ok = d_ok[:, None] & t_in[None, :]
        u, raw, dt, gate = _step_inputs(u_row, dl_row, stride_ut, stride_deltat, t, t_ok, bias, A2, HAS_BIAS, SOFTPLUS)
        nt_ok = n_ok[:, None] & t_in[None, :]
        t64 = t.to(tl.int64)[None, :]
        b_t = tl.load(b_col[:, None] + t64 * stride_bt, mask=nt_ok, other=0.0).to(tl.float32)
        c_t = tl.load(c_col[:, None] + t64 * stride_ct, mask=nt_ok, other=0.0).to(tl.float32)
        x = (dt * u)[:, None, :] * b_t[None, :, :]
        prod, hs = tl.associative_scan((gate, x), 2, affine_combine)
        hs = hs + prod * h[:, :, None]
        h = tl.sum(tl.where(cols[None, None, :] == BLOCK_T - 1, hs, 0.0), axis=2)
        y = tl.sum(hs * c_t[None, :, :], axis=1)
        if HAS_D:
            y = y + skip[:, None] * u
        if HAS_Z:
            zz = tl.load(z_row[:, None] + t64 * stride_zt, mask=t_ok, other=0.0).to(tl.float32)
            y = y * zz * sigmoid(zz)
        tl.store(o_row[:, None] + t64 * stride_outt, y.to(OUT.dtype.element_ty), mask=t_ok)
    tl.store(LAST + state_off, h, mask=dn_ok)


@launcher(**_launch_options(["DU", "DDELTA", "DZ", "DB_PART", "DC_PART"]))
@triton.jit
def scan_selective_bwd_kernel(
    # pointers (the gradients are fresh contiguous buffers, see below)
    DOUT, DLAST, U, DELTA, A, B, C, DSKIP, Z, DBIAS, H0, CKPT,
    DU, DDELTA, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DBIAS_PART, DH0,
    # strides
    stride_ub, stride_ud, stride_ut, stride_deltab, stride_deltad, stride_deltat, stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bt, stride_cb, stride_cg, stride_cn, stride_ct,
    stride_zb, stride_zd, stride_zt, stride_h0b, stride_h0d, stride_h0n, stride_doutb, stride_doutd, stride_doutt,
    # sizes
    dim, n_groups, group_dim, n_state, length, n_dblocks,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Tiles from the last to the first: recompute the states of a tile from its checkpoint, then run the
    adjoint lambda_t = C_t dy_t + exp(dt_{t+1} A) lambda_{t+1} backwards through it.

    Per-channel outputs (du, ddelta, dz) are written directly; gradients shared across channels (dB, dC
    per group, dA, D and delta_bias per channel) are reduced over this program's channels and written as
    partial sums that the launcher adds up (no atomics: deterministic)."""
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b, g, d, d_ok, n, n_ok = _program_channels(pid_d, pid_bg, n_groups, group_dim, n_state, BLOCK_D, BLOCK_N)
    dn_ok = d_ok[:, None] & n_ok[None, :]
    a_dn, bias, skip = _channel_parameters(A, DBIAS, DSKIP, d, n, d_ok, dn_ok, stride_ad, stride_an, HAS_BIAS, HAS_D,
                                           BLOCK_D)
    A2 = a_dn * LOG2E
    state_off = (b * dim + d)[:, None] * n_state + n[None, :]
    mu = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # exp(dt A) lambda at the first step of the later tile
    if HAS_DLAST:
        mu = tl.load(DLAST + state_off, mask=dn_ok, other=0.0)
    u_row = U + b * stride_ub + d * stride_ud
    dl_row = DELTA + b * stride_deltab + d * stride_deltad
    z_row = Z + b * stride_zb + d * stride_zd
    g_row = DOUT + b * stride_doutb + d * stride_doutd
    b_col = B + b * stride_bb + g * stride_bg + n * stride_bn
    c_col = C + b * stride_cb + g * stride_cg + n * stride_cn
    # [B, D, L] outputs are contiguous; partial sums: DB/DC [B, G, n_dblocks, N, L], DA [B, D, N], DD/DBIAS [B, D]
    grad_row = (b * dim + d) * length
    part_col = (((b * n_groups + g) * n_dblocks + pid_d) * n_state + n).to(tl.int64) * length
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_T)
    n_tiles = tl.cdiv(length, BLOCK_T)
    for kk in range(0, n_tiles):
        k = n_tiles - 1 - kk
        t = k * BLOCK_T + cols
        t_in = t < length
        t_ok = d_ok[:, None] & t_in[None, :]
        t64 = t.to(tl.int64)[None, :]
        u, raw, dt, gate = _step_inputs(u_row, dl_row, stride_ut, stride_deltat, t, t_ok, bias, A2, HAS_BIAS, SOFTPLUS)
        nt_ok = n_ok[:, None] & t_in[None, :]
        b_t = tl.load(b_col[:, None] + t64 * stride_bt, mask=nt_ok, other=0.0).to(tl.float32)
        c_t = tl.load(c_col[:, None] + t64 * stride_ct, mask=nt_ok, other=0.0).to(tl.float32)
        x = (dt * u)[:, None, :] * b_t[None, :, :]
        h0 = tl.load(CKPT + state_off * n_tiles + k, mask=dn_ok, other=0.0)
        prod, hs = tl.associative_scan((gate, x), 2, affine_combine)
        hs = hs + prod * h0[:, :, None]
        dout = tl.load(g_row[:, None] + t64 * stride_doutt, mask=t_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.sum(hs * c_t[None, :, :], axis=1)
            if HAS_D:
                y = y + skip[:, None] * u
            zz = tl.load(z_row[:, None] + t64 * stride_zt, mask=t_ok, other=0.0).to(tl.float32)
            sig = sigmoid(zz)
            tl.store(DZ + grad_row[:, None] + t64, (dout * y * sig * (1.0 + zz * (1.0 - sig))).to(DZ.dtype.element_ty),
                     mask=t_ok)
            dy = dout * zz * sig
        else:
            dy = dout
        adj = dy[:, None, :] * c_t[None, :, :]
        ones = tl.full([BLOCK_D, BLOCK_N, BLOCK_T], 1.0, tl.float32)
        _, rest, lam = tl.associative_scan((gate, ones, adj), 2, _adjoint_combine, reverse=True)
        lam = lam + rest * mu[:, :, None]
        mu = tl.sum(tl.where(cols[None, None, :] == 0, gate * lam, 0.0), axis=2)
        # lambda_t exp(dt_t A) h_{t-1} = lambda_t (h_t - x_t): no shifted states needed
        q = lam * (hs - x)
        dA_acc += tl.sum(q * dt[:, None, :], axis=2)
        lam_b = tl.sum(lam * b_t[None, :, :], axis=1)
        ddt = lam_b * u + tl.sum(q * a_dn[:, :, None], axis=1)
        du = lam_b * dt
        if HAS_D:
            du += dy * skip[:, None]
            dD_acc += tl.sum(dy * u, axis=1)
        ddt = tl.where(t_ok, ddt, 0.0)
        if SOFTPLUS:
            ddt = ddt * sigmoid(raw)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(DU + grad_row[:, None] + t64, du.to(DU.dtype.element_ty), mask=t_ok)
        tl.store(DDELTA + grad_row[:, None] + t64, ddt.to(DDELTA.dtype.element_ty), mask=t_ok)
        db_part = tl.sum(lam * (dt * u)[:, None, :], axis=0)
        dc_part = tl.sum(hs * dy[:, None, :], axis=0)
        tl.store(DB_PART + part_col[:, None] + t64, db_part, mask=nt_ok)
        tl.store(DC_PART + part_col[:, None] + t64, dc_part, mask=nt_ok)
    tl.store(DA_PART + state_off, dA_acc, mask=dn_ok)
    tl.store(DD_PART + b * dim + d, dD_acc, mask=d_ok)
    tl.store(DBIAS_PART + b * dim + d, dbias_acc, mask=d_ok)
    if HAS_INIT:
        tl.store(DH0 + state_off, mu, mask=dn_ok)


def _blocks(n_state: int, group_dim: int, budget: int):
    block_n = triton.next_power_of_2(max(n_state, 1))
    block_t = state_spacing(n_state)
    block_d = max(1, min(triton.next_power_of_2(max(group_dim, 1)), budget // (block_n * block_t)))
    return block_d, block_n, block_t


def _strides(u, delta, A, B, C, z, h0) -> dict:
    return {**strides("u", u, "bdt"), **strides("delta", delta, "bdt"), **strides("a", A, "dn"),
            **strides("b", B, "bgnt"), **strides("c", C, "bgnt"), **strides("z", z, "bdt"),
            **strides("h0", h0, "bdn")}


def _grouped(x):
    """B or C as [B, G, N, L] (a [B, N, L] tensor is one group)."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus: bool):
    """Returns (out [B, D, L] in u's dtype, last_state fp32 [B, D, N], saved states fp32 [B, D, N, n_tiles])."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    n_groups = Bg.shape[1]
    group_dim = dim // n_groups
    chunk = state_spacing(n_state)
    n_tiles = triton.cdiv(length, chunk)
    out = torch.empty_like(u)
    last = torch.empty(batch, dim, n_state, device=u.device, dtype=torch.float32)
    ckpt = torch.empty(batch, dim, n_state, n_tiles, device=u.device, dtype=torch.float32)
    if length == 0:
        last.copy_(initial_state if initial_state is not None else torch.zeros_like(last))
        return out, last, ckpt
    block_d, block_n, block_t = _blocks(n_state, group_dim, 4096)
    dummy = u
    z_ = z if z is not None else u
    h0 = initial_state if initial_state is not None else last
    grid = (triton.cdiv(group_dim, block_d), batch * n_groups)
    scan_selective_fwd_kernel.launch(
        grid, U=u, DELTA=delta, A=A, B=Bg, C=Cg, DSKIP=D if D is not None else dummy, Z=z_,
        DBIAS=delta_bias if delta_bias is not None else dummy, H0=h0, OUT=out, LAST=last, CKPT=ckpt,
        **_strides(u, delta, A, Bg, Cg, z_, h0), **strides("out", out, "bdt"),
        dim=dim, n_groups=n_groups, group_dim=group_dim, n_state=n_state, length=length,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_INIT=initial_state is not None, SOFTPLUS=softplus, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t,
    )
    return out, last, ckpt


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, softplus: bool):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), None where an input is None."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    n_groups = Bg.shape[1]
    group_dim = dim // n_groups
    block_d, block_n, block_t = _blocks(n_state, group_dim, 2048)
    n_dblocks = triton.cdiv(group_dim, block_d)
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    du = torch.empty(batch, dim, length, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, length, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, dim, length, device=dev, dtype=z.dtype) if z is not None else None
    db_part = torch.empty(batch, n_groups, n_dblocks, n_state, length, **f32)
    dc_part = torch.empty(batch, n_groups, n_dblocks, n_state, length, **f32)
    da_part = torch.empty(batch, dim, n_state, **f32)
    dd_part = torch.empty(batch, dim, **f32)
    dbias_part = torch.empty(batch, dim, **f32)
    dh0 = torch.empty(batch, dim, n_state, **f32) if initial_state is not None else None
    if length > 0:
        dummy = u
        z_ = z if z is not None else u
        h0 = initial_state if initial_state is not None else da_part
        dlast_ = dlast.float().contiguous() if dlast is not None else da_part
        scan_selective_bwd_kernel.launch(
            (n_dblocks, batch * n_groups),
            DOUT=dout, DLAST=dlast_, U=u, DELTA=delta, A=A, B=Bg, C=Cg, DSKIP=D if D is not None else dummy, Z=z_,
            DBIAS=delta_bias if delta_bias is not None else dummy, H0=h0, CKPT=ckpt,
            DU=du, DDELTA=ddelta, DZ=dz if dz is not None else du, DB_PART=db_part, DC_PART=dc_part,
            DA_PART=da_part, DD_PART=dd_part, DBIAS_PART=dbias_part, DH0=dh0 if dh0 is not None else da_part,
            **_strides(u, delta, A, Bg, Cg, z_, h0), **strides("dout", dout, "bdt"),
            dim=dim, n_groups=n_groups, group_dim=group_dim, n_state=n_state, length=length, n_dblocks=n_dblocks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_INIT=initial_state is not None, HAS_DLAST=dlast is not None, SOFTPLUS=softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t,
        )
    else:
        for t in (da_part, dd_part, dbias_part):
            t.zero_()
        if dh0 is not None:
            dh0.copy_(dlast if dlast is not None else torch.zeros_like(dh0))
    return selective_scan_grads(du, ddelta, dz, da_part, db_part.sum(2), dc_part.sum(2), dd_part, dbias_part, dh0,
                                A, B, C, D, delta_bias, initial_state)
