"""Recurrent mode (setup_step / default_state / step / forward_state / state_output) against convolution mode
and the float64 step-by-step recurrence."""

import pytest
import torch

from flashops.ops.ssm import (
    default_state,
    discretize,
    fft_conv,
    forward_state,
    krylov_kernel,
    s4d_init,
    s4d_kernel,
    setup_step,
    state_output,
    step,
    transition,
)
from flashops.ops.ssm import reference as ref

F64 = torch.float64


def _system(kind, disc, H=3, N=6, n_copies=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.rand(H, dtype=F64, generator=g) * 0.2 + 0.01
    if kind == "dense":
        A, B = transition("legs", N)
        C = torch.randn(n_copies, H, N, dtype=F64, generator=g)
        return A, B, C, dt, setup_step(A, B, C, dt, disc, diagonal=False)
    A = s4d_init("inv" if kind == "complex" else "real", N, H)
    C = torch.randn(n_copies, H, A.shape[1], dtype=A.dtype, generator=g)
    B = torch.ones(H, A.shape[1], dtype=F64)
    return A, B, C, dt, setup_step(A, B, C, dt, disc, diagonal=True)


def _conv(kind, A, B, C, dt, disc, u, D):
    if kind == "dense":
        dA, dB = discretize(A, B.expand(dt.shape[0], -1), dt, disc)
        K = krylov_kernel(dA, dB, C, u.shape[-1])
    else:
        K = s4d_kernel(A, B, C, dt, u.shape[-1], disc, backend="torch")
    return fft_conv(u, K, D)


CASES = [("complex", "zoh"), ("complex", "bilinear"), ("real", "zoh"), ("real", "bilinear"),
         ("dense", "bilinear"), ("dense", "zoh")]


@pytest.mark.parametrize("kind,disc", CASES)
def test_step_equals_convolution(kind, disc):
    A, B, C, dt, ssm = _system(kind, disc)
    u = torch.randn(2, 3, 25, dtype=F64)
    D = torch.randn(2, 3, dtype=F64)
    y_conv = _conv(kind, A, B, C, dt, disc, u, D)
    again = setup_step(A, B, C, dt, disc, diagonal=kind != "dense")  # a second setup changes nothing
    for name, x, y in zip(ssm._fields, ssm, again):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
    state = default_state(again, 2)
    assert state.shape == (2, 3, ssm.dB.shape[-1]) and not state.any()
    ys = []
    for t in range(25):
        y, state = step(again, u[..., t], state, D)
        ys.append(y)
    assert torch.allclose(torch.stack(ys, -1), y_conv, atol=1e-10)
    # the loop's final state is what forward_state computes in one go
    assert torch.allclose(forward_state(ssm, u, default_state(ssm, 2)), state, atol=1e-10)
    _, state_ref = ref.ssm_recurrence(ssm.dA, ssm.dB, ssm.C, u, D, diagonal=ssm.diagonal)
    assert torch.allclose(state, state_ref, atol=1e-10)


@pytest.mark.parametrize("kind,disc", CASES)
@pytest.mark.parametrize("split", [1, 11, 24])
def test_chunked_inference_equals_full(kind, disc, split):
    A, B, C, dt, ssm = _system(kind, disc, seed=1)
    u = torch.randn(2, 3, 25, dtype=F64)
    D = torch.randn(2, 3, dtype=F64)
    full = _conv(kind, A, B, C, dt, disc, u, D)
    state = default_state(ssm, 2)
    outs = []
    for chunk in (u[..., :split], u[..., split:]):
        y = _conv(kind, A, B, C, dt, disc, chunk, D) + state_output(ssm, state, chunk.shape[-1], backend="torch")
        state = forward_state(ssm, chunk, state)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, -1), full, atol=1e-10)


def test_state_output_triton_matches_torch(device):
    from ..helpers import require
    require("vandermonde_kernel", "triton", device=device)
    A, B, C, dt, _ = _system("complex", "zoh")
    ssm = setup_step(A.to(torch.complex64).to(device), B.float().to(device), C.to(torch.complex64).to(device),
                     dt.float().to(device), "zoh", diagonal=True)
    state = torch.randn(2, 3, A.shape[1], dtype=torch.complex64, device=device)
    a = state_output(ssm, state, 20, backend="triton")
    b = state_output(ssm, state, 20, backend="torch")
    assert torch.allclose(a, b, atol=1e-5)
