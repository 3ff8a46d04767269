"""The oracle for Local Linear Attention: the per-query weighted ridge regression, solved directly.

Everything is materialized: the [Tq, Tk] weights and one D x D system per query, so use it for small T only.
It imports nothing from flashops and is differentiable with autograd (``torch.linalg.solve``), so an fp64
``gradcheck`` of it is the ground truth for every gradient, including the one of ``ridge_lambda``.

Convention (see docs/lla.md): with softmax weights ``s_ij = softmax_j(scale * q_i . k_j)`` over the visible
keys, query i's output is the intercept ``b`` of

    min_{b, W}  sum_j s_ij * || v_j - b - W (k_j - q_i) ||^2  +  lambda_i * || W ||_F^2

which in closed form is ``v_bar + C_vk (C_kk + lambda I)^{-1} (q - k_bar)`` with the softmax-weighted means
and (centred) covariances of keys and values. The paper writes ``1/2 sum_j w_ij ||.||^2 + lambda ||W||^2``;
``ridge_lambda`` here is that lambda times 2 on softmax-normalized weights (the convention of the authors'
released code, which adds ``lambda * omega_i * I`` to the unnormalized normal equations).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat


def _work_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else dtype


def _heads_first(q, k, v, dtype):
    """q [B, Tq, H, D] -> [B, H, Tq, D]; k/v [B, Tk, Hkv, D] -> [B, H, Tk, D] (GQA groups repeated)."""
    group = q.shape[2] // k.shape[2]
    qh = rearrange(q.to(dtype), "b t h d -> b h t d")
    kh = repeat(k.to(dtype), "b t h d -> b (h g) t d", g=group)
    vh = repeat(v.to(dtype), "b t h d -> b (h g) t d", g=group)
    return qh, kh, vh


def _ridge(ridge_lambda, b, t_q, h, device, dtype) -> torch.Tensor:
    """lambda per query as [B, H, Tq]; a float or a tensor broadcastable to [B, Tq, H]."""
    if not isinstance(ridge_lambda, torch.Tensor):
        ridge_lambda = torch.tensor(float(ridge_lambda), device=device)
    return ridge_lambda.to(dtype).expand(b, t_q, h).transpose(1, 2)


def softmax_weights(q, k, *, softmax_scale=None, causal=True, key_lengths=None):
    """q [B, H, Tq, D], k [B, H, Tk, D] -> softmax weights s [B, H, Tq, Tk] (rows that see no key are 0)
    and the visible-key mask [B|1, 1, Tq, Tk].

    Causal masks are aligned bottom-right: query i sees keys j <= i + Tk - Tq. ``key_lengths`` (int [B])
    hides keys j >= key_lengths[b].
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    t_q, t_k = q.shape[-2], k.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    i = torch.arange(t_q, device=q.device)[:, None] + (t_k - t_q)
    j = torch.arange(t_k, device=q.device)[None, :]
    visible = (j <= i) if causal else torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    visible = visible[None, None]
    if key_lengths is not None:
        visible = visible & (j[None, None] < key_lengths.reshape(-1, 1, 1, 1))
    logits = logits.masked_fill(~visible, float("-inf"))
    if t_k == 0:  # amax over no keys fails; every row sees nothing
        return logits, visible
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    w = torch.exp(logits - row_max)
    total = w.sum(dim=-1, keepdim=True)
    s = w / total.masked_fill(total == 0, 1.0)
    return s, visible


