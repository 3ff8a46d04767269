"""The CUDA backend where it differs from the others (the op tests run it on their shapes too):

* lengths across its 2048-step chunks, up to 65537, and many channels;
* inputs that are strided or start at addresses that are not 16-byte aligned (the kernels' scalar load path),
  and mixed dtypes (bf16 / fp16 sequences with fp32 B and C, fp32 log-gates next to bf16 q);
* the Vandermonde and Cauchy kernels at the sizes of their tiles, decode steps at head dims 64..256;
* torch.compile(fullgraph) through the custom ops, and launches on a side stream (GPU only).

On a GPU the kernels run for real. Without one, tests/conftest.py runs them through the host emulator at the
smaller sizes; the GPU-sized cases skip with the reason.
"""

import math

import pytest
import torch

import flashops
from flashops.ops.linear import reference as linear_ref
from flashops.ops.ssm import reference as ref
from flashops.testing import GRAD_FACTOR, assert_close

from ..helpers import require
from .ssm_helpers import pairs
from .test_ssm_kernels import _cauchy_inputs, check_vandermonde
from .test_ssm_scans import _check_linear, _check_selective, _gates, _selective_inputs

ON_GPU = torch.cuda.is_available()
F64 = torch.float64
CUDA = ["cuda"]


def _gpu_only(why: str):
    if not ON_GPU:
        pytest.skip(f"GPU-sized case ({why}); without a GPU the emulator runs the smaller ones")


# ------------------------------------------------------------------------------------------------- scans
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("L", [1, 17, 4097, 65537])
def test_linear_scan_lengths(backend, L, device):
    require("linear_scan", backend, device=device)
    if L > 5000:
        _gpu_only("a 65537-step float64 reference loop")
    g = torch.Generator().manual_seed(L)
    shape = (2, 16, L) if ON_GPU else (1, 2, L)
    a = 0.5 + 0.5 * _gates(shape, "uniform", g)
    _check_linear(backend, a, torch.randn(shape, dtype=F64, generator=g), torch.randn(shape[:2], dtype=F64,
                                                                                       generator=g),
                  L % 2 == 1, device)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("L", [17, 4097])
def test_linear_scan_complex_across_chunks(backend, L, device):
    require("linear_scan", backend, device=device)
    g = torch.Generator().manual_seed(L)
    a = torch.polar(0.9 + 0.1 * torch.rand(1, 2, L, dtype=F64, generator=g),
                    torch.rand(1, 2, L, dtype=F64, generator=g) * 2 * math.pi)
    b = torch.randn(1, 2, L, dtype=torch.complex128, generator=g)
    h0 = torch.randn(1, 2, dtype=torch.complex128, generator=g)
    for reverse in (False, True):
        _check_linear(backend, a.to(torch.complex64), b.to(torch.complex64), h0.to(torch.complex64), reverse, device,
                      dtype=torch.complex64)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("L,groups", [(1, None), (17, 2), (4097, None), (65537, 2)])
def test_selective_scan_lengths(backend, L, groups, device):
    require("selective_scan", backend, device=device)
    if L > 5000:
        _gpu_only("a 65537-step float64 reference loop")
    batch, dim = (2, 8) if ON_GPU else (1, 2)
    _check_selective(backend, _selective_inputs(batch, dim, 4, L, "near1", groups=groups, seed=L), device)


@pytest.mark.parametrize("backend", CUDA)
def test_selective_scan_many_channels(backend, device):
    require("selective_scan", backend, device=device)
    _gpu_only("2 x 1536 channels; tests/ops/test_ssm_scans.py runs 21 channels on the emulator")
    _check_selective(backend, _selective_inputs(2, 1536, 16, 300, "mixed", groups=4, seed=5), device)


def _strided(shape, device, offset=3, spread=2):
    """A view of `shape` whose channels are `spread` apart and whose rows start `offset` elements late."""
    base = torch.randn(shape[0], spread * shape[1], shape[2] + offset, device=device)
    return base[:, ::spread, offset:]


