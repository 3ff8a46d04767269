"""The backend contracts of the ssm family: what a module registered as a backend of its ops implements
(``_dispatch.Backend.module``). Complex tensors travel as (re, im) pairs in a trailing dimension of 2."""

from __future__ import annotations

from typing import Optional, Protocol

from torch import Tensor


class LinearScanBackend(Protocol):
    """``linear_scan``: a, b [B, D, L] (or [B, D, L, 2]), initial_state [B, D] (or [B, D, 2])."""

    def linear_scan_fwd(self, a: Tensor, b: Tensor, initial_state: Optional[Tensor], reverse: bool) -> Tensor:
        """All states h [B, D, L] in b's dtype."""

    def linear_scan_bwd(self, dh: Tensor, a: Tensor, h: Tensor, initial_state: Optional[Tensor], reverse: bool
                        ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(da, db, d initial_state or None)."""


class SelectiveScanBackend(Protocol):
    """``selective_scan``: u, delta, z [B, D, L], A [D, N], B, C [B, G, N, L] or [B, N, L], D, delta_bias [D]."""

    def selective_scan_fwd(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                           z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                           softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(out [B, D, L], last state [B, D, N], states saved for the backward [B, D, N, ceil(L / spacing)])."""

    def selective_scan_bwd(self, dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                           B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                           delta_bias: Optional[Tensor], initial_state: Optional[Tensor], ckpt: Tensor,
                           softplus: bool) -> tuple:
        """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, d initial_state), None where the input is None."""


class StateUpdateBackend(Protocol):
    """``selective_state_update``: state [B, D, N], x, dt, z [B, D], A [D, N], B, C [B, N] or [B, G, N],
    D, dt_bias [D]."""

    def selective_state_update_fwd(self, state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                   D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                                   softplus: bool) -> tuple[Tensor, Tensor]:
        """(y [B, D] in x's dtype, new state [B, D, N] in the state's dtype)."""

    def selective_state_update_bwd(self, dy: Tensor, d_new_state: Optional[Tensor], state: Tensor, x: Tensor,
                                   dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                                   z: Optional[Tensor], dt_bias: Optional[Tensor], softplus: bool) -> tuple:
        """(d state, dx, ddt, dA, dB, dC, dD, dz, ddt_bias), None where the input is None."""


class VandermondeBackend(Protocol):
    """``vandermonde_kernel``: x [H, N, 2], w [C, H, N, 2] fp32 (or fp64) pairs."""

    def vandermonde_fwd(self, x: Tensor, w: Tensor, length: int, conj: bool) -> Tensor:
        """K [C, H, L]."""

    def vandermonde_bwd(self, dk: Tensor, x: Tensor, w: Tensor, length: int, conj: bool) -> tuple[Tensor, Tensor]:
        """(dx, dw)."""


class CauchyBackend(Protocol):
    """``cauchy_kernel``: v [M, G, N, 2], z [L, 2], w [G, N, 2] pairs."""

    def cauchy_fwd(self, v: Tensor, z: Tensor, w: Tensor) -> Tensor:
        """out [M, G, L, 2]."""

    def cauchy_bwd(self, dout: Tensor, v: Tensor, z: Tensor, w: Tensor, want_dz: bool
                   ) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """(dv, dz or None, dw)."""