def local_linear_attention(q, k, v, *, ridge_lambda, softmax_scale=None, causal=True, key_lengths=None,
                           upcast=True):
    """Local Linear Attention by a direct solve per query (closed form). Returns o [B, Tq, H, D].

    q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D] (H % Hkv == 0). ``ridge_lambda``: float or tensor broadcastable
    to [B, Tq, H]. ``upcast=True`` computes in fp32 (fp64 for fp64 inputs); ``upcast=False`` does the
    matrix products in the input dtype and only the D x D solve in fp32 (the low-precision baseline of the
    tolerance rule). A query that sees no key gives 0.
    """
    dtype = _work_dtype(q.dtype, upcast)
    solve_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    b, t_q, h, d = q.shape
    qh, kh, vh = _heads_first(q, k, v, dtype)
    s, _ = softmax_weights(qh, kh, softmax_scale=softmax_scale, causal=causal, key_lengths=key_lengths)
    has_keys = (s.sum(-1) > 0).to(solve_dtype)[..., None]  # [B, H, Tq, 1]
    k_bar = torch.matmul(s, kh)  # [B, H, Tq, D]
    second = torch.einsum("bhqk,bhkd,bhke->bhqde", s, kh, kh)
    cov = second.to(solve_dtype) - k_bar.to(solve_dtype)[..., :, None] * k_bar.to(solve_dtype)[..., None, :]
    lam = _ridge(ridge_lambda, b, t_q, h, q.device, solve_dtype)
    system = cov + lam[..., None, None] * torch.eye(d, device=q.device, dtype=solve_dtype)
    z = torch.linalg.solve(system, (k_bar.to(solve_dtype) - qh.to(solve_dtype))[..., None])[..., 0]
    z = (z * has_keys).to(dtype)
    # Equivalent kernel: l_ij = s_ij * (1 - z_i . (k_j - k_bar_i)); it sums to 1 over j.
    centred = torch.matmul(z, kh.transpose(-1, -2)) - (z * k_bar).sum(-1, keepdim=True)
    weights = s * (1.0 - centred)
    out = torch.matmul(weights, vh)
    return rearrange(out, "b h t d -> b t h d").to(q.dtype)


def local_linear_attention_regression(q, k, v, *, ridge_lambda, softmax_scale=None, causal=True):
    """The same estimator from first principles, in float64: for each query solve the (D+1) x (D+1) weighted
    normal equations of ``[b, W]`` (intercept unpenalized) and return the intercept. Slow; tests only."""
    b, t_q, h, d = q.shape
    qh, kh, vh = _heads_first(q, k, v, torch.float64)
    s, _ = softmax_weights(qh, kh, softmax_scale=softmax_scale, causal=causal)
    lam = _ridge(ridge_lambda, b, t_q, h, q.device, torch.float64)
    x = kh[:, :, None, :, :] - qh[:, :, :, None, :]  # [B, H, Tq, Tk, D]: keys centred at the query
    design = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)  # [B, H, Tq, Tk, D+1]
    weighted = design * s[..., None]
    gram = torch.einsum("bhqkc,bhqke->bhqce", weighted, design)
    penalty = torch.diag(torch.cat([torch.zeros(1, dtype=torch.float64), torch.ones(d, dtype=torch.float64)]))
    gram = gram + lam[..., None, None] * penalty.to(q.device)
    rhs = torch.einsum("bhqkc,bhke->bhqce", weighted, vh)
    has_keys = s.sum(-1) > 0
    # Rows without keys: any well-posed system; their output is zeroed below.
    eye = torch.eye(d + 1, dtype=torch.float64, device=q.device)
    gram = torch.where(has_keys[..., None, None], gram, eye)
    coef = torch.linalg.solve(gram, rhs)  # [B, H, Tq, D+1, D]
    out = coef[..., 0, :] * has_keys[..., None]
    return rearrange(out, "b h t d -> b t h d")


def softmax_attention(q, k, v, *, softmax_scale=None, causal=True):
    """Plain softmax attention (the lambda -> infinity limit of LLA), fp32/fp64, bottom-right causal."""
    dtype = _work_dtype(q.dtype, True)
    qh, kh, vh = _heads_first(q, k, v, dtype)
    s, _ = softmax_weights(qh, kh, softmax_scale=softmax_scale, causal=causal)
    return rearrange(torch.matmul(s, vh), "b h t d -> b t h d")
