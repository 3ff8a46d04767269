"""linear_scan and selective_scan against float64 step-by-step loops: every output and every gradient, on
lengths that cross the kernels' time tiles, with gates near 0 and near 1."""

import math

import pytest
import torch

import flashops
from flashops.ops.ssm import linear_scan, selective_scan, selective_state_update
from flashops.ops.ssm import reference as ref
from flashops.testing import GRAD_FACTOR, assert_close

from ..helpers import require
from .ssm_helpers import SCAN_BACKENDS, pairs

F64 = torch.float64
LENGTHS = [1, 31, 2047, 2048, 2049]
# Backends that compute float64 in float64 (gradcheck needs it); Triton computes in fp32.
FP64_BACKENDS = ["cpp", "torch"]
# Backends that run on CPU threads.
CPU_BACKENDS = ["cpp", "torch"]


def _gates(shape, regime, g, dtype=F64):
    u = torch.rand(shape, dtype=F64, generator=g)
    if regime == "near1":
        return (1 - 1e-3 * u).to(dtype)
    if regime == "near0":
        return (1e-3 * u).to(dtype)
    return u.to(dtype)


def _check_linear(backend, a, b, h0, reverse, device, dtype=torch.float32):
    """Run the op on (a, b, h0) cast to dtype; compare output and gradients with the float64 loop."""
    inputs = [x.to(device) if x is not None else None for x in (a, b, h0)]
    ours = [x.to(dtype).requires_grad_() if x is not None else None for x in inputs]
    h = linear_scan(ours[0], ours[1], ours[2], reverse, backend=backend)
    exact = [x.detach().to(F64 if not x.is_complex() else torch.complex128).requires_grad_() if x is not None
             else None for x in ours]
    h_ref = ref.linear_scan(exact[0], exact[1], exact[2], reverse)
    grad = torch.randn(h_ref.shape, dtype=h_ref.dtype, generator=torch.Generator().manual_seed(3)).to(device)
    baseline = None
    if dtype in (torch.float16, torch.bfloat16):
        low = [x.detach().clone().requires_grad_() if x is not None else None for x in ours]
        baseline = ref.linear_scan(low[0], low[1], low[2], reverse)
        baseline.backward(grad.to(dtype))
    assert h.shape == h_ref.shape and h.dtype == ours[1].dtype
    assert_close("h", pairs(h), pairs(h_ref), None if baseline is None else pairs(baseline), dtype=dtype)
    h.backward(grad.to(h.dtype))
    h_ref.backward(grad)
    for i, name in enumerate(("da", "db", "dh0")):
        if ours[i] is None:
            continue
        base = None if baseline is None else pairs(low[i].grad)
        assert_close(name, pairs(ours[i].grad), pairs(exact[i].grad), base, factor=GRAD_FACTOR, dtype=dtype)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("regime", ["near0", "near1"])
def test_linear_scan_real(backend, L, regime, device):
    require("linear_scan", backend, device=device)
    g = torch.Generator().manual_seed(L)
    shape = (1, 1, L) if L > 100 else (2, 3, L)
    a = _gates(shape, regime, g)
    b = torch.randn(shape, dtype=F64, generator=g)
    h0 = torch.randn(shape[:2], dtype=F64, generator=g)
    _check_linear(backend, a, b, h0, L % 2 == 1, device)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L", [17, 129])