@pytest.mark.parametrize("backend", CUDA)
def test_strided_and_unaligned_inputs(backend, device):
    """Channel strides that are not the row length and rows starting 12 bytes into a vector: the kernels must
    take the scalar path there and give what the reference gives on contiguous copies."""
    require("selective_scan", backend, device=device)
    L = 2100 if ON_GPU else 40
    u, delta, z = (_strided((2, 3, L), device) for _ in range(3))
    B, C = (torch.randn(2, 4, L + 5, device=device)[..., 5:] for _ in range(2))
    A = -torch.rand(3, 4, device=device) - 0.1
    leaves = [u, delta, A, B, C, z]
    ours = [t.detach().requires_grad_() for t in leaves]
    exact = [t.detach().double().contiguous().requires_grad_() for t in leaves]
    assert not ours[0].is_contiguous() and ours[0].data_ptr() % 16 != 0
    out = flashops.selective_scan(*ours[:5], z=ours[5], delta_softplus=True, backend=backend)
    out_ref = ref.selective_scan(*exact[:5], z=exact[5], delta_softplus=True)
    assert_close("out", out, out_ref)
    grad = torch.randn_like(out_ref)
    out.backward(grad.float())
    out_ref.backward(grad)
    for name, a, b in zip(("du", "ddelta", "dA", "dB", "dC", "dz"), ours, exact):
        assert_close(name, a.grad, b.grad, factor=GRAD_FACTOR)
    a, b = _strided((2, 3, L), device).sigmoid(), _strided((2, 3, L), device)
    assert_close("h", flashops.linear_scan(a, b, backend=backend), ref.linear_scan(a.double(), b.double()))


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_sequences_with_fp32_B_and_C(backend, dtype, device):
    """u, delta, z in half precision next to fp32 B and C (the kernels' fp32-weight instances) agree with the
    torch backend on the same inputs to half-precision rounding."""
    require("selective_scan", backend, dtype, device)
    args = {k: (v.to(device).float() if isinstance(v, torch.Tensor) else v)
            for k, v in _selective_inputs(2, 4, 8, 300, "mixed", seed=4).items()}
    for k in ("u", "delta", "z"):
        args[k] = args[k].to(dtype)
    results = []
    for name in (backend, "torch"):
        leaves = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v)
                  for k, v in args.items()}
        out, last = flashops.selective_scan(**leaves, return_last_state=True, backend=name)
        (out.float().square().sum() + last.sum()).backward()
        results.append([out.float(), last] + [leaves[k].grad.float() for k in ("u", "delta", "A", "B", "C", "D",
                                                                                "z", "delta_bias", "initial_state")])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()))


# ------------------------------------------------------------------------------------ Vandermonde, Cauchy
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("n_copies", [1, 3])
def test_vandermonde_state_and_length_tiles(backend, n_copies, device):
    require("vandermonde_kernel", backend, device=device)
    H, N, L = (16, 64, 16384) if ON_GPU else (2, 64, 1100)
    g = torch.Generator().manual_seed(n_copies)
    log_z = torch.complex(-torch.rand(H, N, dtype=F64, generator=g) * 0.01,
                          torch.rand(H, N, dtype=F64, generator=g) * 0.5).to(device)
    w = torch.randn(n_copies, H, N, dtype=torch.complex128, generator=g).to(device)
    check_vandermonde(backend, log_z, w, L, g)


