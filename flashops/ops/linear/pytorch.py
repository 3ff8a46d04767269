"""Chunked linear attention in pure PyTorch: the CPU path and the fallback on any device.

The same algorithm as the Triton kernels, vectorized over all chunks: the sequence is cut into chunks of
``CHUNK`` positions; inside a chunk the output is a masked matmul with the decay folded in, across chunks a
fp32 state [K, V] is carried. Only the state recurrence is a Python loop (one iteration per chunk, never per
step). Log-gates are cumulated from the start of each chunk ("re-anchored"), and for data-dependent gates
the intra-chunk products are split into sub-chunks of ``SUB`` rows whose exponentials are taken relative to a
sub-chunk boundary, so that every exponential is exp(x) with x <= 0.

Gate tensors inside this file have the chunked layout [B, H, NT, C, K] (vector gates, GLA) or
[1, H, NT, C, 1] (scalar per-head decay, Lightning); both broadcast the same way, the scalar one is never
expanded over K or the batch. Everything is computed in fp32 (fp64 for fp64 inputs) and returned in the
input dtype. Future positions never enter a row's arithmetic: the causal masks are selects, and when an input
holds a NaN/Inf the intra-chunk product with v keeps it to the rows at or after it (``flashops._numerics``).
Out-of-domain gates (a positive log-gate, a negative or NaN slope) act as NaN from where they apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._numerics import all_finite, compute_dtype, masked_matmul
from .common import LOG_GATE_FLOOR

CHUNK = 64
SUB = 16


# ----------------------------------------------------------------------------------------------- layout
def _to_chunks(x: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, NT, C, D] (in ``dtype``, zero padded to a multiple of the chunk)."""
    b, t, h, d = x.shape
    n_chunks = -(-t // chunk)
    x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, n_chunks * chunk - t))
    return x.reshape(b, n_chunks, chunk, h, d).permute(0, 3, 1, 2, 4)


def _from_chunks(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B, H, NT, C, D] -> [B, T, H, D]."""
    b, h, n, c, d = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, d)[:, :t].contiguous()


def _log_gates(g: torch.Tensor, dtype) -> torch.Tensor:
    """Log-gates as used: floored at LOG_GATE_FLOOR, and NaN where out of domain (> 0) or NaN."""
    g = g.to(dtype)
    g = torch.where(g < LOG_GATE_FLOOR, torch.full_like(g, LOG_GATE_FLOOR), g)
    return torch.where(g > 0, torch.full_like(g, float("nan")), g)


def _decay_rates(slopes: torch.Tensor, dtype) -> torch.Tensor:
    """Slopes as used: capped at -LOG_GATE_FLOOR, and NaN where out of domain (< 0) or NaN."""
    slopes = torch.clamp(slopes.to(dtype), max=-LOG_GATE_FLOOR)  # clamp keeps NaN
    return torch.where(slopes < 0, torch.full_like(slopes, float("nan")), slopes)


def _gate_cumsum(g, slopes, t: int, chunk: int, heads: int, device, dtype):
    """Chunk-local inclusive cumulative log-gates. Padded positions get log-gate 0 so that they leave the
    state untouched. Vector gates: [B, H, NT, C, K]; scalar: [1, H, NT, C, 1]."""
    if g is not None:
        return _to_chunks(_log_gates(g, dtype), chunk, dtype).cumsum(3)
    n_chunks = -(-t // chunk)
    decay = _decay_rates(slopes, dtype).to(device)
    valid = torch.arange(n_chunks * chunk, device=device)[None, :] < t
    per_position = torch.where(valid, -decay[:, None], torch.zeros((), dtype=dtype, device=device))  # [H, Tp]
    return per_position.reshape(1, heads, n_chunks, chunk, 1).cumsum(3)


def _causal_exp(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(diff) where mask, else 0; the masked entries never reach exp (no inf, no NaN gradients)."""
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def _tril(c: int, device) -> torch.Tensor:
    return torch.ones(c, c, dtype=torch.bool, device=device).tril()


