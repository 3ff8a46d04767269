"""Triton kernels for the first-order scans: ``linear_scan`` and ``selective_scan`` (forward and backward).

Both keep a block of independent channels per program and walk time in tiles of ``BLOCK_T`` steps: inside
a tile ``tl.associative_scan`` composes the affine maps ``h -> a h + b`` (combine: ``(a1, b1), (a2, b2) ->
(a1 a2, a2 b1 + b2)``, earlier step on the left), and the fp32 state at the tile's end is carried to the
next tile. Reverse scans load the tile in reversed time order and run the same forward scan, so there is
one combine convention. Padding steps are identity maps (a = 1, b = 0). Complex numbers travel as
interleaved (re, im) pairs (``torch.view_as_real``): a time stride of 2 and a component offset of 1.

The backward of ``h_t = a_t h_{t-1} + b_t`` is the reverse scan ``g_t = dh_t + conj(a_{t+1}) g_{t+1}``
with ``db_t = g_t``, ``da_t = g_t conj(h_{t-1})`` and ``dh0 = conj(a_0) g_0``; the same kernel runs it with
the gate loaded one step ahead (``GATE_SHIFT``) and the gate gradient fused in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import configs
from .common import linear_scan_backward, linear_scan_forward, state_spacing


# ------------------------------------------------------------------------------------------ combines
@triton.jit
def _affine_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _complex_affine_combine(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
            ar2 * br1 - ai2 * bi1 + br2, ar2 * bi1 + ai2 * br1 + bi2)


@triton.jit
def _last(x, cols, BLOCK_T: tl.constexpr):
    """Column BLOCK_T - 1 of a [R, BLOCK_T] tile (no run-time indexing of registers)."""
    return tl.sum(tl.where(cols[None, :] == BLOCK_T - 1, x, 0.0), axis=1)


# ------------------------------------------------------------------------------------- linear scan
@triton.jit
def linear_scan_kernel(
    A, X, INIT, OUT, PREV, PREV_INIT, DGATE,
    n_rows, n_inner, length,
    s_ab, s_ad, s_at, s_xb, s_xd, s_xt, s_ib, s_id, s_ob, s_od, s_ot, s_pb, s_pd, s_pt, s_qb, s_qd,
    s_gb, s_gd, s_gt,
    COMPLEX: tl.constexpr, REVERSE: tl.constexpr, GATE_SHIFT: tl.constexpr, CONJ_GATE: tl.constexpr,
    HAS_INIT: tl.constexpr, GRAD_GATE: tl.constexpr, HAS_PREV_INIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """OUT_t = gate_t * OUT_{t -/+ 1} + X_t over rows (batch, inner) of [B, Dm, L] tensors.

    gate_t = A[t + GATE_SHIFT] (conjugated if CONJ_GATE; 0 outside [0, L)). With GRAD_GATE it also writes
    DGATE_t = OUT_t * conj(PREV[t - GATE_SHIFT]) (PREV_INIT outside [0, L)): the gate gradient of the scan
    that this one differentiates.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    bi = (rows // n_inner).to(tl.int64)
    di = (rows % n_inner).to(tl.int64)
    cols = tl.arange(0, BLOCK_T)
    a_row = A + bi * s_ab + di * s_ad
    x_row = X + bi * s_xb + di * s_xd
    o_row = OUT + bi * s_ob + di * s_od
    carry_re = tl.zeros([BLOCK_R], dtype=tl.float32)
    carry_im = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_INIT:
        init = INIT + bi * s_ib + di * s_id
        carry_re = tl.load(init, mask=row_ok, other=0.0).to(tl.float32)
        if COMPLEX:
            carry_im = tl.load(init + 1, mask=row_ok, other=0.0).to(tl.float32)
    if GRAD_GATE:
        p_row = PREV + bi * s_pb + di * s_pd
        g_row = DGATE + bi * s_gb + di * s_gd
        prev0_re = tl.zeros([BLOCK_R], dtype=tl.float32)
        prev0_im = tl.zeros([BLOCK_R], dtype=tl.float32)
        if HAS_PREV_INIT:
            q = PREV_INIT + bi * s_qb + di * s_qd
            prev0_re = tl.load(q, mask=row_ok, other=0.0).to(tl.float32)
            if COMPLEX:
                prev0_im = tl.load(q + 1, mask=row_ok, other=0.0).to(tl.float32)
    n_blocks = tl.cdiv(length, BLOCK_T)
    for k in range(0, n_blocks):
        if REVERSE:
            t = (n_blocks - 1 - k) * BLOCK_T + (BLOCK_T - 1 - cols)
        else:
            t = k * BLOCK_T + cols
        t_ok = (t < length)[None, :] & row_ok[:, None]
        tg = t + GATE_SHIFT
        g_ok = t_ok & ((tg >= 0) & (tg < length))[None, :]
        a_ptr = a_row[:, None] + tg.to(tl.int64)[None, :] * s_at
        x_ptr = x_row[:, None] + t.to(tl.int64)[None, :] * s_xt
        a_re = tl.load(a_ptr, mask=g_ok, other=0.0).to(tl.float32)
        a_re = tl.where(t_ok, a_re, 1.0)
        x_re = tl.load(x_ptr, mask=t_ok, other=0.0).to(tl.float32)
        if COMPLEX:
            a_im = tl.load(a_ptr + 1, mask=g_ok, other=0.0).to(tl.float32)
            if CONJ_GATE:
                a_im = -a_im
            x_im = tl.load(x_ptr + 1, mask=t_ok, other=0.0).to(tl.float32)
            p_ar, p_ai, h_re, h_im = tl.associative_scan((a_re, a_im, x_re, x_im), 1, _complex_affine_combine)
            h_re, h_im = (h_re + p_ar * carry_re[:, None] - p_ai * carry_im[:, None],
                          h_im + p_ar * carry_im[:, None] + p_ai * carry_re[:, None])
            carry_im = _last(h_im, cols, BLOCK_T)
        else:
            p_ar, h_re = tl.associative_scan((a_re, x_re), 1, _affine_combine)
            h_re = h_re + p_ar * carry_re[:, None]
        carry_re = _last(h_re, cols, BLOCK_T)
        o_ptr = o_row[:, None] + t.to(tl.int64)[None, :] * s_ot
        tl.store(o_ptr, h_re.to(OUT.dtype.element_ty), mask=t_ok)
        if COMPLEX:
            tl.store(o_ptr + 1, h_im.to(OUT.dtype.element_ty), mask=t_ok)
        if GRAD_GATE:
            tp = t - GATE_SHIFT
            inside = ((tp >= 0) & (tp < length))[None, :]
            p_ptr = p_row[:, None] + tp.to(tl.int64)[None, :] * s_pt
            v_re = tl.load(p_ptr, mask=t_ok & inside, other=0.0).to(tl.float32)
            v_re = tl.where(inside, v_re, prev0_re[:, None])
            dg_ptr = g_row[:, None] + t.to(tl.int64)[None, :] * s_gt
            if COMPLEX:
                v_im = tl.load(p_ptr + 1, mask=t_ok & inside, other=0.0).to(tl.float32)
                v_im = tl.where(inside, v_im, prev0_im[:, None])
                tl.store(dg_ptr, (h_re * v_re + h_im * v_im).to(DGATE.dtype.element_ty), mask=t_ok)
                tl.store(dg_ptr + 1, (h_im * v_re - h_re * v_im).to(DGATE.dtype.element_ty), mask=t_ok)
            else:
                tl.store(dg_ptr, (h_re * v_re).to(DGATE.dtype.element_ty), mask=t_ok)


def _linear_cfg(block_r, block_t, warps):
    return triton.Config({"BLOCK_R": block_r, "BLOCK_T": block_t}, num_warps=warps, num_stages=1)


# (BLOCK_R, BLOCK_T, warps); the first entry runs when autotuning is off. The interpreter runs a generic scan
# element by element over the whole tile, padding included: one row and a short tile waste the least.
_LINEAR_CONFIGS = [(4, 256, 4), (2, 512, 4), (8, 128, 4), (4, 512, 8), (8, 256, 8), (16, 64, 4), (1, 1024, 4)]
_LINEAR_INTERPRETED = (1, 64, 1)
_LINEAR_TUNED: dict = {}


def _linear_kernel():
    key = "linear"
    if key not in _LINEAR_TUNED:
        candidates = configs([_linear_cfg(*c) for c in _LINEAR_CONFIGS], [_linear_cfg(*_LINEAR_INTERPRETED)])
        _LINEAR_TUNED[key] = triton.autotune(
            configs=candidates, key=["COMPLEX", "REVERSE", "GRAD_GATE"],
            restore_value=[] if len(candidates) == 1 else ["OUT", "DGATE"])(linear_scan_kernel)
    return _LINEAR_TUNED[key]


def _strides3(t: torch.Tensor):
    """(batch, channel, time) strides of a [B, D, L] (real) or [B, D, L, 2] (complex pairs) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _run_linear(gate, x, init, out, *, reverse, gate_shift, conj_gate, prev=None, prev_init=None, dgate=None):
    batch, inner, length = x.shape[:3]
    complex_ = x.dim() == 4
    dummy = x
    grad_gate = dgate is not None
    init_strides = (init.stride(0), init.stride(1)) if init is not None else (0, 0)
    prev_init_strides = (prev_init.stride(0), prev_init.stride(1)) if prev_init is not None else (0, 0)
    n_rows = batch * inner
    kernel = _linear_kernel()
    kernel[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)](
        gate, x, init if init is not None else dummy, out, prev if grad_gate else dummy,
        prev_init if prev_init is not None else dummy, dgate if grad_gate else dummy,
        n_rows, inner, length,
        *_strides3(gate), *_strides3(x), *init_strides, *_strides3(out),
        *(_strides3(prev) if grad_gate else (0, 0, 0)), *prev_init_strides,
        *(_strides3(dgate) if grad_gate else (0, 0, 0)),
        COMPLEX=complex_, REVERSE=reverse, GATE_SHIFT=gate_shift, CONJ_GATE=conj_gate,
        HAS_INIT=init is not None, GRAD_GATE=grad_gate, HAS_PREV_INIT=prev_init is not None,
    )


def linear_scan_fwd(a, b, initial_state, reverse: bool):
    """a, b: [B, D, L] real or [B, D, L, 2] complex pairs; initial_state [B, D] / [B, D, 2] or None."""
    return linear_scan_forward(_run_linear, a, b, initial_state, reverse)


def linear_scan_bwd(dh, a, h, initial_state, reverse: bool):
    """Gradients (da, db, d_initial_state or None) of linear_scan_fwd."""
    return linear_scan_backward(_run_linear, dh, a, h, initial_state, reverse)


# ----------------------------------------------------------------------------------- selective scan


@triton.jit
def _softplus(x):
    # max(x, 0) + log(1 + exp(-|x|)): no overflow, no libdevice.
    return tl.maximum(x, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(x) * 1.4426950408889634)) * 0.6931471805599453


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * 1.4426950408889634))


@triton.jit
def _adjoint_combine(f2, p2, s2, f1, p1, s1):
    """Reverse scan of the adjoint lambda_t = g_t + a_{t+1} lambda_{t+1} without shifting the gates.

    A segment [t, e] is (first gate a_t, product of its other gates, lambda_t restricted to the segment);
    the scan runs from the end, so the accumulated later segment is the left operand."""
    return f1, p1 * f2 * p2, s1 + p1 * f2 * s2


@triton.jit
def _ss_step_inputs(u_row, dl_row, s_ut, s_dt, t, t_ok, bias, A2,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, raw delta + bias, dt (0 on padding) [R, T] and the gate exp(dt A) [R, N, T] of one time tile."""
    u = tl.load(u_row[:, None] + t.to(tl.int64)[None, :] * s_ut, mask=t_ok, other=0.0).to(tl.float32)
    raw = tl.load(dl_row[:, None] + t.to(tl.int64)[None, :] * s_dt, mask=t_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    dt = tl.where(t_ok, dt, 0.0)  # padding steps are identity maps
    gate = tl.exp2(dt[:, None, :] * A2[:, :, None])
    return u, raw, dt, gate


@triton.jit
def _ss_program(pid_d, pid_bg, dim, n_groups, group_dim, n_state,
                s_ab_, s_an, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = pid_bg // n_groups
    g = pid_bg % n_groups
    local = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = local < group_dim
    d = (g * group_dim + local).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < n_state
    return b.to(tl.int64), g.to(tl.int64), d, d_ok, n, n_ok


@triton.jit
def selective_scan_fwd_kernel(
    U, DELTA, A, Bm, Cm, DSKIP, Z, DBIAS, H0, OUT, LAST, CKPT,
    dim, n_groups, group_dim, n_state, length,
    s_ub, s_ud, s_ut, s_db, s_dd, s_dt, s_ad, s_an, s_bb, s_bg, s_bn, s_bt, s_cb, s_cg, s_cn, s_ct,
    s_zb, s_zd, s_zt, s_hb, s_hd, s_hn, s_ob, s_od, s_ot,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: BLOCK_D channels of one (batch, group), all N states, time in tiles of BLOCK_T.
    Writes out [B, D, L], the last state and the state before every tile (CKPT [B, D, N, n_tiles])."""
    b, g, d, d_ok, n, n_ok = _ss_program(tl.program_id(0), tl.program_id(1), dim, n_groups, group_dim,
                                         n_state, s_ad, s_an, BLOCK_D, BLOCK_N)
    dn_ok = d_ok[:, None] & n_ok[None, :]
    A2 = tl.load(A + d[:, None] * s_ad + n[None, :] * s_an, mask=dn_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + d, mask=d_ok, other=0.0).to(tl.float32)
    skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        skip = tl.load(DSKIP + d, mask=d_ok, other=0.0).to(tl.float32)
    state_off = (b * dim + d)[:, None] * n_state + n[None, :]  # [B, D, N] contiguous fp32 buffers
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_INIT:
        h = tl.load(H0 + b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn, mask=dn_ok, other=0.0).to(tl.float32)
    u_row = U + b * s_ub + d * s_ud
    dl_row = DELTA + b * s_db + d * s_dd
    z_row = Z + b * s_zb + d * s_zd
    o_row = OUT + b * s_ob + d * s_od
    b_col = Bm + b * s_bb + g * s_bg + n * s_bn
    c_col = Cm + b * s_cb + g * s_cg + n * s_cn
    cols = tl.arange(0, BLOCK_T)
    n_tiles = tl.cdiv(length, BLOCK_T)
    for k in range(0, n_tiles):
        tl.store(CKPT + state_off * n_tiles + k, h, mask=dn_ok)
        t = k * BLOCK_T + cols
        t_in = t < length
        t_ok = d_ok[:, None] & t_in[None, :]
        u, raw, dt, gate = _ss_step_inputs(u_row, dl_row, s_ut, s_dt, t, t_ok, bias, A2, HAS_BIAS, SOFTPLUS)
        nt_ok = n_ok[:, None] & t_in[None, :]
        t64 = t.to(tl.int64)[None, :]
        b_t = tl.load(b_col[:, None] + t64 * s_bt, mask=nt_ok, other=0.0).to(tl.float32)
        c_t = tl.load(c_col[:, None] + t64 * s_ct, mask=nt_ok, other=0.0).to(tl.float32)
        x = (dt * u)[:, None, :] * b_t[None, :, :]
        prod, hs = tl.associative_scan((gate, x), 2, _affine_combine)
        hs = hs + prod * h[:, :, None]
        h = tl.sum(tl.where(cols[None, None, :] == BLOCK_T - 1, hs, 0.0), axis=2)
        y = tl.sum(hs * c_t[None, :, :], axis=1)
        if HAS_D:
            y = y + skip[:, None] * u
        if HAS_Z:
            zz = tl.load(z_row[:, None] + t64 * s_zt, mask=t_ok, other=0.0).to(tl.float32)
            y = y * zz * _sigmoid(zz)
        tl.store(o_row[:, None] + t64 * s_ot, y.to(OUT.dtype.element_ty), mask=t_ok)
    tl.store(LAST + state_off, h, mask=dn_ok)


@triton.jit
def selective_scan_bwd_kernel(
    DOUT, DLAST, U, DELTA, A, Bm, Cm, DSKIP, Z, DBIAS, H0, CKPT,
    DU, DDELTA, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DBIAS_PART, DH0,
    dim, n_groups, group_dim, n_state, length, n_dblocks,
    s_ub, s_ud, s_ut, s_db, s_dd, s_dt, s_ad, s_an, s_bb, s_bg, s_bn, s_bt, s_cb, s_cg, s_cn, s_ct,
    s_zb, s_zd, s_zt, s_hb, s_hd, s_hn, s_gb, s_gd, s_gt,
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
    b, g, d, d_ok, n, n_ok = _ss_program(pid_d, pid_bg, dim, n_groups, group_dim, n_state, s_ad, s_an,
                                         BLOCK_D, BLOCK_N)
    dn_ok = d_ok[:, None] & n_ok[None, :]
    a_dn = tl.load(A + d[:, None] * s_ad + n[None, :] * s_an, mask=dn_ok, other=0.0).to(tl.float32)
    A2 = a_dn * 1.4426950408889634
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + d, mask=d_ok, other=0.0).to(tl.float32)
    skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        skip = tl.load(DSKIP + d, mask=d_ok, other=0.0).to(tl.float32)
    state_off = (b * dim + d)[:, None] * n_state + n[None, :]
    mu = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # exp(dt A) lambda at the first step of the later tile
    if HAS_DLAST:
        mu = tl.load(DLAST + state_off, mask=dn_ok, other=0.0)
    u_row = U + b * s_ub + d * s_ud
    dl_row = DELTA + b * s_db + d * s_dd
    z_row = Z + b * s_zb + d * s_zd
    g_row = DOUT + b * s_gb + d * s_gd
    b_col = Bm + b * s_bb + g * s_bg + n * s_bn
    c_col = Cm + b * s_cb + g * s_cg + n * s_cn
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
        u, raw, dt, gate = _ss_step_inputs(u_row, dl_row, s_ut, s_dt, t, t_ok, bias, A2, HAS_BIAS, SOFTPLUS)
        nt_ok = n_ok[:, None] & t_in[None, :]
        b_t = tl.load(b_col[:, None] + t64 * s_bt, mask=nt_ok, other=0.0).to(tl.float32)
        c_t = tl.load(c_col[:, None] + t64 * s_ct, mask=nt_ok, other=0.0).to(tl.float32)
        x = (dt * u)[:, None, :] * b_t[None, :, :]
        h0 = tl.load(CKPT + state_off * n_tiles + k, mask=dn_ok, other=0.0)
        prod, hs = tl.associative_scan((gate, x), 2, _affine_combine)
        hs = hs + prod * h0[:, :, None]
        dout = tl.load(g_row[:, None] + t64 * s_gt, mask=t_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.sum(hs * c_t[None, :, :], axis=1)
            if HAS_D:
                y = y + skip[:, None] * u
            zz = tl.load(z_row[:, None] + t64 * s_zt, mask=t_ok, other=0.0).to(tl.float32)
            sig = _sigmoid(zz)
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
            ddt = ddt * _sigmoid(raw)
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


def _ss_blocks(n_state: int, group_dim: int, budget: int):
    block_n = triton.next_power_of_2(max(n_state, 1))
    block_t = state_spacing(n_state)
    block_d = max(1, min(triton.next_power_of_2(max(group_dim, 1)), budget // (block_n * block_t)))
    return block_d, block_n, block_t


def _warps_cfg(warps):
    return triton.Config({}, num_warps=warps, num_stages=1)


_SS_TUNED: dict = {}


def _ss_kernel(kind: str):
    if kind not in _SS_TUNED:
        fn = selective_scan_fwd_kernel if kind == "fwd" else selective_scan_bwd_kernel
        restore = ["OUT", "LAST", "CKPT"] if kind == "fwd" else ["DU", "DDELTA", "DZ", "DB_PART", "DC_PART"]
        candidates = configs([_warps_cfg(w) for w in (4, 8, 2)], [_warps_cfg(1)])
        _SS_TUNED[kind] = triton.autotune(
            configs=candidates, key=["BLOCK_D", "BLOCK_N", "HAS_Z", "HAS_INIT"],
            restore_value=restore if len(candidates) > 1 else [])(fn)
    return _SS_TUNED[kind]


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
    block_d, block_n, block_t = _ss_blocks(n_state, group_dim, 4096)
    dummy = u
    z_ = z if z is not None else u
    h0 = initial_state if initial_state is not None else last
    grid = (triton.cdiv(group_dim, block_d), batch * n_groups)
    _ss_kernel("fwd")[grid](
        u, delta, A, Bg, Cg, D if D is not None else dummy, z_, delta_bias if delta_bias is not None else dummy,
        h0, out, last, ckpt,
        dim, n_groups, group_dim, n_state, length,
        *u.stride(), *delta.stride(), *A.stride(), *Bg.stride(), *Cg.stride(), *z_.stride(), *h0.stride(),
        *out.stride(),
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
    block_d, block_n, block_t = _ss_blocks(n_state, group_dim, 2048)
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
        _ss_kernel("bwd")[(n_dblocks, batch * n_groups)](
            dout, dlast_, u, delta, A, Bg, Cg, D if D is not None else dummy, z_,
            delta_bias if delta_bias is not None else dummy, h0, ckpt,
            du, ddelta, dz if dz is not None else du, db_part, dc_part, da_part, dd_part, dbias_part,
            dh0 if dh0 is not None else da_part,
            dim, n_groups, group_dim, n_state, length, n_dblocks,
            *u.stride(), *delta.stride(), *A.stride(), *Bg.stride(), *Cg.stride(), *z_.stride(), *h0.stride(),
            *dout.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_INIT=initial_state is not None, HAS_DLAST=dlast is not None, SOFTPLUS=softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t,
        )
    else:
        for t in (da_part, dd_part, dbias_part):
            t.zero_()
        if dh0 is not None:
            dh0.copy_(dlast if dlast is not None else torch.zeros_like(dh0))
    dB = db_part.sum(2)
    dC = dc_part.sum(2)
    if B.dim() == 3:
        dB, dC = dB.squeeze(1), dC.squeeze(1)
    return (du, ddelta, da_part.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dd_part.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(initial_state.dtype) if dh0 is not None else None)