def test_linear_scan_complex(backend, reverse, L, device):
    require("linear_scan", backend, device=device)
    g = torch.Generator().manual_seed(L)
    mag = _gates((2, 3, L), "uniform", g)
    phase = torch.rand(2, 3, L, dtype=F64, generator=g) * 2 * math.pi
    a = torch.polar(mag, phase)
    b = torch.randn(2, 3, L, dtype=torch.complex128, generator=g)
    h0 = torch.randn(2, 3, dtype=torch.complex128, generator=g)
    _check_linear(backend, a.to(torch.complex64), b.to(torch.complex64), h0.to(torch.complex64), reverse, device,
                  dtype=torch.complex64)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_linear_scan_pairs_and_mixed_kinds(backend, device):
    require("linear_scan", backend, device=device)
    a = torch.polar(torch.rand(2, 3, 40, device=device), torch.randn(2, 3, 40, device=device))
    b = torch.randn(2, 3, 40, dtype=torch.complex64, device=device)
    want = linear_scan(a, b, backend=backend)
    re, im = linear_scan((a.real.contiguous(), a.imag.contiguous()), (b.real.contiguous(), b.imag.contiguous()),
                         backend=backend)
    assert torch.equal(torch.complex(re, im), want)
    # real gates, complex inputs: the gates are promoted
    ar = torch.rand(2, 3, 40, device=device)
    mixed = linear_scan(ar, b, backend=backend)
    assert mixed.is_complex()
    assert_close("h", pairs(mixed), pairs(ref.linear_scan(ar.to(torch.complex128), b.to(torch.complex128))))


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_scan_low_precision(backend, dtype, device):
    require("linear_scan", backend, dtype, device)
    g = torch.Generator().manual_seed(0)
    a = _gates((2, 4, 300), "uniform", g)
    b = torch.randn(2, 4, 300, dtype=F64, generator=g)
    h0 = torch.randn(2, 4, dtype=F64, generator=g)
    _check_linear(backend, a, b, h0, False, device, dtype)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_linear_scan_gradcheck(backend):
    require("linear_scan", backend, F64, "cpu")
    g = torch.Generator().manual_seed(0)
    for reverse in (False, True):
        a = torch.rand(1, 2, 5, dtype=F64, generator=g, requires_grad=True)
        b = torch.randn(1, 2, 5, dtype=F64, generator=g, requires_grad=True)
        h0 = torch.randn(1, 2, dtype=F64, generator=g, requires_grad=True)
        torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, reverse, backend=backend), (a, b, h0))
        ac = torch.randn(1, 2, 4, dtype=torch.complex128, generator=g).mul(0.5).requires_grad_()
        bc = torch.randn(1, 2, 4, dtype=torch.complex128, generator=g, requires_grad=True)
        torch.autograd.gradcheck(lambda a, b: linear_scan(a, b, reverse=reverse, backend=backend), (ac, bc))


def test_linear_scan_reverse_identity(device):
    a = torch.rand(2, 3, 50, device=device)
    b = torch.randn(2, 3, 50, device=device)
    h0 = torch.randn(2, 3, device=device)
    fwd = linear_scan(a.flip(-1), b.flip(-1), h0)
    assert torch.allclose(linear_scan(a, b, h0, reverse=True), fwd.flip(-1), atol=1e-6)


# --------------------------------------------------------------------------------------------- selective
def _selective_inputs(batch, dim, n_state, L, regime, groups=None, seed=0, with_options=True, softplus=True):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, L, dtype=F64, generator=g)
    delta = torch.randn(batch, dim, L, dtype=F64, generator=g) * 0.5
    if regime == "near1":  # dt ~ 1e-3, |A| <= 1: exp(dt A) > 0.998 (long memory)
        bias = torch.full((dim,), -7.0, dtype=F64)
        A = -torch.rand(dim, n_state, dtype=F64, generator=g)
    elif regime == "near0":  # dt ~ 1, A ~ -10: exp(dt A) ~ 1e-4
        bias = torch.full((dim,), 0.5, dtype=F64)
        A = -10 - torch.rand(dim, n_state, dtype=F64, generator=g)
    else:
        bias = torch.randn(dim, dtype=F64, generator=g) * 0.3
        A = -torch.rand(dim, n_state, dtype=F64, generator=g) * 2 - 0.1
    if not softplus:
        delta = delta.abs()
    shape = (batch, n_state, L) if groups is None else (batch, groups, n_state, L)
    B = torch.randn(shape, dtype=F64, generator=g)
    C = torch.randn(shape, dtype=F64, generator=g)
    if not with_options:
        return dict(u=u, delta=delta, A=A, B=B, C=C, delta_softplus=softplus)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(dim, dtype=F64, generator=g),
                z=torch.randn(batch, dim, L, dtype=F64, generator=g), delta_bias=bias, delta_softplus=softplus,
                initial_state=torch.randn(batch, dim, n_state, dtype=F64, generator=g))


