"""FlashLLA in Triton: blockwise forward and backward with a matrix-free conjugate-gradient solve.

Per query i (softmax weights s_ij, centred keys y_ij = k_j - k_bar_i), the forward solves
``A_i z_i = k_bar_i - q_i`` with ``A_i = sum_j s_ij y_ij y_ij^T + lambda_i I`` and returns
``o_i = sum_j s_ij (1 - z_i . y_ij) v_j`` (docs/lla.md). Nothing of size T x T or D x D per query is ever
stored: one program owns a tile of queries and streams key/value tiles.

Forward, one program per (query tile, batch * head):
  1. statistics pass: online max, normalizer, weighted key sum (-> k_bar) and, for the Jacobi
     preconditioner, the weighted squared keys (-> diag A);
  2. conjugate gradient on the whole tile: each matrix-vector product ``A p`` is one pass over the keys
     with three tensor-core products (q K^T for the weights, p K^T, (s * (p . y)) K). The loop stops when
     every row of the tile has converged (relative residual <= tol) or after ``cg_max_iters``;
  3. output pass: ``o = sum_j l_ij v_j`` with the equivalent-kernel weights l_ij = s_ij (1 - z_i . y_ij).
Backward (implicit differentiation, never through the CG iterations):
  ``lla_dq_bwd_kernel`` per query tile: the adjoint right-hand side c_i = sum_j s_ij (g_i . v_j) y_ij,
  a second CG solve A_i r_i = c_i, then dq; it hands z and r (row-scaled, input dtype) and six scalars per row
  to ``lla_dkdv_bwd_kernel``, one program per key tile over the query tiles of every head of its GQA group
  (no atomics). The gradient of the ridge is r_i . z_i.
The split-KV decode kernel is in ``triton_decode.py``.

Low precision: the products run on the input dtype with fp32 accumulation. Every weighted sum that is later
centred uses the same rounded weights for the sum and for its normalizer, so the centring cancels the mean
exactly (the rounding never leaks a ``k_bar k_bar^T`` sized error into the covariance), and vectors that
enter a product (p, z, r) are scaled to max-abs 1 per row first (no fp16 overflow for small ridges).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, dot_precision, launcher, strides
from ..common.triton_math import LN2, LOG2E
from ..common.triton_numerics import masked_dot
from . import cg_stats
from .args import LLAArgs

# ----------------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, warps, stages) per head-dim bucket; the first entry is the default. The CG loop keeps about
# six [BLOCK_M, D] fp32 row vectors live (x, residual, direction, A p, k_bar, the product accumulator), so query
# tiles are smaller than in exact attention. Ordered by ptxas register spills for sm_90 (bf16): the first entries
# compile without spills (fwd, dq) or with under 0.5 KB (dK/dV); larger tiles spill more.
_CONFIGS = {
    "fwd": {64: [(32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2)],
            128: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2)]},
    "dq": {64: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2)],
           128: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)]},
    # dK/dV: BLOCK_N keys held, BLOCK_M queries streamed.
    "dkdv": {64: [(32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2), (32, 64, 4, 2)],
             128: [(32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2), (32, 64, 8, 1), (16, 32, 4, 2)]},
}
# Under the interpreter: small, unequal tiles so that short tests still cross tile and mask boundaries.
_INTERPRETED = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}
# Per-row scalars handed from the dq kernel to the dK/dV kernel: g_bar, phi_bar, z scale, z_lo.k_bar, r scale,
# r_lo.k_bar (k_bar shifted).
ROW_FIELDS = 6
BACKEND = "triton"


def _tile(block_m, block_n, warps, stages):
    return config(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n)


@functools.cache
def _candidates(kind: str, block_d: int) -> tuple:
    return tuple(_tile(*e) for e in _CONFIGS[kind][64 if block_d <= 64 else 128])


def _launch_options(kind: str) -> dict:
    return dict(configs=lambda args: _candidates(kind, args["BLOCK_D"]), interpreted=_tile(*_INTERPRETED[kind], 1, 1),
                key=["BLOCK_D", "CAUSAL"])



# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _load_tile(base, start, offs, offs_d, limit, stride, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """Rows [start, start + len(offs)) of a [T, D] matrix (row stride ``stride``), zero-padded."""
    ptrs = base + tl.cast(start, tl.int64) * stride + offs[:, None] * stride + offs_d[None, :]
    if MASK_ROWS:
        ok = (start + offs)[:, None] < limit
        if not EVEN_D:
            ok = ok & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(ptrs, mask=ok, other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _load_keys(k_base, shift, start, offs, offs_d, limit, stride, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A key tile as stored (for the logits) and shifted by the sequence's first key (for everything centred:
    moments, y_ij products; the shift keeps a common key offset from costing precision)."""
    k = _load_tile(k_base, start, offs, offs_d, limit, stride, HEAD_DIM, EVEN_D, MASK_ROWS)
    return k, (k.to(tl.float32) - shift[None, :]).to(k.dtype)


