"""Triton kernel of ``linear_scan`` (forward, and the backward as a reverse scan of the same kernel).

A block of independent channels per program walks time in tiles of ``BLOCK_T`` steps: inside a tile
``tl.associative_scan`` composes the affine maps ``h -> a h + b`` (combine: ``(a1, b1), (a2, b2) -> (a1 a2,
a2 b1 + b2)``, earlier step on the left), and the fp32 state at the tile's end is carried to the next tile.
Reverse scans load the tile in reversed time order and run the same forward scan, so there is one combine
convention. Padding steps are identity maps (a = 1, b = 0). Complex numbers travel as interleaved (re, im)
pairs (``torch.view_as_real``): a time stride of 2 and a component offset of 1.

The backward of ``h_t = a_t h_{t-1} + b_t`` is the reverse scan ``g_t = dh_t + conj(a_{t+1}) g_{t+1}`` with
``db_t = g_t``, ``da_t = g_t conj(h_{t-1})`` and ``dh0 = conj(a_0) g_0``; the same kernel runs it with the gate
loaded one step ahead (``GATE_SHIFT``) and the gate gradient fused in.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..._triton_utils import config, launcher, strides
from .common import linear_scan_backward, linear_scan_forward

# (BLOCK_R, BLOCK_T, warps); the first entry is the default. The interpreter runs a generic scan element by
# element over the whole tile, padding included: one row and a short tile waste the least.
_CONFIGS = [(4, 256, 4), (2, 512, 4), (8, 128, 4), (4, 512, 8), (8, 256, 8), (16, 64, 4), (1, 1024, 4)]


@triton.jit
def affine_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _complex_affine_combine(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
            ar2 * br1 - ai2 * bi1 + br2, ar2 * bi1 + ai2 * br1 + bi2)


@triton.jit
def _last(x, cols, BLOCK_T: tl.constexpr):
    """Column BLOCK_T - 1 of a [R, BLOCK_T] tile (no run-time indexing of registers)."""
    return tl.sum(tl.where(cols[None, :] == BLOCK_T - 1, x, 0.0), axis=1)


@launcher(configs=[config(warps, 1, BLOCK_R=rows, BLOCK_T=steps) for rows, steps, warps in _CONFIGS],
          interpreted=config(1, 1, BLOCK_R=1, BLOCK_T=64), key=["COMPLEX", "REVERSE", "GRAD_GATE"],
          restore_value=["OUT", "DGATE"])
@triton.jit
def scan_linear_fwd_kernel(
    # pointers
    A, X, INIT, OUT, PREV, PREV_INIT, DGATE,
    # strides (of [B, D, L] tensors, complex ones as [B, D, L, 2]; INIT and PREV_INIT are [B, D])
    stride_ab, stride_ad, stride_at, stride_xb, stride_xd, stride_xt, stride_initb, stride_initd,
    stride_outb, stride_outd, stride_outt, stride_prevb, stride_prevd, stride_prevt,
    stride_prev_initb, stride_prev_initd, stride_dgateb, stride_dgated, stride_dgatet,
    # sizes
    n_rows, n_inner, length,
    # meta-parameters
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
    a_row = A + bi * stride_ab + di * stride_ad
    x_row = X + bi * stride_xb + di * stride_xd
    o_row = OUT + bi * stride_outb + di * stride_outd
    carry_re = tl.zeros([BLOCK_R], dtype=tl.float32)
    carry_im = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_INIT:
        init = INIT + bi * stride_initb + di * stride_initd
        carry_re = tl.load(init, mask=row_ok, other=0.0).to(tl.float32)
        if COMPLEX:
            carry_im = tl.load(init + 1, mask=row_ok, other=0.0).to(tl.float32)
    if GRAD_GATE:
        p_row = PREV + bi * stride_prevb + di * stride_prevd
        g_row = DGATE + bi * stride_dgateb + di * stride_dgated
        prev0_re = tl.zeros([BLOCK_R], dtype=tl.float32)
        prev0_im = tl.zeros([BLOCK_R], dtype=tl.float32)
        if HAS_PREV_INIT:
            q = PREV_INIT + bi * stride_prev_initb + di * stride_prev_initd
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
        a_ptr = a_row[:, None] + tg.to(tl.int64)[None, :] * stride_at
        x_ptr = x_row[:, None] + t.to(tl.int64)[None, :] * stride_xt
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
            p_ar, h_re = tl.associative_scan((a_re, x_re), 1, affine_combine)
            h_re = h_re + p_ar * carry_re[:, None]
        carry_re = _last(h_re, cols, BLOCK_T)
        o_ptr = o_row[:, None] + t.to(tl.int64)[None, :] * stride_outt
        tl.store(o_ptr, h_re.to(OUT.dtype.element_ty), mask=t_ok)
        if COMPLEX:
            tl.store(o_ptr + 1, h_im.to(OUT.dtype.element_ty), mask=t_ok)
        if GRAD_GATE:
            tp = t - GATE_SHIFT
            inside = ((tp >= 0) & (tp < length))[None, :]
            p_ptr = p_row[:, None] + tp.to(tl.int64)[None, :] * stride_prevt
            v_re = tl.load(p_ptr, mask=t_ok & inside, other=0.0).to(tl.float32)
            v_re = tl.where(inside, v_re, prev0_re[:, None])
            dg_ptr = g_row[:, None] + t.to(tl.int64)[None, :] * stride_dgatet
            if COMPLEX:
                v_im = tl.load(p_ptr + 1, mask=t_ok & inside, other=0.0).to(tl.float32)
                v_im = tl.where(inside, v_im, prev0_im[:, None])
                tl.store(dg_ptr, (h_re * v_re + h_im * v_im).to(DGATE.dtype.element_ty), mask=t_ok)
                tl.store(dg_ptr + 1, (h_im * v_re - h_re * v_im).to(DGATE.dtype.element_ty), mask=t_ok)
            else:
                tl.store(dg_ptr, (h_re * v_re).to(DGATE.dtype.element_ty), mask=t_ok)


def _scan(gate, x, init, out, *, reverse, gate_shift, conj_gate, prev=None, prev_init=None, dgate=None):
    batch, inner, length = x.shape[:3]
    dummy = x
    grad_gate = dgate is not None
    n_rows = batch * inner
    scan_linear_fwd_kernel.launch(
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),),
        A=gate, X=x, INIT=init if init is not None else dummy, OUT=out, PREV=prev if grad_gate else dummy,
        PREV_INIT=prev_init if prev_init is not None else dummy, DGATE=dgate if grad_gate else dummy,
        **strides("a", gate, "bdt"), **strides("x", x, "bdt"), **strides("init", init, "bd"),
        **strides("out", out, "bdt"), **strides("prev", prev if grad_gate else None, "bdt"),
        **strides("prev_init", prev_init, "bd"), **strides("dgate", dgate, "bdt"),
        n_rows=n_rows, n_inner=inner, length=length,
        COMPLEX=x.dim() == 4, REVERSE=reverse, GATE_SHIFT=gate_shift, CONJ_GATE=conj_gate,
        HAS_INIT=init is not None, GRAD_GATE=grad_gate, HAS_PREV_INIT=prev_init is not None,
    )


def linear_scan_fwd(a, b, initial_state, reverse: bool):
    """a, b: [B, D, L] real or [B, D, L, 2] complex pairs; initial_state [B, D] / [B, D, 2] or None."""
    return linear_scan_forward(_scan, a, b, initial_state, reverse)


def linear_scan_bwd(dh, a, h, initial_state, reverse: bool):
    """Gradients (da, db, d_initial_state or None) of linear_scan_fwd."""
    return linear_scan_backward(_scan, dh, a, h, initial_state, reverse)
