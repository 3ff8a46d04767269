"""Memory-efficient Local Linear Attention in pure PyTorch: the CPU path and the fallback on any device.

Queries are processed in chunks; for each chunk the keys are streamed in chunks with an online max
rescaling of the accumulated statistics (softmax normalizer, weighted key sum and weighted second moment).
With them the chunk's D x D systems ``(C_kk + lambda I) z = k_bar - q`` are formed and solved directly,
which is exact (no iterative tolerance) and costs O(chunk * D^2) memory, independent of T. A second pass
applies the equivalent kernel ``l_ij = s_ij (1 - z_i . (k_j - k_bar_i))`` to the values. The backward
recomputes the systems, solves the adjoint system ``A r = c`` and applies the closed-form gradient
(docs/lla.md) chunk by chunk. The conjugate-gradient controls of ``LLAArgs`` are not used here.

Computation is in fp32 (fp64 for fp64 inputs). When q, k or v hold a NaN/Inf, chunks with masked keys keep
the masked entries out of every product (``flashops._numerics``): a non-finite key or value reaches only the
queries that see it.
"""

from __future__ import annotations

import torch

from ..._numerics import all_finite, compute_dtype, finite_or_zero, masked_matmul
from .args import LLAArgs

# Temporaries stay within about this many fp32 elements per chunk (chunk sizes adapt to B*H and D).
TILE_ELEMENTS = 1 << 22
MAX_QUERY_CHUNK = 256
MAX_KEY_CHUNK = 512