@triton.jit
def _key_origin(k_base, offs_d, seqlen_k, HEAD_DIM: tl.constexpr):
    """The first key of the sequence (zeros if there is none, or where it is not finite), fp32 [BLOCK_D]."""
    width = tl.minimum(seqlen_k, 1) * HEAD_DIM  # 0 when there is no key
    origin = tl.load(k_base + offs_d, mask=offs_d < width, other=0.0).to(tl.float32)
    return tl.where(tl.abs(origin) < float("inf"), origin, 0.0)


@triton.jit
def _logits2(q, k, rows, cols, seqlen_k, diag, qk_scale2, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """log2-domain logits [BLOCK_M, BLOCK_N]; invisible keys are -inf."""
    x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale2
    if MASKED:
        ok = cols[None, :] < seqlen_k
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + diag)
        x = tl.where(ok, x, float("-inf"))
    return x


@triton.jit
def _row_scaled(x):
    """x / max|x| per row (to be cast into a tl.dot operand without overflow) and the fp32 scale."""
    scale = tl.max(tl.abs(x), 1)
    scale = tl.where(scale > 0, scale, 1.0)
    return x / scale[:, None], scale


@triton.jit
def _centred(x_lo, x_scale, x_kbar, k, DOT_PRECISION: tl.constexpr):
    """(x_i . (k_j - k_bar_i)) [BLOCK_M, BLOCK_N] from the row-scaled x (see _row_scaled)."""
    xk = tl.dot(x_lo, tl.trans(k), input_precision=DOT_PRECISION)
    return (xk - x_kbar[:, None]) * x_scale[:, None]


@triton.jit
def _key_ranges(start_m, seqlen_k, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key tiles of query rows [start_m, start_m + BLOCK_M): [0, full) need no mask, [full, end) do."""
    end = seqlen_k
    full = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        end = tl.maximum(tl.minimum(end, start_m + BLOCK_M + diag), 0)
        full = tl.minimum(full, (tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N)
    end = tl.cdiv(end, BLOCK_N) * BLOCK_N
    full = tl.minimum(full, end)
    return full, end


# -------------------------------------------------------------------------------------- streamed passes
@triton.jit
def _stats_tile(m, l, k_sum, k_sq, q, k_base, shift, start_n, rows, offs_n, offs_d, seqlen_k, diag, stride_kt,
                qk_scale2, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, PRECOND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k, ks = _load_keys(k_base, shift, start_n, offs_n, offs_d, seqlen_k, stride_kt, HEAD_DIM, EVEN_D, MASKED)
    x = _logits2(q, k, rows, start_n + offs_n, seqlen_k, diag, qk_scale2, MASKED, CAUSAL, DOT_PRECISION)
    m_new = tl.maximum(m, tl.max(x, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    w = tl.exp2(x - m_ref[:, None]).to(k.dtype)
    alpha = tl.exp2(m - m_ref)
    l = l * alpha + tl.sum(w.to(tl.float32), 1)
    kf = ks.to(tl.float32)
    if MASKED:  # a NaN/Inf key hidden from a row must not reach it through 0 * k
        visible = x != float("-inf")
        k_sum = masked_dot(w, ks, visible, k_sum * alpha[:, None], DOT_PRECISION)
        if PRECOND:
            k_sq = masked_dot(w, (kf * kf).to(k.dtype), visible, k_sq * alpha[:, None], DOT_PRECISION)
    else:
        k_sum = tl.dot(w, ks, k_sum * alpha[:, None], input_precision=DOT_PRECISION)
        if PRECOND:
            k_sq = tl.dot(w, (kf * kf).to(k.dtype), k_sq * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l, k_sum, k_sq


@triton.jit
def _stats(q, k_base, shift, rows, offs_n, offs_d, seqlen_k, diag, stride_kt, qk_scale2, full, end,
           HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECOND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Row max m (log2), normalizer l = sum_j 2^(x_ij - m_i), sum_j w_ij k'_j and sum_j w_ij k'_j^2 (k' shifted)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    k_sum = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_sq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full, BLOCK_N):
        m, l, k_sum, k_sq = _stats_tile(m, l, k_sum, k_sq, q, k_base, shift, start_n, rows, offs_n, offs_d, seqlen_k,
                                        diag, stride_kt, qk_scale2, HEAD_DIM, EVEN_D, False, CAUSAL, PRECOND,
                                        DOT_PRECISION)
    for start_n in range(full, end, BLOCK_N):
        m, l, k_sum, k_sq = _stats_tile(m, l, k_sum, k_sq, q, k_base, shift, start_n, rows, offs_n, offs_d, seqlen_k,
                                        diag, stride_kt, qk_scale2, HEAD_DIM, EVEN_D, True, CAUSAL, PRECOND,
                                        DOT_PRECISION)
    return m, l, k_sum, k_sq


@triton.jit
def _matvec_tile(y, y_sum, p_lo, p_kbar, q, lse2, k_base, shift, start_n, rows, offs_n, offs_d, seqlen_k, diag,
                 stride_kt, qk_scale2, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k, ks = _load_keys(k_base, shift, start_n, offs_n, offs_d, seqlen_k, stride_kt, HEAD_DIM, EVEN_D, MASKED)
    x = _logits2(q, k, rows, start_n + offs_n, seqlen_k, diag, qk_scale2, MASKED, CAUSAL, DOT_PRECISION)
    s = tl.exp2(x - lse2[:, None])
    t = tl.dot(p_lo, tl.trans(ks), input_precision=DOT_PRECISION) - p_kbar[:, None]
    if MASKED:  # hidden entries: selects, not 0 * (NaN key)
        visible = x != float("-inf")
        st = tl.where(visible, s * t, 0.0).to(k.dtype)
        y = masked_dot(st, ks, visible, y, DOT_PRECISION)
    else:
        st = (s * t).to(k.dtype)
        y = tl.dot(st, ks, y, input_precision=DOT_PRECISION)
    y_sum += tl.sum(st.to(tl.float32), 1)
    return y, y_sum


@triton.jit
def _apply_system(p, q, k_bar, lam, lse2, k_base, shift, rows, offs_n, offs_d, seqlen_k, diag, stride_kt, qk_scale2,
                  full, end, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A p = sum_j s_ij (y_ij . p_i) y_ij + lambda_i p_i for every row, streaming the keys once."""
    p_lo, p_scale = _row_scaled(p)
    p_lo = p_lo.to(q.dtype)
    p_kbar = tl.sum(p_lo.to(tl.float32) * k_bar, 1)
    y = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    y_sum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, full, BLOCK_N):
        y, y_sum = _matvec_tile(y, y_sum, p_lo, p_kbar, q, lse2, k_base, shift, start_n, rows, offs_n, offs_d, seqlen_k,
                                diag, stride_kt, qk_scale2, HEAD_DIM, EVEN_D, False, CAUSAL, DOT_PRECISION)
    for start_n in range(full, end, BLOCK_N):
        y, y_sum = _matvec_tile(y, y_sum, p_lo, p_kbar, q, lse2, k_base, shift, start_n, rows, offs_n, offs_d, seqlen_k,
                                diag, stride_kt, qk_scale2, HEAD_DIM, EVEN_D, True, CAUSAL, DOT_PRECISION)
    return (y - y_sum[:, None] * k_bar) * p_scale[:, None] + lam[:, None] * p


