"""Local Linear Attention in pure PyTorch: the CPU path and the fallback on any device.

The algorithm of the Triton kernels (docs/lla.md), laid out for a CPU. Queries are processed in chunks; a chunk
(every head of its rows at once, the heads of a GQA group as more rows of the same product) computes its
softmax weights over all the keys it sees once and keeps them. Against those weights the system
``A_i z_i = k_bar_i - q_i`` is solved by conjugate gradient, each product ``A p`` being two matrix products
over the kept weights (``u_ij = s_ij p_i . k'_j``, then ``sum_j u_ij k'_j``, see ``_Chunk.apply``), and the output is
``o_i = sum_j s_ij (1 - z_i . y_ij) v_j``. So a chunk costs (4 + 2 * iterations) [rows, keys, D] products and
no D x D matrix per query. The backward recomputes the weights from the saved log-sum-exp, solves the adjoint
system ``A r = c`` the same way and applies the closed-form gradient. Memory: the weights and a few temporaries
of one chunk, ``[B*H, rows, Tk]``, within about TILE_ELEMENTS (fewer rows as Tk grows, at least 16): linear in T.

Decode (one query against a cache) keeps the exact D x D statistics instead (``state.combine_partials``): for a
single query they cost less than the CG passes and need no tolerance.

Computation is in fp32 (fp64 for fp64 inputs). When q, k or v hold a NaN/Inf, chunks that hide keys keep the
hidden entries out of every product (``flashops._numerics``): a non-finite key or value reaches only the
queries that see it.
"""

from __future__ import annotations

import torch

from ..._numerics import all_finite, compute_dtype, finite_or_zero, masked_matmul
from . import cg_stats
from .args import LLAArgs
from .state import combine_partials

# The weights of one query chunk against its keys, [B*H, rows, Tk], stay within about this many elements.
TILE_ELEMENTS = 1 << 21
MAX_QUERY_CHUNK = 128
BACKEND = "torch"