def _chunk_sizes(bh: int, bh_kv: int, d: int, t_q: int, t_k: int) -> tuple[int, int]:
    per_row = max(1, bh * d * d)
    query_chunk = max(16, min(MAX_QUERY_CHUNK, TILE_ELEMENTS // per_row, t_q))
    key_chunk = max(16, min(MAX_KEY_CHUNK, TILE_ELEMENTS // max(1, bh_kv * d * d), t_k))
    return query_chunk, key_chunk


class _Problem:
    """One dense problem in grouped layout: q [B, Hkv, G, Tq, D], k/v [B, Hkv, 1, Tk, D] in the compute dtype
    (fp32, or fp64 for fp64 inputs)."""

    def __init__(self, q, k, v, ridge, a: LLAArgs, key_lengths=None):
        b, t_q, h, d = q.shape
        t_k, h_kv = k.shape[1], k.shape[2]
        g = h // h_kv
        self.shape = (b, h_kv, g, t_q, t_k, d)
        self.a = a
        self.off = t_k - t_q
        self.dtype = dt = compute_dtype(q.dtype)
        self.q = q.to(dt).reshape(b, t_q, h_kv, g, d).permute(0, 2, 3, 1, 4)
        self.k = k.to(dt).permute(0, 2, 1, 3).unsqueeze(2)
        # Keys shifted by one of them: the covariance is shift-invariant, and moments of keys that share a
        # large common offset lose less to cancellation. q, k_bar are shifted alike where they meet keys.
        # (A non-finite first key is no origin: it may be one that no query sees.)
        self.shift = finite_or_zero(self.k[..., :1, :]) if t_k else torch.zeros_like(self.k[..., :1, :])
        self.ks = self.k - self.shift
        self.v = v.to(dt).permute(0, 2, 1, 3).unsqueeze(2)
        self.lam = ridge.to(dt).expand(b, t_q, h).reshape(b, t_q, h_kv, g).permute(0, 2, 3, 1)
        self.key_lengths = key_lengths
        self.min_length = None if key_lengths is None else int(key_lengths.min()) if key_lengths.numel() else 0
        self.eye = torch.eye(d, device=q.device, dtype=dt)
        self.finite = all_finite(q, k, v)

    def grouped(self, x):
        """[B, Tq, H, D] -> [B, Hkv, G, Tq, D] (compute dtype)."""
        b, h_kv, g, t_q, _, d = self.shape
        return x.to(self.dtype).reshape(b, t_q, h_kv, g, d).permute(0, 2, 3, 1, 4)

    def chunks(self):
        b, h_kv, g, t_q, t_k, d = self.shape
        return _chunk_sizes(b * h_kv * g, b * h_kv, d, t_q, t_k)

    def key_end(self, i1: int) -> int:
        """One past the last key visible to any query before i1."""
        t_k = self.shape[4]
        return max(0, min(t_k, i1 + self.off)) if self.a.causal else t_k

    def logits(self, i0, i1, j0, j1):
        """Logits of queries [i0, i1) against keys [j0, j1), -inf where a key is hidden, and the visibility
        mask when the chunk hides keys and an input is not finite (the products must then be contained)."""
        x = torch.matmul(self.q[..., i0:i1, :], self.k[..., j0:j1, :].transpose(-1, -2)) * self.a.softmax_scale
        causal_cut = self.a.causal and j1 - 1 > i0 + self.off
        length_cut = self.key_lengths is not None and j1 > self.min_length
        visible = None
        if causal_cut or length_cut:
            cols = torch.arange(j0, j1, device=x.device)
            visible = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=x.device)
            if causal_cut:
                rows = torch.arange(i0, i1, device=x.device)
                visible = cols[None, :] <= rows[:, None] + self.off
            visible = visible.expand(x.shape[0], 1, 1, -1, -1)
            if length_cut:
                visible = visible & (cols < self.key_lengths.reshape(-1, 1, 1, 1, 1))
            x = x.masked_fill(~visible, float("-inf"))
        return x, (None if self.finite else visible)

    def weights(self, i0, i1, j0, j1, row_lse):
        """Softmax weights s [.., Ci, Cj] (exact zeros where hidden) and the visibility mask (or None)."""
        x, visible = self.logits(i0, i1, j0, j1)
        s = torch.exp(x - row_lse)
        return (s if visible is None else torch.where(visible, s, torch.zeros((), dtype=s.dtype))), visible

    def outer(self, j0, j1):
        """k_j k_j^T of a chunk of shifted keys, flattened: [B, Hkv, 1, Ck, D*D]."""
        k = self.ks[..., j0:j1, :]
        return (k[..., :, None] * k[..., None, :]).flatten(-2)

    def system(self, second, k_bar, i0, i1):
        """A = E_s[k k^T] - k_bar k_bar^T + lambda I for queries [i0, i1) from shifted moments."""
        d = self.shape[-1]
        cov = second.reshape(*second.shape[:-1], d, d) - k_bar[..., :, None] * k_bar[..., None, :]
        return cov + self.lam[..., i0:i1, None, None] * self.eye


def _weighted_sum(w, x, visible):
    """w @ x over keys; contained (a hidden non-finite key reaches no row) when ``visible`` is given."""
    return torch.matmul(w, x) if visible is None else masked_matmul(w, x, visible)


def _select(visible, x):
    """x where visible (hidden entries exactly 0, even where x is NaN); x itself when nothing is hidden."""
    return x if visible is None else torch.where(visible, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _solve(system, rhs):
    return torch.linalg.solve_ex(system, rhs[..., None])[0][..., 0]


def _forward_one(p: _Problem):
    b, h_kv, g, t_q, t_k, d = p.shape
    dev, dt = p.q.device, p.dtype
    out = torch.zeros(b, h_kv, g, t_q, d, device=dev, dtype=dt)
    lse = torch.full((b, h_kv, g, t_q), float("-inf"), device=dev, dtype=dt)
    k_bar_all = torch.zeros(b, h_kv, g, t_q, d, device=dev, dtype=dt)
    z_all = torch.zeros(b, h_kv, g, t_q, d, device=dev, dtype=dt)
    query_chunk, key_chunk = p.chunks()
    for i0 in range(0, t_q, query_chunk):
        i1 = min(i0 + query_chunk, t_q)
        hi = p.key_end(i1)
        if hi == 0:
            continue
        rows = (b, h_kv, g, i1 - i0)
        m = torch.full((*rows, 1), float("-inf"), device=dev, dtype=dt)
        total = torch.zeros(*rows, 1, device=dev, dtype=dt)
        k_sum = torch.zeros(*rows, d, device=dev, dtype=dt)
        second = torch.zeros(*rows, d * d, device=dev, dtype=dt)
        for j0 in range(0, hi, key_chunk):
            j1 = min(j0 + key_chunk, hi)
            x, visible = p.logits(i0, i1, j0, j1)
            m_new = torch.maximum(m, x.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            w = _select(visible, torch.exp(x - m_safe))
            alpha = torch.exp(m - m_safe)
            total = total * alpha + w.sum(dim=-1, keepdim=True)
            k_sum = k_sum * alpha + _weighted_sum(w, p.ks[..., j0:j1, :], visible)
            second = second * alpha + _weighted_sum(w, p.outer(j0, j1), visible)
            m = m_new
        seen = total > 0
        norm = total.masked_fill(~seen, 1.0)
        k_bar = k_sum / norm  # shifted
        z = _solve(p.system(second / norm, k_bar, i0, i1), k_bar - (p.q[..., i0:i1, :] - p.shift))
        z = torch.where(seen, z, torch.zeros((), dtype=dt, device=dev))
        row_lse = (m + torch.log(norm)).masked_fill(~seen, float("-inf"))
        # Rows with no key get +inf so that their weights vanish.
        lse_safe = row_lse.masked_fill(~seen, float("inf"))
        z_kbar = (z * k_bar).sum(-1, keepdim=True)
        acc = torch.zeros(*rows, d, device=dev, dtype=dt)
        for j0 in range(0, hi, key_chunk):
            j1 = min(j0 + key_chunk, hi)
            s, visible = p.weights(i0, i1, j0, j1, lse_safe)
            centred = torch.matmul(z, p.ks[..., j0:j1, :].transpose(-1, -2)) - z_kbar
            acc = acc + _weighted_sum(_select(visible, s * (1.0 - centred)), p.v[..., j0:j1, :], visible)
        out[..., i0:i1, :] = acc
        lse[..., i0:i1] = row_lse.squeeze(-1)
        k_bar_all[..., i0:i1, :] = torch.where(seen, k_bar + p.shift, torch.zeros((), dtype=dt, device=dev))
        z_all[..., i0:i1, :] = z
    return out, lse, k_bar_all, z_all


def _ungroup(x):
    """[B, Hkv, G, T, D] -> [B, T, H, D]."""
    b, h_kv, g, t, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, t, h_kv * g, d)


def _like(template, values):
    """``values`` in a fresh tensor with the dtype and memory layout of ``template`` (as the custom ops promise)."""
    return torch.empty_like(template).copy_(values)


def forward(q, k, v, ridge, a: LLAArgs, key_lengths=None):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], ridge broadcastable to [B, Tq, H] -> out [B, Tq, H, D] (input
    dtype), lse [B, H, Tq] (natural log), k_bar and z [B, Tq, H, D] (fp32; fp64 for fp64 inputs)."""
    b, t_q, h, _ = q.shape
    p = _Problem(q, k, v, ridge, a, key_lengths)
    out, lse, k_bar, z = _forward_one(p)
    return (_like(q, _ungroup(out)), lse.reshape(b, h, t_q), _ungroup(k_bar).contiguous(),
            _ungroup(z).contiguous())


def backward(dout, q, k, v, out, lse, k_bar, z, ridge, a: LLAArgs):
    """Gradients (dq, dk, dv in the input dtypes, dridge [B, Tq, H] fp32, fp64 for fp64 inputs) of the exact
    LLA output."""
    p = _Problem(q, k, v, ridge, a)
    b, h_kv, g, t_q, t_k, d = p.shape
    dev, dt = q.device, p.dtype
    do_all, o_all = p.grouped(dout), p.grouped(out)
    k_bar_all, z_all = p.grouped(k_bar), p.grouped(z)
    lse_all = lse.to(dt).reshape(b, h_kv, g, t_q)
    dq = torch.zeros(b, h_kv, g, t_q, d, device=dev, dtype=dt)
    dk = torch.zeros(b, h_kv, t_k, d, device=dev, dtype=dt)
    dv = torch.zeros(b, h_kv, t_k, d, device=dev, dtype=dt)
    dlam = torch.zeros(b, h_kv, g, t_q, device=dev, dtype=dt)
    scale = a.softmax_scale
    query_chunk, key_chunk = p.chunks()
    for i0 in range(0, t_q, query_chunk):
        i1 = min(i0 + query_chunk, t_q)
        hi = p.key_end(i1)
        if hi == 0:
            continue
        rows = (b, h_kv, g, i1 - i0)
        q_c, do_c = p.q[..., i0:i1, :], do_all[..., i0:i1, :]
        k_bar_c, z_c = k_bar_all[..., i0:i1, :] - p.shift, z_all[..., i0:i1, :]  # shifted k_bar
        row_lse = lse_all[..., i0:i1, None]
        lse_safe = row_lse.masked_fill(torch.isneginf(row_lse), float("inf"))
        # c = sum_j s_ij G_ij (k_j - k_bar_i) with G_ij = g_i . v_j: the right-hand side of the adjoint solve.
        second = torch.zeros(*rows, d * d, device=dev, dtype=dt)
        c = torch.zeros(*rows, d, device=dev, dtype=dt)
        g_bar = torch.zeros(*rows, 1, device=dev, dtype=dt)
        for j0 in range(0, hi, key_chunk):
            j1 = min(j0 + key_chunk, hi)
            s, visible = p.weights(i0, i1, j0, j1, lse_safe)
            second = second + _weighted_sum(s, p.outer(j0, j1), visible)
            sg = _select(visible, s * torch.matmul(do_c, p.v[..., j0:j1, :].transpose(-1, -2)))
            c = c + _weighted_sum(sg, p.ks[..., j0:j1, :], visible)
            g_bar = g_bar + sg.sum(-1, keepdim=True)
        c = c - g_bar * k_bar_c
        lam = p.lam[..., i0:i1, None]
        r = _solve(p.system(second, k_bar_c, i0, i1), c)
        r_z = (r * z_c).sum(-1, keepdim=True)
        phi_bar = ((do_c * o_all[..., i0:i1, :]).sum(-1, keepdim=True)
                   + (r * (k_bar_c - (q_c - p.shift))).sum(-1, keepdim=True) - lam * r_z)
        dlam[..., i0:i1] = r_z.squeeze(-1)
        z_kbar = (z_c * k_bar_c).sum(-1, keepdim=True)
        r_kbar = (r * k_bar_c).sum(-1, keepdim=True)
        dq_c = r.clone()
        for j0 in range(0, hi, key_chunk):
            j1 = min(j0 + key_chunk, hi)
            k_c, ks_c, v_c = p.k[..., j0:j1, :], p.ks[..., j0:j1, :], p.v[..., j0:j1, :]
            s, visible = p.weights(i0, i1, j0, j1, lse_safe)
            gv = torch.matmul(do_c, v_c.transpose(-1, -2))
            zy = torch.matmul(z_c, ks_c.transpose(-1, -2)) - z_kbar
            ry = torch.matmul(r, ks_c.transpose(-1, -2)) - r_kbar
            ell = _select(visible, s * (1.0 - zy))
            # dL/dlogit_ij and the coefficient of z_i in the direct (non-logit) dependence on k_j.
            dlogit = _select(visible, ell * gv + s * (g_bar * zy - ry + ry * zy - phi_bar))
            coef_z = _select(visible, s * (g_bar - gv + ry))
            dq_c = dq_c + scale * _weighted_sum(dlogit, k_c, visible)
            dk[..., j0:j1, :] += torch.einsum("bhgqk,bhgqd->bhkd", dlogit * scale, q_c)
            dk[..., j0:j1, :] += torch.einsum("bhgqk,bhgqd->bhkd", coef_z, z_c)
            dk[..., j0:j1, :] -= torch.einsum("bhgqk,bhgqd->bhkd", ell, r)
            dv[..., j0:j1, :] += torch.einsum("bhgqk,bhgqd->bhkd", ell, do_c)
        dq[..., i0:i1, :] = dq_c
    h = h_kv * g
    dridge = dlam.permute(0, 3, 1, 2).reshape(b, t_q, h)
    return _like(q, _ungroup(dq)), _like(k, dk.permute(0, 2, 1, 3)), _like(v, dv.permute(0, 2, 1, 3)), dridge


def decode(q, k_cache, v_cache, cache_seqlens, ridge, a: LLAArgs):
    """One query per sequence ([B, 1, H, D]) against the first cache_seqlens[b] keys of the cache."""
    a_full = LLAArgs(softmax_scale=a.softmax_scale, causal=False)
    out, _, _, _ = forward(q, k_cache, v_cache, ridge, a_full, key_lengths=cache_seqlens)
    return out
