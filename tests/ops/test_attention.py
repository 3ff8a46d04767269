"""Exact attention: every backend against the fp32 reference, outputs, LSE and every gradient."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import flashops
from flashops import _dispatch
from flashops.ops.attention import reference
from flashops.ops.attention.dropout import dense_keep_mask, draw_seed, varlen_keep_masks
from flashops.testing import assert_close, max_abs_error

from ..conftest import DEVICE, ON_GPU
from ..helpers import BACKENDS, assert_all_close, require

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP = "attention"


def make_qkv(b, t_q, t_k, h, h_kv, d, dtype, packed=False):
    shape_q = (1, t_q, h, d) if packed else (b, t_q, h, d)
    shape_k = (1, t_k, h_kv, d) if packed else (b, t_k, h_kv, d)
    q = torch.randn(shape_q, device=DEVICE, dtype=dtype).requires_grad_()
    k = torch.randn(shape_k, device=DEVICE, dtype=dtype).requires_grad_()
    v = torch.randn(shape_k, device=DEVICE, dtype=dtype).requires_grad_()
    return q, k, v


def run_and_compare(q, k, v, backend, *, op=flashops.flash_attention, op_args=(), ref_kwargs=None, **kwargs):
    """Run ``op`` (returning out, lse), backprop random dO and dLSE, compare everything with the reference.

    The reference runs in fp32 (the oracle) and in the input dtype (the baseline of the tolerance rule)."""
    out, lse = op(q, k, v, *op_args, return_lse=True, backend=backend, **kwargs)
    d_out = torch.randn_like(out)
    d_lse = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)
    grads = torch.autograd.grad((out, lse), (q, k, v), (d_out, d_lse))

    ref_kwargs = {**kwargs, **(ref_kwargs or {})}
    ref_kwargs.pop("generator", None)

    def reference_run(upcast):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if upcast:
            leaves = [x.detach().float().requires_grad_() for x in leaves]
        o, l = reference.attention(*leaves, upcast=upcast, **ref_kwargs)
        g = torch.autograd.grad((o, l), leaves, (d_out.to(o.dtype), d_lse))
        return (o, l, *g)

    names = ["out", "lse", "dq", "dk", "dv"]
    baseline = dict(zip(names, reference_run(False))) if q.dtype != torch.float32 else None
    assert_all_close(dict(zip(names, (out, lse, *grads))), dict(zip(names, reference_run(True))), baseline, q.dtype)
    return out, lse, grads


# (B, Tq, Tk, H, Hkv, D): awkward lengths, Tq != Tk, GQA 1/2/4, non-power-of-two head dims.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 17, 17, 4, 2, 40),
    (1, 113, 113, 2, 1, 64),
    (1, 113, 300, 4, 1, 128),
    (2, 300, 113, 2, 2, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(backend, causal, shape):
    b, t_q, t_k, h, h_kv, d = shape
    require(OP, backend, torch.float32, head_dim=d)
    run_and_compare(*make_qkv(b, t_q, t_k, h, h_kv, d, torch.float32), backend, causal=causal)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="torch's fused CPU kernels serve the torch backend on a CPU only")
def test_torch_backend_runs_torchs_fused_cpu_kernels_where_they_apply(monkeypatch):
    """Unmasked, causal (Tq = Tk, SDPA's top-left Tq < Tk, bottom-right Tq < Tk as two calls), GQA and varlen calls
    run torch's fused CPU kernels forward and backward and match the reference; a gradient on the lse, a window,
    rows that see no key (bottom-right Tq > Tk) and a bottom-right offset in half precision take the chunked
    path."""
    from flashops.ops.attention import pytorch as attention_pytorch

    calls = {"FORWARD": 0, "BACKWARD": 0}
    for name in calls:
        kernel = getattr(attention_pytorch._Fused, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(attention_pytorch._Fused, name, staticmethod(counted))

    def run(q, k, v, *, op=flashops.flash_attention, lse_grad=False, **kwargs):
        """The torch backend's out and gradients for a random cotangent, checked against the fp32 reference;
        returns the fused (forward, backward) calls it made."""
        for name in calls:
            calls[name] = 0
        out, lse = op(q, k, v, return_lse=True, backend="torch", **kwargs)
        d_out = torch.randn_like(out)
        d_lse = torch.randn_like(lse) if lse_grad else torch.zeros_like(lse)
        grads = torch.autograd.grad((out, lse), (q, k, v), (d_out, d_lse))
        ref_kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("cu_seqlens_q", "cu_seqlens_k")}
        if op is flashops.flash_attention_varlen:
            ref_kwargs.update(cu_seqlens_q=kwargs["cu_seqlens_q"], cu_seqlens_k=kwargs["cu_seqlens_k"])
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, l = reference.attention(*leaves, upcast=True, **ref_kwargs)
        want = (o, l, *torch.autograd.grad((o, l), leaves, (d_out, d_lse)))
        for name, actual, expected in zip(["out", "lse", "dq", "dk", "dv"], (out, lse, *grads), want):
            assert_close(name, actual, expected)
        return calls["FORWARD"], calls["BACKWARD"]

    q, k, v = make_qkv(2, 77, 77, 4, 2, 40, torch.float32)
    assert run(q, k, v, causal=True) == (1, 1)
    assert run(q, k, v) == (1, 1)
    assert run(q, k, v, causal=True, lse_grad=True) == (1, 0)
    assert run(q, k, v, causal=True, window_size=(8, 0)) == (0, 0)
    q, k, v = make_qkv(1, 30, 77, 4, 2, 40, torch.float32)
    assert run(q, k, v, causal=True) == (2, 2)  # the prefix unmasked, the last 30 keys top-left causal
    assert run(*make_qkv(1, 77, 30, 4, 2, 40, torch.float32), causal=True) == (0, 0)
    q16, k16, v16 = make_qkv(1, 30, 77, 4, 2, 40, torch.bfloat16)
    flashops.flash_attention(q16, k16, v16, causal=True, backend="torch")
    assert calls["FORWARD"] == 0
    cu_q = torch.tensor([0, 30, 30, 107], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, 107, 107, 4, 2, 40, torch.float32, packed=True)
    assert run(q, k, v, op=flashops.flash_attention_varlen, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, causal=True) == (2, 2)
    # SDPA's is_causal with Tq < Tk is the fused kernels' own (top-left) mask.
    q, k, v = (x.transpose(1, 2) for x in make_qkv(2, 33, 47, 4, 2, 16, torch.float32))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    calls.update(FORWARD=0, BACKWARD=0)
    actual = flashops.sdpa(*leaves, is_causal=True, enable_gqa=True, backend="torch")
    grads = torch.autograd.grad(actual.sum(), leaves)
    assert (calls["FORWARD"], calls["BACKWARD"]) == (1, 1)
    expected_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    expected = F.scaled_dot_product_attention(*expected_leaves, is_causal=True, enable_gqa=True)
    assert_close("sdpa", actual, expected)
    for name, a, e in zip("qkv", grads, torch.autograd.grad(expected.sum(), expected_leaves)):
        assert_close(f"sdpa d{name}", a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_half(backend, dtype, causal):
    require(OP, backend, dtype)
    run_and_compare(*make_qkv(2, 77, 130, 4, 2, 64, dtype), backend, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [32, 96, 256])
def test_head_dims(backend, d):
    require(OP, backend, torch.float16, head_dim=d)
    run_and_compare(*make_qkv(1, 70, 70, 2, 2, d, torch.float16), backend, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(8, 0), (20, 5), (-1, 3), (0, 0), (7, -1)])
def test_sliding_window(backend, window):
    require(OP, backend, torch.float32)
    run_and_compare(*make_qkv(1, 90, 130, 2, 1, 32, torch.float32), backend, window_size=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_alibi(backend):
    require(OP, backend, torch.float32)
    q, k, v = make_qkv(2, 65, 80, 4, 2, 32, torch.float32)
    slopes = torch.rand(4, device=DEVICE)
    run_and_compare(q, k, v, backend, causal=True, softcap=5.0, alibi_slopes=slopes)
    slopes_per_batch = torch.rand(2, 4, device=DEVICE)
    run_and_compare(q, k, v, backend, alibi_slopes=slopes_per_batch, softmax_scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_reference_with_same_mask(backend):
    require(OP, backend, torch.float32, dropout=True)
    b, t_q, t_k, h = 2, 70, 90, 2
    q, k, v = make_qkv(b, t_q, t_k, h, 1, 32, torch.float32)
    p = 0.3
    seed = int(draw_seed(DEVICE, torch.Generator(DEVICE).manual_seed(7)))
    mask = dense_keep_mask(seed, b, h, t_q, t_k, p, DEVICE)
    run_and_compare(q, k, v, backend, causal=True, dropout_p=p,
                    generator=torch.Generator(DEVICE).manual_seed(7), ref_kwargs={"dropout_mask": mask})
    keep_rate = mask.float().mean().item()
    assert abs(keep_rate - (1 - p)) < 0.02


def test_dropout_backends_draw_the_same_mask():
    require(OP, "triton", torch.float32, dropout=True)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 16, torch.float32)
    outs = [flashops.flash_attention(q, k, v, dropout_p=0.5, backend=be,
                                     generator=torch.Generator(DEVICE).manual_seed(3)) for be in BACKENDS]
    assert max_abs_error(outs[0], outs[1]) < 1e-5
    other = flashops.flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator(DEVICE).manual_seed(4))
    assert max_abs_error(outs[0], other) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [(32, 32), (64, 32)])
def test_block_sparse(backend, block_size):
    require(OP, backend, torch.float32, block_size=block_size)
    b, t_q, t_k, h = 2, 150, 130, 2
    q, k, v = make_qkv(b, t_q, t_k, h, 1, 32, torch.float32)
    nb = (math.ceil(t_q / block_size[0]), math.ceil(t_k / block_size[1]))
    block_mask = torch.rand(b, 1, *nb, device=DEVICE) < 0.5
    block_mask[0, 0, 1, :] = False  # one query block with nothing to attend to
    out, lse, _ = run_and_compare(q, k, v, backend, op=flashops.block_sparse_attention, op_args=(block_mask,),
                                  ref_kwargs={"block_mask": block_mask}, block_size=block_size, causal=True)
    rows = slice(block_size[0], 2 * block_size[0])
    assert torch.all(out[0, rows] == 0) and torch.all(torch.isneginf(lse[0, :, rows]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_matches_per_sequence(backend):
    require(OP, backend, torch.float32, varlen=True)
    lens_q = [5, 0, 70, 33]
    lens_k = [9, 4, 70, 1]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, sum(lens_q), sum(lens_k), 4, 2, 40, torch.float32, packed=True)
    common = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for kwargs in (dict(causal=True), dict(window_size=(6, 2)), dict(alibi_slopes=torch.rand(4, 4, device=DEVICE))):
        run_and_compare(q, k, v, backend, op=flashops.flash_attention_varlen, op_args=(cu_q, cu_k),
                        ref_kwargs=common, **kwargs)
    p = 0.2
    seed = int(draw_seed(DEVICE, torch.Generator(DEVICE).manual_seed(1)))
    masks = varlen_keep_masks(seed, 4, cu_q, cu_k, p, DEVICE)
    run_and_compare(q, k, v, backend, op=flashops.flash_attention_varlen, op_args=(cu_q, cu_k), dropout_p=p,
                    generator=torch.Generator(DEVICE).manual_seed(1), ref_kwargs={**common, "dropout_mask": masks})


def test_varlen_flash_attn_layout_and_dense_equivalence():
    q, k, v = make_qkv(2, 40, 40, 2, 2, 16, torch.float32)
    dense = flashops.flash_attention(q, k, v, causal=True)
    cu = torch.tensor([0, 40, 80], dtype=torch.int32, device=DEVICE)
    packed = flashops.flash_attention_varlen(q.reshape(80, 2, 16), k.reshape(80, 2, 16), v.reshape(80, 2, 16),
                                             cu, cu, 40, 40, causal=True)
    assert packed.shape == (80, 2, 16)
    assert max_abs_error(packed.reshape(2, 40, 2, 16), dense) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero(backend):
    require(OP, backend, torch.float32)
    q, k, v = make_qkv(1, 50, 20, 2, 2, 16, torch.float32)
    out, lse = flashops.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.all(out[:, :30] == 0) and torch.all(torch.isneginf(lse[:, :, :30]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[:, :30] == 0)
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_without_crashing(backend):
    require(OP, backend, torch.float32)
    q, k, v = make_qkv(1, 20, 20, 1, 1, 16, torch.float32)
    q = q.detach().clone()
    q[0, 3, 0, 0] = float("nan")
    out = flashops.flash_attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 3]).all()
    assert torch.isfinite(out[0, torch.arange(20) != 3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_backward(backend):
    require(OP, backend, torch.float32)
    q, k, v = make_qkv(1, 100, 100, 4, 1, 32, torch.float32)
    grads = []
    for _ in range(2):
        out = flashops.flash_attention(q, k, v, causal=True, deterministic=True, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_matches_torch(backend):
    require(OP, backend, torch.float32)
    b, h, t_q, t_k, d = 2, 4, 33, 47, 16
    q = torch.randn(b, h, t_q, d, device=DEVICE)
    k = torch.randn(b, 2, t_k, d, device=DEVICE)
    v = torch.randn(b, 2, t_k, d, device=DEVICE)
    bool_mask = torch.rand(b, 1, t_q, t_k, device=DEVICE) < 0.7
    bool_mask[..., 0] = True  # no fully masked row (torch gives NaN there)
    float_mask = torch.randn(t_q, t_k, device=DEVICE)
    cases = [
        dict(is_causal=True),
        dict(attn_mask=bool_mask),
        dict(attn_mask=float_mask, scale=0.5),
        dict(),
    ]
    for kwargs in cases:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = F.scaled_dot_product_attention(*leaves, enable_gqa=True, **kwargs)
        g_expected = torch.autograd.grad(expected.sum(), leaves)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        actual = flashops.sdpa(*leaves, enable_gqa=True, backend=backend, **kwargs)
        g_actual = torch.autograd.grad(actual.sum(), leaves)
        assert_close(f"sdpa {list(kwargs)}", actual, expected)
        for name, a, e in zip("qkv", g_actual, g_expected):
            assert_close(f"sdpa d{name} {list(kwargs)}", a, e)


def test_sdpa_mask_gradient_and_shapes():
    q, k, v = (torch.randn(3, 10, 8, device=DEVICE) for _ in range(3))  # 3-D: one head
    bias = torch.randn(10, 10, device=DEVICE, requires_grad=True)
    out = flashops.sdpa(q, k, v, attn_mask=bias)
    expected_bias = bias.detach().clone().requires_grad_()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=expected_bias)
    assert out.shape == (3, 10, 8)
    assert_close("out", out, expected)
    g = torch.randn_like(out)
    (db,) = torch.autograd.grad(out, bias, g)
    (db_expected,) = torch.autograd.grad(expected, expected_bias, g)
    assert_close("dmask", db, db_expected)
    # 5-D input with a mask broadcasting over the two leading dims.
    q5 = torch.randn(2, 3, 2, 6, 8, device=DEVICE)
    mask = torch.rand(6, 6, device=DEVICE) < 0.8
    mask[:, 0] = True
    assert_close("5d", flashops.sdpa(q5, q5, q5, attn_mask=mask),
                 F.scaled_dot_product_attention(q5, q5, q5, attn_mask=mask))


def test_sdpa_fully_masked_row_is_zero():
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    mask = torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
    mask[2] = False
    out = flashops.sdpa(q, q, q, attn_mask=mask)
    assert torch.all(out[0, 0, 2] == 0) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    q, k, v = (torch.randn(1, 8, 2, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        flashops.flash_attention(q[0], k, v)
    with pytest.raises(TypeError, match="k must have dtype"):
        flashops.flash_attention(q, k.to(torch.int32), v)
    with pytest.raises(ValueError, match="dtype"):
        flashops.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        flashops.flash_attention(torch.randn(1, 8, 3, 16, device=DEVICE), k, v)
    with pytest.raises(ValueError, match="head dim 320"):
        big = torch.randn(1, 8, 2, 320, device=DEVICE)
        flashops.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="device"):
        flashops.flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="window_size"):
        flashops.flash_attention(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="dropout_p"):
        flashops.flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        flashops.flash_attention(q, k, v, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="block_mask must have shape"):
        flashops.block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE),
                                        block_size=(16, 16))
    with pytest.raises(ValueError, match="stride"):
        flashops.flash_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)
    with pytest.raises(ValueError, match="not a backend of .attention.; choose one of"):
        flashops.flash_attention(q, k, v, backend="nope")


def test_bad_varlen_inputs():
    q = torch.randn(10, 2, 16, device=DEVICE)
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype int32 or int64"):
        flashops.flash_attention_varlen(q, q, q, good.float(), good)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the packed length 10"):
        flashops.flash_attention_varlen(q, q, q, good, torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="max_seqlen_q=3 is smaller than the longest sequence"):
        flashops.flash_attention_varlen(q, q, q, good, good, max_seqlen_q=3)
    with pytest.raises(ValueError, match="non-decreasing"):
        bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEVICE)
        flashops.flash_attention_varlen(q, q, q, bad, bad)


def test_forced_backend_that_declines_names_its_reason(monkeypatch):
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    monkeypatch.setenv("FLASHOPS_BACKEND", "attention=triton")
    bias = torch.randn(8, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(_dispatch.BackendError, match="gradient for attn_mask"):
        flashops.sdpa(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), attn_mask=bias)


# ------------------------------------------------------------------------------------ torch integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require(OP, backend, torch.float32)
    q, k, v = (torch.randn(1, 20, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    args = (q, k, v, None, None, 20, 20, None, None, 128, 128, None, None, 0.25, None, 0, 0.0, 0.0, backend)
    torch.library.opcheck(torch.ops.flashops.attention_fwd.default, args)


def test_compile_fullgraph_no_graph_break():
    q, k, v = (torch.randn(1, 24, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))

    def loss(q, k, v):
        out, lse = flashops.flash_attention(q, k, v, causal=True, return_lse=True)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert max_abs_error(a, b) < 1e-5


# ------------------------------------------------------------------------------------------------ memory
_MEMORY_PROBE = """
import sys, torch, flashops
torch.set_num_threads(1)
t = int(sys.argv[1])
q, k, v = (torch.randn(1, t, 4, 64, requires_grad=True) for _ in range(3))
out = flashops.flash_attention(q, k, v, backend="torch")
out.sum().backward()
print(int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]))
"""


@pytest.mark.skipif(ON_GPU, reason="the GPU variant measures torch.cuda.max_memory_allocated")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for the peak RSS")
def test_torch_path_memory_is_linear_in_t_cpu():
    def peak_kib(t):
        # Every large block mmapped and unmapped on free, one arena: the peak RSS is then repeatable to
        # a fraction of a MiB instead of depending on glibc's heap trimming.
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(flashops.__file__)),
               "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
        res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(t)], capture_output=True, text=True,
                             env=env, check=True)
        return int(res.stdout.split()[-1])

    t1k, t2k, t4k = peak_kib(1024), peak_kib(2048), peak_kib(4096)
    scores_4k_kib = 4 * 4096 * 4096 * 4 // 1024  # one fp32 [H, T, T] score matrix at T=4096: 256 MiB
    # Quadrupling T costs a fraction of one materialized score matrix (a materializing path needs
    # at least two: scores and probabilities) ...
    assert t4k - t1k < scores_4k_kib / 4, (t1k, t2k, t4k)
    # ... and the growth per doubling stays roughly constant per token (quadratic would be 4x).
    assert t4k - t2k < 3.0 * max(t2k - t1k, 1024), (t1k, t2k, t4k)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_is_linear_in_t_gpu(backend):
    def peak(t):
        q, k, v = (torch.randn(1, t, 4, 64, device=DEVICE, requires_grad=True) for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        flashops.flash_attention(q, k, v, backend=backend).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    small, large = peak(8192), peak(16384)
    assert large < 3.0 * small
    assert large < 4 * 16384 * 16384 * 4 / 8
