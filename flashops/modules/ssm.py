"""State-space layers: ``LSSL`` (dense HiPPO A, Krylov kernel) and ``S4D`` (diagonal A, Vandermonde kernel).

Both map ``x [B, T, C]`` to ``y [B, T, C]``: C = ``embed_dim`` independent SSM channels, each with its own
trainable step dt and ``channels`` copies of the output, a convolution ``y = K * x + D x`` (training, any T),
then an activation and a linear layer that mixes the ``channels * C`` outputs back to C. For generation the
same layer runs as a recurrence, following :mod:`flashops.modules.cache`: ``cache = layer.init_cache(B)``,
``layer(x, cache)`` (a prompt, in one or several chunks) and ``layer.step(x_t, cache)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.ssm import (
    SSMStep,
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
from .base import KeepsFP32, accepts_aliases, check_input, describe
from .cache import RecurrentCache, check_cache

_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "identity": lambda x: x}


class SSMCache(RecurrentCache):
    """Decoding state of an SSM layer: ``state`` ``[B, H, N]`` (complex64 for conjugate-pair states, fp32 or
    wider otherwise) and ``ssm``, the layer discretized when the cache was made, which ``step`` uses."""

    def __init__(self, state: Tensor, ssm: SSMStep):
        super().__init__(state)
        self.ssm = ssm


class _LTISSM(KeepsFP32):
    """What LSSL and S4D share: dt parametrization, convolution and recurrent modes, output mixing."""

    diagonal: bool
    # The SSM's own parameters keep fp32 under .to(torch.bfloat16); the output layer follows the module dtype.
    fp32_names = ("dt_param", "D", "log_A_real", "A_imag", "A", "B", "C")

    def __init__(self, embed_dim: int, channels: int, dt_min: float, dt_max: float, dt_transform: str,
                 discretization: str, activation: str):
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim (d_model) must be a positive int, got {embed_dim!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if dt_transform not in ("exp", "softplus"):
            raise ValueError(f"dt_transform must be 'exp' or 'softplus', got {dt_transform!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.embed_dim, self.channels = embed_dim, channels
        self.dt_transform, self.discretization, self.activation = dt_transform, discretization, activation
        log_dt = init_log_dt(embed_dim, dt_min, dt_max)
        dt_param = log_dt if dt_transform == "exp" else inverse_softplus(log_dt.double().exp()).float()
        self.dt_param = nn.Parameter(dt_param)
        self.D = nn.Parameter(torch.randn(channels, embed_dim))
        self.output_linear = nn.Linear(channels * embed_dim, embed_dim)

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

    def _ssm(self) -> SSMStep:
        A, B, C = self.ssm_parameters()
        return setup_step(A, B, C, self.dt(), self.discretization, diagonal=self.diagonal)

    def _mix(self, y: Tensor) -> Tensor:
        """[B, C, H, ...] -> activation -> linear over the C*H outputs, time last -> [B, ..., H]."""
        y = y.movedim(-1, 1) if y.dim() == 4 else y  # [B, L, C, H]
        y = y.reshape(*y.shape[:-2], self.channels * self.embed_dim)
        return self.output_linear(_ACTIVATIONS[self.activation](y))

    def init_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                   dtype=None) -> SSMCache:
        """A zero state for ``batch_size`` sequences and the layer discretized for :meth:`step` (make a new
        cache after the parameters change). The state does not grow: ``max_seqlen`` and ``dtype`` are accepted
        so that a model can make every layer's cache with one call, and bound nothing."""
        del max_seqlen, dtype
        with torch.no_grad():
            ssm = self._ssm()
        if device is not None:
            ssm = SSMStep(*(t.to(device) if isinstance(t, Tensor) else t for t in ssm))
        return SSMCache(default_state(ssm, batch_size), ssm)

    def forward(self, x: Tensor, cache: Optional[SSMCache] = None) -> Tensor:
        """x ``[B, T, C]`` -> y ``[B, T, C]`` (convolution mode, any T). With a cache, the tokens continue from
        its state, which then holds the state after them: a sequence fed in chunks gives the same outputs."""
        check_input(x, self.embed_dim, (3,), "[B, T, C]")
        length = x.shape[1]
        xt = x.transpose(1, 2)  # [B, C, T]
        y = fft_conv(xt, self.kernel(length), self.D)
        if cache is None:
            return self._mix(y)
        check_cache(cache, SSMCache, self, x.shape[0])
        ssm = self._ssm()
        y = y + state_output(ssm, cache.state, length).to(y.dtype)
        cache.advance(forward_state(ssm, xt, cache.state), length)
        return self._mix(y)

    def step(self, x_t: Tensor, cache: SSMCache) -> Tensor:
        """One token per sequence in recurrent mode: x_t ``[B, C]`` -> y_t ``[B, C]``."""
        check_input(x_t, self.embed_dim, (2,), "[B, C] (one token per sequence)")
        check_cache(cache, SSMCache, self, x_t.shape[0])
        y, state = step(cache.ssm, x_t, cache.state, self.D)
        cache.advance(state, 1)
        return self._mix(y.to(x_t.dtype))

    def _finish_init(self, device, dtype) -> None:
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)