@pytest.mark.parametrize("backend", CUDA)
def test_cauchy_row_and_state_tiles(backend, device):
    """More rows than one block's 4 and more states than one block's 32, L not a multiple of 128."""
    require("cauchy_kernel", backend, device=device)
    v, z, w = _cauchy_inputs(6, 2, 70, 301, device, seed=2)
    v32, z32, w32 = (t.to(torch.complex64).requires_grad_() for t in (v, z, w))
    out = flashops.cauchy_kernel(v32, z32, w32, backend=backend)
    v64, z64, w64 = (t.detach().to(torch.complex128).requires_grad_() for t in (v32, z32, w32))
    out_ref = ref.cauchy(v64, z64, w64)
    assert_close("out", pairs(out), pairs(out_ref))
    grad = torch.randn(out_ref.shape, dtype=torch.complex128).to(device)
    out.backward(grad.to(torch.complex64))
    out_ref.backward(grad)
    for name, a, b in (("dv", v32, v64), ("dz", z32, z64), ("dw", w32, w64)):
        assert_close(name, pairs(a.grad), pairs(b.grad))


# ------------------------------------------------------------------------------------------- decode steps
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("d_k,d_v,gate_dtype", [(256, 256, torch.float32), (64, 100, None), (7, 130, torch.bfloat16)])
def test_linear_attention_steps_head_dims(backend, d_k, d_v, gate_dtype, device):
    """Head dims up to 256 (both column halves of a lane), V not a multiple of 4 (scalar path), log-gates in
    another dtype than q, q/k/v taken as slices of [B, T, H, D] tensors."""
    dtype = torch.bfloat16 if gate_dtype == torch.bfloat16 else torch.float32
    require("gated_linear_attention_step", backend, dtype, device)
    b, h = 3, 2
    q, k = (torch.randn(b, 5, h, d_k, device=device, dtype=dtype)[:, 2] for _ in range(2))
    v = torch.randn(b, 5, h, d_v, device=device, dtype=dtype)[:, 3]
    state = torch.randn(b, h, d_k, d_v, device=device)
    gated = gate_dtype is not None
    gate = (torch.nn.functional.logsigmoid(torch.randn(b, h, d_k, device=device)).to(gate_dtype) if gated
            else torch.rand(h, device=device))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, state) + ((gate,) if gated else ())]
    q_, k_, v_, state_ = leaves[:4]
    if gated:
        o, new = flashops.gated_linear_attention_step(q_, k_, v_, leaves[4], state_, scale=0.3, backend=backend)
    else:
        o, new = flashops.lightning_attention_step(q_, k_, v_, gate, state_, scale=0.3, backend=backend)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    log_gate = exact[4] if gated else -gate.double()[None, :, None]
    o_ref, new_ref = linear_ref.recurrent_step(*exact[:3], log_gate, exact[3], scale=0.3)
    tolerance = {} if dtype == torch.float32 else {"dtype": dtype}
    baseline = None
    if dtype != torch.float32:  # the reference in the input dtype
        low = [t.detach().to(dtype) for t in leaves]
        baseline = linear_ref.recurrent_step(*low[:3], low[4] if gated else -gate.to(dtype)[None, :, None],
                                             low[3].to(dtype), scale=0.3)[0]
    assert_close("o", o, o_ref, baseline, **tolerance)
    assert_close("new_state", new, new_ref, **tolerance)
    do = torch.randn_like(o_ref).to(o.dtype).double()  # upstream gradients both sides can hold exactly
    d_new = torch.randn_like(new_ref).float().double()
    ((o * do.to(o.dtype)).sum() + (new * d_new.float()).sum()).backward()
    ((o_ref * do).sum() + (new_ref * d_new).sum()).backward()
    for name, a, r in zip(("dq", "dk", "dv", "dstate", "dg"), leaves, exact):
        loose = {} if a.dtype == torch.float32 else {"dtype": a.dtype}
        if loose:  # no baseline: half-precision gradients of one step are compared at half precision's scale
            torch.testing.assert_close(a.grad.double(), r.grad, rtol=2e-2, atol=3e-2 * r.grad.abs().max().item())
        else:
            assert_close(name, a.grad, r.grad, factor=GRAD_FACTOR)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("n_state,groups,x_dtype", [(16, None, torch.float32), (5, 2, torch.float32),
                                                     (64, 4, torch.bfloat16)])
