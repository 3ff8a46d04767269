"""HiPPO matrices, NPLR form, S4D initializations and discretizations, checked in float64 against closed
forms and independent oracles (scipy when present)."""

import math

import pytest
import torch

from flashops.ops.ssm import (
    MEASURES,
    basis_kernels,
    discretize,
    init_dt_bias,
    init_log_dt,
    inverse_softplus,
    nplr,
    rank_correction,
    s4d_init,
    transition,
)

F64 = torch.float64
NORMAL_SHIFT = {"legs": -0.5, "legt": 0.0, "lagt": 0.0, "fout": 0.0, "foud": -0.5}


def _full(x):
    return torch.cat([x, x.conj()], dim=-1)


def test_legs_closed_form():
    A, B = transition("legs", 5)
    for n in range(5):
        for k in range(5):
            want = -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else (-(n + 1) if n == k else 0.0)
            assert A[n, k].item() == pytest.approx(want, abs=1e-14)
        assert B[n].item() == pytest.approx(math.sqrt(2 * n + 1))


def test_legt_lagt_fourier_closed_forms():
    A, B = transition("legt", 4)
    # -1/2 sqrt(2n+1) sqrt(2k+1) on and below the diagonal, alternating signs above it
    assert A[2, 1].item() == pytest.approx(-0.5 * math.sqrt(5 * 3))
    assert A[1, 3].item() == pytest.approx(-0.5 * math.sqrt(3 * 7) * 1.0)
    assert A[0, 1].item() == pytest.approx(+0.5 * math.sqrt(1 * 3))
    assert torch.allclose(B, 0.5 * torch.sqrt(2 * torch.arange(4, dtype=F64) + 1))
    A, B = transition("lagt", 3)
    assert torch.equal(A, torch.tensor([[-0.5, 0, 0], [-1, -0.5, 0], [-1, -1, -0.5]], dtype=F64))
    assert torch.equal(B, torch.ones(3, dtype=F64))
    A, B = transition("foud", 6)
    assert torch.allclose(torch.diagonal(A), torch.full((6,), -0.5, dtype=F64))
    # pair (cos k, sin k) rotates at 2 pi k
    assert A[3, 2].item() == pytest.approx(2 * math.pi) and A[2, 3].item() == pytest.approx(-2 * math.pi)
    assert torch.allclose(B, torch.tensor([1, 0, 2 ** 0.5, 0, 2 ** 0.5, 0], dtype=F64))
    A, B = transition("fout", 6)
    assert torch.allclose(A + torch.outer(B, B), -(A + torch.outer(B, B)).T)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [2, 8, 32])