_FLOAT_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _check_selective(backend, args, device, dtype=torch.float32, with_last=True):
    seq_args = ("u", "delta", "z", "B", "C")
    ours, exact, low = {}, {}, {}
    for k, v in args.items():
        if not isinstance(v, torch.Tensor):
            ours[k] = exact[k] = low[k] = v
            continue
        v = v.to(device)
        # u, delta, z (and B, C) in the input dtype; A, D, delta_bias, initial_state stay fp32 as in mamba
        ours[k] = v.to(dtype if k in seq_args else torch.float32).requires_grad_()
        exact[k] = ours[k].detach().double().requires_grad_()
        low[k] = ours[k].detach().to(dtype).requires_grad_()
    out, last = selective_scan(**ours, return_last_state=True, backend=backend)
    out_ref, last_ref = ref.selective_scan(**exact, return_last_state=True)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out_ref.shape, dtype=F64, generator=g).to(device)
    grad_last = torch.randn(last_ref.shape, dtype=F64, generator=g).to(device) if with_last else None
    low_precision = dtype != torch.float32
    base_out = base_last = None
    if low_precision:
        base_out, base_last = ref.selective_scan(**low, return_last_state=True)
        ((base_out * grad.to(dtype)).sum() + ((base_last * grad_last.to(dtype)).sum() if with_last else 0)).backward()
    assert out.dtype == ours["u"].dtype and last.dtype == torch.float32
    assert_close("out", out, out_ref, base_out, dtype=dtype)
    assert_close("last_state", last, last_ref, base_last, dtype=dtype)
    ((out * grad.to(out.dtype)).sum() + ((last * grad_last.float()).sum() if with_last else 0)).backward()
    ((out_ref * grad).sum() + ((last_ref * grad_last).sum() if with_last else 0)).backward()
    for k in _FLOAT_ARGS:
        if k not in ours or ours[k] is None:
            continue
        base = low[k].grad if low_precision else None
        assert_close(f"d{k}", ours[k].grad, exact[k].grad, base, factor=GRAD_FACTOR, dtype=dtype)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("L,regime", [(1, "mixed"), (31, "mixed"), (2047, "near1"), (2048, "near0"),
                                      (2049, "near1")])
def test_selective_scan_lengths(backend, L, regime, device):
    require("selective_scan", backend, device=device)
    # long sequences: one channel with one state keeps the interpreter (per-element scans) quick
    args = _selective_inputs(1, 1, 1, L, regime, seed=L) if L > 100 else _selective_inputs(2, 3, 3, L, regime, seed=L)
    _check_selective(backend, args, device)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "grouped", "options", "wide_state"])
