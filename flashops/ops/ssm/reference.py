"""Oracles for the ssm family: the math as written, everything materialized, loops where the math loops.

They compute in the dtype of their inputs (pass float64 / complex128 for ground truth; the same call in
float16 gives the low-precision baseline of the tolerance rule) and import nothing from flashops.
Layouts match the public ops: sequences are ``[B, D, L]`` (channels, then time), kernels ``[C, H, L]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------- kernels
def power_kernel(dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """``K[c, h, l] = C[c, h] dA[h]^l dB[h]`` by repeated multiplication. dA ``[H, N, N]``, dB ``[H, N]``,
    C ``[C, H, N]`` -> ``[C, H, L]``."""
    x = dB
    out = []
    for _ in range(L):
        out.append(torch.einsum("chn,hn->ch", C, x))
        x = torch.einsum("hmn,hn->hm", dA, x)
    return torch.stack(out, dim=-1)


def vandermonde(log_z: torch.Tensor, w: torch.Tensor, L: int, conj: bool = True) -> torch.Tensor:
    """``K[c, h, l] = s Re(sum_n w[c, h, n] exp(log_z[h, n] l))`` with ``s = 2`` for conjugate-pair halves
    (``conj``) else 1, through the materialized ``[H, N, L]`` Vandermonde matrix."""
    powers = torch.exp(log_z[..., None] * torch.arange(L, device=log_z.device, dtype=log_z.real.dtype))
    k = torch.einsum("chn,hnl->chl", w.to(powers.dtype), powers)
    return (2.0 if conj else 1.0) * k.real


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out[..., l] = sum_n v_n / (z_l - w_n) + conj(v_n) / (z_l - conj(w_n))``; v, w ``[..., N]``,
    z ``[L]``."""
    zl = z[:, None]
    terms = v[..., None, :] / (zl - w[..., None, :]) + v.conj()[..., None, :] / (zl - w.conj()[..., None, :])
    return terms.sum(-1)


def causal_conv(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None,
                K_backward: torch.Tensor | None = None) -> torch.Tensor:
    """Direct convolution: ``y[b, c, h, t] = sum_j K[c, h, j] u[b, h, t - j] + sum_j Kb[c, h, j]
    u[b, h, t + 1 + j] + D[c, h] u[b, h, t]``; u ``[B, H, L]``, K ``[C, H, Lk]`` -> ``[B, C, H, L]``."""
    b, h, length = u.shape
    y = u.new_zeros(b, K.shape[0], h, length)
    for j in range(min(K.shape[-1], length)):
        y[..., j:] += K[None, :, :, j, None] * u[:, None, :, : length - j]
    if K_backward is not None:
        for j in range(min(K_backward.shape[-1], length - 1)):
            y[..., : length - 1 - j] += K_backward[None, :, :, j, None] * u[:, None, :, 1 + j:]
    if D is not None:
        y = y + D[None, :, :, None] * u[:, None]
    return y


def ssm_recurrence(dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, u: torch.Tensor,
                   D: torch.Tensor | None = None, state: torch.Tensor | None = None, diagonal: bool = False):
    """Run ``x_t = dA x_{t-1} + dB u_t``, ``y_t = Re(s C x_t) + D u_t`` step by step.

    Dense: dA ``[H, N, N]``; diagonal: dA ``[H, N]`` (complex halves: pass ``diagonal=True`` and the output
    takes ``2 Re``; real states: ``1 Re``). dB ``[H, N]``, C ``[C, H, N]``, u ``[B, H, L]``, state
    ``[B, H, N]`` (the state before u[0]). Returns ``(y [B, C, H, L], final state)``.
    """
    b, h, length = u.shape
    n = dB.shape[-1]
    x = torch.zeros(b, h, n, dtype=torch.promote_types(dA.dtype, u.dtype), device=u.device)
    if state is not None:
        x = x + state
    scale = 2.0 if (diagonal and dA.is_complex()) else 1.0
    ys = []
    for t in range(length):
        if diagonal:
            x = dA * x + dB * u[..., t, None]
        else:
            x = torch.einsum("hmn,bhn->bhm", dA, x) + dB * u[..., t, None]
        y = scale * torch.einsum("chn,bhn->bch", C.to(x.dtype), x)
        ys.append(y.real if y.is_complex() else y)
    y = torch.stack(ys, -1) if ys else u.new_zeros(b, C.shape[0], h, 0)
    if D is not None:
        y = y + D[None, :, :, None] * u[:, None]
    return y, x


# --------------------------------------------------------------------------------------------- scans
def linear_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + b_t`` along the last dim (``reverse``: ``h_t = a_t h_{t+1} + b_t``), with
    ``h_{-1}`` (``h_L``) = initial_state ``[...]`` or 0; real or complex."""
    h = b.new_zeros(b.shape[:-1]) if initial_state is None else initial_state.to(b.dtype)
    steps = range(a.shape[-1] - 1, -1, -1) if reverse else range(a.shape[-1])
    out = [None] * a.shape[-1]
    for t in steps:
        h = a[..., t] * h + b[..., t]
        out[t] = h
    return torch.stack(out, -1) if out else b.clone()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """Mamba's selective scan, step by step, in the dtype of ``u`` (pass float64 for ground truth).

    u, delta, z ``[B, D, L]``; A ``[D, N]``; B, C ``[B, N, L]`` or grouped ``[B, G, N, L]``; D, delta_bias
    ``[D]``; initial_state ``[B, D, N]``::

        dt = softplus(delta + delta_bias) (or without softplus);  h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t
        y_t = C_t . h_t + D u_t;  out = y * silu(z)
    Returns ``out`` or ``(out, last_state)``.
    """
    dtype = u.dtype
    batch, dim, length = u.shape
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A = A.to(dtype)

    def per_channel(x):  # [B, N, L] or [B, G, N, L] -> [B, D, N, L]
        x = x.to(dtype)
        if x.dim() == 3:
            return x[:, None].expand(batch, dim, *x.shape[1:])
        return x.repeat_interleave(dim // x.shape[1], dim=1)

    Bd, Cd = per_channel(B), per_channel(C)
    h = u.new_zeros(batch, dim, A.shape[-1]) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(length):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, -1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return (y, h) if return_last_state else y