def test_normal_plus_low_rank(measure, N):
    A, B = transition(measure, N)
    P = rank_correction(measure, N)
    S = A + P.T @ P
    shift = NORMAL_SHIFT[measure]
    skew = S - shift * torch.eye(N, dtype=F64)
    assert torch.allclose(skew, -skew.T, atol=1e-12)
    Lam, Pt, Bt, V = nplr(measure, N)
    assert Lam.shape == (N // 2,) and Pt.shape == (P.shape[0], N // 2) and V.shape == (N, N // 2)
    assert torch.allclose(Lam.real, torch.full_like(Lam.real, shift), atol=1e-10)
    Vf = _full(V)
    assert torch.allclose(Vf.conj().T @ Vf, torch.eye(N, dtype=torch.complex128), atol=1e-10)
    low_rank = sum(torch.outer(p, p.conj()) for p in _full(Pt))
    A_rec = Vf @ (torch.diag(_full(Lam)) - low_rank) @ Vf.conj().T
    assert torch.allclose(A_rec, A.to(A_rec.dtype), atol=1e-9 * N)
    assert torch.allclose(Vf @ _full(Bt), B.to(torch.complex128), atol=1e-10 * N)


def test_nplr_zero_eigenvalues_are_paired():
    # FouT / FouD have a pair of zero eigenvalues (the sin(0) state): they must still pair up.
    Lam, _, _, V = nplr("fout", 8)
    assert int((Lam.abs() < 1e-9).sum()) == 1
    assert torch.allclose(_full(V).conj().T @ _full(V), torch.eye(8, dtype=torch.complex128), atol=1e-12)


def test_legs_basis_is_warped_legendre():
    special = pytest.importorskip("scipy.special")
    N = 8
    t = torch.linspace(0, 4, 41, dtype=F64)
    K = basis_kernels("legs", N, t)
    n = torch.arange(N, dtype=F64)
    x = (2 * torch.exp(-t) - 1).numpy()
    leg = torch.tensor(special.eval_legendre(n.numpy()[:, None], x[None, :]))
    want = torch.sqrt(2 * n + 1)[:, None] * leg * torch.exp(-t)[None]
    assert torch.allclose(K, want, atol=1e-12)


def _hippo_online(measure, N, u, dt, scaled):
    """Run the HiPPO ODE with bilinear steps: LegS is time-varying (A/t), LegT time-invariant."""
    A, B = transition(measure, N)
    steps = torch.arange(1, len(u) + 1, dtype=F64)
    if scaled:
        dA, dB = discretize(A, B, 1.0 / steps, "bilinear")  # one (A/k, B/k) per step k, batched
    else:
        dA, dB = discretize(A, B, dt, "bilinear")
    c = torch.zeros(N, dtype=F64)
    for k, uk in enumerate(u.tolist()):
        c = (dA[k] @ c + dB[k] * uk) if scaled else (dA @ c + dB * uk)
    return c


def test_legs_reconstructs_a_smooth_signal():
    special = pytest.importorskip("scipy.special")
    N, L = 32, 512
    s = torch.linspace(0, 1, L, dtype=F64)
    u = torch.sin(6 * s) + 0.5 * torch.cos(15 * s)
    c = _hippo_online("legs", N, u, None, True)
    n = torch.arange(N)
    # c_n ~ sqrt(2n+1) <u, P_n(2x-1)> over the uniform measure on the history
    basis = torch.tensor(special.eval_legendre(n.numpy()[:, None], (2 * s - 1).numpy()[None]))
    rec = (c[:, None] * torch.sqrt(2 * n + 1.0)[:, None].double() * basis).sum(0)
    assert ((rec - u) ** 2).mean().item() < 1e-3


def test_legt_reconstructs_the_recent_window():
    special = pytest.importorskip("scipy.special")
    N, dt, L = 24, 2e-3, 2000
    t = torch.arange(L, dtype=F64) * dt
    u = torch.sin(3 * t) + torch.cos(7 * t)
    c = _hippo_online("legt", N, u, dt, False)
    # halved LegT: window of length 2, u(T - s) ~ sum_n c_n sqrt(2n+1) P_n(1 - s)
    s_grid = torch.linspace(0, 2, 101, dtype=F64)
    n = torch.arange(N)
    basis = torch.tensor(special.eval_legendre(n.numpy()[:, None], (1 - s_grid).numpy()[None]))
    rec = (c[:, None] * torch.sqrt(2 * n + 1.0)[:, None].double() * basis).sum(0)
    T = t[-1]
    want = torch.sin(3 * (T - s_grid)) + torch.cos(7 * (T - s_grid))
    assert ((rec - want)[5:-5] ** 2).mean().item() < 1e-3


def test_s4d_inits():
    N, H = 8, 3
    n = torch.arange(N // 2, dtype=F64)
    lin = s4d_init("lin", N, H)
    assert lin.shape == (H, N // 2) and torch.allclose(lin[1], torch.complex(torch.full_like(n, -0.5), -math.pi * n))
    inv = s4d_init("inv", N, H)
    assert torch.allclose(-inv.imag[0], N / math.pi * (N / (2 * n + 1) - 1))
    legs = s4d_init("legs", N, H)
    assert torch.allclose(legs.real, torch.full((H, N // 2), -0.5, dtype=F64))
    # S4D-LegS eigenvalues: those of the normal part of HiPPO-LegS
    eig = torch.linalg.eigvals(transition("legs", N)[0] + rank_correction("legs", N).T @ rank_correction("legs", N))
    assert torch.allclose(torch.sort(eig.imag[eig.imag < 0]).values, torch.sort(legs[0].imag).values, atol=1e-9)
    real = s4d_init("real", 5, 2)
    assert real.dtype == F64 and torch.equal(real[0], -torch.arange(1, 6, dtype=F64))


def test_dt_inits():
    g = torch.Generator().manual_seed(0)
    log_dt = init_log_dt(1000, 1e-3, 1e-1, generator=g)
    assert log_dt.dtype == torch.float32
    assert math.log(1e-3) <= log_dt.min().item() and log_dt.max().item() <= math.log(1e-1)
    assert abs(log_dt.mean().item() - 0.5 * (math.log(1e-3) + math.log(1e-1))) < 0.2
    x = torch.tensor([1e-4, 0.01, 1.0, 5.0], dtype=F64)
    assert torch.allclose(torch.nn.functional.softplus(inverse_softplus(x)), x, rtol=1e-12)
    bias = init_dt_bias(500, 1e-3, 1e-1, generator=g)
    dt = torch.nn.functional.softplus(bias.double())
    assert dt.min().item() >= 1e-3 * 0.999 and dt.max().item() <= 1e-1 * 1.001


# ------------------------------------------------------------------------------------------- discretization
def _random_system(N=5, H=3):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(H, N, N, dtype=F64, generator=g) - 2 * torch.eye(N, dtype=F64)
    B = torch.randn(H, N, dtype=F64, generator=g)
    dt = torch.rand(H, dtype=F64, generator=g) * 0.3 + 0.01
    return A, B, dt


def test_zoh_matches_matrix_exponential():
    linalg = pytest.importorskip("scipy.linalg")
    A, B, dt = _random_system()
    dA, dB = discretize(A, B, dt, "zoh")
    for h in range(A.shape[0]):
        e = linalg.expm(dt[h].item() * A[h].numpy())
        assert torch.allclose(dA[h], torch.tensor(e), atol=1e-12)
        want = torch.linalg.solve(A[h], (torch.tensor(e) - torch.eye(5, dtype=F64)) @ B[h])
        assert torch.allclose(dB[h], want, atol=1e-11)


@pytest.mark.parametrize("method,scipy_method", [("bilinear", "bilinear"), ("zoh", "zoh"), ("euler", "euler"),
                                                 ("backward_euler", "backward_diff")])
def test_discretizations_match_scipy(method, scipy_method):
    signal = pytest.importorskip("scipy.signal")
    A, B = transition("legs", 6)
    dA, dB = discretize(A, B, 0.07, method)
    ad, bd, *_ = signal.cont2discrete((A.numpy(), B.numpy()[:, None], torch.eye(6).numpy(), torch.zeros(6, 1).numpy()),
                                      0.07, method=scipy_method)
    assert torch.allclose(dA, torch.tensor(ad), atol=1e-13)
    assert torch.allclose(dB, torch.tensor(bd[:, 0]), atol=1e-13)


def test_gbt_alpha_endpoints_and_half():
    A, B, dt = _random_system()
    for method, alpha in (("bilinear", 0.5), ("euler", 0.0), ("backward_euler", 1.0)):
        ref = discretize(A, B, dt, method)
        got = discretize(A, B, dt, "gbt", alpha=alpha)
        assert torch.allclose(ref[0], got[0], atol=1e-14) and torch.allclose(ref[1], got[1], atol=1e-14)
    dA, dB = discretize(A, B, dt, "euler")
    assert torch.allclose(dA, torch.eye(5, dtype=F64) + dt[:, None, None] * A)


@pytest.mark.parametrize("method", ["bilinear", "zoh", "euler", "backward_euler", "zoh_euler"])
def test_diagonal_equals_dense(method):
    g = torch.Generator().manual_seed(2)
    A = torch.complex(-torch.rand(3, 4, dtype=F64, generator=g), torch.randn(3, 4, dtype=F64, generator=g))
    B = torch.randn(3, 4, dtype=torch.complex128, generator=g)
    dt = torch.rand(3, dtype=F64, generator=g)
    dA, dB = discretize(A, B, dt, method, diagonal=True)
    dA2, dB2 = discretize(torch.diag_embed(A), B, dt, method)
    assert torch.allclose(torch.diag_embed(dA), dA2, atol=1e-13) and torch.allclose(dB, dB2, atol=1e-13)


def test_zoh_diagonal_handles_zero_eigenvalue():
    A = torch.tensor([[0.0, -1.0]], dtype=F64)
    dA, dB = discretize(A, torch.ones(1, 2, dtype=F64), torch.tensor([0.5], dtype=F64), "zoh", diagonal=True)
    assert torch.allclose(dB, torch.tensor([[0.5, 1 - math.exp(-0.5)]], dtype=F64))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="measure must be one of"):
        transition("legx", 4)
    with pytest.raises(ValueError, match="N must be a positive int"):
        transition("legs", 0)
    with pytest.raises(ValueError, match="must be even"):
        nplr("legs", 5)
    with pytest.raises(ValueError, match="rank for measure 'legt' must be an int >= 2"):
        rank_correction("legt", 4, rank=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        s4d_init("fourier", 4)
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        init_log_dt(4, 0.1, 0.01)
    A, B = transition("legs", 4)
    with pytest.raises(ValueError, match="method must be one of"):
        discretize(A, B, 0.1, "rk4")
    with pytest.raises(ValueError, match="needs alpha in"):
        discretize(A, B, 0.1, "gbt")
    with pytest.raises(ValueError, match="alpha is only used with method='gbt'"):
        discretize(A, B, 0.1, "zoh", alpha=0.3)
    with pytest.raises(ValueError, match="dense A must have shape"):
        discretize(B, B, 0.1, "zoh")
    with pytest.raises(ValueError, match="B must have N=4"):
        discretize(A, B[:3], 0.1, "zoh")
