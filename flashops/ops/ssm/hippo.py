"""HiPPO matrices, their normal-plus-low-rank (NPLR) form, S4D initializations and dt initialization.

Everything here is plain math in float64 (no dispatch, no autograd concerns): a model calls these once at
construction and casts the result. Conventions follow S4/S4D so that parameters are interchangeable:

* ``transition(measure, N)`` returns the continuous-time ``A [N, N]`` and ``B [N]`` of ``x' = A x + B u``.
* ``rank_correction(measure, N)`` returns ``P [r, N]`` such that ``A + P^T P`` is normal, and in fact equal
  to ``c I + S`` with ``S`` skew-symmetric (``c = -1/2`` for legs and foud, ``0`` for legt, lagt and fout).
* ``nplr`` diagonalizes that normal part through the Hermitian matrix ``-i (A + P^T P)`` (``eigh`` in
  float64 is stable; a general ``eig`` of a non-normal HiPPO matrix is not) and keeps one eigenvalue of each
  conjugate pair, so ``A = V_full (diag(Lambda_full) - P~_full P~_full^*) V_full^*`` with the full
  quantities made of the kept halves and their conjugates.
"""

from __future__ import annotations

import math

import torch

MEASURES = ("legs", "legt", "lagt", "fout", "foud")
S4D_INITS = ("lin", "inv", "legs", "real")
_F64 = torch.float64


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def _check_size(name: str, n, *, even: bool = False) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    if even and n % 2:
        raise ValueError(f"{name} must be even (states come in conjugate pairs), got {n}")


def _fourier_b(n_state: int) -> torch.Tensor:
    b = torch.zeros(n_state, dtype=_F64)
    b[0::2] = math.sqrt(2.0)
    b[0] = 1.0
    return b