class _Problem:
    """One dense problem, heads grouped by KV head: q [N, G, Tq, D] (N = B * Hkv), keys and values [N, Tk, D],
    in the compute dtype (fp32, or fp64 for fp64 inputs)."""

    def __init__(self, q, k, v, ridge, a: LLAArgs):
        b, t_q, h, d = q.shape
        t_k, h_kv = k.shape[1], k.shape[2]
        self.sizes = (b, h_kv, h // h_kv, t_q, t_k, d)
        self.a = a
        self.off = t_k - t_q
        self.dtype = dt = compute_dtype(q.dtype)
        self.q = self.grouped(q)
        self.k = k.to(dt).permute(0, 2, 1, 3).reshape(b * h_kv, t_k, d)
        self.v = v.to(dt).permute(0, 2, 1, 3).reshape(b * h_kv, t_k, d)
        # Keys shifted by one of them: the covariance is shift-invariant, and moments of keys that share a large
        # common offset lose less to cancellation (q and k_bar are shifted alike where they meet keys). A
        # non-finite first key is no origin: it may be one that no query sees.
        self.shift = finite_or_zero(self.k[:, :1]) if t_k else self.k.new_zeros(b * h_kv, 1, d)
        self.ks = self.k - self.shift
        self.lam = self.grouped(ridge.expand(b, t_q, h)[..., None])[..., 0]  # [N, G, Tq]
        self.finite = all_finite(q, k, v)

    def grouped(self, x):
        """[B, Tq, H, D] -> [N, G, Tq, D] in the compute dtype."""
        b, h_kv, g, t_q, _, _ = self.sizes
        return x.to(self.dtype).reshape(b, t_q, h_kv, g, x.shape[-1]).permute(0, 2, 3, 1, 4).flatten(0, 1)

    def query_chunk(self) -> int:
        b, h_kv, g, t_q, t_k, _ = self.sizes
        return max(16, min(MAX_QUERY_CHUNK, TILE_ELEMENTS // max(1, b * h_kv * g * t_k), t_q))

    def key_end(self, i1: int) -> int:
        """One past the last key visible to any query before i1."""
        t_k = self.sizes[4]
        return max(0, min(t_k, i1 + self.off)) if self.a.causal else t_k

    def pairs(self, i0: int, i1: int) -> int:
        """Visible (query, key) pairs of queries [i0, i1), over every head."""
        b, h_kv, g, t_q, t_k, _ = self.sizes
        return b * h_kv * g * int(cg_stats.visible_keys(t_q, t_k, self.a.causal)[i0:i1].sum())


def rows(x, i0: int, i1: int):
    """Rows [i0, i1) of every group of x [N, G, T, ...] as [N, G * (i1 - i0), ...]."""
    return x[:, :, i0:i1].flatten(1, 2)


class _Chunk:
    """Queries [i0, i1) of every head, with their softmax weights s over the keys [0, hi) they see (exact zeros
    where hidden) and the weighted mean k_bar of the shifted keys. ``saved`` = (lse, k_bar) [N, R, 1], [N, R, D]
    from a forward takes them instead of computing them."""

    def __init__(self, p: _Problem, i0: int, i1: int, saved=None):
        self.p = p
        self.span = (i0, i1)
        g = p.sizes[2]
        self.hi = hi = p.key_end(i1)
        self.q = q = rows(p.q, i0, i1)
        self.lam = rows(p.lam[..., None], i0, i1)
        self.ks = p.ks[:, :hi]
        self.ks_t = self.ks.transpose(1, 2)
        x = torch.bmm(q, p.k[:, :hi].transpose(1, 2)).mul_(p.a.softmax_scale)
        self.visible = None
        if p.a.causal and hi - 1 > i0 + p.off:  # the chunk's first query does not see its last key
            query = torch.arange(i0, i1, device=x.device).repeat(g)
            visible = torch.arange(hi, device=x.device)[None, :] <= query[:, None] + p.off
            x.masked_fill_(~visible, float("-inf"))
            if not p.finite:  # then hidden entries must stay out of every product
                self.visible = visible
        if saved is None:
            m = x.amax(dim=-1, keepdim=True)
            s = x.sub_(m.masked_fill(torch.isneginf(m), 0.0)).exp_()
            total = s.sum(dim=-1, keepdim=True)
            self.seen = total > 0
            s.div_(total.masked_fill(~self.seen, 1.0))
            self.lse = (m + torch.log(total)).masked_fill(~self.seen, float("-inf"))
            self.s = self.select(s)
            self.k_bar = self.weighted(self.s, self.ks)  # shifted, as every key-side quantity here
        else:
            self.lse, k_bar = saved
            self.seen = self.lse > float("-inf")
            self.s = self.select(x.sub_(self.lse.masked_fill(~self.seen, float("inf"))).exp_())
            self.k_bar = k_bar - p.shift
        self.q_shifted = q - p.shift
        self._scratch = torch.empty_like(self.s)

    def select(self, x):
        """x where the key is visible (hidden entries exactly 0, even where x is NaN)."""
        return x if self.visible is None else torch.where(self.visible, x, torch.zeros((), dtype=x.dtype,
                                                                                          device=x.device))

    def weighted(self, w, x):
        """w @ x over the keys; a hidden non-finite key reaches no row."""
        return torch.bmm(w, x) if self.visible is None else masked_matmul(w, x, self.visible)

    def linear_factor(self, z, out=None):
        """1 - z_i . y_ij = 1 - z_i . (k'_j - k_bar_i) for every row and key, [N, R, hi]: the factor of the
        softmax weight in the equivalent kernel l_ij = s_ij (1 - z_i . y_ij)."""
        return torch.baddbmm(1.0 + _dot(z, self.k_bar), z, self.ks_t, alpha=-1.0, out=out)

    def apply(self, p):
        """A p = sum_j s_ij (p . y_ij) y_ij + lambda p for every row: two products over the kept weights.

        With u_ij = s_ij (p . k'_j): sum_j s (p . y) y = sum_j u k'_j - k_bar sum_j u, since sum_j s k'_j = k_bar
        and sum_j s = 1 (the centring of p . k'_j cancels). Centring t = p . y first costs a pass over the tile
        and is no more precise: t is formed from p . k'_j either way."""
        u = self.select(torch.bmm(p, self.ks_t, out=self._scratch).mul_(self.s))
        return self.weighted(u, self.ks).addcmul_(u.sum(-1, keepdim=True), self.k_bar, value=-1.0).addcmul_(self.lam, p)

    def inverse_diagonal(self):
        """Jacobi preconditioner 1 / diag(A) = 1 / (E_s[k'^2] - k_bar^2 + lambda), guarded against rounding."""
        squares = self.weighted(self.s, self.ks * self.ks)
        return 1.0 / ((squares - self.k_bar * self.k_bar).clamp_min(0.0) + self.lam)

    def solve(self, rhs, stage: str):
        """Conjugate gradient for A x = rhs on every row at once (``LLAArgs`` controls it). A row stops when
        ||rhs - A x|| <= tol ||rhs|| (or on a non-positive / NaN curvature), the chunk when all rows have. Each
        row's arithmetic depends on its own data only (a converged row is frozen by selects), so results do not
        depend on which rows share a chunk."""
        a = self.p.a
        inv_diag = self.inverse_diagonal() if a.cg_preconditioner else None
        x = torch.zeros_like(rhs)
        res = rhs
        direction = pre = res if inv_diag is None else res * inv_diag
        rr = _dot(res, res)
        rz = rr if inv_diag is None else _dot(res, pre)
        threshold = a.cg_tol * a.cg_tol * rr
        active = self.seen & (rr > threshold)
        zero = torch.zeros((), dtype=rhs.dtype, device=rhs.device)
        iterations = 0
        while iterations < a.cg_max_iters and bool(active.any()):
            ap = self.apply(direction)
            curvature = _dot(direction, ap)
            step_ok = active & (curvature > 0)
            alpha = torch.where(step_ok, rz / curvature, zero)
            # where, not a zero step: a row stopped on an inf/NaN product must not pick up 0 * inf
            x = torch.where(step_ok, x.addcmul(alpha, direction), x)
            res = torch.where(step_ok, res.addcmul(alpha, ap, value=-1.0), res)
            rr = _dot(res, res)
            active = step_ok & (rr > threshold)
            pre = res if inv_diag is None else res * inv_diag
            rz_new = rr if inv_diag is None else _dot(res, pre)
            # rz > 0 on an active row (its residual is above the threshold, >= 0)
            direction = torch.addcmul(pre, torch.where(active, rz_new / rz, zero), direction)
            rz = rz_new
            iterations += 1
        if cg_stats.recording():
            cg_stats.report(stage, BACKEND, iterations, self.p.pairs(*self.span))
        return x


def _dot(x, y):
    """Row-wise x . y over the last dimension, kept as a [..., 1] column."""
    return torch.linalg.vecdot(x, y).unsqueeze(-1)


def _ungroup(x, sizes):
    """[N, G, T, D] -> [B, T, H, D]."""
    b, h_kv, g = sizes[:3]
    return x.reshape(b, h_kv, g, x.shape[2], x.shape[3]).permute(0, 3, 1, 2, 4).flatten(2, 3)


def _like(template, values):
    """``values`` in a fresh tensor with the dtype and memory layout of ``template`` (as the custom ops promise)."""
    return torch.empty_like(template).copy_(values)


def forward(q, k, v, ridge, a: LLAArgs):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], ridge broadcastable to [B, Tq, H] -> out [B, Tq, H, D] (input
    dtype), lse [B, H, Tq] (natural log), k_bar and z [B, Tq, H, D] (fp32; fp64 for fp64 inputs)."""
    b, t_q, h, d = q.shape
    p = _Problem(q, k, v, ridge, a)
    n, g = p.q.shape[:2]
    dev, dt = p.q.device, p.dtype
    out = torch.zeros(n, g, t_q, d, device=dev, dtype=dt)
    lse = torch.full((n, g, t_q, 1), float("-inf"), device=dev, dtype=dt)
    k_bar = torch.zeros_like(out)
    z = torch.zeros_like(out)
    zero = torch.zeros((), dtype=dt, device=dev)
    chunk = p.query_chunk()
    for i0 in range(0, t_q, chunk):
        i1 = min(i0 + chunk, t_q)
        if p.key_end(i1) == 0:
            continue
        c = _Chunk(p, i0, i1)
        z_c = c.solve(torch.where(c.seen, c.k_bar - c.q_shifted, zero), "fwd")
        ell = c.select(c.linear_factor(z_c, out=c._scratch).mul_(c.s))
        part = (n, g, i1 - i0)
        out[:, :, i0:i1] = c.weighted(ell, p.v[:, :c.hi]).view(*part, d)
        lse[:, :, i0:i1] = c.lse.view(*part, 1)
        k_bar[:, :, i0:i1] = torch.where(c.seen, c.k_bar + p.shift, zero).view(*part, d)
        z[:, :, i0:i1] = z_c.view(*part, d)
    return (_like(q, _ungroup(out, p.sizes)), lse[..., 0].reshape(b, h, t_q), _ungroup(k_bar, p.sizes).contiguous(),
            _ungroup(z, p.sizes).contiguous())


def backward(dout, q, k, v, out, lse, k_bar, z, ridge, a: LLAArgs):
    """Gradients (dq, dk, dv in the input dtypes, dridge [B, Tq, H] fp32, fp64 for fp64 inputs) of the LLA output."""
    p = _Problem(q, k, v, ridge, a)
    b, h_kv, g, t_q, t_k, d = p.sizes
    n = b * h_kv
    dev, dt = p.q.device, p.dtype
    do_all, o_all = p.grouped(dout), p.grouped(out)
    k_bar_all, z_all = p.grouped(k_bar), p.grouped(z)
    lse_all = lse.to(dt).reshape(n, g, t_q, 1)
    dq = torch.zeros(n, g, t_q, d, device=dev, dtype=dt)
    dk = torch.zeros(n, t_k, d, device=dev, dtype=dt)
    dv = torch.zeros(n, t_k, d, device=dev, dtype=dt)
    dlam = torch.zeros(n, g, t_q, 1, device=dev, dtype=dt)
    scale = a.softmax_scale
    chunk = p.query_chunk()
    for i0 in range(0, t_q, chunk):
        i1 = min(i0 + chunk, t_q)
        hi = p.key_end(i1)
        if hi == 0:
            continue
        c = _Chunk(p, i0, i1, saved=(rows(lse_all, i0, i1), rows(k_bar_all, i0, i1)))
        s = c.s
        do_c, z_c = rows(do_all, i0, i1), rows(z_all, i0, i1)
        # Adjoint right-hand side c_i = sum_j s_ij G_ij y_ij with G_ij = g_i . v_j, and g_bar_i = sum_j s_ij G_ij.
        gv = torch.bmm(do_c, p.v[:, :hi].transpose(1, 2))
        sg = c.select(s * gv)
        g_bar = sg.sum(-1, keepdim=True)
        r = c.solve(c.weighted(sg, c.ks) - g_bar * c.k_bar, "bwd")
        r_z = (r * z_c).sum(-1, keepdim=True)
        phi_bar = ((do_c * rows(o_all, i0, i1)).sum(-1, keepdim=True)
                   + (r * (c.k_bar - c.q_shifted)).sum(-1, keepdim=True) - c.lam * r_z)
        # With w = 1 - z.y (so l = s w) and e = G - r.y - g_bar, the closed-form gradient (docs/lla.md) reads
        # dL/dlogit = s (e w + g_bar - phi_bar) and the coefficient of z_i in the direct dependence of the loss
        # on k_j is -s e: three [rows, keys] tiles, each formed in place where it can be.
        w = c.linear_factor(z_c)
        se = c.select(gv.add_(_dot(r, c.k_bar) - g_bar).baddbmm_(r, c.ks_t, alpha=-1.0).mul_(s))
        ell = c.select(s * w)
        dlogit = c.select(torch.addcmul(s * (g_bar - phi_bar), se, w))
        dq[:, :, i0:i1] = (r + scale * c.weighted(dlogit, c.ks)).view(n, g, i1 - i0, d)
        dk_c = torch.bmm(dlogit.transpose(1, 2), c.q).mul_(scale)
        dk_c.baddbmm_(se.transpose(1, 2), z_c, alpha=-1.0).baddbmm_(ell.transpose(1, 2), r, alpha=-1.0)
        dk[:, :hi] += dk_c
        dv[:, :hi].baddbmm_(ell.transpose(1, 2), do_c)
        dlam[:, :, i0:i1] = r_z.view(n, g, i1 - i0, 1)
    dridge = _ungroup(dlam, p.sizes)[..., 0]
    return (_like(q, _ungroup(dq, p.sizes)), _like(k, dk.view(b, h_kv, t_k, d).transpose(1, 2)),
            _like(v, dv.view(b, h_kv, t_k, d).transpose(1, 2)), dridge)


# The decode statistics of one chunk of the cache, [B, H, chunk, D], stay within about this many elements.
DECODE_TILE_ELEMENTS = 1 << 21


def decode(q, k_cache, v_cache, cache_seqlens, ridge, a: LLAArgs):
    """One query per sequence ([B, 1, H, D]) against the first cache_seqlens[b] (default: all) keys of the cache:
    exact D x D statistics of chunks of the cache, merged by max rescaling, one direct solve per (batch, head)."""
    b, _, h, d = q.shape
    t_k, h_kv = k_cache.shape[1], k_cache.shape[2]
    g = h // h_kv
    if t_k == 0 or b * h == 0:
        return torch.zeros_like(q)
    dt = compute_dtype(q.dtype)
    dev = q.device
    zero = torch.zeros((), dtype=dt, device=dev)
    q_rows = q[:, 0].to(dt).reshape(b, h_kv, g, d)
    k = k_cache.to(dt).transpose(1, 2)  # [B, Hkv, T, D]
    v = v_cache.to(dt).transpose(1, 2)
    origin = finite_or_zero(k[:, :, :1])  # the first key, where finite
    valid = None
    if cache_seqlens is not None:
        valid = (torch.arange(t_k, device=dev)[None, :] < cache_seqlens[:, None])[:, None, :, None]  # [B, 1, T, 1]
        # Cache rows past a sequence's length may hold anything (torch.empty): they never enter arithmetic.
        k, v = torch.where(valid, k, zero), torch.where(valid, v, zero)
        origin = torch.where(cache_seqlens[:, None, None, None] > 0, origin, zero)
    shifted = k - origin
    chunk = max(1, DECODE_TILE_ELEMENTS // max(1, b * h * d))
    parts = []
    for j0 in range(0, t_k, chunk):
        j1 = min(j0 + chunk, t_k)
        ks, v_c = shifted[:, :, None, j0:j1], v[:, :, None, j0:j1]  # [B, Hkv, 1, C, D]
        x = torch.matmul(q_rows, k[:, :, j0:j1].transpose(-1, -2)) * a.softmax_scale  # [B, Hkv, G, C]
        if valid is not None:
            x = x.masked_fill(~valid[:, :, j0:j1, 0][:, :, None], float("-inf"))
        m = x.amax(dim=-1)
        w = torch.exp(x - m.masked_fill(torch.isneginf(m), 0.0)[..., None])
        wk = w[..., None] * ks  # [B, Hkv, G, C, D]
        parts.append((m, w.sum(-1), wk.sum(-2), torch.matmul(w[..., None, :], v_c)[..., 0, :],
                      torch.matmul(wk.transpose(-1, -2), ks), torch.matmul((w[..., None] * v_c).transpose(-1, -2), ks)))
    m, total, k_sum, v_sum, kk, vk = (torch.stack(t, dim=3) for t in zip(*parts))
    lam = ridge[:, 0].to(dt).reshape(b, h_kv, g)
    out = combine_partials(q_rows - origin, m, total, k_sum, v_sum, kk, vk, lam)
    return out.reshape(b, 1, h, d).to(q.dtype)
