"""Memory-efficient exact attention in pure PyTorch: the CPU path and the fallback on any device.

Queries are processed in chunks and, inside a chunk, keys in chunks with an online softmax, so the largest
temporary is one [B, H, Cq, Ck] score tile: peak memory grows linearly in T. Key chunks that the causal or
sliding-window mask empties are never visited; masks are built only for chunks that straddle a boundary.
The backward recomputes the probabilities from the saved log-sum-exp, chunk by chunk.

Computation is in fp32 (fp64 for fp64 inputs). When q, k or v hold a NaN/Inf, masked chunks take a slower
path in which masked-out entries never enter arithmetic (``flashops._numerics``): a non-finite key or value
reaches only the rows that see it, and gradients of masked-out positions stay exactly zero.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._numerics import all_finite, compute_dtype, finite_or_zero, masked_matmul
from .args import AttentionArgs
from .dropout import keep_mask

# A score tile of [B*H, Cq, Ck] fp32 stays within this many elements (chunk sizes adapt to B*H). The
# sizes were picked by timing T=4096, H=8, D=64 on a 2-core CPU against torch SDPA (see docs/attention.md).
TILE_ELEMENTS = 1 << 21
MAX_KEY_CHUNK = 512
MAX_QUERY_CHUNK = 256


def _chunk_sizes(bh: int, t_q: int, t_k: int) -> tuple[int, int]:
    key_chunk = max(16, min(MAX_KEY_CHUNK, t_k))
    query_chunk = max(16, min(MAX_QUERY_CHUNK, TILE_ELEMENTS // max(1, bh * key_chunk), t_q))
    return query_chunk, key_chunk


def _key_range(a: AttentionArgs, i0: int, i1: int, off: int, t_k: int) -> tuple[int, int]:
    """Keys visible to any of the queries [i0, i1)."""
    lo = 0 if a.window_left is None else max(0, i0 + off - a.window_left)
    hi = t_k if a.window_right is None else min(t_k, i1 - 1 + off + a.window_right + 1)
    return lo, hi


def _needs_mask(a: AttentionArgs, i0, i1, j0, j1, off) -> bool:
    if a.block_mask is not None:
        return True
    if a.window_right is not None and j1 - 1 > i0 + off + a.window_right:
        return True
    if a.window_left is not None and j0 < i1 - 1 + off - a.window_left:
        return True
    return False


class _Sequence:
    """One dense problem in grouped layout: q [B, Hkv, G, Tq, D], k/v [B, Hkv, 1, Tk, D] in the compute dtype
    (fp32, or fp64 for fp64 inputs)."""

    def __init__(self, q, k, v, a: AttentionArgs, batch_ids, slopes, block_mask, bias, finite: bool):
        b, t_q, h, d = q.shape
        t_k, h_kv = k.shape[1], k.shape[2]
        g = h // h_kv
        self.shape = (b, h_kv, g, t_q, t_k, d)
        self.off = t_k - t_q
        self.a = a
        self.dtype = compute_dtype(q.dtype)
        self.q = q.to(self.dtype).reshape(b, t_q, h_kv, g, d).permute(0, 2, 3, 1, 4)
        self.k = k.to(self.dtype).permute(0, 2, 1, 3).unsqueeze(2)
        self.v = v.to(self.dtype).permute(0, 2, 1, 3).unsqueeze(2)
        # Non-finite inputs take the contained path in masked chunks (checked once: cheap next to the matmuls).
        self.finite = finite
        self.slopes = None if slopes is None else slopes.to(self.dtype).reshape(-1, h_kv, g, 1, 1)
        self.block_mask = None if block_mask is None else self._grouped(block_mask.bool())
        self.bias = None if bias is None else self._grouped(bias)
        self.bh = (batch_ids[:, None] * h + torch.arange(h, device=q.device)).reshape(b, h_kv, g)
        self.seed = int(a.seed) if a.dropout_p > 0 else 0

    def _grouped(self, t):
        """[B|1, H|1, X, Y] -> [B|1, Hkv|1, G|1, X, Y]."""
        _, h_kv, g = self.shape[:3]
        if t.shape[1] == 1:
            return t.unsqueeze(1)
        return t.reshape(t.shape[0], h_kv, g, t.shape[-2], t.shape[-1])

    def masked(self, i0, i1, j0, j1) -> bool:
        """Whether the chunk has masked-out entries that a non-finite input could leak through."""
        return self.bias is not None or _needs_mask(self.a, i0, i1, j0, j1, self.off)

    def scores(self, i0, i1, j0, j1):
        """Logits of queries [i0, i1) against keys [j0, j1) (-inf where masked out), and tanh of the capped
        scores (or None)."""
        a = self.a
        s = torch.matmul(self.q[..., i0:i1, :], self.k[..., j0:j1, :].transpose(-1, -2))
        s.mul_(a.softmax_scale)
        tanh = None
        if a.softcap > 0:
            tanh = s.div_(a.softcap).tanh_()
            s = tanh * a.softcap
        rows = torch.arange(i0, i1, device=s.device)
        cols = torch.arange(j0, j1, device=s.device)
        if self.slopes is not None:
            dist = (rows[:, None] + self.off - cols[None, :]).abs().to(self.dtype)
            s.sub_(self.slopes * dist)
        if self.bias is not None:
            bias = self.bias
            if bias.shape[-2] > 1:
                bias = bias[..., i0:i1, :]
            if bias.shape[-1] > 1:
                bias = bias[..., j0:j1]
            s.add_(bias)
            if not self.finite:  # a -inf (masked) entry stays -inf even where q.k is NaN
                s.masked_fill_(torch.isneginf(bias), float("-inf"))
        if _needs_mask(a, i0, i1, j0, j1, self.off):
            allowed = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=s.device)
            diag = rows[:, None] + self.off
            if a.window_right is not None:
                allowed &= cols[None, :] <= diag + a.window_right
            if a.window_left is not None:
                allowed &= cols[None, :] >= diag - a.window_left
            if self.block_mask is not None:
                blocks = self.block_mask[..., rows // a.block_m, :][..., cols // a.block_n]
                allowed = allowed & blocks
            s.masked_fill_(~allowed, float("-inf"))
        return s, tanh

    def keep(self, i0, i1, j0, j1):
        dev = self.q.device
        return keep_mask(self.seed, self.bh, torch.arange(i0, i1, device=dev), torch.arange(j0, j1, device=dev),
                         self.a.dropout_p)


def _forward_one(seq: _Sequence):
    b, h_kv, g, t_q, t_k, d = seq.shape
    a = seq.a
    dev, dt = seq.q.device, seq.dtype
    out = torch.zeros(b, h_kv, g, t_q, d, device=dev, dtype=dt)
    lse = torch.full((b, h_kv, g, t_q), float("-inf"), device=dev, dtype=dt)
    query_chunk, key_chunk = _chunk_sizes(b * h_kv * g, t_q, t_k)
    for i0 in range(0, t_q, query_chunk):
        i1 = min(i0 + query_chunk, t_q)
        lo, hi = _key_range(a, i0, i1, seq.off, t_k)
        if hi <= lo:
            continue
        m = torch.full((b, h_kv, g, i1 - i0, 1), float("-inf"), device=dev, dtype=dt)
        l = torch.zeros_like(m)
        acc = torch.zeros(b, h_kv, g, i1 - i0, d, device=dev, dtype=dt)
        for j0 in range(lo, hi, key_chunk):
            j1 = min(j0 + key_chunk, hi)
            s, _ = seq.scores(i0, i1, j0, j1)
            contained = not seq.finite and seq.masked(i0, i1, j0, j1)
            visible = ~torch.isneginf(s) if contained else None
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            p = s.sub_(m_safe).exp_()  # in place: a CPU pays for every fresh tile-sized buffer
            alpha = torch.exp(m - m_safe)
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            if a.dropout_p > 0:
                p.mul_(seq.keep(i0, i1, j0, j1)).mul_(1.0 / (1.0 - a.dropout_p))
            v_c = seq.v[..., j0:j1, :]
            pv = masked_matmul(p, v_c, visible) if contained else torch.matmul(p, v_c)
            acc = pv.add_(acc.mul_(alpha))
            m = m_new
        empty = l == 0
        out[..., i0:i1, :] = acc / l.masked_fill(empty, 1.0)
        lse[..., i0:i1] = (m + torch.log(l)).masked_fill(empty, float("-inf")).squeeze(-1)
    return out, lse


def _backward_one(seq: _Sequence, dout, lse, delta, want_dbias: bool):
    """dout [B, Hkv, G, Tq, D], lse/delta [B, Hkv, G, Tq] (compute dtype) -> dq, dk, dv (compute dtype,
    grouped), dbias full."""
    b, h_kv, g, t_q, t_k, d = seq.shape
    a = seq.a
    dev, dt = seq.q.device, seq.dtype
    dq = torch.zeros(b, h_kv, g, t_q, d, device=dev, dtype=dt)
    dk = torch.zeros(b, h_kv, t_k, d, device=dev, dtype=dt)
    dv = torch.zeros(b, h_kv, t_k, d, device=dev, dtype=dt)
    dbias = torch.zeros(b, h_kv, g, t_q, t_k, device=dev, dtype=dt) if want_dbias else None
    lse_safe = lse.masked_fill(torch.isneginf(lse), float("inf"))[..., None]
    # A NaN statistic can come with finite q, k, v when the output and lse are those of a larger attention (ring
    # attention's global ones, which another rank's NaN reached): masked entries must stay out of it too.
    finite = seq.finite and all_finite(lse_safe.masked_fill(torch.isposinf(lse_safe), 0.0), delta)
    query_chunk, key_chunk = _chunk_sizes(b * h_kv * g, t_q, t_k)
    keep_scale = 1.0 / (1.0 - a.dropout_p) if a.dropout_p > 0 else 1.0
    for i0 in range(0, t_q, query_chunk):
        i1 = min(i0 + query_chunk, t_q)
        lo, hi = _key_range(a, i0, i1, seq.off, t_k)
        do_c = dout[..., i0:i1, :]
        q_c = seq.q[..., i0:i1, :]
        for j0 in range(lo, hi, key_chunk):
            j1 = min(j0 + key_chunk, hi)
            s, tanh = seq.scores(i0, i1, j0, j1)
            contained = not finite and seq.masked(i0, i1, j0, j1)
            visible = ~torch.isneginf(s) if contained else None
            p = s.sub_(lse_safe[..., i0:i1, :]).exp_()
            zero = torch.zeros((), dtype=dt, device=dev)
            if contained:  # masked entries are exact zeros, even for a row whose lse is NaN
                p = torch.where(visible, p, zero)
            dp = torch.matmul(do_c, seq.v[..., j0:j1, :].transpose(-1, -2))
            if a.dropout_p > 0:
                keep = seq.keep(i0, i1, j0, j1) * keep_scale
                dv[..., j0:j1, :] += torch.einsum("bhgqk,bhgqd->bhkd", p * keep, do_c)
                dp.mul_(keep)
            else:
                dv[..., j0:j1, :] += torch.einsum("bhgqk,bhgqd->bhkd", p, do_c)
            ds = dp.sub_(delta[..., i0:i1, None]).mul_(p)
            if contained:  # p is 0 where masked, but dp there is NaN for a non-finite value
                ds = torch.where(visible, ds, zero)
            if dbias is not None:
                dbias[..., i0:i1, j0:j1] = ds
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
                if contained:
                    ds = torch.where(visible, ds, zero)
            k_c = seq.k[..., j0:j1, :]
            # ds is 0 where masked and NaN wherever a visible entry is non-finite, so zeroing the non-finite
            # factors keeps masked-out NaN/Inf out of dq and dk without hiding the visible ones.
            dq[..., i0:i1, :] += torch.matmul(ds, finite_or_zero(k_c) if contained else k_c)
            dk[..., j0:j1, :] += torch.einsum("bhgqk,bhgqd->bhkd", ds, finite_or_zero(q_c) if contained else q_c)
    dq.mul_(a.softmax_scale)
    dk.mul_(a.softmax_scale)
    return dq, dk, dv, dbias


def _ungroup(x):
    """[B, Hkv, G, T, D] -> [B, T, H, D]."""
    b, h_kv, g, t, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, t, h_kv * g, d)


def _sequences(q, k, v, a: AttentionArgs):
    """Yield (query slice, key slice, [q, k, v] of the slices, the rest of their _Sequence's arguments) per dense
    problem: the whole batch, or each varlen sequence."""
    if not a.varlen:
        batch_ids = torch.arange(q.shape[0], device=q.device)
        yield slice(None), slice(None), (q, k, v), (batch_ids, a.alibi_slopes, a.block_mask, a.bias)
        return
    cu_q, cu_k = a.cu_seqlens_q.tolist(), a.cu_seqlens_k.tolist()
    for n in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        slopes = a.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[n]
        block_mask = None if a.block_mask is None else a.block_mask[n : n + 1]
        batch_ids = torch.tensor([n], device=q.device)
        yield qs, ks, (q[:, qs], k[:, ks], v[:, ks]), (batch_ids, slopes, block_mask, None)


class _Fused:
    """One dense problem on torch's fused flash-attention kernels for the CPU (a forward that returns the log-sum-exp,
    and its backward), about twice as fast as the chunked path; used where they compute exactly what this path
    promises (:meth:`plan`).

    The kernels know no mask but SDPA's top-left causal one. flash-attn's bottom-right causal mask with a prefix
    (Tk > Tq: query i sees keys j <= i + Tk - Tq) is two of their calls: the prefix every query sees, unmasked,
    and the last Tq keys, top-left causal; their outputs merge by their log-sum-exps, and each call's backward
    given the merged output and log-sum-exp gives that part's gradients (fp32/fp64 only: the parts' outputs are
    rounded to the input dtype before the merge).

    They multiply masked-out probabilities (exact zeros) by the values inside a block, so a NaN/Inf would leak
    through ``0 * NaN``: non-finite entries are replaced by 0 before the call (a select), which leaves every
    output that does not see them bitwise as it is without them, and the outputs that do see them are set to NaN
    afterwards (a row that sees a non-finite key, or whose query is one, is NaN with its log-sum-exp; a value
    poisons its column of the rows that see it). The backward of such a problem is that of the zeroed inputs only
    where no row sees a non-finite entry; otherwise the chunked path computes it (:attr:`exact_backward`)."""

    FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    @staticmethod
    def plan(q, k, v, a: AttentionArgs) -> Optional[_Fused]:
        """The fused problem where its kernels cover the call: no mask, SDPA's top-left causal mask (query i sees
        keys j <= i: every row sees a key) or flash-attn's bottom-right one with Tk >= Tq (fp32/fp64); no softcap,
        ALiBi, block or additive mask, no dropout (flashops draws its own counter-based stream); on a CPU, not
        empty. Else None: the chunked path."""
        t_q, t_k = q.shape[1], k.shape[1]
        if (q.device.type != "cpu" or q.numel() == 0 or t_k == 0 or a.dropout_p > 0 or a.softcap > 0
                or a.alibi_slopes is not None or a.block_mask is not None or a.bias is not None
                or a.window_left is not None):
            return None
        if a.window_right is None:
            return _Fused(q, k, v, causal=False, prefix=0)
        if a.window_right == t_q - t_k:
            return _Fused(q, k, v, causal=True, prefix=0)
        if a.window_right == 0 and t_k > t_q and q.dtype in (torch.float32, torch.float64):
            return _Fused(q, k, v, causal=True, prefix=t_k - t_q)
        return None

    def __init__(self, q, k, v, causal: bool, prefix: int):
        self.causal = causal
        self.prefix = prefix  # keys every query sees before the causal part (bottom-right alignment)
        self.finite = all_finite(q, k, v)
        self.inputs = (q, k, v) if self.finite else tuple(finite_or_zero(x) for x in (q, k, v))
        self.hit_rows = self.hit_values = None
        if not self.finite:
            self.hit_rows, self.hit_values = self._hits(q, k, v)

    def _hits(self, q, k, v):
        """Rows [B, Tq, H] and entries [B, Tq, H, D] of the output that see a non-finite input."""
        t_q, t_k, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]

        def seen(bad):  # [B, Tk, Hkv, ...] -> [B, Tq, H, ...]: whether a row sees a bad key or value
            if self.causal:  # row i sees the keys j <= i + prefix
                up_to = bad.to(torch.int32).cumsum(dim=1) > 0
                bad = up_to[:, (torch.arange(t_q, device=bad.device) + self.prefix).clamp(max=t_k - 1)]
            else:
                bad = bad.any(dim=1, keepdim=True).expand(-1, t_q, *bad.shape[2:])
            return bad.repeat_interleave(group, dim=2)

        rows = ~torch.isfinite(q).all(-1) | seen(~torch.isfinite(k).all(-1))
        return rows, seen(~torch.isfinite(v))

    def _parts(self):
        """(key slice, is_causal) of each kernel call."""
        if not self.prefix:
            return [(slice(None), self.causal)]
        return [(slice(0, self.prefix), False), (slice(self.prefix, None), True)]

    @property
    def exact_backward(self) -> bool:
        return self.finite or not (bool(self.hit_rows.any()) or bool(self.hit_values.any()))

    def forward(self, scale: float):
        """out [B, Tq, H, D] (a [B, H, Tq, D]-strided view), lse [B, H, Tq]."""
        q, k, v = _heads_first(*self.inputs)
        parts = [self.FORWARD(q, k[:, :, keys], v[:, :, keys], 0.0, causal, scale=scale)
                 for keys, causal in self._parts()]
        out, lse = parts[0]
        if len(parts) == 2:
            (out_a, lse_a), (out_b, lse_b) = parts
            lse = torch.logaddexp(lse_a, lse_b)
            out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
        out = out.transpose(1, 2)
        if not self.finite:
            out = out.masked_fill(self.hit_rows[..., None] | self.hit_values, float("nan"))
            lse = lse.masked_fill(self.hit_rows.transpose(1, 2), float("nan"))
        return out, lse

    def backward(self, dout, out, lse, scale: float):
        """(dq, dk, dv) [B, T, H, D] of the problem (only where :attr:`exact_backward`)."""
        q, k, v = _heads_first(*self.inputs)
        dout, out = _heads_first(dout, out)
        parts = [self.BACKWARD(dout, q, k[:, :, keys], v[:, :, keys], out, lse, 0.0, causal, scale=scale)
                 for keys, causal in self._parts()]
        dq, dk, dv = parts[0]
        if len(parts) == 2:
            dq = dq + parts[1][0]
            dk, dv = (torch.cat([a, b], dim=2) for a, b in zip(parts[0][1:], parts[1][1:]))
        return [x.transpose(1, 2) for x in (dq, dk, dv)]


def _heads_first(*tensors):
    """[B, T, H, D] -> [B, H, T, D] views (torch's layout)."""
    return [x.transpose(1, 2) for x in tensors]


def forward(q, k, v, a: AttentionArgs):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> out [B, Tq, H, D] (input dtype), lse [B, H, Tq] (fp32; fp64 for
    fp64 inputs) (varlen: q/k/v packed [1, total, ., D], lse [H, total_q])."""
    out = torch.empty_like(q)
    h = q.shape[2]
    lse_shape = (h, q.shape[1]) if a.varlen else (q.shape[0], h, q.shape[1])
    lse = torch.empty(lse_shape, device=q.device, dtype=compute_dtype(q.dtype))
    for qs, _, (q_n, k_n, v_n), rest in _sequences(q, k, v, a):
        fused = _Fused.plan(q_n, k_n, v_n, a)
        if fused is not None:
            o, l = fused.forward(a.softmax_scale)
        else:
            o, l = _forward_one(_Sequence(q_n, k_n, v_n, a, *rest, finite=all_finite(q_n, k_n, v_n)))
            o = _ungroup(o)
        out[:, qs] = o
        l = l.reshape(l.shape[0], h, l.shape[-1])
        if a.varlen:
            lse[:, qs] = l[0]
        else:
            lse.copy_(l)
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, a: AttentionArgs, want_dbias: bool = False, *, fused: bool = True):
    """Gradients (dq, dk, dv, dbias-or-None) in the input dtypes; dlse may be None. ``fused=False`` keeps to the
    chunked path (ring attention: see distributed/_internals.block_backward)."""
    h, h_kv = q.shape[2], k.shape[2]
    g = h // h_kv
    dt = compute_dtype(q.dtype)
    lse_bht = (lse.unsqueeze(0) if a.varlen else lse).to(dt)
    # The fused kernels take no lse gradient (they form delta themselves); an all-zero one is none.
    lse_grad = dlse is not None and bool(dlse.ne(0).any())
    delta = None  # for the chunked path, computed once when a problem needs it
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbias = None
    for qs, ks, (q_n, k_n, v_n), rest in _sequences(q, k, v, a):
        b, t_q = q_n.shape[:2]
        plan = _Fused.plan(q_n, k_n, v_n, a) if fused and not lse_grad else None
        if plan is not None and plan.exact_backward:
            dq_n, dk_n, dv_n = plan.backward(dout[:, qs], out[:, qs], lse_bht[..., qs], a.softmax_scale)
        else:
            if delta is None:
                # delta_i = rowsum(dO_i * O_i) - dLSE_i: the softmax Jacobian's diagonal term plus the lse gradient.
                delta = (dout.to(dt) * out.to(dt)).sum(-1).permute(0, 2, 1)  # [B, H, Tq]
                if lse_grad:
                    delta = delta - (dlse.unsqueeze(0) if a.varlen else dlse).to(dt)
            seq = _Sequence(q_n, k_n, v_n, a, *rest, finite=all_finite(q_n, k_n, v_n))
            do_g = dout[:, qs].to(dt).reshape(b, t_q, h_kv, g, q.shape[-1]).permute(0, 2, 3, 1, 4)
            dq_s, dk_s, dv_s, dbias = _backward_one(seq, do_g, lse_bht[..., qs].reshape(b, h_kv, g, t_q),
                                                    delta[..., qs].reshape(b, h_kv, g, t_q), want_dbias)
            dq_n, dk_n, dv_n = _ungroup(dq_s), dk_s.permute(0, 2, 1, 3), dv_s.permute(0, 2, 1, 3)
        dq[:, qs] = dq_n
        dk[:, ks] = dk_n
        dv[:, ks] = dv_n
    if dbias is not None:
        b, h_kv_, g_, t_q, t_k = dbias.shape
        dbias = dbias.reshape(b, h, t_q, t_k)
        reduce_dims = [i for i, n in enumerate(a.bias.shape) if n == 1 and dbias.shape[i] != 1]
        if reduce_dims:  # sum() over an empty dim list would reduce every dimension
            dbias = dbias.sum(dim=reduce_dims, keepdim=True)
        dbias = dbias.to(a.bias.dtype)
    return dq, dk, dv, dbias