def _fourier_pairs(n_state: int) -> torch.Tensor:
    """Sub-diagonal of the Fourier generators: basis (cos 0, sin 0, cos 1, sin 1, ...), so entry k couples
    state k+1 to state k with the frequency of its pair (0 between pairs)."""
    freqs = torch.arange(n_state // 2, dtype=_F64)
    d = torch.stack([torch.zeros_like(freqs), freqs], dim=-1).reshape(-1)[1:]
    if n_state % 2:  # odd N: the last cosine has no sine partner
        d = torch.cat([d, torch.zeros(1, dtype=_F64)])
    return d


def transition(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous-time HiPPO ``A [N, N]`` and ``B [N]`` (float64) for ``measure``.

    * ``legs``: scaled Legendre, ``A_nk = -sqrt(2n+1) sqrt(2k+1)`` below the diagonal, ``-(n+1)`` on it
      (the S4 / S4D-LegS default; used as an LTI system it projects onto warped Legendre functions).
    * ``legt``: translated Legendre (LMU) in orthonormal form, halved as in S4 for timescale correctness.
    * ``lagt``: translated Laguerre (kept for LSSL parity; discouraged, its memory decays fast).
    * ``fout``: translated Fourier (S4-FouT); ``foud``: Fourier with uniform decay ``-1/2``.

    Example:
        >>> A, B = transition("legs", 4)
    """
    _check_measure(measure)
    _check_size("N", N)
    n = torch.arange(N, dtype=_F64)
    if measure == "legs":
        r = torch.sqrt(2 * n + 1)
        A = torch.where(n[:, None] > n[None, :], -r[:, None] * r[None, :], torch.zeros((), dtype=_F64))
        A = A - torch.diag(n + 1)
        B = r.clone()
    elif measure == "legt":
        r = torch.sqrt(2 * n + 1)
        sign = torch.where(n[:, None] >= n[None, :], torch.ones((), dtype=_F64),
                           (-1.0) ** (n[:, None] - n[None, :]))
        A = -0.5 * r[:, None] * r[None, :] * sign
        B = 0.5 * r
    elif measure == "lagt":
        A = 0.5 * torch.eye(N, dtype=_F64) - torch.tril(torch.ones(N, N, dtype=_F64))
        B = torch.ones(N, dtype=_F64)
    elif measure == "fout":
        d = _fourier_pairs(N)
        B = _fourier_b(N)
        A = math.pi * (torch.diag(d, -1) - torch.diag(d, 1)) - torch.outer(B, B)
    else:  # foud
        d = _fourier_pairs(N)
        A = 2 * math.pi * (torch.diag(d, -1) - torch.diag(d, 1)) - 0.5 * torch.eye(N, dtype=_F64)
        B = _fourier_b(N)
    return A, B


_DEFAULT_RANK = {"legs": 1, "legt": 2, "lagt": 1, "fout": 1, "foud": 1}


def rank_correction(measure: str, N: int, rank: int | None = None) -> torch.Tensor:
    """``P [rank, N]`` (float64) with ``A + P^T P`` normal for ``transition(measure, N)``.

    The minimal ranks are legs 1, legt 2, lagt 1, fout 1, foud 1 (an all-zero row: foud is already normal);
    a larger ``rank`` pads with zero rows.
    """
    _check_measure(measure)
    _check_size("N", N)
    minimal = _DEFAULT_RANK[measure]
    rank = minimal if rank is None else rank
    if not isinstance(rank, int) or rank < minimal:
        raise ValueError(f"rank for measure {measure!r} must be an int >= {minimal}, got {rank!r}")
    n = torch.arange(N, dtype=_F64)
    if measure == "legs":
        P = torch.sqrt(n + 0.5)[None]
    elif measure == "legt":
        r = torch.sqrt(2 * n + 1) / math.sqrt(2.0)  # halved like the matrix
        even, odd = r.clone(), r.clone()
        even[1::2] = 0.0
        odd[0::2] = 0.0
        P = torch.stack([odd, even])
    elif measure == "lagt":
        P = torch.full((1, N), math.sqrt(0.5), dtype=_F64)
    elif measure == "fout":
        P = _fourier_b(N)[None]
    else:
        P = torch.zeros(1, N, dtype=_F64)
    if rank > P.shape[0]:
        P = torch.cat([P, torch.zeros(rank - P.shape[0], N, dtype=_F64)])
    return P


def _pair_null_space(vectors: torch.Tensor) -> torch.Tensor:
    """Eigenvectors [N, z] of eigenvalue 0 of a real skew matrix (z even) -> z/2 complex vectors
    ``(r_2j + i r_2j+1) / sqrt 2`` built from a real orthonormal basis ``r`` of the same space, so that each
    vector and its conjugate reproduce the space: ``v v^* + conj(v) conj(v)^* = r r^T + r' r'^T``."""
    z = vectors.shape[1]
    real_basis = torch.cat([vectors.real, vectors.imag], dim=1)
    u, s, _ = torch.linalg.svd(real_basis, full_matrices=False)
    r = u[:, :z]
    return (r[:, 0::2] + 1j * r[:, 1::2]) / math.sqrt(2.0)


def nplr(measure: str, N: int, rank: int | None = None):
    """Normal plus low-rank form of a HiPPO matrix, diagonalized in float64.

    Returns ``(Lambda, P, B, V)``: ``Lambda [N/2]`` complex eigenvalues (one per conjugate pair, negative
    imaginary part first, real part ``c``), ``P [rank, N/2] = V^* P``, ``B [N/2] = V^* B`` and the unitary
    half ``V [N, N/2]``, such that with ``X_full = [X, conj(X)]``::

        A = V_full (diag(Lambda_full) - P_full^* P_full) V_full^*,   B = V_full B_full

    (``P_full^* P_full`` is the outer product over the rank index). ``N`` must be even.
    """
    _check_measure(measure)
    _check_size("N", N, even=True)
    A, B = transition(measure, N)
    P = rank_correction(measure, N, rank)
    normal = A + P.T @ P  # c I + skew
    c = torch.diagonal(normal).mean()
    skew = normal - c * torch.eye(N, dtype=_F64)
    # -i S is Hermitian for real skew S: eigh gives real eigenvalues w and a unitary V with S = V (i w) V^*.
    w, vecs = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    scale = max(1.0, float(w.abs().max()))
    tol = 1e-9 * scale * N
    negative = w < -tol
    zero = w.abs() <= tol
    keep = vecs[:, negative]
    lam_im = w[negative]
    n_zero = int(zero.sum())
    if n_zero:
        keep = torch.cat([keep, _pair_null_space(vecs[:, zero])], dim=1)
        lam_im = torch.cat([lam_im, torch.zeros(n_zero // 2, dtype=_F64)])
    if keep.shape[1] != N // 2:
        raise RuntimeError(f"nplr({measure!r}, {N}): eigenvalues do not come in conjugate pairs")
    Lam = torch.complex(torch.full_like(lam_im, float(c)), lam_im)
    V_inv = keep.conj().T
    return Lam, P.to(torch.complex128) @ V_inv.T, V_inv @ B.to(torch.complex128), keep


def s4d_init(kind: str, N: int, H: int = 1) -> torch.Tensor:
    """Diagonal state matrices of S4D, repeated over ``H`` channels (float64 / complex128).

    * ``lin``: ``-1/2 + i pi n`` (S4D-Lin), ``inv``: ``-1/2 + i N/pi (N/(2n+1) - 1)`` (S4D-Inv),
      ``legs``: the eigenvalues of the normal part of HiPPO-LegS (S4D-LegS); each is complex
      ``[H, N/2]`` (one state per conjugate pair, ``N`` even).
    * ``real``: ``-(n + 1)`` for ``n < N``, real ``[H, N]`` (S4D-Real, Mamba's initialization).
    """
    if kind not in S4D_INITS:
        raise ValueError(f"kind must be one of {S4D_INITS}, got {kind!r}")
    _check_size("N", N, even=kind != "real")
    _check_size("H", H)
    if kind == "real":
        return (-(torch.arange(N, dtype=_F64) + 1)).expand(H, N).clone()
    n = torch.arange(N // 2, dtype=_F64)
    if kind == "lin":
        imag = math.pi * n
    elif kind == "inv":
        imag = N / math.pi * (N / (2 * n + 1) - 1)
    else:
        imag = -nplr("legs", N)[0].imag
    return torch.complex(torch.full_like(imag, -0.5), -imag).expand(H, N // 2).clone()


def basis_kernels(measure: str, N: int, t: torch.Tensor) -> torch.Tensor:
    """``expm(t A) B`` for each time in ``t`` -> ``[N, len(t)]`` float64: the impulse responses (basis
    functions) of the continuous HiPPO system. For ``legs`` they are the warped Legendre functions
    ``sqrt(2n+1) P_n(2 e^{-t} - 1) e^{-t}``."""
    A, B = transition(measure, N)
    t = torch.as_tensor(t, dtype=_F64).reshape(-1)
    return (torch.linalg.matrix_exp(t[:, None, None] * A) @ B).T


def _check_dt_range(dt_min, dt_max) -> None:
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max):
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")


def init_log_dt(H: int, dt_min: float = 1e-3, dt_max: float = 1e-1, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``log dt`` drawn log-uniformly in ``[log dt_min, log dt_max]``, ``[H]`` float32 (S4/S4D/LSSL)."""
    _check_size("H", H)
    _check_dt_range(dt_min, dt_max)
    u = torch.rand(H, generator=generator, dtype=_F64)
    return (u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).float()


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """``y`` with ``softplus(y) == x`` for ``x > 0``: ``x + log(-expm1(-x))``."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(D: int, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Mamba's ``delta_bias [D]`` (float32): ``inverse_softplus`` of a log-uniform dt, floored at
    ``dt_floor``, so that ``softplus(0 + delta_bias)`` starts in ``[dt_min, dt_max]``."""
    dt = init_log_dt(D, dt_min, dt_max, generator=generator).double().exp().clamp(min=dt_floor)
    return inverse_softplus(dt).float()
