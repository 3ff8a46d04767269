"""Convolution kernels (Vandermonde, Cauchy, DPLR, Krylov) and fft_conv against float64 oracles:
the power-series kernel ``C dA^l dB`` and the step-by-step recurrence."""

import math

import pytest
import torch

from flashops.ops.ssm import (
    cauchy_kernel,
    discretize,
    dplr_kernel,
    fft_conv,
    krylov_kernel,
    nplr,
    s4d_init,
    s4d_kernel,
    transition,
    vandermonde_kernel,
)
from flashops.ops.ssm import reference as ref
from flashops.testing import assert_close

from ..helpers import require
from .ssm_helpers import BACKENDS, pairs

C64, C128, F64 = torch.complex64, torch.complex128, torch.float64


def _diag_system(H, N, n_copies, device, kind="lin", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = s4d_init(kind, 2 * N if kind != "real" else N, H)
    A = A + (0.1 * torch.randn(A.shape, dtype=F64, generator=g) if not A.is_complex()
             else torch.complex(0.2 * torch.rand(A.shape, dtype=F64, generator=g), torch.zeros(A.shape, dtype=F64)))
    cdt = C128 if A.is_complex() else F64
    C = torch.randn(n_copies, H, A.shape[1], dtype=cdt, generator=g)
    dt = torch.exp(torch.empty(H, dtype=F64).uniform_(math.log(1e-2), math.log(2e-1), generator=g))
    return A.to(device), C.to(device), dt.to(device)


# --------------------------------------------------------------------------------------------- Vandermonde
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,N,n_copies,L", [(3, 5, 2, 1), (2, 16, 1, 17), (2, 33, 3, 129), (1, 4, 6, 300)])
def test_vandermonde_matches_materialized(backend, H, N, n_copies, L, device):
    require("vandermonde_kernel", backend, device=device)
    g = torch.Generator().manual_seed(H * N + L)
    log_z = torch.complex(-torch.rand(H, N, dtype=F64, generator=g) * 0.05,
                          torch.randn(H, N, dtype=F64, generator=g)).to(device)
    w = torch.randn(n_copies, H, N, dtype=C128, generator=g).to(device)
    check_vandermonde(backend, log_z, w, L, g)


def check_vandermonde(backend, log_z, w, L, g):
    """The kernel and both gradients in complex64 against the materialized complex128 reference."""
    x32 = log_z.to(C64).requires_grad_()
    w32 = w.to(C64).requires_grad_()
    k = vandermonde_kernel(x32, w32, L, backend=backend)
    x64 = x32.detach().to(C128).requires_grad_()
    w64 = w32.detach().to(C128).requires_grad_()
    k_ref = ref.vandermonde(x64, w64, L)
    assert k.shape == (w.shape[0], w.shape[1], L) and k.dtype == torch.float32
    assert_close("K", k, k_ref)
    grad = torch.randn(k_ref.shape, dtype=F64, generator=g).to(log_z.device)
    k.backward(grad.float())
    k_ref.backward(grad)
    assert_close("dlog_z", pairs(x32.grad), pairs(x64.grad))
    assert_close("dw", pairs(w32.grad), pairs(w64.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vandermonde_real_states(backend, device):
    require("vandermonde_kernel", backend, device=device)
    log_z = (-torch.rand(2, 6, dtype=F64) * 0.3).to(device)
    w = torch.randn(2, 6, dtype=F64).to(device)
    x32, w32 = log_z.float().requires_grad_(), w.float().requires_grad_()
    k = vandermonde_kernel(x32, w32, 40, backend=backend)
    assert k.shape == (2, 40)
    x64, w64 = log_z.clone().requires_grad_(), w.clone().requires_grad_()
    k_ref = ref.vandermonde(x64, w64[None], 40, conj=False)[0]
    assert_close("K", k, k_ref)
    k.sum().backward()
    k_ref.sum().backward()
    assert_close("dlog_z", x32.grad, x64.grad)
    assert_close("dw", w32.grad, w64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("disc", ["zoh", "bilinear", "euler", "backward_euler"])
@pytest.mark.parametrize("kind", ["inv", "real"])
def test_s4d_kernel_equals_power_kernel(backend, disc, kind, device):
    require("vandermonde_kernel", backend, device=device)
    A, C, dt = _diag_system(3, 4, 2, device, kind)
    B = torch.ones_like(A)
    k = s4d_kernel(A.to(C64 if A.is_complex() else torch.float32), B.real.float(),
                   C.to(C64 if C.is_complex() else torch.float32), dt.float(), 50, disc, backend=backend)
    dA, dB = discretize(A, B, dt, disc, diagonal=True)
    k_ref = ref.power_kernel(torch.diag_embed(dA), dB, C, 50)
    k_ref = 2 * k_ref.real if A.is_complex() else k_ref
    assert_close("K", k, k_ref)


def test_s4d_kernel_float64_and_gradients_reach_every_parameter(device):
    A, C, dt = _diag_system(2, 3, 1, device)
    A, C, dt = A.requires_grad_(), C.requires_grad_(), dt.requires_grad_()
    B = torch.ones_like(A).requires_grad_()
    torch.autograd.gradcheck(lambda A, B, C, dt: s4d_kernel(A, B, C, dt, 9, "zoh", backend="torch"),
                             (A, B, C, dt))
    torch.autograd.gradcheck(lambda A, C, dt: s4d_kernel(A, 1.0, C, dt, 7, "bilinear", backend="torch"),
                             (A, C, dt))


def test_vandermonde_memory_is_linear(device):
    """The torch path materializes at most a bounded chunk of the [H, N, L] powers."""
    from flashops.ops.ssm import pytorch as tp
    assert tp._l_chunk(4 * 64, 1 << 20) * 4 * 64 <= tp.BLOCK_ELEMENTS


# ------------------------------------------------------------------------------------------------ Krylov
@pytest.mark.parametrize("measure", ["legs", "legt", "fout"])
@pytest.mark.parametrize("L", [1, 7, 64])
def test_krylov_kernel_equals_power_kernel(measure, L):
    A, B = transition(measure, 6)
    dt = torch.tensor([0.05, 0.3], dtype=F64)
    dA, dB = discretize(A, B.expand(2, 6), dt, "bilinear")
    C = torch.randn(3, 2, 6, dtype=F64)
    assert torch.allclose(krylov_kernel(dA, dB, C, L), ref.power_kernel(dA, dB, C, L), atol=1e-12)
    assert krylov_kernel(dA, dB, C[0], L).shape == (2, L)


def test_krylov_kernel_gradcheck():
    A, B = transition("legs", 3)
    dt = torch.tensor([0.1, 0.2], dtype=F64, requires_grad=True)
    A = A.clone().requires_grad_()
    C = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)

    def kernel(A, C, dt):
        dA, dB = discretize(A, B.expand(2, 3), dt, "bilinear")
        return krylov_kernel(dA, dB, C, 11)

    torch.autograd.gradcheck(kernel, (A, C, dt))


# ------------------------------------------------------------------------------------------------ Cauchy
def _cauchy_inputs(M, G, N, L, device, hard=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(M, G, N, dtype=C128, generator=g)
    if hard:  # poles close to the imaginary axis, evaluation points right next to them
        w = torch.complex(torch.full((G, N), -1e-3, dtype=F64),
                          N * torch.rand(G, N, dtype=F64, generator=g) + 1)
        z = 1j * (w.imag.reshape(-1)[torch.randint(0, G * N, (L,), generator=g)]
                  + 1e-3 * torch.randn(L, dtype=F64, generator=g))
    else:
        w = torch.complex(-torch.rand(G, N, dtype=F64, generator=g) - 0.1,
                          3 * torch.randn(G, N, dtype=F64, generator=g))
        z = torch.complex(torch.zeros(L, dtype=F64), 4 * torch.randn(L, dtype=F64, generator=g))
    return v.to(device), z.to(device), w.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,G,N,L", [(1, 1, 1, 1), (2, 3, 7, 40), (3, 2, 40, 130)])
def test_cauchy_matches_naive(backend, M, G, N, L, device):
    require("cauchy_kernel", backend, device=device)
    v, z, w = _cauchy_inputs(M, G, N, L, device)
    v32, z32, w32 = (t.to(C64).requires_grad_() for t in (v, z, w))
    out = cauchy_kernel(v32, z32, w32, backend=backend)
    v64, z64, w64 = (t.detach().to(C128).requires_grad_() for t in (v32, z32, w32))
    out_ref = ref.cauchy(v64, z64, w64)
    assert out.shape == (M, G, L) and out.dtype == C64
    assert_close("out", pairs(out), pairs(out_ref))
    grad = torch.randn(out_ref.shape, dtype=C128).to(device)
    out.backward(grad.to(C64))
    out_ref.backward(grad)
    for name, a, b in (("dv", v32, v64), ("dz", z32, z64), ("dw", w32, w64)):
        assert_close(name, pairs(a.grad), pairs(b.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cauchy_near_singular_points(backend, device):
    """Re(w) ~ -1e-3, Im(w) ~ N, z within 1e-3 of a pole: each term is computed as 1/(z - w) directly
    (exact subtraction), so fp32 keeps a small relative error."""
    require("cauchy_kernel", backend, device=device)
    v, z, w = _cauchy_inputs(2, 2, 64, 50, device, hard=True)
    v32, z32, w32 = (t.to(C64) for t in (v, z, w))
    out = cauchy_kernel(v32, z32, w32, backend=backend)
    out_ref = ref.cauchy(v32.to(C128), z32.to(C128), w32.to(C128))
    rel = ((out.to(C128) - out_ref).abs() / out_ref.abs().clamp_min(1e-30)).max().item()
    assert rel < 1e-4, rel


def test_cauchy_leading_dims_and_gradcheck():
    v, z, w = _cauchy_inputs(6, 2, 3, 5, "cpu")
    out = cauchy_kernel(v.reshape(2, 3, 2, 3), z, w, backend="torch")
    assert out.shape == (2, 3, 2, 5)
    assert torch.allclose(out.reshape(6, 2, 5), ref.cauchy(v, z, w), atol=1e-12)
    v, z, w = (t[:2, :, :2].clone() if t.dim() == 3 else t[..., :2].clone() for t in (v, z, w))
    v, z, w = v.requires_grad_(), z[:3].clone().requires_grad_(), w.requires_grad_()
    torch.autograd.gradcheck(lambda v, z, w: cauchy_kernel(v, z, w, backend="torch"), (v, z, w))


# -------------------------------------------------------------------------------------------------- DPLR
def _dplr_dense(Lam, P, B, C, dt, L):
    """Power-series kernel of the full (conjugate-completed) system and S4's C~ = C (I - dA^L)."""
    def full(x):
        return torch.cat([x, x.conj()], dim=-1)

    A = torch.diag_embed(full(Lam)) - sum(full(p)[..., :, None] * full(p).conj()[..., None, :] for p in P)
    dA, dB = discretize(A, full(B), dt, "bilinear")
    k = ref.power_kernel(dA, dB, full(C), L).real
    n2 = Lam.shape[-1]
    eye = torch.eye(2 * n2, dtype=C128)
    c_tilde = torch.einsum("chn,hnm->chm", full(C), eye - torch.linalg.matrix_power(dA, L))[..., :n2]
    return k, c_tilde


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("measure,L", [("legs", 16), ("legs", 17), ("legt", 10), ("foud", 9)])
def test_dplr_kernel_equals_dense_power_kernel(backend, measure, L, device):
    require("cauchy_kernel", backend, device=device)
    N, H = 8, 2
    Lam, P, B, _ = nplr(measure, N)
    Lam, B = Lam.expand(H, -1), B.expand(H, -1)
    P = P[:, None].expand(-1, H, -1)
    C = torch.randn(2, H, N // 2, dtype=C128)
    dt = torch.tensor([0.1, 0.02], dtype=F64)
    k_ref, c_tilde = _dplr_dense(Lam, P, B, C, dt, L)
    k64 = dplr_kernel(Lam, P, B, c_tilde, dt, L, backend="torch")
    assert torch.allclose(k64, k_ref, atol=1e-10 * k_ref.abs().max().item())
    k = dplr_kernel(*(t.to(C64).to(device) for t in (Lam, P, B, c_tilde)), dt.float().to(device), L, backend=backend)
    assert k.dtype == torch.float32
    assert_close("K", k, k_ref.to(device))


def test_dplr_kernel_gradcheck():
    Lam, P, B, _ = nplr("legs", 4)
    Lam = Lam[None].clone().requires_grad_()
    P = P[:, None].clone().requires_grad_()
    B = B[None].clone().requires_grad_()
    C = torch.randn(1, 1, 2, dtype=C128, requires_grad=True)
    dt = torch.tensor([0.1], dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: dplr_kernel(*a, 6, backend="torch"), (Lam, P, B, C, dt))


# ---------------------------------------------------------------------------------------------- fft_conv
@pytest.mark.parametrize("L,Lk", [(1, 1), (17, 17), (17, 5), (9, 30)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_conv_matches_direct_convolution(L, Lk, bidirectional, device):
    g = torch.Generator().manual_seed(L * Lk)
    u = torch.randn(2, 3, L, dtype=F64, generator=g).to(device).requires_grad_()
    K = torch.randn(2, 3, Lk, dtype=F64, generator=g).to(device).requires_grad_()
    Kb = torch.randn(2, 3, Lk, dtype=F64, generator=g).to(device).requires_grad_() if bidirectional else None
    D = torch.randn(2, 3, dtype=F64, generator=g).to(device).requires_grad_()
    y = fft_conv(u, K, D, K_backward=Kb)
    y_ref = ref.causal_conv(u, K, D, Kb)
    assert y.shape == (2, 2, 3, L)
    assert torch.allclose(y, y_ref, atol=1e-12)
    grad = torch.randn(y.shape, dtype=F64, generator=g).to(device)
    inputs = [t for t in (u, K, D, Kb) if t is not None]
    # with L = 1 the anti-causal kernel touches nothing: its gradient is None in both
    got = torch.autograd.grad(y, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(y_ref, inputs, grad, allow_unused=True)
    for a, b, x in zip(got, want, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert torch.allclose(a, b, atol=1e-11)


def test_fft_conv_shapes_and_dtypes(device):
    u = torch.randn(2, 3, 20, device=device, dtype=torch.float16)
    y = fft_conv(u, torch.randn(3, 20, device=device), torch.randn(3, device=device))
    assert y.shape == (2, 3, 20) and y.dtype == torch.float16
    y32 = fft_conv(u.float(), torch.randn(3, 20, device=device))
    assert y32.dtype == torch.float32
    u64 = torch.randn(1, 2, 7, dtype=F64, requires_grad=True)
    K64 = torch.randn(2, 7, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda u, K: fft_conv(u, K, K_backward=K.flip(-1)), (u64, K64))


@pytest.mark.parametrize("disc", ["zoh", "bilinear", "euler", "backward_euler"])
def test_conv_equals_recurrence_diagonal(disc, device):
    A, C, dt = _diag_system(3, 4, 2, device)
    B = torch.ones_like(A)
    u = torch.randn(2, 3, 40, dtype=F64, device=device)
    D = torch.randn(2, 3, dtype=F64, device=device)
    y = fft_conv(u, s4d_kernel(A, B, C, dt, 40, disc, backend="torch"), D)
    dA, dB = discretize(A, B, dt, disc, diagonal=True)
    y_ref, _ = ref.ssm_recurrence(dA, dB, C, u, D, diagonal=True)
    assert torch.allclose(y, y_ref, atol=1e-10)


@pytest.mark.parametrize("disc", ["bilinear", "zoh", "euler"])
def test_conv_equals_recurrence_dense(disc):
    A, B = transition("legt", 6)
    dt = torch.tensor([0.02, 0.1, 0.5], dtype=F64)
    dA, dB = discretize(A, B.expand(3, 6), dt, disc)
    C = torch.randn(2, 3, 6, dtype=F64)
    u = torch.randn(2, 3, 33, dtype=F64)
    y = fft_conv(u, krylov_kernel(dA, dB, C, 33))
    y_ref, _ = ref.ssm_recurrence(dA, dB, C, u)
    # forward Euler is unstable at the largest step: compare relative to the (growing) output
    assert torch.allclose(y, y_ref, atol=1e-10 * y_ref.abs().max().item())


# ------------------------------------------------------------------------------------ custom ops / compile
def test_vandermonde_and_cauchy_custom_ops(device):
    log_z = torch.complex(-torch.rand(2, 3), torch.randn(2, 3)).to(device)
    w = torch.randn(1, 2, 3, dtype=C64, device=device)
    args = (torch.view_as_real(log_z).requires_grad_(), torch.view_as_real(w).requires_grad_(), 9, True, "torch")
    torch.library.opcheck(torch.ops.flashops.vandermonde_fwd, args)
    v, z, wc = (t.to(C64) for t in _cauchy_inputs(2, 2, 3, 5, device))
    torch.library.opcheck(torch.ops.flashops.cauchy_fwd, (torch.view_as_real(v.reshape(2, 2, 3)).requires_grad_(),
                                                          torch.view_as_real(z), torch.view_as_real(wc), "torch"))

    def f(log_z, w):
        return s4d_kernel(log_z, 1.0, w, torch.full((2,), 0.1, device=device), 9, backend="torch").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(log_z, w), f(log_z, w))


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise(device):
    log_z = torch.complex(-torch.rand(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"w must have shape \[C, 2, 3\]"):
        vandermonde_kernel(log_z, torch.randn(1, 3, 3, dtype=C64), 5)
    with pytest.raises(ValueError, match="L must be an int >= 0"):
        vandermonde_kernel(log_z, torch.randn(2, 3, dtype=C64), -1)
    with pytest.raises(ValueError, match=r"log_z must have shape \[H, N\]"):
        vandermonde_kernel(log_z[0], torch.randn(3, dtype=C64), 5)
    with pytest.raises(TypeError, match="log_z must be a torch.Tensor"):
        vandermonde_kernel([1.0], torch.randn(3, dtype=C64), 5)
    with pytest.raises(ValueError, match=r"dt must be a tensor of shape \[H=2\]"):
        s4d_kernel(log_z, 1.0, torch.randn(2, 3, dtype=C64), torch.ones(3), 5)
    with pytest.raises(ValueError, match="trailing dimensions of v must equal w's shape"):
        cauchy_kernel(torch.randn(2, 4, dtype=C64), torch.randn(5, dtype=C64), torch.randn(3, dtype=C64))
    with pytest.raises(ValueError, match=r"z must have shape \[L\]"):
        cauchy_kernel(torch.randn(2, 3, dtype=C64), torch.randn(5, 1, dtype=C64), torch.randn(3, dtype=C64))
    with pytest.raises(ValueError, match=r"K must have shape \[C, 3, Lk\]"):
        fft_conv(torch.randn(2, 3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"D must have shape \[1, 3\]"):
        fft_conv(torch.randn(2, 3, 8), torch.randn(3, 8), torch.randn(4))
    with pytest.raises(ValueError, match="K_backward must have K's shape"):
        fft_conv(torch.randn(2, 3, 8), torch.randn(3, 8), K_backward=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"u must be a float tensor \[B, H, L\]"):
        fft_conv(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"dA must have shape \[H, N, N\]"):
        krylov_kernel(torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2, 3), 5)
    # L = 0 is no error: the empty kernel (tests/invariants checks every op's empty inputs)
    assert dplr_kernel(log_z, log_z[None], log_z, log_z[None], torch.ones(2), 0).shape == (1, 2, 0)