def test_selective_state_update_is_one_scan_step(backend, n_state, groups, x_dtype, device):
    """One step from `state` equals selective_scan over one position from initial_state = state, in the output,
    the new state and every gradient (dt in fp32 next to a bf16 x exercises the converted path)."""
    require("selective_state_update", backend, x_dtype, device)
    dim = 12
    args = _selective_inputs(3, dim, n_state, 1, "mixed", groups=groups, seed=n_state)
    names = ("initial_state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    step_args = [args[k][..., 0] if k in ("u", "delta", "z", "B", "C") else args[k] for k in names]
    leaves = [t.to(device).float().requires_grad_() for t in step_args]
    x_in = leaves[1].detach().to(x_dtype).requires_grad_()
    z_in = leaves[7].detach().to(x_dtype).requires_grad_()
    y, new = flashops.selective_state_update(leaves[0], x_in, *leaves[2:7], z_in, leaves[8], dt_softplus=True,
                                             backend=backend)
    exact = {k: t.detach().double().requires_grad_() for k, t in zip(names, leaves)}
    exact["u"], exact["z"] = x_in.detach().double().requires_grad_(), z_in.detach().double().requires_grad_()
    seq = {k: (v[..., None] if k in ("u", "delta", "z", "B", "C") else v) for k, v in exact.items()}
    out_ref, last_ref = ref.selective_scan(**seq, delta_softplus=True, return_last_state=True)
    low = {} if x_dtype == torch.float32 else {"dtype": x_dtype}
    assert y.dtype == x_dtype and new.dtype == torch.float32
    assert_close("y", y, out_ref[..., 0], **low)
    assert_close("new_state", new, last_ref)
    dy = torch.randn_like(out_ref[..., 0])
    d_new = torch.randn_like(last_ref)
    ((y.float() * dy.float()).sum() + (new * d_new.float()).sum()).backward()
    ((out_ref[..., 0] * dy).sum() + (last_ref * d_new).sum()).backward()
    grads = [leaves[0].grad, x_in.grad, *[t.grad for t in leaves[2:7]], z_in.grad, leaves[8].grad]
    for name, a in zip(names, grads):
        if x_dtype == torch.float32:
            assert_close(f"d{name}", a, exact[name].grad, factor=GRAD_FACTOR)
        else:
            r = exact[name].grad
            torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=3e-2 * max(1.0, r.abs().max().item()))


# ----------------------------------------------------------------------------------------- tracing, streams
@pytest.mark.parametrize("backend", CUDA)
def test_torch_compile_fullgraph(backend, device):
    require("selective_scan", backend, device=device)
    args = {k: (v.float().to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in _selective_inputs(1, 2, 3, 20, "mixed").items()}
    a, b = torch.rand(1, 2, 20, device=device), torch.randn(1, 2, 20, device=device)
    q, k, v = (torch.randn(1, 2, 8, device=device) for _ in range(3))

    def f(a, b, q, args):
        h = flashops.linear_scan(a, b, backend=backend)
        out = flashops.selective_scan(**args, backend=backend)
        o, state = flashops.lightning_attention_step(q, k, v, None, backend=backend)
        y, new = flashops.selective_state_update(args["initial_state"], args["u"][..., 0], args["delta"][..., 0],
                                                 args["A"], args["B"][..., 0], args["C"][..., 0], backend=backend)
        return h.sum() + out.sum() + o.sum() + state.sum() + y.sum() + new.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(a, b, q, args), f(a, b, q, args))


@pytest.mark.parametrize("backend", CUDA)
def test_launches_follow_the_current_stream(backend, device):
    require("linear_scan", backend, device=device)
    _gpu_only("CUDA streams")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        a = torch.rand(4, 64, 8192, device=device)  # made on the side stream, not yet synchronized
        b = torch.randn(4, 64, 8192, device=device)
        h = flashops.linear_scan(a, b, backend=backend)
    stream.synchronize()
    assert_close("h", h, flashops.linear_scan(a, b, backend="torch"))
