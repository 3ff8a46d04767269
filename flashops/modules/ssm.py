"""State-space layers: ``LSSL`` (dense HiPPO A, Krylov kernel) and ``S4D`` (diagonal A, Vandermonde kernel).

Both map ``[B, L, H]`` to ``[B, L, H]``: H independent SSM channels, each with its own trainable step dt and
C copies of the output (``channels``), a convolution ``y = K * u + D u`` (training, any L), then an activation
and a linear layer that mixes the ``channels * H`` outputs back to H. For generation the same layer runs as
a recurrence: ``setup_step()``, ``default_state(batch)``, ``step(u_t, state)``; and ``forward(u, state)``
passes a state from one chunk to the next, so chunked processing equals processing the whole sequence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.ssm import (
    default_state,
    fft_conv,
    forward_state,
    init_log_dt,
    inverse_softplus,
    krylov_kernel,
    s4d_init,
    s4d_kernel,
    setup_step,
    state_output,
    step,
    transition,
)
from ..ops.ssm.discretization import discretize

_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "identity": lambda x: x}


class _LTISSM(nn.Module):
    """What LSSL and S4D share: dt parametrization, convolution and recurrent modes, output mixing."""

    diagonal: bool

    def __init__(self, d_model: int, channels: int, dt_min: float, dt_max: float, dt_transform: str,
                 discretization: str, activation: str):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if dt_transform not in ("exp", "softplus"):
            raise ValueError(f"dt_transform must be 'exp' or 'softplus', got {dt_transform!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.channels = d_model, channels
        self.dt_transform, self.discretization, self.activation = dt_transform, discretization, activation
        log_dt = init_log_dt(d_model, dt_min, dt_max)
        dt_param = log_dt if dt_transform == "exp" else inverse_softplus(log_dt.double().exp()).float()
        self.dt_param = nn.Parameter(dt_param)
        self.D = nn.Parameter(torch.randn(channels, d_model))
        self.output_linear = nn.Linear(channels * d_model, d_model)
        self._step: Optional[object] = None

    # ---- subclasses provide these
    def ssm_parameters(self):
        """(A, B, C) in continuous time."""
        raise NotImplementedError

    def kernel(self, L: int) -> Tensor:
        """Convolution kernel ``[channels, H, L]``."""
        raise NotImplementedError

    # ---- shared
    def dt(self) -> Tensor:
        return torch.exp(self.dt_param) if self.dt_transform == "exp" else F.softplus(self.dt_param)

    def _ssm(self):
        A, B, C = self.ssm_parameters()
        return setup_step(A, B, C, self.dt(), self.discretization, diagonal=self.diagonal)

    def _mix(self, y: Tensor) -> Tensor:
        """[B, C, H, ...] -> activation -> linear over the C*H outputs, time last -> [B, ..., H]."""
        y = y.movedim(-1, 1) if y.dim() == 4 else y  # [B, L, C, H]
        y = y.reshape(*y.shape[:-2], self.channels * self.d_model)
        return self.output_linear(_ACTIVATIONS[self.activation](y))

    def _check_input(self, u: Tensor):
        if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u must have shape [B, L, H={self.d_model}], got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")

    def forward(self, u: Tensor, state: Optional[Tensor] = None):
        """u ``[B, L, H]`` -> y ``[B, L, H]``; with ``state`` (from ``default_state`` or a previous chunk)
        returns ``(y, next_state)``, the state after the chunk."""
        self._check_input(u)
        length = u.shape[1]
        ut = u.transpose(1, 2)  # [B, H, L]
        y = fft_conv(ut, self.kernel(length), self.D)
        if state is None:
            return self._mix(y)
        ssm = self._ssm()
        y = y + state_output(ssm, state, length).to(y.dtype)
        return self._mix(y), forward_state(ssm, ut, state)

    def setup_step(self) -> None:
        """Discretize for recurrent mode (call again after the parameters change; calling twice is safe)."""
        self._step = self._ssm()

    def default_state(self, batch: int) -> Tensor:
        """Zero state ``[batch, H, N]`` (complex for conjugate-pair states)."""
        return default_state(self._step if self._step is not None else self._ssm(), batch)

    def step(self, u_t: Tensor, state: Tensor):
        """One step: u_t ``[B, H]`` -> ``(y_t [B, H], next state)``. Needs ``setup_step()`` first."""
        if self._step is None:
            raise RuntimeError(f"{type(self).__name__}.step needs setup_step() to be called first")
        if u_t.dim() != 2 or u_t.shape[-1] != self.d_model:
            raise ValueError(f"u_t must have shape [B, H={self.d_model}], got {tuple(u_t.shape)}")
        y, state = step(self._step, u_t, state, self.D)
        return self._mix(y.to(u_t.dtype)), state

    def forward_state(self, u: Tensor, state: Tensor) -> Tensor:
        """State after processing u ``[B, L, H]`` from ``state``, without computing outputs."""
        self._check_input(u)
        return forward_state(self._step if self._step is not None else self._ssm(), u.transpose(1, 2), state)


class S4D(_LTISSM):
    """Diagonal state-space layer (S4D): ``A = -exp(log_A_real) + i A_imag`` per channel, B = 1 (absorbed in
    C), kernel by :func:`flashops.ops.ssm.s4d_kernel` (Vandermonde, never ``[H, N, L]``) and FFT convolution.

    Args:
        d_model: H. d_state: N (N/2 complex conjugate-pair states; N real states for ``init="real"``).
        channels: output copies per channel, mixed by the output linear layer.
        init: ``"inv"`` (S4D-Inv, default), ``"lin"``, ``"legs"`` or ``"real"``.
        dt_min, dt_max: range of the log-uniform initial step. dt_transform: ``"exp"`` or ``"softplus"``.
        discretization: ``"zoh"`` (default) or ``"bilinear"`` (any diagonal method of ``discretize``).
        activation: ``"gelu"`` (default), ``"silu"`` or ``"identity"`` before the output linear layer.
        backend: backend of the Vandermonde kernel (default: automatic).
    """

    diagonal = True

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, *, init: str = "inv",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_transform: str = "exp",
                 discretization: str = "zoh", activation: str = "gelu", backend: Optional[str] = None):
        super().__init__(d_model, channels, dt_min, dt_max, dt_transform, discretization, activation)
        A = s4d_init(init, d_state, d_model)
        self.init, self.backend = init, backend
        self.log_A_real = nn.Parameter(torch.log(-A.real).float())
        if A.is_complex():
            self.A_imag = nn.Parameter(A.imag.float())
            c = torch.randn(channels, d_model, A.shape[1], dtype=torch.complex64)
            self.C = nn.Parameter(torch.view_as_real(c).clone())
        else:
            self.register_parameter("A_imag", None)
            self.C = nn.Parameter(torch.randn(channels, d_model, A.shape[1]))

    def ssm_parameters(self):
        real = -torch.exp(self.log_A_real)
        if self.A_imag is None:
            return real, torch.ones_like(real), self.C
        return torch.complex(real, self.A_imag), torch.ones_like(real), torch.view_as_complex(self.C)

    def kernel(self, L: int) -> Tensor:
        A, B, C = self.ssm_parameters()
        return s4d_kernel(A, B, C, self.dt(), L, self.discretization, backend=self.backend)


class LSSL(_LTISSM):
    """Linear state-space layer (LSSL) with a dense HiPPO matrix shared by all H channels.

    Each channel discretizes ``(A, B)`` with its own trainable dt (generalized bilinear transform by default)
    and convolves with the Krylov kernel ``C dA^l dB`` (O(N^2 L) per channel, by repeated squaring).

    Args:
        d_model: H. d_state: N. channels: output copies M per channel, mixed by the output linear layer.
        measure: HiPPO measure of A (``"legs"`` default, ``"legt"``, ``"lagt"``, ``"fout"``, ``"foud"``).
        trainable_A: learn A and B (LSSL) or keep the HiPPO matrices fixed (LSSL-fixed, default).
        dt_min, dt_max, dt_transform, activation: as in :class:`S4D`.
        discretization: ``"bilinear"`` (default) or any dense method of ``discretize``.
    """

    diagonal = False

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, *, measure: str = "legs",
                 trainable_A: bool = False, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_transform: str = "exp", discretization: str = "bilinear", activation: str = "gelu"):
        super().__init__(d_model, channels, dt_min, dt_max, dt_transform, discretization, activation)
        A, B = transition(measure, d_state)
        self.measure = measure
        if trainable_A:
            self.A = nn.Parameter(A.float())
            self.B = nn.Parameter(B.float())
        else:
            self.register_buffer("A", A.float())
            self.register_buffer("B", B.float())
        self.C = nn.Parameter(torch.randn(channels, d_model, d_state) / math.sqrt(d_state))

    def ssm_parameters(self):
        return self.A, self.B, self.C

    def kernel(self, L: int) -> Tensor:
        dA, dB = discretize(self.A, self.B.expand(self.d_model, -1), self.dt(), self.discretization)
        return krylov_kernel(dA, dB, self.C, L)
