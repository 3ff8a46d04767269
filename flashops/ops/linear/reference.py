"""The oracle for linear attention: the recurrence and the quadratic masked form, plain PyTorch.

State recurrence per (sequence, head), with q_t, k_t in R^K, v_t in R^V and log-gates g_t in R^K (<= 0):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

Lightning Attention uses a constant per-head log-gate g_t = -slope_h (broadcast over K); plain linear
attention is slope 0; GLA passes data-dependent g. The non-causal form is o_t = scale * q_t (S_0 + K^T V).

GQA: k and v may have fewer heads than q; the state has one head per decay (the gates' heads, at least the kv
heads), kv head j serves states j * (H_state / H_kv) ..., and query head h reads state h // (H / H_state).
``reverse=True`` runs the recurrence from each sequence's last position to its first (fla's ``reverse``):
S_t = diag(exp(g_t)) S_{t+1} + k_t^T v_t, the initial state enters after the last position and the final state
is S at the first.

``upcast=True`` (default) computes in fp32 (fp64 stays fp64); ``upcast=False`` computes in the input dtype,
which gives the "same reference in low precision" baseline of the tolerance rule. Imports nothing from
flashops.
"""

from __future__ import annotations

import torch


def _work_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    if not upcast:
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sequences(total: int, cu_seqlens):
    if cu_seqlens is None:
        return None
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _repeat_heads(x, heads: int, dim: int):
    """x with its ``dim`` (a head dimension) repeated to ``heads``: head j serves heads j * r ... (j + 1) * r - 1."""
    return x.repeat_interleave(heads // x.shape[dim], dim=dim)


def _recurrent_one(q, k, v, g, scale, state, reverse):
    """q [T, H, K]; k, g [T, Hs, K]; v [T, Hs, V]; state [Hs, K, V] -> o [T, H, V], final state [Hs, K, V]."""
    t_len, heads = q.shape[:2]
    outs = [None] * t_len
    for t in (reversed(range(t_len)) if reverse else range(t_len)):
        state = torch.exp(g[t])[..., None] * state + k[t][..., :, None] * v[t][..., None, :]
        outs[t] = scale * torch.einsum("hk,hkv->hv", q[t], _repeat_heads(state, heads, 0))
    o = torch.stack(outs) if outs else v.new_zeros(t_len, heads, v.shape[-1])
    return o, state


def _quadratic_one(q, k, v, g, scale, state, reverse):
    """The parallel form: o_t = scale * sum_{s<=t} (q_t * exp(G_t - G_s)) . k_s v_s + scale * (q_t * exp(G_t)) S_0,
    with G the inclusive cumulative sum of g (reverse: the same on the time-flipped sequence). Materializes
    [T, T, H, K]: short T only, finite gates only."""
    if reverse:
        o, final = _quadratic_one(q.flip(0), k.flip(0), v.flip(0), g.flip(0), scale, state, False)
        return o.flip(0), final
    heads, state_heads = q.shape[1], k.shape[1]
    k, v, g = (_repeat_heads(x, heads, 1) for x in (k, v, g))
    state = _repeat_heads(state, heads, 0)
    t_len = q.shape[0]
    big_g = torch.cumsum(g, dim=0)  # [T, H, K]
    causal = torch.ones(t_len, t_len, dtype=torch.bool, device=q.device).tril()
    diff = big_g[:, None] - big_g[None, :]  # [T(t), T(s), H, K]
    decay = torch.where(causal[:, :, None, None], diff, torch.full_like(diff, float("-inf"))).exp()
    scores = torch.einsum("thk,tshk,shk->hts", q, decay, k)
    o = torch.einsum("hts,shv->thv", scores, v)
    o = o + torch.einsum("thk,hkv->thv", q * big_g.exp(), state)
    total = big_g[-1] if t_len else torch.zeros_like(g[0] if g.shape[0] else state[..., 0])
    final = total.exp()[..., None] * state + torch.einsum("shk,shv->hkv", k * (total[None] - big_g).exp(), v)
    return scale * o, final[:: heads // state_heads]  # the query heads of a state hold copies of it


def linear_attention_recurrence(q, k, v, log_gates, *, scale=None, initial_state=None, output_final_state=False,
                                cu_seqlens=None, method="recurrent", upcast=True, reverse=False):
    """Causal gated linear attention by the per-step recurrence (``method="recurrent"``, ground truth) or
    the quadratic masked form (``method="quadratic"``).

    q [B, T, H, K]; k [B, T, H_kv, K]; v [B, T, H_kv, V]; log_gates broadcastable to [B, T, H_s, K] (e.g.
    [1, 1, H_s, 1] for a per-head constant) with H_s the state heads (a multiple of H_kv, a divisor of H; at
    least H_kv: k and v are repeated for the states of their group); initial_state [N, H_s, K, V]. Varlen:
    B == 1 and cu_seqlens [N + 1]. Returns ``(o, final_state)``: o [B, T, H, V] in the input dtype,
    final_state [N, H_s, K, V] (or None).
    """
    dtype = _work_dtype(q, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t_len, h, d_k = q.shape
    d_v = v.shape[-1]
    state_heads = max(k.shape[2], log_gates.shape[2] if log_gates.dim() == 4 else 1)
    g = torch.broadcast_to(log_gates, (b, t_len, state_heads, d_k)).to(dtype)
    qf, kf, vf = q.to(dtype), _repeat_heads(k.to(dtype), state_heads, 2), _repeat_heads(v.to(dtype), state_heads, 2)
    one = _recurrent_one if method == "recurrent" else _quadratic_one
    spans = _sequences(t_len, cu_seqlens) or [(0, t_len)] * b
    outs, finals = [], []
    for n, (start, end) in enumerate(spans):
        row = 0 if cu_seqlens is not None else n
        s0 = (initial_state[n].to(dtype) if initial_state is not None
              else qf.new_zeros(state_heads, d_k, d_v))
        o, s = one(qf[row, start:end], kf[row, start:end], vf[row, start:end], g[row, start:end], scale, s0,
                   reverse)
        outs.append(o)
        finals.append(s)
    return _gather(outs, finals, cu_seqlens, vf.new_zeros(b, t_len, h, d_v), qf.new_zeros(0, state_heads, d_k, d_v),
                   q.dtype, output_final_state)


def _gather(outs, finals, cu_seqlens, empty_out, empty_final, out_dtype, output_final_state):
    """Per-sequence outputs and final states -> (o [B, T, H, V], final [N, H_state, K, V] or None); the empty
    tensors stand in for a batch without sequences."""
    if cu_seqlens is not None:
        o = torch.cat(outs, dim=0)[None] if outs else empty_out
    else:
        o = torch.stack(outs) if outs else empty_out
    final = torch.stack(finals) if finals else empty_final
    final = final.to(torch.float32 if final.dtype != torch.float64 else final.dtype)
    return o.to(out_dtype), (final if output_final_state else None)


def lightning_attention(q, k, v, slopes, *, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, method="recurrent", upcast=True, reverse=False):
    """Lightning Attention: per-head constant decay exp(-slopes[s]), slopes [H] or [H_kv] (one state per slope).
    Same arguments as the fast op."""
    log_gates = -slopes.to(_work_dtype(q, upcast)).reshape(1, 1, -1, 1)
    return linear_attention_recurrence(q, k, v, log_gates, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                       method=method, upcast=upcast, reverse=reverse)


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, method="recurrent", upcast=True, reverse=False):
    """GLA: data-dependent log-gates g [B, T, H_kv, K] (they follow k). Same arguments as the fast op."""
    return linear_attention_recurrence(q, k, v, g, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                       method=method, upcast=upcast, reverse=reverse)


def noncausal_linear_attention(q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, upcast=True):
    """o_t = scale * q_t (S_0 + sum_s k_s^T v_s) over the whole sequence; final state S_0 + K^T V (one per kv
    head; query head h reads state h // (H / H_kv))."""
    dtype = _work_dtype(q, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t_len, h, d_k = q.shape
    d_v = v.shape[-1]
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    spans = _sequences(t_len, cu_seqlens) or [(0, t_len)] * b
    outs, finals = [], []
    for n, (start, end) in enumerate(spans):
        row = 0 if cu_seqlens is not None else n
        s = initial_state[n].to(dtype) if initial_state is not None else qf.new_zeros(k.shape[2], d_k, d_v)
        s = s + torch.einsum("thk,thv->hkv", kf[row, start:end], vf[row, start:end])
        outs.append(scale * torch.einsum("thk,hkv->thv", qf[row, start:end], _repeat_heads(s, h, 0)))
        finals.append(s)
    return _gather(outs, finals, cu_seqlens, vf.new_zeros(b, t_len, h, d_v), qf.new_zeros(0, k.shape[2], d_k, d_v),
                   q.dtype, output_final_state)


def recurrent_step(q, k, v, log_gate, state, *, scale=None, upcast=True):
    """One decoding step: q [B, H, K], k [B, H_kv, K], v [B, H_kv, V], log_gate broadcastable to [B, H_s, K],
    state [B, H_s, K, V] (or None) -> (o [B, H, V], new_state fp32), with the head mapping of the chunked form."""
    dtype = _work_dtype(q, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, heads, d_k = q.shape
    state_heads = max(k.shape[1], log_gate.shape[1] if log_gate.dim() == 3 else 1)
    if state is None:
        state = q.new_zeros(b, state_heads, d_k, v.shape[-1], dtype=dtype)
    g = torch.broadcast_to(log_gate, (b, state_heads, d_k)).to(dtype)
    kf, vf = (_repeat_heads(x.to(dtype), state_heads, 1) for x in (k, v))
    new = torch.exp(g)[..., None] * state.to(dtype) + kf[..., :, None] * vf[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(dtype), _repeat_heads(new, heads, 1))
    return o.to(q.dtype), new.to(torch.float32 if dtype != torch.float64 else dtype)
