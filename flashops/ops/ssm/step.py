"""Recurrent (step) mode of linear time-invariant SSMs: the functional helpers behind the modules'
``setup_step`` / ``default_state`` / ``step`` / ``forward_state``.

The state ``x`` is the one after the last processed input (``x_{-1} = 0`` for a fresh sequence):
``x_t = dA x_{t-1} + dB u_t`` and ``y_t = s Re(C x_t) + D u_t``, with ``s = 2`` for diagonal SSMs stored as
conjugate-pair halves and 1 otherwise. A chunk of L inputs moves the state to
``dA^L x + sum_k dA^k dB u_{L-1-k}`` (``forward_state``) and adds ``s Re(C dA^{t+1} x)`` to the output at
step t (``state_output``), so processing a sequence chunk by chunk equals processing it whole.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .convolution import krylov, vandermonde_kernel
from .discretization import discretize

# [H, N, chunk] complex powers at a time when the state is advanced over a chunk.
_POWER_ELEMENTS = 1 << 22


class SSMStep(NamedTuple):
    """Discretized SSM for recurrent mode. Diagonal: dA, dB ``[H, N]``, log_dA ``[H, N]``; dense: dA
    ``[H, N, N]``, dB ``[H, N]``. C ``[C, H, N]``. ``conj``: states are conjugate-pair halves (diagonal)."""

    dA: Tensor
    dB: Tensor
    C: Tensor
    log_dA: Optional[Tensor]
    diagonal: bool
    conj: bool


def setup_step(A: Tensor, B: Tensor, C: Tensor, dt: Tensor, discretization: str = "zoh", *,
               diagonal: bool, alpha: Optional[float] = None) -> SSMStep:
    """Discretize once for stepping. A ``[H, N]`` (diagonal) or ``[H, N, N]`` / ``[N, N]`` (dense), B
    broadcastable to ``[H, N]``, C ``[C, H, N]`` or ``[H, N]``, dt ``[H]``. Pure: calling it again on the same
    parameters gives the same result (nothing is modified in place)."""
    C3 = C.unsqueeze(0) if C.dim() == 2 else C
    if diagonal:
        B = torch.as_tensor(B, device=A.device).expand_as(A)
        dA, dB = discretize(A, B, dt, discretization, alpha=alpha, diagonal=True)
        if discretization in ("zoh", "zoh_euler"):
            log_dA = dt[:, None] * A
        else:
            log_dA = torch.log(dA.to(torch.complex128 if dA.dtype in (torch.float64, torch.complex128)
                                     else torch.complex64))
        return SSMStep(dA, dB, C3, log_dA, True, A.is_complex())
    n = A.shape[-1]
    B = torch.as_tensor(B, device=A.device).expand(dt.shape[0], n)
    dA, dB = discretize(A, B, dt, discretization, alpha=alpha)
    return SSMStep(dA, dB, C3, None, False, False)


def _state_dtype(ssm: SSMStep) -> torch.dtype:
    return torch.promote_types(ssm.dA.dtype, ssm.dB.dtype)


def default_state(ssm: SSMStep, batch: int) -> Tensor:
    """Zero state ``[batch, H, N]`` (complex for conjugate-pair states)."""
    h, n = ssm.dB.shape
    return torch.zeros(batch, h, n, dtype=_state_dtype(ssm), device=ssm.dB.device)


def _readout(ssm: SSMStep, x: Tensor) -> Tensor:
    y = torch.einsum("chn,bhn->bch", ssm.C.to(x.dtype), x)
    if y.is_complex():
        y = (2.0 if ssm.conj else 1.0) * y.real
    return y


def step(ssm: SSMStep, u_t: Tensor, state: Tensor, D: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One step: u_t ``[B, H]`` -> ``(y_t [B, C, H], new state [B, H, N])``. D: ``[C, H]`` or None."""
    u = u_t.to(state.real.dtype if state.is_complex() else state.dtype)
    if ssm.diagonal:
        x = ssm.dA * state + ssm.dB * u[..., None]
    else:
        x = torch.einsum("hmn,bhn->bhm", ssm.dA.to(state.dtype), state) + ssm.dB * u[..., None]
    y = _readout(ssm, x)
    if D is not None:
        y = y + D * u[:, None]
    return y, x


def _diag_powers(ssm: SSMStep, k0: int, k1: int) -> Tensor:
    ks = torch.arange(k0, k1, device=ssm.dA.device, dtype=ssm.log_dA.real.dtype)
    p = torch.exp(ssm.log_dA[..., None] * ks)
    return p if ssm.conj or not p.is_complex() else p.real


def forward_state(ssm: SSMStep, u: Tensor, state: Tensor) -> Tensor:
    """State after a chunk u ``[B, H, L]`` starting from ``state``: ``dA^L x + sum_k dA^k dB u_{L-1-k}``."""
    length = u.shape[-1]
    rev = u.flip(-1).to(state.real.dtype if state.is_complex() else state.dtype)
    if not ssm.diagonal:
        kry = krylov(ssm.dA, ssm.dB, length)
        power = torch.linalg.matrix_power(ssm.dA.to(state.dtype), length)
        return torch.einsum("hmn,bhn->bhm", power, state) + torch.einsum("hnk,bhk->bhn", kry.to(state.dtype), rev)
    h, n = ssm.dB.shape
    out = _diag_powers(ssm, length, length + 1)[..., 0].to(state.dtype) * state
    chunk = max(1, _POWER_ELEMENTS // max(1, h * n))
    for k0 in range(0, length, chunk):
        k1 = min(k0 + chunk, length)
        p = _diag_powers(ssm, k0, k1).to(state.dtype)
        out = out + ssm.dB.to(state.dtype) * torch.einsum("bhk,hnk->bhn", rev[..., k0:k1].to(p.dtype), p)
    return out


def state_output(ssm: SSMStep, state: Tensor, L: int, *, backend: Optional[str] = None) -> Tensor:
    """What the state before a chunk adds to its outputs: ``s Re(C dA^{t+1} x)`` -> ``[B, C, H, L]``."""
    batch = state.shape[0]
    n_c, h, n = ssm.C.shape
    if ssm.diagonal:
        w = (ssm.C[None] * (ssm.dA * state)[:, None]).reshape(batch * n_c, h, n)
        k = vandermonde_kernel(ssm.log_dA, w, L, conj=ssm.conj, backend=backend)
        return k.reshape(batch, n_c, h, L)
    x = torch.einsum("hmn,bhn->bhm", ssm.dA.to(state.dtype), state)
    return torch.einsum("chn,bhnl->bchl", ssm.C.to(state.dtype), krylov(ssm.dA.to(state.dtype), x, L))