class S4D(_LTISSM):
    """Diagonal state-space layer (S4D): ``A = -exp(log_A_real) + i A_imag`` per channel, B = 1 (absorbed in
    C), kernel by :func:`flashops.ops.ssm.s4d_kernel` (Vandermonde, never ``[H, N, L]``) and FFT convolution.

    Args:
        embed_dim: C, the number of SSM channels (``d_model=`` as in S4 and mamba_ssm is accepted too).
        d_state: N (N/2 complex conjugate-pair states; N real states for ``init="real"``).
        channels: output copies per channel, mixed by the output linear layer.
        init: ``"inv"`` (S4D-Inv, default), ``"lin"``, ``"legs"`` or ``"real"``.
        dt_min, dt_max: range of the log-uniform initial step. dt_transform: ``"exp"`` or ``"softplus"``.
        discretization: ``"zoh"`` (default) or ``"bilinear"`` (any diagonal method of ``discretize``).
        activation: ``"gelu"`` (default), ``"silu"`` or ``"identity"`` before the output linear layer.
        backend: backend of the Vandermonde kernel (default: automatic).
        device, dtype: of the output layer; the SSM parameters are fp32 (fp64 after ``.double()``).
    """

    diagonal = True

    @accepts_aliases(d_model="embed_dim")
    def __init__(self, embed_dim: int, d_state: int = 64, channels: int = 1, *, init: str = "inv",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_transform: str = "exp",
                 discretization: str = "zoh", activation: str = "gelu", backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__(embed_dim, channels, dt_min, dt_max, dt_transform, discretization, activation)
        A = s4d_init(init, d_state, embed_dim)
        self.d_state, self.init, self.backend = d_state, init, backend
        self.log_A_real = nn.Parameter(torch.log(-A.real).float())
        if A.is_complex():
            self.A_imag = nn.Parameter(A.imag.float())
            c = torch.randn(channels, embed_dim, A.shape[1], dtype=torch.complex64)
            self.C = nn.Parameter(torch.view_as_real(c).clone())
        else:
            self.register_parameter("A_imag", None)
            self.C = nn.Parameter(torch.randn(channels, embed_dim, A.shape[1]))
        self._finish_init(device, dtype)

    def ssm_parameters(self):
        real = -torch.exp(self.log_A_real)
        if self.A_imag is None:
            return real, torch.ones_like(real), self.C
        return torch.complex(real, self.A_imag), torch.ones_like(real), torch.view_as_complex(self.C)

    def kernel(self, L: int) -> Tensor:
        A, B, C = self.ssm_parameters()
        return s4d_kernel(A, B, C, self.dt(), L, self.discretization, backend=self.backend)

    def extra_repr(self) -> str:
        return describe(embed_dim=self.embed_dim, d_state=self.d_state, channels=self.channels, init=self.init,
                        discretization=self.discretization, dt_transform=self.dt_transform,
                        activation=self.activation, backend=self.backend)


class LSSL(_LTISSM):
    """Linear state-space layer (LSSL) with a dense HiPPO matrix shared by all H channels.

    Each channel discretizes ``(A, B)`` with its own trainable dt (generalized bilinear transform by default)
    and convolves with the Krylov kernel ``C dA^l dB`` (O(N^2 L) per channel, by repeated squaring).

    Args:
        embed_dim: C, the number of SSM channels (``d_model=`` is accepted too). d_state: N.
        channels: output copies M per channel, mixed by the output linear layer.
        measure: HiPPO measure of A (``"legs"`` default, ``"legt"``, ``"lagt"``, ``"fout"``, ``"foud"``).
        trainable_A: learn A and B (LSSL) or keep the HiPPO matrices fixed (LSSL-fixed, default).
        dt_min, dt_max, dt_transform, activation: as in :class:`S4D`.
        discretization: ``"bilinear"`` (default) or any dense method of ``discretize``.
        device, dtype: as in :class:`S4D`.
    """

    diagonal = False

    @accepts_aliases(d_model="embed_dim")
    def __init__(self, embed_dim: int, d_state: int = 64, channels: int = 1, *, measure: str = "legs",
                 trainable_A: bool = False, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_transform: str = "exp", discretization: str = "bilinear", activation: str = "gelu",
                 device=None, dtype=None):
        super().__init__(embed_dim, channels, dt_min, dt_max, dt_transform, discretization, activation)
        A, B = transition(measure, d_state)
        self.d_state, self.measure, self.trainable_A = d_state, measure, trainable_A
        if trainable_A:
            self.A = nn.Parameter(A.float())
            self.B = nn.Parameter(B.float())
        else:
            self.register_buffer("A", A.float())
            self.register_buffer("B", B.float())
        self.C = nn.Parameter(torch.randn(channels, embed_dim, d_state) / math.sqrt(d_state))
        self._finish_init(device, dtype)

    def ssm_parameters(self):
        return self.A, self.B, self.C

    def kernel(self, L: int) -> Tensor:
        dA, dB = discretize(self.A, self.B.expand(self.embed_dim, -1), self.dt(), self.discretization)
        return krylov_kernel(dA, dB, self.C, L)

    def extra_repr(self) -> str:
        return describe(embed_dim=self.embed_dim, d_state=self.d_state, channels=self.channels,
                        measure=self.measure, trainable_A=self.trainable_A, discretization=self.discretization,
                        dt_transform=self.dt_transform, activation=self.activation)