def test_selective_scan_variants(backend, case, device):
    require("selective_scan", backend, device=device)
    if case == "plain":  # no D, z, bias, initial state; no softplus; last state unused
        args = _selective_inputs(2, 3, 4, 45, "mixed", with_options=False, softplus=False)
        _check_selective(backend, args, device, with_last=False)
    elif case == "grouped":
        _check_selective(backend, _selective_inputs(1, 4, 3, 40, "mixed", groups=2, seed=2), device)
    elif case == "options":
        args = _selective_inputs(1, 3, 2, 40, "mixed", seed=3)
        args["z"] = None
        args["initial_state"] = None
        _check_selective(backend, args, device)
    else:  # N = 40 > 32: shorter time tiles, masked states
        _check_selective(backend, _selective_inputs(1, 1, 40, 19, "mixed", seed=4), device)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selective_scan_low_precision(backend, dtype, device):
    require("selective_scan", backend, dtype, device)
    _check_selective(backend, _selective_inputs(2, 3, 4, 64, "mixed", seed=5), device, dtype)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_selective_scan_gradcheck(backend):
    require("selective_scan", backend, F64, "cpu")
    args = _selective_inputs(1, 2, 2, 5, "mixed", groups=None, seed=6)
    names = list(_FLOAT_ARGS)
    tensors = [args[k].clone().requires_grad_() for k in names]

    def run(*xs):
        kw = dict(zip(names, xs))
        out, last = selective_scan(**kw, delta_softplus=True, return_last_state=True, backend=backend)
        return out, last

    torch.autograd.gradcheck(run, tensors)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_chunked_equals_full(backend, device):
    """State passing: two chunks with the first chunk's last state as the second's initial state."""
    require("selective_scan", backend, device=device)
    args = {k: (v.float().to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in _selective_inputs(1, 2, 3, 50, "mixed", seed=7).items()}
    full, last = selective_scan(**args, return_last_state=True, backend=backend)
    first = {k: (v[..., :21] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
    second = {k: (v[..., 21:].contiguous() if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
    first = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in first.items()}
    y1, s1 = selective_scan(**first, return_last_state=True, backend=backend)
    second["initial_state"] = s1
    y2, s2 = selective_scan(**second, return_last_state=True, backend=backend)
    assert_close("out", torch.cat([y1, y2], -1), full)
    assert_close("last_state", s2, last)
    # the gradient reaches the first chunk through the passed state
    u1 = first["u"].clone().requires_grad_()
    y1, s1 = selective_scan(**{**first, "u": u1}, return_last_state=True, backend=backend)
    y2 = selective_scan(**{**second, "initial_state": s1}, backend=backend)
    y2.sum().backward()
    assert u1.grad is not None and u1.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("groups", [None, 3])
def test_scans_many_channels(backend, groups, device):
    """More channels than one of the C++ kernels' channel blocks: D = 21 is two blocks of 8 and a tail, and with 3
    groups of 7 channels sharing B and C, blocks end at group boundaries."""
    require("selective_scan", backend, device=device)
    _check_selective(backend, _selective_inputs(2, 21, 4, 24, "mixed", groups=groups, seed=11), device)
    if groups is None:
        g = torch.Generator().manual_seed(12)
        _check_linear(backend, _gates((2, 21, 37), "near1", g), torch.randn(2, 21, 37, dtype=F64, generator=g),
                      torch.randn(2, 21, dtype=F64, generator=g), True, device)


def _scan_gradients(backend, device, threads):
    """Outputs and every gradient of both scans on inputs large enough for the C++ backend to use 2 threads."""
    g = torch.Generator().manual_seed(13)
    a = _gates((2, 21, 1000), "uniform", g, torch.float32).to(device).requires_grad_()
    b = torch.randn(2, 21, 1000, generator=g).to(device).requires_grad_()
    args = {k: (v.float().to(device).requires_grad_() if isinstance(v, torch.Tensor) else v)
            for k, v in _selective_inputs(2, 21, 16, 150, "mixed", groups=3, seed=13).items()}
    leaves = [a, b] + [args[k] for k in _FLOAT_ARGS]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h = linear_scan(a, b, backend=backend)
        out, last = selective_scan(**args, return_last_state=True, backend=backend)
        loss = (h * torch.linspace(-1, 1, 1000, device=device)).sum() + out.square().sum() + last.sum()
        return [h.detach(), out.detach(), last.detach(), *torch.autograd.grad(loss, leaves)]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scans_two_threads_deterministic(backend, device):
    """Two CPU threads (the C++ backend splits the channel blocks and adds per-thread dB / dC partial sums in a
    fixed order) match one thread, and two runs give bitwise equal results."""
    require("selective_scan", backend, device=device)
    names = ["h", "out", "last", "da", "db"] + [f"d{k}" for k in _FLOAT_ARGS]
    one = _scan_gradients(backend, device, 1)
    two = _scan_gradients(backend, device, 2)
    again = _scan_gradients(backend, device, 2)
    for name, x1, x2, x3 in zip(names, one, two, again):
        assert torch.equal(x2, x3), f"{name} differs between two identical runs"
        assert_close(name, x2, x1)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_extreme_steps(backend, device):
    """Steps at the edges of the fast math, cycling: softplus above its threshold (delta ~ 25.5: dt = delta), far
    below 0 (delta ~ -30: dt ~ 1e-13), and ordinary; with A down to -50, exp(dt A) underflows to 0."""
    require("selective_scan", backend, device=device)
    args = _selective_inputs(2, 3, 4, 33, "mixed", seed=14)
    pattern = torch.tensor([25.5, -30.0, 0.3], dtype=F64).repeat(11)
    args["delta"] = pattern + 0.2 * torch.rand(2, 3, 33, dtype=F64, generator=torch.Generator().manual_seed(15))
    args["delta_bias"] = torch.zeros(3, dtype=F64)
    args["A"] = -torch.linspace(0.5, 50, 12, dtype=F64).reshape(3, 4)
    _check_selective(backend, args, device)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_custom_ops_per_backend(backend, dtype, device):
    """opcheck (the fake kernels' shapes and dtypes, e.g. fp64 saved states, against each backend) and a
    torch.compile(fullgraph=True) trace through both scans."""
    require("selective_scan", backend, dtype, device)
    a = torch.rand(2, 3, 9, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(2, 3, 9, device=device, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2, 3, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.flashops.linear_scan_fwd, (a, b, h0, True, backend))
    args = {k: (v.to(device, dtype).requires_grad_() if isinstance(v, torch.Tensor) else v)
            for k, v in _selective_inputs(1, 2, 3, 40, "mixed", groups=None, seed=9).items()}
    torch.library.opcheck(torch.ops.flashops.selective_scan_fwd, (*(args[k] for k in _FLOAT_ARGS), True, backend))

    def f(a, b, h0, kw):
        h = flashops.linear_scan(a, b, h0, backend=backend)
        out, last = flashops.selective_scan(**kw, return_last_state=True, backend=backend)
        return h.sum() + out.sum() + last.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(a, b, h0, args), f(a, b, h0, args))


def test_selective_state_update_steps_equal_scan(device):
    args = {k: (v.float().to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in _selective_inputs(2, 4, 3, 12, "mixed", groups=2, seed=8).items()}
    out, last = selective_scan(**args, return_last_state=True)
    state = args["initial_state"]
    ys = []
    for t in range(12):
        y, state = selective_state_update(state, args["u"][..., t], args["delta"][..., t], args["A"],
                                          args["B"][..., t], args["C"][..., t], args["D"], args["z"][..., t],
                                          args["delta_bias"], dt_softplus=True)
        ys.append(y)
    assert_close("out", torch.stack(ys, -1), out)
    assert_close("state", state, last)


@pytest.mark.parametrize("groups", [None, 2])
def test_selective_state_update_gradcheck(groups):
    """The torch backend's backward is written out (a custom op's backward cannot run autograd inside)."""
    args = _selective_inputs(2, 4, 3, 1, "mixed", groups=groups, seed=6)
    names = ("initial_state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    step = [(args[k][..., 0] if k in ("u", "delta", "z", "B", "C") else args[k]).clone().requires_grad_()
            for k in names]

    def f(*tensors):
        return selective_state_update(*tensors, dt_softplus=True, backend="torch")

    torch.autograd.gradcheck(f, step)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("groups", [None, 2])
def test_selective_state_update_custom_op(backend, groups, device):
    """Schema, fake kernel and autograd registration of the step's custom op (the torch backward is autograd of
    the formula, the cuda one the kernel)."""
    require("selective_state_update", backend, device=device)
    args = _selective_inputs(2, 4, 3, 1, "mixed", groups=groups, seed=5)
    names = ("initial_state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    step = [(args[k][..., 0] if k in ("u", "delta", "z", "B", "C") else args[k]).float().to(device)
            .requires_grad_() for k in names]
    torch.library.opcheck(torch.ops.flashops.selective_state_update_fwd, (*step, True, backend))


def test_scan_bad_inputs(device):
    a = torch.rand(2, 3, 9, device=device)
    with pytest.raises(ValueError, match=r"a and b must have the same shape"):
        linear_scan(a, torch.rand(2, 3, 8, device=device))
    with pytest.raises(ValueError, match=r"must have 3 dimensions \[B, D, L\]"):
        linear_scan(a[0], a[0])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 3\)"):
        linear_scan(a, a, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="a and b must have the same dtype"):
        linear_scan(a, a.half())
    with pytest.raises(TypeError, match="a must have dtype in"):
        linear_scan(a.int(), a)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        linear_scan(a.transpose(1, 2), a.transpose(1, 2))
    with pytest.raises(ValueError, match="given as a pair must be"):
        linear_scan((a, a, a), a)
    args = {k: (v.float().to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in _selective_inputs(2, 4, 3, 10, "mixed").items()}
    with pytest.raises(ValueError, match=r"A must have shape \[D=4, N\]"):
        selective_scan(**{**args, "A": args["A"][:2]})
    with pytest.raises(TypeError, match="complex A is not supported"):
        selective_scan(**{**args, "A": args["A"].to(torch.complex64)})
    with pytest.raises(ValueError, match=r"B must have shape \[2, 3, 10\]"):
        selective_scan(**{**args, "B": args["B"][..., :5]})
    with pytest.raises(ValueError, match="time-invariant"):
        selective_scan(**{**args, "B": args["A"]})
    with pytest.raises(ValueError, match="G=3 of B and C must divide D=4"):
        B3 = torch.randn(2, 3, 3, 10, device=device)
        selective_scan(**{**args, "B": B3, "C": B3})
    with pytest.raises(ValueError, match=r"D must have shape \(4,\)"):
        selective_scan(**{**args, "D": args["D"][:3]})
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 4, 3\)"):
        selective_scan(**{**args, "initial_state": args["initial_state"][:1]})
    with pytest.raises(ValueError, match="delta and z must have u's dtype"):
        selective_scan(**{**args, "delta": args["delta"].half()})
    with pytest.raises(ValueError, match="backend='nope' is not a backend of 'selective_scan'"):
        selective_scan(**args, backend="nope")
