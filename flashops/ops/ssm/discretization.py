"""Discretization of ``x' = A x + B u`` with step ``dt`` into ``x_k = dA x_{k-1} + dB u_k``.

Plain differentiable PyTorch functions (no dispatch): they cost O(N) (diagonal) or O(N^3) (dense) per
channel, nothing next to the kernels that follow. Methods:

* ``"gbt"`` with ``alpha``: generalized bilinear transform
  ``dA = (I - alpha dt A)^{-1} (I + (1 - alpha) dt A)``, ``dB = (I - alpha dt A)^{-1} dt B``;
  ``"bilinear"`` is ``alpha = 1/2`` (Tustin, the S4/LSSL default), ``"euler"`` is ``alpha = 0`` (forward),
  ``"backward_euler"`` is ``alpha = 1``.
* ``"zoh"``: zero-order hold, ``dA = exp(dt A)``, ``dB = A^{-1} (exp(dt A) - I) B`` (computed without
  inverting ``A``: ``phi_1`` elementwise for diagonal ``A``, one block matrix exponential for dense ``A``).
* ``"zoh_euler"``: Mamba's choice, ZOH for ``A`` and Euler for ``B``: ``dA = exp(dt A)``, ``dB = dt B``.
"""

from __future__ import annotations

import torch

METHODS = ("bilinear", "zoh", "euler", "backward_euler", "gbt", "zoh_euler")
_ALPHAS = {"bilinear": 0.5, "euler": 0.0, "backward_euler": 1.0}


def _phi1(x: torch.Tensor) -> torch.Tensor:
    """(exp(x) - 1) / x with its limit 1 at x = 0 (real or complex)."""
    zero = x == 0
    safe = torch.where(zero, torch.ones_like(x), x)
    return torch.where(zero, torch.ones_like(x), torch.expm1(safe) / safe)


def _alpha(method: str, alpha) -> float | None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gbt":
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"method='gbt' needs alpha in [0, 1], got alpha={alpha!r}")
        return float(alpha)
    if alpha is not None:
        raise ValueError(f"alpha is only used with method='gbt', got method={method!r} and alpha={alpha!r}")
    return _ALPHAS.get(method)


def discretize(A: torch.Tensor, B: torch.Tensor, dt, method: str = "bilinear", *, alpha: float | None = None,
               diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Discretize ``(A, B)`` with step ``dt``; returns ``(dA, dB)``.

    Args:
        A: diagonal ``[..., N]`` (``diagonal=True``; real or complex) or dense ``[..., N, N]``.
        B: ``[..., N]``, broadcastable against A's batch dimensions.
        dt: step size, a float or a tensor ``[...]`` broadcastable against A's batch dimensions
            (e.g. one step per channel: A ``[H, N, N]`` or ``[N, N]`` with dt ``[H]``).
        method: ``"bilinear"`` (default), ``"zoh"``, ``"euler"``, ``"backward_euler"``, ``"gbt"`` (needs
            ``alpha``) or ``"zoh_euler"`` (Mamba). See the module docstring for the formulas.

    Example:
        >>> dA, dB = discretize(A, B, torch.full((H,), 0.01), "zoh", diagonal=True)   # A [H, N]
    """
    a = _alpha(method, alpha)
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise TypeError(f"A and B must be tensors, got {type(A).__name__} and {type(B).__name__}")
    real_dtype = A.real.dtype if A.is_complex() else A.dtype
    if not isinstance(dt, torch.Tensor):
        dt = torch.tensor(float(dt), dtype=real_dtype, device=A.device)
    elif not dt.is_floating_point():
        dt = dt.to(real_dtype)
    if diagonal:
        if A.dim() < 1:
            raise ValueError(f"diagonal A must have shape [..., N], got {tuple(A.shape)}")
        if B.shape[-1] != A.shape[-1]:
            raise ValueError(f"B must have N={A.shape[-1]} states like A, got shape {tuple(B.shape)}")
        dtA = dt[..., None] * A
        if method == "zoh":
            return torch.exp(dtA), _phi1(dtA) * dt[..., None] * B
        if method == "zoh_euler":
            return torch.exp(dtA), dt[..., None] * B
        denom = 1 - a * dtA
        return (1 + (1 - a) * dtA) / denom, dt[..., None] * B / denom
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"dense A must have shape [..., N, N], got {tuple(A.shape)} (pass diagonal=True "
                         f"for a diagonal A [..., N])")
    n = A.shape[-1]
    if B.shape[-1] != n:
        raise ValueError(f"B must have N={n} states like A, got shape {tuple(B.shape)}")
    dtA = dt[..., None, None] * A
    if method in ("zoh", "zoh_euler"):
        if method == "zoh_euler":
            return torch.linalg.matrix_exp(dtA), dt[..., None] * B
        # exp([[A, B], [0, 0]] dt) = [[exp(dt A), A^{-1}(exp(dt A) - I) B], [0, 1]]
        batch = torch.broadcast_shapes(dtA.shape[:-2], B.shape[:-1])
        block = dtA.new_zeros(*batch, n + 1, n + 1)
        block[..., :n, :n] = dtA
        block[..., :n, n] = dt[..., None] * B
        expm = torch.linalg.matrix_exp(block)
        return expm[..., :n, :n], expm[..., :n, n]
    eye = torch.eye(n, dtype=dtA.dtype, device=A.device)
    lhs = eye - a * dtA
    dA = torch.linalg.solve(lhs, eye + (1 - a) * dtA)
    batch = torch.broadcast_shapes(lhs.shape[:-2], B.shape[:-1])
    dB = torch.linalg.solve(lhs.expand(*batch, n, n), (dt[..., None] * B).expand(*batch, n).unsqueeze(-1))
    return dA, dB.squeeze(-1)
