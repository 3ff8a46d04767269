"""Local Linear Attention: reference properties, both backends against the direct solve (outputs and every
gradient), limits, causality, ill-conditioned inputs, decode, bad inputs, opcheck and torch.compile."""


import pytest
import torch

import flashops
from flashops.ops.lla import cg_stats
from flashops.ops.lla import pytorch as lla_pytorch
from flashops.ops.lla import reference as ref
from flashops.testing import GRAD_FACTOR, assert_close

from ..helpers import BACKENDS, require

OP = "local_linear_attention"


def _qkv(b, t_q, t_k, h, h_kv, d, device, dtype=torch.float32, key_mean=0.0):
    q = torch.randn(b, t_q, h, d, device=device, dtype=dtype)
    k = (torch.randn(b, t_k, h_kv, d, device=device) + key_mean).to(dtype)
    v = torch.randn(b, t_k, h_kv, d, device=device, dtype=dtype)
    return q, k, v


def _oracle(q, k, v, ridge, **kw):
    """fp64 reference output and gradients (q, k, v, ridge) for the cotangent g."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, ridge)]
    out = ref.local_linear_attention(*leaves[:3], ridge_lambda=leaves[3], **kw)
    return out, leaves


# ------------------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("causal,t_q,t_k", [(True, 9, 9), (True, 4, 11), (False, 6, 10)])
def test_reference_closed_form_is_the_weighted_ridge_regression(causal, t_q, t_k, device):
    q, k, v = _qkv(2, t_q, t_k, 4, 2, 6, device, torch.float64)
    ridge = torch.rand(2, t_q, 4, dtype=torch.float64, device=device) + 0.05
    closed = ref.local_linear_attention(q, k, v, ridge_lambda=ridge, causal=causal)
    direct = ref.local_linear_attention_regression(q, k, v, ridge_lambda=ridge, causal=causal)
    torch.testing.assert_close(closed, direct, rtol=1e-10, atol=1e-10)


def test_reference_limits(device):
    q, k, v = _qkv(1, 12, 12, 2, 2, 5, device, torch.float64)
    # lambda -> infinity: softmax attention (local constant fit).
    huge = ref.local_linear_attention(q, k, v, ridge_lambda=1e9)
    torch.testing.assert_close(huge, ref.softmax_attention(q, k, v), rtol=0, atol=1e-7)
    # flat weights (scale 0), lambda -> 0, all keys: the global least-squares fit with intercept, at q.
    ols = ref.local_linear_attention(q, k, v, ridge_lambda=1e-10, softmax_scale=0.0, causal=False)
    for h in range(2):
        design = torch.cat([torch.ones(12, 1, dtype=torch.float64, device=device), k[0, :, h]], dim=1)
        coef = torch.linalg.lstsq(design, v[0, :, h]).solution
        want = coef[0] + q[0, :, h] @ coef[1:]
        torch.testing.assert_close(ols[0, :, h], want, rtol=1e-6, atol=1e-6)
    # One visible key: the fit is exact, o_0 = v_0 for any lambda.
    tiny = ref.local_linear_attention(q, k, v, ridge_lambda=1e-3)
    torch.testing.assert_close(tiny[:, 0], v[:, 0], rtol=0, atol=1e-10)


def test_reference_gradcheck_fp64(device):
    q, k, v = _qkv(1, 6, 6, 2, 1, 4, device, torch.float64)
    ridge = torch.rand(2, dtype=torch.float64, device=device) + 0.2
    inputs = [x.requires_grad_() for x in (q, k, v, ridge)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, r: ref.local_linear_attention(q, k, v, ridge_lambda=r, softmax_scale=0.8), inputs)


# ------------------------------------------------------------------------------------- backends vs reference
SHAPES = [
    # b, t_q, t_k, h, h_kv, d, causal
    (1, 1, 1, 2, 1, 16, True),
    (2, 17, 17, 1, 1, 16, True),
    (1, 63, 63, 1, 1, 32, True),
    (1, 20, 45, 2, 1, 16, True),    # Tq < Tk: bottom-right causal (a prefix is cached)
    (1, 40, 23, 2, 2, 16, True),    # Tq > Tk: the first rows see no key
    (1, 30, 19, 2, 2, 24, False),   # non-causal, head dim not a power of two
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(backend, shape, device, monkeypatch):
    b, t_q, t_k, h, h_kv, d, causal = shape
    require(OP, backend, torch.float32, device, head_dim=d)
    # Small query chunks, so that the PyTorch path crosses chunk boundaries (causal masks on later chunks).
    monkeypatch.setattr(lla_pytorch, "MAX_QUERY_CHUNK", 16)
    q, k, v = (x.requires_grad_() for x in _qkv(b, t_q, t_k, h, h_kv, d, device))
    ridge = torch.linspace(0.3, 2.0, h, device=device).requires_grad_()
    out = flashops.local_linear_attention(q, k, v, ridge_lambda=ridge, causal=causal, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, ridge), g)
    want, leaves = _oracle(q, k, v, ridge, causal=causal)
    want_grads = torch.autograd.grad(want, leaves, g.double())
    assert_close("out", out, want)
    for name, got, exp in zip(("dq", "dk", "dv", "dridge"), grads, want_grads):
        assert_close(name, got, exp)
    if t_q > t_k and causal:
        assert torch.equal(out[:, : t_q - t_k], torch.zeros_like(out[:, : t_q - t_k]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_with_a_large_common_offset(backend, device):
    """Key moments are taken about the first key: an offset shared by all keys (common in trained models)
    must not cost precision, although it does for a naive fp32 evaluation of the same formulas."""
    require(OP, backend, torch.float32, device, head_dim=16)
    q, k, v = (x.requires_grad_() for x in _qkv(1, 40, 40, 1, 1, 16, device, key_mean=30.0))
    out = flashops.local_linear_attention(q, k, v, ridge_lambda=0.3, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want, leaves = _oracle(q, k, v, torch.tensor(0.3, device=device))
    want_grads = torch.autograd.grad(want, leaves[:3], g.double())
    assert_close("out", out, want)
    for name, got, exp in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(name, got, exp)
    with torch.no_grad():
        last = flashops.local_linear_attention_decode(q[:, -1:], k, v, ridge_lambda=0.3, backend=backend)
    assert_close("decode", last, want[:, -1:])
    naive = ref.local_linear_attention(q, k, v, ridge_lambda=0.3)  # fp32, no shift
    assert not torch.allclose(naive.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_two_reference_rule(backend, dtype, device):
    require(OP, backend, dtype, device, head_dim=16)
    q, k, v = (x.requires_grad_() for x in _qkv(1, 33, 33, 2, 1, 16, device, dtype))
    ridge = torch.tensor([0.5, 2.0], device=device)
    out = flashops.local_linear_attention(q, k, v, ridge_lambda=ridge, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want, leaves = _oracle(q, k, v, ridge)
    want_grads = torch.autograd.grad(want, leaves[:3], g.double())
    # The same reference in the input dtype (products in low precision, the D x D solve in fp32).
    low = [x.detach().requires_grad_() for x in (q, k, v)]
    base = ref.local_linear_attention(*low, ridge_lambda=ridge, upcast=False)
    base_grads = torch.autograd.grad(base, low, g)
    assert_close("out", out, want, base)
    for name, got, exp, lowp in zip(("dq", "dk", "dv"), grads, want_grads, base_grads):
        assert_close(name, got, exp, lowp, factor=GRAD_FACTOR)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_ridge_is_softmax_attention(backend, device):
    require(OP, backend, torch.float32, device, head_dim=16)
    q, k, v = _qkv(1, 33, 33, 2, 1, 16, device)
    out = flashops.local_linear_attention(q, k, v, ridge_lambda=1e8, backend=backend)
    softmax = flashops.flash_attention(q, k, v, causal=True, backend="torch")
    assert_close("out", out, softmax)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality_future_keys_do_not_change_the_past(backend, device):
    require(OP, backend, torch.float32, device, head_dim=16)
    q, k, v = _qkv(1, 40, 40, 1, 1, 16, device)
    out = flashops.local_linear_attention(q, k, v, ridge_lambda=2.0, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, 21:] = torch.randn_like(k2[:, 21:]) * 3
    v2[:, 21:] = torch.randn_like(v2[:, 21:])
    out2 = flashops.local_linear_attention(q, k2, v2, ridge_lambda=2.0, backend=backend)
    # Bit-identical: masked keys get exactly zero weight and each query's solve only sees its own row.
    assert torch.equal(out[:, :21], out2[:, :21])
    assert not torch.allclose(out[:, 21:], out2[:, 21:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ill_conditioned_contexts_are_finite(backend, device):
    require(OP, backend, torch.float32, device, head_dim=16)
    q, k, v = _qkv(1, 24, 24, 2, 1, 16, device)
    dup = k[:, :1].expand_as(k).contiguous()  # every key identical: zero key covariance
    # Tiny ridges: CG cannot converge in a few iterations; the result must still be finite.
    cases = [(q, dup, v, 1e-6), (q[:, :12], k[:, :12], v[:, :12], 1e-6), (q[:, :1], k[:, :1], v[:, :1], 1e-6)]
    for q_, k_, v_, lam in cases:
        q_, k_, v_ = (x.clone().requires_grad_() for x in (q_, k_, v_))
        out = flashops.local_linear_attention(q_, k_, v_, ridge_lambda=lam, cg_max_iters=8, backend=backend)
        grads = torch.autograd.grad(out.sum(), (q_, k_, v_))
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(g_).all() for g_ in grads)
    # Identical keys: the slope is not identifiable, the fit is the softmax average (here: of all values).
    out = flashops.local_linear_attention(q, dup, v, ridge_lambda=0.1, backend=backend)
    assert_close("duplicate keys", out, ref.softmax_attention(q.double(), dup.double(), v.double()))
    # A single key is fitted exactly.
    out = flashops.local_linear_attention(q[:, :1], k[:, :1], v[:, :1], ridge_lambda=1.0, backend=backend)
    assert_close("T=1", out, v[:, :1].expand_as(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cg_controls_are_honoured(backend, device):
    require(OP, backend, torch.float32, device, head_dim=16)
    q, k, v = _qkv(1, 32, 32, 1, 1, 16, device)
    want = ref.local_linear_attention(q.double(), k.double(), v.double(), ridge_lambda=0.05)
    errors = []
    for iters in (1, 3, 32):
        out = flashops.local_linear_attention(q, k, v, ridge_lambda=0.05, cg_max_iters=iters, cg_tol=0.0,
                                              backend=backend)
        errors.append(float((out.double() - want).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4
    pre = flashops.local_linear_attention(q, k, v, ridge_lambda=0.05, cg_preconditioner=True, cg_tol=1e-7,
                                          backend=backend)
    assert_close("jacobi", pre, want)
    # The iterations each solve ran are recorded on request (the benchmark's FLOP count reads them).
    with cg_stats.record_cg() as solves:
        out = flashops.local_linear_attention(q.requires_grad_(), k, v, ridge_lambda=0.05, cg_max_iters=5,
                                              backend=backend)
        out.sum().backward()
    assert {s.stage for s in solves} == {"fwd", "bwd"} and all(s.backend == backend for s in solves)
    assert all(int(s.iterations.max()) == 5 for s in solves)  # a ridge this small needs more than 5
    assert sum(int(s.pairs.sum()) for s in solves if s.stage == "fwd") == 32 * 33 // 2
    assert cg_stats.mean_iterations(solves, "fwd") == 5.0


# ------------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_equals_last_row_of_the_full_forward(backend, device):
    require("local_linear_attention_decode", backend, torch.float32, device, head_dim=16)
    b, t, h, h_kv, d = 3, 70, 4, 2, 16
    q, k, v = _qkv(b, t, t, h, h_kv, d, device)
    lengths = torch.tensor([70, 1, 37], device=device, dtype=torch.int32)
    ridge = torch.tensor([0.2, 0.5, 1.0, 4.0], device=device)
    cache_k = torch.cat([k, torch.randn_like(k[:, :5])], dim=1)  # unused cache tail
    cache_v = torch.cat([v, torch.randn_like(v[:, :5])], dim=1)
    rows = torch.stack([q[i, int(n) - 1] for i, n in enumerate(lengths)])[:, None]
    out = flashops.local_linear_attention_decode(rows, cache_k, cache_v, ridge_lambda=ridge, cache_seqlens=lengths,
                                                 backend=backend)
    for i, n in enumerate(lengths.tolist()):
        full = flashops.local_linear_attention(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n], ridge_lambda=ridge,
                                               backend="torch")
        assert_close(f"decode[{i}]", out[i:i + 1], full[:, -1:])
    whole = flashops.local_linear_attention_decode(q[:, -1:], k, v, ridge_lambda=0.7, backend=backend)
    assert_close("decode", whole, ref.local_linear_attention(q.double(), k.double(), v.double(),
                                                             ridge_lambda=0.7)[:, -1:])


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(device):
    q, k, v = _qkv(1, 8, 8, 2, 1, 16, device)
    lla = flashops.local_linear_attention
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        lla(q[0], k, v, ridge_lambda=1.0)
    with pytest.raises(ValueError, match="dtype"):
        lla(q, k.half(), v, ridge_lambda=1.0)
    with pytest.raises(ValueError, match="device"):
        lla(q, k.to("meta"), v, ridge_lambda=1.0)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        lla(q[:, :, :1], k.expand(1, 8, 2, 16), v.expand(1, 8, 2, 16), ridge_lambda=1.0)
    with pytest.raises(ValueError, match="same head dim"):
        lla(q, k[..., :8], v[..., :8], ridge_lambda=1.0)
    with pytest.raises(ValueError, match="head dim 300"):
        big = torch.randn(1, 4, 1, 300, device=device)
        lla(big, big, big, ridge_lambda=1.0)
    with pytest.raises(ValueError, match="ridge_lambda must be finite and > 0"):
        lla(q, k, v, ridge_lambda=0.0)
    with pytest.raises(ValueError, match="ridge_lambda must be finite and > 0 everywhere"):
        lla(q, k, v, ridge_lambda=torch.tensor([1.0, -1.0], device=device))
    with pytest.raises(ValueError, match="does not broadcast"):
        lla(q, k, v, ridge_lambda=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="ridge_lambda must be a float or a tensor"):
        lla(q, k, v, ridge_lambda="1")
    with pytest.raises(TypeError, match="ridge_lambda"):
        lla(q, k, v)
    with pytest.raises(ValueError, match="cg_max_iters"):
        lla(q, k, v, ridge_lambda=1.0, cg_max_iters=0)
    with pytest.raises(ValueError, match="cg_tol"):
        lla(q, k, v, ridge_lambda=1.0, cg_tol=-1.0)
    with pytest.raises(flashops._dispatch.BackendError, match="head dim 160 > 128"):
        wide = torch.randn(1, 4, 1, 160, device=device)
        lla(wide, wide, wide, ridge_lambda=1.0, backend="triton")
    with pytest.raises(ValueError, match="is not a backend"):
        lla(q, k, v, ridge_lambda=1.0, backend="cuda")
    dec = flashops.local_linear_attention_decode
    with pytest.raises(ValueError, match=r"one new token per sequence"):
        dec(q[:, :2], k, v, ridge_lambda=1.0)
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        dec(q[:, :1], k, v, ridge_lambda=1.0, cache_seqlens=torch.tensor([3], device=device))
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 8\]"):
        dec(q[:, :1], k, v, ridge_lambda=1.0, cache_seqlens=torch.tensor([9], dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="inference-only"):
        dec(q[:, :1].requires_grad_(), k, v, ridge_lambda=1.0)


# ------------------------------------------------------------------------------------ custom ops, compile
def test_opcheck(device):
    q, k, v = _qkv(1, 9, 9, 2, 1, 16, device)
    ridge = torch.full((1, 1, 1), 0.5, device=device).expand(1, 9, 2)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), ridge, 0.25, True, 32, 1e-6, False, "torch")
    torch.library.opcheck(torch.ops.flashops.lla_fwd.default, args)
    saved = [t.detach() for t in (q, k, v, *torch.ops.flashops.lla_fwd(*args))]
    out = saved[3]
    torch.library.opcheck(torch.ops.flashops.lla_bwd.default,
                          (torch.randn_like(out), *saved, ridge, 0.25, True, 32, 1e-6, False, "torch"))
    torch.library.opcheck(torch.ops.flashops.lla_decode.default,
                          (q[:, :1].detach(), k.detach(), v.detach(), None, ridge[:, :1], 0.25, "torch"))


def test_torch_compile_fullgraph(device):
    q, k, v = (x.requires_grad_() for x in _qkv(1, 12, 12, 2, 1, 16, device))
    ridge = torch.tensor([0.5, 1.5], device=device, requires_grad=True)

    def f(q, k, v, ridge):
        return flashops.local_linear_attention(q, k, v, ridge_lambda=ridge, backend="torch").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, ridge), (q, k, v, ridge))
    want = torch.autograd.grad(f(q, k, v, ridge), (q, k, v, ridge))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