# ----------------------------------------------------------------------------------------------- pieces
def _intra_scores(q, k, gc):
    """A[r, c] = sum_k q_rk k_ck exp(gc_rk - gc_ck) for c <= r inside each chunk: [B, H, NT, C, C]."""
    c = q.shape[3]
    tril = _tril(c, q.device)
    if gc.shape[-1] == 1:
        gs = gc[..., 0]
        scores = (q @ k.transpose(-1, -2)) * _causal_exp(gs[..., :, None] - gs[..., None, :], tril)
        return torch.where(tril, scores, torch.zeros((), dtype=scores.dtype, device=q.device))  # no 0 * NaN
    scores = q.new_zeros(*q.shape[:3], c, c)
    for i in range(c // SUB):
        rows = slice(i * SUB, (i + 1) * SUB)
        anchor = gc[..., i * SUB : i * SUB + 1, :]  # first row of the sub-chunk: gc_c >= anchor >= gc_r
        if i > 0:
            q_scaled = q[..., rows, :] * (gc[..., rows, :] - anchor).exp()
            k_scaled = k[..., : i * SUB, :] * (anchor - gc[..., : i * SUB, :]).exp()
            scores[..., rows, : i * SUB] = q_scaled @ k_scaled.transpose(-1, -2)
    # Diagonal sub-chunks, elementwise in fp32: one column offset at a time.
    q_sub, k_sub, g_sub = (x.unflatten(3, (c // SUB, SUB)) for x in (q, k, gc))
    diag = q.new_zeros(*q_sub.shape[:-1], SUB)
    row_idx = torch.arange(SUB, device=q.device)[:, None]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    for j in range(SUB):
        weight = _causal_exp(g_sub - g_sub[..., j : j + 1, :], row_idx >= j)
        diag[..., j] = torch.where(row_idx[:, 0] >= j, (q_sub * k_sub[..., j : j + 1, :] * weight).sum(-1), zero)
    for i in range(c // SUB):
        rows = slice(i * SUB, (i + 1) * SUB)
        scores[..., rows, rows] = diag[..., i, :, :]
    return scores


def _states(k, v, gc, initial_state):
    """States before each chunk h [B, H, NT, K, V] and the final state, from the chunk-local contributions."""
    b, h, n_chunks = k.shape[:3]
    last = gc[..., -1:, :]  # [.., NT, 1, K|1]
    contrib = (k * (last - gc).exp()).transpose(-1, -2) @ v  # [B, H, NT, K, V]
    chunk_decay = last.transpose(-1, -2).exp()  # [.., NT, K|1, 1]
    state = (initial_state.to(k.dtype).clone() if initial_state is not None
             else k.new_zeros(b, h, k.shape[-1], v.shape[-1]))
    states = []
    for n in range(n_chunks):
        states.append(state)
        state = chunk_decay[:, :, n] * state + contrib[:, :, n]
    hs = torch.stack(states, dim=2) if states else k.new_zeros(b, h, 0, k.shape[-1], v.shape[-1])
    return hs, state


# --------------------------------------------------------------------------------------------- dense API
def _forward_dense(q, k, v, g, slopes, scale, initial_state, chunk):
    t = q.shape[1]
    heads = q.shape[2]
    dt = compute_dtype(q.dtype)
    qc, kc, vc = (_to_chunks(x, chunk, dt) for x in (q, k, v))
    gc = _gate_cumsum(g, slopes, t, chunk, heads, q.device, dt)
    hs, final = _states(kc, vc, gc, initial_state)
    scores = _intra_scores(qc, kc, gc)
    # A NaN/Inf value of a later position must not reach earlier rows of its chunk through 0 * v.
    intra = scores @ vc if all_finite(v) else masked_matmul(scores, vc, _tril(qc.shape[3], q.device))
    o = (qc * gc.exp()) @ hs + intra
    return _from_chunks(o * scale, t), final


def _backward_dense(do, dht, q, k, v, g, slopes, scale, initial_state, chunk):
    t = q.shape[1]
    heads = q.shape[2]
    dt = compute_dtype(q.dtype)
    qc, kc, vc, doc = (_to_chunks(x, chunk, dt) for x in (q, k, v, do))
    gc = _gate_cumsum(g, slopes, t, chunk, heads, q.device, dt)
    hs, _ = _states(kc, vc, gc, initial_state)
    c = qc.shape[3]
    last = gc[..., -1:, :]
    chunk_decay = last.transpose(-1, -2).exp()
    q_decayed = qc * gc.exp()  # q_r exp(gc_r)
    k_decayed = kc * (last - gc).exp()  # k_c exp(gl - gc_c)

    # Reverse sweep over chunks: dhs[n] = dL/d(state after chunk n).
    d_state = dht.to(dt) if dht is not None else qc.new_zeros(hs.shape[:2] + hs.shape[3:])
    contrib = scale * q_decayed.transpose(-1, -2) @ doc  # [B, H, NT, K, V]
    dhs = []
    for n in reversed(range(qc.shape[2])):
        dhs.append(d_state)
        d_state = chunk_decay[:, :, n] * d_state + contrib[:, :, n]
    dhs = torch.stack(dhs[::-1], dim=2) if dhs else hs.clone()
    dh0 = d_state

    scores = _intra_scores(qc, kc, gc)
    dv = scale * scores.transpose(-1, -2) @ doc + k_decayed @ dhs
    tril = _tril(c, q.device)
    d_scores = torch.where(tril, scale * (doc @ vc.transpose(-1, -2)), torch.zeros((), dtype=dt, device=q.device))
    dq_inter = scale * gc.exp() * (doc @ hs.transpose(-1, -2))
    dk_inter = (last - gc).exp() * (vc @ dhs.transpose(-1, -2))
    dq_intra, dk_intra = _intra_grads(d_scores, qc, kc, gc)
    dq = dq_inter + dq_intra
    dk = dk_inter + dk_intra
    dg = None
    if g is not None:
        # dL/d(gc_u) = q_u dq_u - k_u dk_u, plus at the chunk's last row the state it hands on:
        # sum_v dH * h_next = exp(gl) sum_v dH * h + sum_c k_c dk_inter_c.
        d_cum = qc * dq - kc * dk
        d_cum[..., -1, :] += (last[..., 0, :].exp() * (hs * dhs).sum(-1) + (kc * dk_inter).sum(-2))
        dg = d_cum.flip(3).cumsum(3).flip(3)
        dg = _from_chunks(dg, t)
        dg = torch.where(g < LOG_GATE_FLOOR, torch.zeros_like(dg), dg)
    return _from_chunks(dq, t), _from_chunks(dk, t), _from_chunks(dv, t), dg, dh0


def _intra_grads(d_scores, q, k, gc):
    """dq_r = sum_{c<=r} dA_rc k_c exp(gc_r - gc_c), dk_c = sum_{r>=c} dA_rc q_r exp(gc_r - gc_c)."""
    c = q.shape[3]
    if gc.shape[-1] == 1:
        gs = gc[..., 0]
        weighted = d_scores * _causal_exp(gs[..., :, None] - gs[..., None, :], _tril(c, q.device))
        return weighted @ k, weighted.transpose(-1, -2) @ q
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    for i in range(c // SUB):
        rows = slice(i * SUB, (i + 1) * SUB)
        if i > 0:  # rows of sub-chunk i against the columns before it, anchored at its first row
            anchor = gc[..., i * SUB : i * SUB + 1, :]
            k_scaled = k[..., : i * SUB, :] * (anchor - gc[..., : i * SUB, :]).exp()
            dq[..., rows, :] = (gc[..., rows, :] - anchor).exp() * (d_scores[..., rows, : i * SUB] @ k_scaled)
        if i < c // SUB - 1:  # columns of sub-chunk i against the rows after it, anchored at its last row
            anchor = gc[..., (i + 1) * SUB - 1 : (i + 1) * SUB, :]
            later = slice((i + 1) * SUB, c)
            q_scaled = q[..., later, :] * (gc[..., later, :] - anchor).exp()
            dk[..., rows, :] = (anchor - gc[..., rows, :]).exp() * (
                d_scores[..., later, rows].transpose(-1, -2) @ q_scaled)
    q_sub, k_sub, g_sub = (x.unflatten(3, (c // SUB, SUB)) for x in (q, k, gc))
    ds_sub = torch.stack([d_scores[..., i * SUB : (i + 1) * SUB, i * SUB : (i + 1) * SUB] for i in range(c // SUB)],
                         dim=3)  # [B, H, NT, NC, SUB, SUB]
    idx = torch.arange(SUB, device=q.device)[:, None]
    dq_diag = torch.zeros_like(q_sub)
    dk_diag = torch.zeros_like(k_sub)
    for j in range(SUB):
        # column j of the diagonal block feeds rows r >= j; row j feeds columns c <= j.
        dq_diag += ds_sub[..., :, j : j + 1] * k_sub[..., j : j + 1, :] * _causal_exp(
            g_sub - g_sub[..., j : j + 1, :], idx >= j)
        dk_diag += ds_sub[..., j, :, None] * q_sub[..., j : j + 1, :] * _causal_exp(
            g_sub[..., j : j + 1, :] - g_sub, idx <= j)
    return dq + dq_diag.flatten(3, 4), dk + dk_diag.flatten(3, 4)


# ------------------------------------------------------------------------------------------ backend API
def _split(cu_seqlens):
    if cu_seqlens is None:
        return None
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def chunk_forward(q, k, v, g, slopes, scale, initial_state, cu_seqlens, output_final_state, chunk=CHUNK):
    """Causal (gated) linear attention. Exactly one of g [B, T, H, K] / slopes [H] is given.
    Returns o [B, T, H, V] (input dtype) and the final state fp32 [N, H, K, V] (None unless requested)."""
    spans = _split(cu_seqlens)
    if spans is None:
        o, final = _forward_dense(q, k, v, g, slopes, scale, initial_state, chunk)
    else:
        outs, finals = [], []
        for n, (s, e) in enumerate(spans):
            init = None if initial_state is None else initial_state[n : n + 1]
            o_n, f_n = _forward_dense(q[:, s:e], k[:, s:e], v[:, s:e], None if g is None else g[:, s:e], slopes,
                                      scale, init, chunk)
            outs.append(o_n)
            finals.append(f_n)
        o = torch.cat(outs, dim=1)
        final = torch.cat(finals, dim=0)
    return o.to(q.dtype), (final if output_final_state else None)


def chunk_backward(do, dht, q, k, v, g, slopes, scale, initial_state, cu_seqlens, chunk=CHUNK):
    """Gradients (dq, dk, dv, dg or None, dh0 or None) of :func:`chunk_forward`; ``dht`` is the gradient of
    the final state (or None)."""
    spans = _split(cu_seqlens)
    if spans is None:
        dq, dk, dv, dg, dh0 = _backward_dense(do, dht, q, k, v, g, slopes, scale, initial_state, chunk)
    else:
        parts = []
        for n, (s, e) in enumerate(spans):
            sl = slice(n, n + 1)
            parts.append(_backward_dense(
                do[:, s:e], None if dht is None else dht[sl], q[:, s:e], k[:, s:e], v[:, s:e],
                None if g is None else g[:, s:e], slopes, scale, None if initial_state is None else initial_state[sl],
                chunk))
        dq, dk, dv = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
        dg = None if g is None else torch.cat([p[3] for p in parts], dim=1)
        dh0 = torch.cat([p[4] for p in parts], dim=0)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dg is None else dg.to(g.dtype),
            None if initial_state is None else dh0.to(initial_state.dtype))


def noncausal_forward(q, k, v, scale, initial_state, cu_seqlens, output_final_state):
    """o = scale * q (S_0 + K^T V) per sequence; returns (o, final state or None)."""
    states = _noncausal_states(k, v, initial_state, cu_seqlens)
    o = scale * _apply_per_sequence(q.to(states.dtype), states, cu_seqlens)
    return o.to(q.dtype).contiguous(), (states if output_final_state else None)


def noncausal_backward(do, dht, q, k, v, scale, initial_state, cu_seqlens):
    states = _noncausal_states(k, v, initial_state, cu_seqlens)
    dt = states.dtype
    dq = scale * _apply_per_sequence(do.to(dt), states.transpose(-1, -2), cu_seqlens)
    d_state = scale * _noncausal_states(q, do, None, cu_seqlens)
    if dht is not None:
        d_state = d_state + dht.to(dt)
    dk = _apply_per_sequence(v.to(dt), d_state.transpose(-1, -2), cu_seqlens)
    dv = _apply_per_sequence(k.to(dt), d_state, cu_seqlens)
    dh0 = None if initial_state is None else d_state.to(initial_state.dtype)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dh0


def _noncausal_states(a, b, initial_state, cu_seqlens):
    """sum over each sequence of a_t^T b_t: [N, H, Da, Db] in the compute dtype (plus the initial state)."""
    dt = compute_dtype(a.dtype)
    if cu_seqlens is None:
        states = torch.einsum("bthk,bthv->bhkv", a.to(dt), b.to(dt))
    else:
        states = torch.stack([torch.einsum("thk,thv->hkv", a[0, s:e].to(dt), b[0, s:e].to(dt))
                              for s, e in _split(cu_seqlens)])
    return states if initial_state is None else states + initial_state.to(dt)


def _apply_per_sequence(x, states, cu_seqlens):
    """x_t S_n for the sequence n holding t: [B, T, H, Dv]."""
    if cu_seqlens is None:
        return torch.einsum("bthk,bhkv->bthv", x, states)
    outs = [torch.einsum("thk,hkv->thv", x[0, s:e], states[n]) for n, (s, e) in enumerate(_split(cu_seqlens))]
    return torch.cat(outs, dim=0)[None]


def step_forward(q, k, v, g, slopes, state, scale):
    """One decoding step: q, k [B, H, K], v [B, H, V], g [B, H, K] or slopes [H]; state [B, H, K, V] or None
    (zeros). Returns (o [B, H, V], new state fp32; fp64 for fp64 inputs)."""
    dt = compute_dtype(q.dtype)
    decay = _step_decay(g, slopes, dt)
    new = k.to(dt)[..., :, None] * v.to(dt)[..., None, :]
    if state is not None:
        new = new + decay[..., None] * state.to(dt)
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(dt), new)
    return o.to(q.dtype).contiguous(), new.contiguous()


def step_backward(do, d_new, q, k, v, g, slopes, state, scale):
    dt = compute_dtype(q.dtype)
    decay = _step_decay(g, slopes, dt)
    prev = state.to(dt) if state is not None else q.new_zeros((*q.shape, v.shape[-1]), dtype=dt)
    new = decay[..., None] * prev + k.to(dt)[..., :, None] * v.to(dt)[..., None, :]
    dq = scale * torch.einsum("bhv,bhkv->bhk", do.to(dt), new)
    d_total = scale * q.to(dt)[..., :, None] * do.to(dt)[..., None, :]
    if d_new is not None:
        d_total = d_total + d_new.to(dt)
    dk = torch.einsum("bhkv,bhv->bhk", d_total, v.to(dt))
    dv = torch.einsum("bhkv,bhk->bhv", d_total, k.to(dt))
    d_state = None if state is None else (decay[..., None] * d_total).to(state.dtype)
    dg = None
    if g is not None:
        dg = decay * (d_total * prev).sum(-1)
        dg = torch.where(g < LOG_GATE_FLOOR, torch.zeros_like(dg), dg).to(g.dtype)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dg,
            d_state)


def _step_decay(g, slopes, dtype):
    if g is not None:
        return _log_gates(g, dtype).exp()
    return torch.exp(-_decay_rates(slopes, dtype))[None, :, None]