@triton.jit
def _cg_solve(rhs, inv_diag, active, q, k_bar, lam, lse2, k_base, shift, rows, offs_n, offs_d, seqlen_k, diag,
              stride_kt, qk_scale2, full, end, cg_tol2, cg_max_iters, HEAD_DIM: tl.constexpr,
              EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, PRECOND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Preconditioned conjugate gradient for A_i x_i = rhs_i on every row of the tile at once. A row stops
    when ||rhs - A x|| <= tol ||rhs|| (or on a non-positive / NaN curvature); the tile stops when all have.
    Returns x and the iterations the tile ran."""
    x = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    res = rhs
    if PRECOND:
        pre = res * inv_diag
    else:
        pre = res
    p = pre
    rz = tl.sum(res * pre, 1)
    threshold = cg_tol2 * tl.sum(rhs * rhs, 1)
    active = active & (tl.sum(res * res, 1) > threshold)
    n_active = tl.sum(active.to(tl.int32), 0)
    it = tl.full([], 0, tl.int32)
    while (n_active > 0) & (it < cg_max_iters):
        ap = _apply_system(p, q, k_bar, lam, lse2, k_base, shift, rows, offs_n, offs_d, seqlen_k, diag, stride_kt,
                           qk_scale2, full, end, HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, DOT_PRECISION)
        curvature = tl.sum(p * ap, 1)
        step_ok = active & (curvature > 0)
        alpha = tl.where(step_ok, rz / tl.where(step_ok, curvature, 1.0), 0.0)
        # where, not a zero step: a row stopped on an inf/NaN product must not pick up 0 * inf.
        x = tl.where(step_ok[:, None], x + alpha[:, None] * p, x)
        res = tl.where(step_ok[:, None], res - alpha[:, None] * ap, res)
        active = step_ok & (tl.sum(res * res, 1) > threshold)
        if PRECOND:
            pre = res * inv_diag
        else:
            pre = res
        rz_new = tl.sum(res * pre, 1)
        beta = tl.where(active, rz_new / tl.where(rz > 0, rz, 1.0), 0.0)
        p = pre + beta[:, None] * p
        rz = rz_new
        n_active = tl.sum(active.to(tl.int32), 0)
        it += 1
    return x, it


@triton.jit
def _inverse_diagonal(k_sq, k_bar, lam):
    """Jacobi preconditioner 1 / diag(A) = 1 / (E_s[k^2] - k_bar^2 + lambda), guarded against rounding."""
    return 1.0 / (tl.maximum(k_sq - k_bar * k_bar, 0.0) + lam[:, None])


@triton.jit
def _output_tile(acc, z_lo, z_kbar, z_scale, gain, q, lse2, k_base, shift, v_base, start_n, rows, offs_n, offs_d,
                 seqlen_k, diag, stride_kt, stride_vt, qk_scale2, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k, ks = _load_keys(k_base, shift, start_n, offs_n, offs_d, seqlen_k, stride_kt, HEAD_DIM, EVEN_D, MASKED)
    v = _load_tile(v_base, start_n, offs_n, offs_d, seqlen_k, stride_vt, HEAD_DIM, EVEN_D, MASKED)
    x = _logits2(q, k, rows, start_n + offs_n, seqlen_k, diag, qk_scale2, MASKED, CAUSAL, DOT_PRECISION)
    s = tl.exp2(x - lse2[:, None])
    zy = _centred(z_lo, z_scale, z_kbar, ks, DOT_PRECISION)
    # l_ij / gain_i: bounded even when z is huge (tiny ridge), so it fits the dot operand's dtype.
    ell = s * (1.0 - zy) / gain[:, None]
    if MASKED:  # hidden entries: selects, not 0 * (NaN key or value)
        visible = x != float("-inf")
        return masked_dot(tl.where(visible, ell, 0.0), v, visible, acc, DOT_PRECISION)
    return tl.dot(ell.to(v.dtype), v, acc, input_precision=DOT_PRECISION)


# ----------------------------------------------------------------------------------------------- forward
@launcher(**_launch_options("fwd"))
@triton.jit
def lla_output_fwd_kernel(
    # pointers (Z is laid out like KBAR: [B, Tq, H, D] fp32; ITERS int32 [B, H, Tq], written if RECORD_ITERS)
    Q, K, V, RIDGE, O, LSE, KBAR, Z, ITERS,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_ridgeb, stride_ridget, stride_ridgeh,
    stride_kbarb, stride_kbart, stride_kbarh,
    # sizes and scalars
    seqlen_q, seqlen_k, num_heads, kv_group, qk_scale2, cg_tol2, cg_max_iters,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECOND: tl.constexpr,
    RECORD_ITERS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // kv_group
    if CAUSAL:  # heaviest query tiles first: better tail balance
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    diag = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    d_ok = offs_d[None, :] < HEAD_DIM

    q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh, start_m, offs_m, offs_d, seqlen_q, stride_qt,
                   HEAD_DIM, EVEN_D, True)
    lam = tl.load(RIDGE + b64 * stride_ridgeb + rows.to(tl.int64) * stride_ridget + h64 * stride_ridgeh, mask=row_ok,
                  other=1.0)
    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh
    shift = _key_origin(k_base, offs_d, seqlen_k, HEAD_DIM)
    full, end = _key_ranges(start_m, seqlen_k, diag, BLOCK_M, BLOCK_N, CAUSAL)

    m, l, k_sum, k_sq = _stats(q, k_base, shift, rows, offs_n, offs_d, seqlen_k, diag, stride_kt, qk_scale2, full, end,
                               HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, PRECOND, DOT_PRECISION)
    seen = l > 0.0
    norm = tl.where(seen, l, 1.0)
    k_bar = k_sum / norm[:, None]  # shifted, as every key-side quantity below
    lse2 = tl.where(seen, m + tl.log2(norm), float("inf"))  # +inf: a row with no key gets zero weights
    inv_diag = _inverse_diagonal(k_sq / norm[:, None], k_bar, lam)
    rhs = tl.where(seen[:, None], k_bar - (q.to(tl.float32) - shift[None, :]), 0.0)
    z, iterations = _cg_solve(rhs, inv_diag, seen & row_ok, q, k_bar, lam, lse2, k_base, shift, rows, offs_n,
                              offs_d, seqlen_k, diag, stride_kt, qk_scale2, full, end, cg_tol2, cg_max_iters,
                              HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, PRECOND, DOT_PRECISION)

    z_lo, z_scale = _row_scaled(z)
    z_lo = z_lo.to(q.dtype)
    z_kbar = tl.sum(z_lo.to(tl.float32) * k_bar, 1)
    gain = 1.0 + z_scale
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full, BLOCK_N):
        acc = _output_tile(acc, z_lo, z_kbar, z_scale, gain, q, lse2, k_base, shift, v_base, start_n, rows, offs_n,
                           offs_d, seqlen_k, diag, stride_kt, stride_vt, qk_scale2, HEAD_DIM, EVEN_D, False, CAUSAL,
                           DOT_PRECISION)
    for start_n in range(full, end, BLOCK_N):
        acc = _output_tile(acc, z_lo, z_kbar, z_scale, gain, q, lse2, k_base, shift, v_base, start_n, rows, offs_n,
                           offs_d, seqlen_k, diag, stride_kt, stride_vt, qk_scale2, HEAD_DIM, EVEN_D, True, CAUSAL,
                           DOT_PRECISION)
    out = acc * gain[:, None]

    ok = row_ok[:, None] & d_ok
    row64 = rows.to(tl.int64)
    tl.store(O + b64 * stride_ob + h64 * stride_oh + row64[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=ok)
    side = b64 * stride_kbarb + h64 * stride_kbarh + row64[:, None] * stride_kbart + offs_d[None, :]
    tl.store(KBAR + side, tl.where(seen[:, None], k_bar + shift[None, :], 0.0), mask=ok)
    tl.store(Z + side, z, mask=ok)
    lse = tl.where(seen, (m + tl.log2(norm)) * LN2, float("-inf"))
    tl.store(LSE + (b64 * num_heads + h64) * seqlen_q + rows, lse, mask=row_ok)
    if RECORD_ITERS:  # every row carries its tile's CG iterations (cg_stats)
        tl.store(ITERS + (b64 * num_heads + h64) * seqlen_q + rows, tl.zeros([BLOCK_M], tl.int32) + iterations,
                 mask=row_ok)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _adjoint_tile(c, g_sum, k_sq, q, do, lse2, k_base, shift, v_base, start_n, rows, offs_n, offs_d, seqlen_k, diag,
                  stride_kt, stride_vt, qk_scale2, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECOND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k, ks = _load_keys(k_base, shift, start_n, offs_n, offs_d, seqlen_k, stride_kt, HEAD_DIM, EVEN_D, MASKED)
    v = _load_tile(v_base, start_n, offs_n, offs_d, seqlen_k, stride_vt, HEAD_DIM, EVEN_D, MASKED)
    x = _logits2(q, k, rows, start_n + offs_n, seqlen_k, diag, qk_scale2, MASKED, CAUSAL, DOT_PRECISION)
    s = tl.exp2(x - lse2[:, None])
    gv = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    sg = (s * gv).to(k.dtype)
    c = tl.dot(sg, ks, c, input_precision=DOT_PRECISION)
    g_sum += tl.sum(sg.to(tl.float32), 1)
    if PRECOND:
        kf = ks.to(tl.float32)
        k_sq = tl.dot(s.to(k.dtype), (kf * kf).to(k.dtype), k_sq, input_precision=DOT_PRECISION)
    return c, g_sum, k_sq


@triton.jit
def _dq_tile(dq, z_lo, z_scale, z_kbar, r_lo, r_scale, r_kbar, g_bar, phi_bar, q, do, lse2, k_base, shift, v_base,
             start_n, rows, offs_n, offs_d, seqlen_k, diag, stride_kt, stride_vt, qk_scale2,
             HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    k, ks = _load_keys(k_base, shift, start_n, offs_n, offs_d, seqlen_k, stride_kt, HEAD_DIM, EVEN_D, MASKED)
    v = _load_tile(v_base, start_n, offs_n, offs_d, seqlen_k, stride_vt, HEAD_DIM, EVEN_D, MASKED)
    x = _logits2(q, k, rows, start_n + offs_n, seqlen_k, diag, qk_scale2, MASKED, CAUSAL, DOT_PRECISION)
    s = tl.exp2(x - lse2[:, None])
    gv = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    zy = _centred(z_lo, z_scale, z_kbar, ks, DOT_PRECISION)
    ry = _centred(r_lo, r_scale, r_kbar, ks, DOT_PRECISION)
    dlogit = s * ((1.0 - zy) * gv + g_bar[:, None] * zy - ry + ry * zy - phi_bar[:, None])
    # sum_j dlogit_ij = 0 (softmax), so sum_j dlogit_ij k_j = sum_j dlogit_ij k'_j: the shifted keys lose less.
    return tl.dot(dlogit.to(k.dtype), ks, dq, input_precision=DOT_PRECISION)


@launcher(**_launch_options("dq"))
@triton.jit
def lla_dq_bwd_kernel(
    # pointers (Z, Z_LO, R_LO are laid out like KBAR; LSE, DRIDGE, ITERS [B, H, Tq]; ROWS [B, H, Tq, ROW_FIELDS])
    Q, K, V, RIDGE, O, DO, LSE, KBAR, Z, DQ, Z_LO, R_LO, ROWS, DRIDGE, ITERS,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_ridgeb, stride_ridget, stride_ridgeh, stride_kbarb, stride_kbart, stride_kbarh,
    # sizes and scalars
    seqlen_q, seqlen_k, num_heads, kv_group, sm_scale, qk_scale2, cg_tol2, cg_max_iters,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECOND: tl.constexpr,
    RECORD_ITERS: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_FIELDS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // kv_group
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    diag = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    row64 = rows.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh, start_m, offs_m, offs_d, seqlen_q, stride_qt,
                   HEAD_DIM, EVEN_D, True)
    do = _load_tile(DO + b64 * stride_dob + h64 * stride_doh, start_m, offs_m, offs_d, seqlen_q, stride_dot,
                    HEAD_DIM, EVEN_D, True)
    o = _load_tile(O + b64 * stride_ob + h64 * stride_oh, start_m, offs_m, offs_d, seqlen_q, stride_ot,
                   HEAD_DIM, EVEN_D, True)
    do_o = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    side = b64 * stride_kbarb + h64 * stride_kbarh + row64[:, None] * stride_kbart + offs_d[None, :]
    k_bar_stored = tl.load(KBAR + side, mask=ok, other=0.0)
    lam = tl.load(RIDGE + b64 * stride_ridgeb + row64 * stride_ridget + h64 * stride_ridgeh, mask=row_ok, other=1.0)
    scalar_off = (b64 * num_heads + h64) * seqlen_q + rows
    lse = tl.load(LSE + scalar_off, mask=row_ok, other=float("-inf"))
    seen = lse > float("-inf")
    lse2 = tl.where(seen, lse * LOG2E, float("inf"))
    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh
    shift = _key_origin(k_base, offs_d, seqlen_k, HEAD_DIM)
    k_bar = k_bar_stored - shift[None, :]
    full, end = _key_ranges(start_m, seqlen_k, diag, BLOCK_M, BLOCK_N, CAUSAL)

    # Adjoint right-hand side c_i = sum_j s_ij (g_i . v_j) (k_j - k_bar_i).
    c = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    g_bar = tl.zeros([BLOCK_M], tl.float32)
    k_sq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full, BLOCK_N):
        c, g_bar, k_sq = _adjoint_tile(c, g_bar, k_sq, q, do, lse2, k_base, shift, v_base, start_n, rows, offs_n,
                                       offs_d, seqlen_k, diag, stride_kt, stride_vt, qk_scale2, HEAD_DIM, EVEN_D,
                                       False, CAUSAL, PRECOND, DOT_PRECISION)
    for start_n in range(full, end, BLOCK_N):
        c, g_bar, k_sq = _adjoint_tile(c, g_bar, k_sq, q, do, lse2, k_base, shift, v_base, start_n, rows, offs_n,
                                       offs_d, seqlen_k, diag, stride_kt, stride_vt, qk_scale2, HEAD_DIM, EVEN_D,
                                       True, CAUSAL, PRECOND, DOT_PRECISION)
    c = c - g_bar[:, None] * k_bar
    r, iterations = _cg_solve(c, _inverse_diagonal(k_sq, k_bar, lam), seen & row_ok, q, k_bar, lam, lse2, k_base,
                              shift, rows, offs_n, offs_d, seqlen_k, diag, stride_kt, qk_scale2, full, end, cg_tol2,
                              cg_max_iters, HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, PRECOND,
                              DOT_PRECISION)

    z = tl.load(Z + side, mask=ok, other=0.0)
    r_z = tl.sum(r * z, 1)
    phi_bar = do_o + tl.sum(r * (k_bar - (q.to(tl.float32) - shift[None, :])), 1) - lam * r_z
    z_lo, z_scale = _row_scaled(z)
    z_lo = z_lo.to(q.dtype)
    r_lo, r_scale = _row_scaled(r)
    r_lo = r_lo.to(q.dtype)
    z_kbar = tl.sum(z_lo.to(tl.float32) * k_bar, 1)
    r_kbar = tl.sum(r_lo.to(tl.float32) * k_bar, 1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full, BLOCK_N):
        dq = _dq_tile(dq, z_lo, z_scale, z_kbar, r_lo, r_scale, r_kbar, g_bar, phi_bar, q, do, lse2, k_base, shift,
                      v_base, start_n, rows, offs_n, offs_d, seqlen_k, diag, stride_kt, stride_vt, qk_scale2,
                      HEAD_DIM, EVEN_D, False, CAUSAL, DOT_PRECISION)
    for start_n in range(full, end, BLOCK_N):
        dq = _dq_tile(dq, z_lo, z_scale, z_kbar, r_lo, r_scale, r_kbar, g_bar, phi_bar, q, do, lse2, k_base, shift,
                      v_base, start_n, rows, offs_n, offs_d, seqlen_k, diag, stride_kt, stride_vt, qk_scale2,
                      HEAD_DIM, EVEN_D, True, CAUSAL, DOT_PRECISION)
    dq = dq * sm_scale + r

    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row64[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=ok)
    # For the dK/dV kernel: z and r as its dot operands, and the per-row scalars it needs.
    tl.store(Z_LO + side, z_lo, mask=ok)
    tl.store(R_LO + side, r_lo, mask=ok)
    row_base = ROWS + scalar_off * ROW_FIELDS
    tl.store(row_base + 0, g_bar, mask=row_ok)
    tl.store(row_base + 1, phi_bar, mask=row_ok)
    tl.store(row_base + 2, z_scale, mask=row_ok)
    tl.store(row_base + 3, z_kbar, mask=row_ok)
    tl.store(row_base + 4, r_scale, mask=row_ok)
    tl.store(row_base + 5, r_kbar, mask=row_ok)
    tl.store(DRIDGE + scalar_off, r_z, mask=row_ok)
    if RECORD_ITERS:  # every row carries its tile's CG iterations (cg_stats)
        tl.store(ITERS + scalar_off, tl.zeros([BLOCK_M], tl.int32) + iterations, mask=row_ok)


@triton.jit
def _dkdv_tile(dk, dv, k, ks, v, q_base, do_base, zlo_base, rlo_base, lse_base, rows_base, start_m, cols, offs_m,
               offs_d, seqlen_q, diag, stride_qt, stride_dot, stride_kbart, sm_scale, qk_scale2, HEAD_DIM: tl.constexpr,
               EVEN_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, ROW_FIELDS: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One query tile's contribution to dK, dV of a key tile, on transposed tiles [BLOCK_N, BLOCK_M]."""
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    q = _load_tile(q_base, start_m, offs_m, offs_d, seqlen_q, stride_qt, HEAD_DIM, EVEN_D, True)
    do = _load_tile(do_base, start_m, offs_m, offs_d, seqlen_q, stride_dot, HEAD_DIM, EVEN_D, True)
    z_lo = _load_tile(zlo_base, start_m, offs_m, offs_d, seqlen_q, stride_kbart, HEAD_DIM, EVEN_D, True)
    r_lo = _load_tile(rlo_base, start_m, offs_m, offs_d, seqlen_q, stride_kbart, HEAD_DIM, EVEN_D, True)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse > float("-inf"), lse * LOG2E, float("inf"))
    row_ptr = rows_base + rows.to(tl.int64) * ROW_FIELDS
    g_bar = tl.load(row_ptr + 0, mask=row_ok, other=0.0)
    phi_bar = tl.load(row_ptr + 1, mask=row_ok, other=0.0)
    z_scale = tl.load(row_ptr + 2, mask=row_ok, other=0.0)
    z_kbar = tl.load(row_ptr + 3, mask=row_ok, other=0.0)
    r_scale = tl.load(row_ptr + 4, mask=row_ok, other=0.0)
    r_kbar = tl.load(row_ptr + 5, mask=row_ok, other=0.0)

    x_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2
    if MASKED:
        if CAUSAL:
            x_t = tl.where(cols[:, None] <= rows[None, :] + diag, x_t, float("-inf"))
    s_t = tl.exp2(x_t - lse2[None, :])
    zy_t = (tl.dot(ks, tl.trans(z_lo), input_precision=DOT_PRECISION) - z_kbar[None, :]) * z_scale[None, :]
    ell_t = s_t * (1.0 - zy_t)
    dv = tl.dot(ell_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    ry_t = (tl.dot(ks, tl.trans(r_lo), input_precision=DOT_PRECISION) - r_kbar[None, :]) * r_scale[None, :]
    dk = tl.dot((-ell_t * r_scale[None, :]).to(q.dtype), r_lo, dk, input_precision=DOT_PRECISION)
    gv_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    # Direct (non-logit) dependence of the loss on k_j: sum_i [s_ij (g_bar_i - G_ij + r_i.y_ij) z_i - l_ij r_i].
    coef_z_t = s_t * (g_bar[None, :] - gv_t + ry_t) * z_scale[None, :]
    dk = tl.dot(coef_z_t.to(q.dtype), z_lo, dk, input_precision=DOT_PRECISION)
    dlogit_t = ell_t * gv_t + s_t * (g_bar[None, :] * zy_t - ry_t + ry_t * zy_t - phi_bar[None, :])
    dk = tl.dot((dlogit_t * sm_scale).to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@launcher(**_launch_options("dkdv"))
@triton.jit
def lla_dkdv_bwd_kernel(
    # pointers (Z_LO, R_LO are laid out like the forward's KBAR)
    Q, K, V, DO, LSE, Z_LO, R_LO, ROWS, DK, DV,
    # strides
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_kbarb, stride_kbart, stride_kbarh,
    # sizes and scalars
    seqlen_q, seqlen_k, num_heads, kv_group, sm_scale, qk_scale2,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROW_FIELDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    num_kv_heads = num_heads // kv_group
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    start_n = pid_n * BLOCK_N
    diag = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
    k, ks = _load_keys(k_base, _key_origin(k_base, offs_d, seqlen_k, HEAD_DIM), start_n, offs_n, offs_d, seqlen_k,
                       stride_kt, HEAD_DIM, EVEN_D, True)
    v = _load_tile(V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh, start_n, offs_n, offs_d, seqlen_k,
                   stride_vt, HEAD_DIM, EVEN_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query tiles that see this key tile: [lo, full) partly (mask), [full, end) entirely.
    lo = 0
    full = 0
    if CAUSAL:
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    lo = tl.minimum(lo, end)
    full = tl.minimum(tl.maximum(full, lo), end)
    for g in range(0, kv_group):
        h64 = tl.cast(h_kv * kv_group + g, tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_dob + h64 * stride_doh
        side = b64 * stride_kbarb + h64 * stride_kbarh
        scalar = (b64 * num_heads + h64) * seqlen_q
        for start_m in range(lo, full, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, ks, v, q_base, do_base, Z_LO + side, R_LO + side, LSE + scalar,
                                ROWS + scalar * ROW_FIELDS, start_m, cols, offs_m, offs_d, seqlen_q, diag, stride_qt,
                                stride_dot, stride_kbart, sm_scale, qk_scale2, HEAD_DIM, EVEN_D, True, CAUSAL,
                                ROW_FIELDS, DOT_PRECISION)
        for start_m in range(full, end, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, ks, v, q_base, do_base, Z_LO + side, R_LO + side, LSE + scalar,
                                ROWS + scalar * ROW_FIELDS, start_m, cols, offs_m, offs_d, seqlen_q, diag, stride_qt,
                                stride_dot, stride_kbart, sm_scale, qk_scale2, HEAD_DIM, EVEN_D, False, CAUSAL,
                                ROW_FIELDS, DOT_PRECISION)
    ok = (cols < seqlen_k)[:, None] & (offs_d[None, :] < HEAD_DIM)
    col64 = cols.to(tl.int64)
    tl.store(DK + b64 * stride_dkb + h_kv.to(tl.int64) * stride_dkh + col64[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b64 * stride_dvb + h_kv.to(tl.int64) * stride_dvh + col64[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------- launchers
def _features(q, a: LLAArgs) -> dict:
    d = q.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=a.causal,
                DOT_PRECISION=dot_precision(q.dtype))


def _token_strides(**tensors) -> dict:
    """(batch, token, head) strides of [B, T, H, D] tensors (and of the ridge, [B, Tq, H])."""
    out = {}
    for name, t in tensors.items():
        out.update(strides(name, t, "bth"))
    return out


def _iterations(q):
    """(ITERS, RECORD_ITERS): an int32 [B, H, Tq] buffer for the kernel to write each row's CG iterations into
    while cg_stats records, else a placeholder it never touches."""
    if cg_stats.recording():
        b, t_q, h, _ = q.shape
        return torch.zeros(b, h, t_q, device=q.device, dtype=torch.int32), True
    return q, False


def forward(q, k, v, ridge, a: LLAArgs):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], ridge fp32 view broadcast to [B, Tq, H] ->
    out (input dtype), lse fp32 [B, H, Tq] (natural log), k_bar and z fp32 [B, Tq, H, D]."""
    b, t_q, h, d = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t_q, device=q.device, dtype=torch.float32)
    k_bar = torch.empty(b, t_q, h, d, device=q.device, dtype=torch.float32)
    z = torch.empty_like(k_bar)
    if b * h * t_q == 0:
        return out, lse, k_bar, z
    iterations, record = _iterations(q)
    lla_output_fwd_kernel.launch(
        lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), b * h),
        Q=q, K=k, V=v, RIDGE=ridge, O=out, LSE=lse, KBAR=k_bar, Z=z, ITERS=iterations,
        **_token_strides(q=q, k=k, v=v, o=out, ridge=ridge, kbar=k_bar),
        seqlen_q=t_q, seqlen_k=t_k, num_heads=h, kv_group=h // h_kv, qk_scale2=a.softmax_scale * LOG2E.value,
        cg_tol2=a.cg_tol * a.cg_tol, cg_max_iters=a.cg_max_iters, PRECOND=a.cg_preconditioner,
        RECORD_ITERS=record, **_features(q, a))
    if record:
        cg_stats.report_rows("fwd", BACKEND, iterations, t_k, a.causal)
    return out, lse, k_bar, z


def backward(dout, q, k, v, out, lse, k_bar, z, ridge, a: LLAArgs):
    """(dq, dk, dv) in the input dtypes and dridge fp32 [B, Tq, H]."""
    b, t_q, h, d = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dridge = torch.zeros(b, h, t_q, device=q.device, dtype=torch.float32)
    if b * h * t_q * t_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dridge.transpose(1, 2)
    # Hand-off to the dK/dV kernel: z and r scaled per row (input dtype) and per-row scalars.
    z_lo = torch.empty(k_bar.shape, device=q.device, dtype=q.dtype)  # laid out like k_bar
    r_lo = torch.empty_like(z_lo)
    rows = torch.empty(b, h, t_q, ROW_FIELDS, device=q.device, dtype=torch.float32)
    common = dict(Q=q, K=k, V=v, DO=dout, Z_LO=z_lo, R_LO=r_lo, ROWS=rows, LSE=lse,
                  **_token_strides(q=q, k=k, v=v, do=dout, kbar=k_bar),
                  seqlen_q=t_q, seqlen_k=t_k, num_heads=h, kv_group=h // h_kv, sm_scale=a.softmax_scale,
                  qk_scale2=a.softmax_scale * LOG2E.value, ROW_FIELDS=ROW_FIELDS, **_features(q, a))
    iterations, record = _iterations(q)
    lla_dq_bwd_kernel.launch(
        lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), b * h),
        RIDGE=ridge, O=out, KBAR=k_bar, Z=z, DQ=dq, DRIDGE=dridge, ITERS=iterations,
        **_token_strides(o=out, dq=dq, ridge=ridge), cg_tol2=a.cg_tol * a.cg_tol, cg_max_iters=a.cg_max_iters,
        PRECOND=a.cg_preconditioner, RECORD_ITERS=record, **common)
    if record:
        cg_stats.report_rows("bwd", BACKEND, iterations, t_k, a.causal)
    lla_dkdv_bwd_kernel.launch(
        lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]), b * h_kv),
        DK=dk, DV=dv, **_token_strides(dk=dk, dv=dv), **common)
    return dq, dk, dv, dridge.transpose(1, 2)
