"""Linear attention (Lightning-2, GLA, plain, non-causal, decode steps) against the fp32 recurrence.

Every backend is compared on outputs, final states and every gradient (q, k, v, g, initial_state) with the
tolerance rule of flashops.testing; fp16 uses the reference run in fp16 as the baseline. Shapes stay tiny
(the Triton kernels run under the interpreter on CPU) but cross chunk (64) and sub-chunk (16) boundaries.
"""

import pytest
import torch
import torch.nn.functional as F

import flashops
from flashops import _dispatch
from flashops.ops import linear as L
from flashops.ops.linear import reference as ref
from flashops.testing import GRAD_FACTOR, assert_close

from ..helpers import BACKENDS, assert_all_close, require

# The decode steps also have CUDA kernels (on the CPU: through the host emulator, tests/conftest.py).
STEP_BACKENDS = ["cuda", *BACKENDS]


def _gates(shape, device, strength=2.0):
    return F.logsigmoid(torch.randn(shape, device=device) * strength)


def _make(b, t, h, d_k, d_v, device, dtype, *, gated, n_states=None, with_state=True):
    q = torch.randn(b, t, h, d_k, device=device, dtype=dtype)
    k = torch.randn(b, t, h, d_k, device=device, dtype=dtype)
    v = torch.randn(b, t, h, d_v, device=device, dtype=dtype)
    gate = _gates((b, t, h, d_k), device) if gated else torch.rand(h, device=device)
    h0 = torch.randn(n_states or b, h, d_k, d_v, device=device) if with_state else None
    return q, k, v, gate, h0


def _run(fn, q, k, v, gate, h0, *, gated, upstream, **kwargs):
    """Forward, then gradients of <o, do> + <final, dht> for every differentiable input."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None
              for x in (q, k, v, gate if gated else None, h0)]
    q_, k_, v_, g_, h0_ = leaves
    o, final = fn(q_, k_, v_, g_ if gated else gate, initial_state=h0_, output_final_state=True, **kwargs)
    do, dht = upstream(o, final)
    loss = (o.float() * do).sum() + (final * dht).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return o, final, grads


def _fast(gated):
    return flashops.gated_linear_attention if gated else flashops.lightning_attention


def _oracle(gated):
    return ref.gated_linear_attention if gated else ref.lightning_attention


def _upstream(seed=1):
    def make(o, final):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        do = torch.randn(o.shape, generator=gen).to(o.device)
        dht = torch.randn(final.shape, generator=gen).to(final.device)
        return do, dht
    return make


def _compare(gated, q, k, v, gate, h0, backend, **kwargs):
    """The op in its dtype vs the fp32 reference (and, for half types, the reference in that dtype)."""
    up = _upstream()
    o, final, grads = _run(_fast(gated), q, k, v, gate, h0, gated=gated, upstream=up, backend=backend, **kwargs)
    f32 = [x.float() if x is not None else None for x in (q, k, v)]
    o_r, final_r, grads_r = _run(_oracle(gated), *f32, gate, h0, gated=gated, upstream=up, **kwargs)
    lowp = q.dtype != torch.float32
    if lowp:
        o_b, final_b, grads_b = _run(_oracle(gated), q, k, v, gate, h0, gated=gated, upstream=up, upcast=False,
                                     **kwargs)
    names = ["o", "final_state", "dq", "dk", "dv"] + (["dg"] if gated else []) + (["dh0"] if h0 is not None else [])
    baseline = dict(zip(names, (o_b, final_b, *grads_b))) if lowp else None
    assert_all_close(dict(zip(names, (o, final, *grads))), dict(zip(names, (o_r, final_r, *grads_r))), baseline,
                     q.dtype)
    return o, final, grads


# ------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("gated", [True, False])
def test_reference_recurrence_equals_quadratic_form(gated):
    q, k, v, gate, h0 = _make(2, 37, 2, 8, 12, "cpu", torch.float64, gated=gated)
    gate = gate.double()
    rec = _oracle(gated)(q, k, v, gate, initial_state=h0.double(), output_final_state=True)
    quad = _oracle(gated)(q, k, v, gate, initial_state=h0.double(), output_final_state=True, method="quadratic")
    torch.testing.assert_close(rec[0], quad[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rec[1], quad[1], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------- chunked vs recurrence
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 17, 63, 129])
def test_lightning_matches_reference(backend, t, device):
    require(L.LIGHTNING, backend, torch.float32, device)
    q, k, v, slopes, h0 = _make(2, t, 2, 16, 32, device, torch.float32, gated=False)
    slopes[1] = 0.0  # one head without decay: plain linear attention
    _compare(False, q, k, v, slopes, h0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,batch", [(1, 2), (17, 2), (63, 2), (129, 1)])
def test_gla_matches_reference(backend, t, batch, device):
    require(L.GLA, backend, torch.float32, device)
    q, k, v, g, h0 = _make(batch, t, 2, 16, 32, device, torch.float32, gated=True)
    _compare(True, q, k, v, g, h0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
def test_no_initial_state_and_odd_head_dims(backend, gated, device):
    # K, V not powers of two (padded tiles) and different from each other; no initial state; custom scale.
    require(L.GLA, backend, torch.float32, device)
    q, k, v, gate, _ = _make(1, 70, 2, 20, 24, device, torch.float32, gated=gated, with_state=False)
    _compare(gated, q, k, v, gate, None, backend, scale=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_half_precision_two_reference_rule(backend, dtype, gated, device):
    require(L.GLA, backend, dtype, device)
    q, k, v, gate, h0 = _make(1, 80, 2, 16, 32, device, dtype, gated=gated)
    _compare(gated, q, k, v, gate, h0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_gates_stay_finite(backend, device):
    """g = -inf (forget everything), g = -1e4, and gates within 1e-6 of 1, in one sequence."""
    require(L.GLA, backend, torch.float32, device)
    q, k, v, g, h0 = _make(1, 90, 2, 16, 16, device, torch.float32, gated=True)
    g = g.clone()
    g[:, 5] = float("-inf")
    g[:, 20:24, 0] = -1e4
    g[:, 30:60] = -1e-6 * torch.rand_like(g[:, 30:60])
    g[:, 70:, 1, :8] = -50.0
    o, final, grads = _compare(True, q, k, v, g, h0, backend)
    assert all(bool(torch.isfinite(x).all()) for x in (o, final, *grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_slopes_stay_finite(backend, device):
    require(L.LIGHTNING, backend, torch.float32, device)
    q, k, v, _, h0 = _make(1, 70, 3, 16, 16, device, torch.float32, gated=False)
    slopes = torch.tensor([float("inf"), 1e4, 1e-7], device=device)
    o, final, grads = _compare(False, q, k, v, slopes, h0, backend)
    assert all(bool(torch.isfinite(x).all()) for x in (o, final, *grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_linear_attention_is_zero_decay(backend, device):
    require(L.LIGHTNING, backend, torch.float32, device)
    q, k, v, _, h0 = _make(1, 40, 2, 16, 16, device, torch.float32, gated=False)
    o, final = flashops.linear_attention(q, k, v, initial_state=h0, output_final_state=True, backend=backend)
    o_r, final_r = ref.linear_attention_recurrence(q, k, v, torch.zeros(1, device=device), scale=0.25,
                                                   initial_state=h0, output_final_state=True)
    assert_close("o", o, o_r)
    assert_close("final_state", final, final_r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_views(backend, device):
    """[B, H, T, D] storage viewed as [B, T, H, D] (stride(-1) == 1, not contiguous) gives the same result."""
    require(L.GLA, backend, torch.float32, device)
    q, k, v, g, h0 = _make(1, 33, 2, 16, 16, device, torch.float32, gated=True)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g)]
    assert not views[0].is_contiguous()
    o, final = flashops.gated_linear_attention(*views, initial_state=h0, output_final_state=True, backend=backend)
    o_r, final_r = flashops.gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                                                   backend=backend)
    torch.testing.assert_close(o, o_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final, final_r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
def test_empty_sequence_dimension(backend, gated, device):
    require(L.GLA, backend, torch.float32, device)
    q, k, v, gate, h0 = _make(2, 0, 2, 16, 16, device, torch.float32, gated=gated)
    o, final = _fast(gated)(q, k, v, gate, initial_state=h0, output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 16)
    torch.testing.assert_close(final, h0)


# ------------------------------------------------------------------------------------------------ varlen
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
def test_varlen_equals_separate_sequences(backend, gated, device):
    require(L.GLA, backend, torch.float32, device)
    lengths = [17, 0, 70, 1]
    cu = torch.tensor([0, 17, 17, 87, 88], dtype=torch.int32, device=device)
    q, k, v, gate, h0 = _make(1, sum(lengths), 2, 16, 16, device, torch.float32, gated=gated, n_states=4)
    up = _upstream()
    o, final, grads = _run(_fast(gated), q, k, v, gate, h0, gated=gated, upstream=up, cu_seqlens=cu,
                           backend=backend)
    o_r, final_r, grads_r = _run(_oracle(gated), q, k, v, gate, h0, gated=gated, upstream=up, cu_seqlens=cu)
    names = ["dq", "dk", "dv"] + (["dg"] if gated else []) + ["dh0"]
    assert_close("o", o, o_r)
    assert_close("final_state", final, final_r)
    for name, a, r in zip(names, grads, grads_r):
        assert_close(name, a, r, factor=GRAD_FACTOR)
    # Each packed sequence equals the op run on it alone.
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, final_n = _fast(gated)(q[:, s:e], k[:, s:e], v[:, s:e], gate[:, s:e] if gated else gate,
                                    initial_state=h0[n : n + 1], output_final_state=True, backend=backend)
        torch.testing.assert_close(o[:, s:e], o_n, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[n : n + 1], final_n, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- non-causal
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_noncausal_matches_reference(backend, varlen, device):
    require(L.NONCAUSAL, backend, torch.float32, device)
    if varlen:
        cu = torch.tensor([0, 600, 600, 613], dtype=torch.int32, device=device)  # > one 512 segment, an empty one
        q, k, v, _, h0 = _make(1, 613, 2, 16, 24, device, torch.float32, gated=False, n_states=3)
    else:
        cu = None
        q, k, v, _, h0 = _make(2, 45, 2, 16, 24, device, torch.float32, gated=False)
    up = _upstream()

    def fast(q_, k_, v_, _, **kw):
        return flashops.linear_attention(q_, k_, v_, causal=False, backend=backend, **kw)

    def oracle(q_, k_, v_, _, **kw):
        return ref.noncausal_linear_attention(q_, k_, v_, **kw)

    o, final, grads = _run(fast, q, k, v, None, h0, gated=False, upstream=up, cu_seqlens=cu)
    o_r, final_r, grads_r = _run(oracle, q, k, v, None, h0, gated=False, upstream=up, cu_seqlens=cu)
    assert_close("o", o, o_r)
    assert_close("final_state", final, final_r)
    for name, a, r in zip(["dq", "dk", "dv", "dh0"], grads, grads_r):
        assert_close(name, a, r, factor=GRAD_FACTOR)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
def test_steps_reproduce_the_chunked_op(backend, gated, device):
    require(L.GLA_STEP, backend, torch.float32, device)
    q, k, v, gate, h0 = _make(2, 19, 2, 16, 24, device, torch.float32, gated=gated)
    chunked = None if backend == "cuda" else backend  # the chunked ops have no CUDA kernels
    o, final = _fast(gated)(q, k, v, gate, initial_state=h0, output_final_state=True, backend=chunked)
    state = h0
    for t in range(q.shape[1]):
        if gated:
            o_t, state = flashops.gated_linear_attention_step(q[:, t], k[:, t], v[:, t], gate[:, t], state,
                                                              backend=backend)
        else:
            o_t, state = flashops.lightning_attention_step(q[:, t], k[:, t], v[:, t], gate, state, backend=backend)
        torch.testing.assert_close(o_t, o[:, t], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, final, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_step_gradients(backend, gated, with_state, device):
    require(L.GLA_STEP, backend, torch.float32, device)
    b, h, d_k, d_v = 2, 3, 20, 40
    q, k = (torch.randn(b, h, d_k, device=device) for _ in range(2))
    v = torch.randn(b, h, d_v, device=device)
    gate = _gates((b, h, d_k), device) if gated else torch.rand(h, device=device)
    if gated:
        gate[0, 0, :3] = float("-inf")
    state = torch.randn(b, h, d_k, d_v, device=device) if with_state else None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v) + ((gate,) if gated else ())
              + ((state,) if with_state else ())]
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(b, h, d_v, generator=gen).to(device)
    d_new = torch.randn(b, h, d_k, d_v, generator=gen).to(device)

    def grads(fast):
        q_, k_, v_ = leaves[:3]
        g_ = leaves[3] if gated else gate
        s_ = leaves[-1] if with_state else None
        if fast and gated:
            o, new = flashops.gated_linear_attention_step(q_, k_, v_, g_, s_, scale=0.5, backend=backend)
        elif fast:
            o, new = flashops.lightning_attention_step(q_, k_, v_, g_, s_, scale=0.5, backend=backend)
        else:
            log_gate = g_ if gated else -g_[None, :, None]
            o, new = ref.recurrent_step(q_, k_, v_, log_gate, s_, scale=0.5)
        return (o, new) + torch.autograd.grad((o * do).sum() + (new * d_new).sum(), leaves)

    fast, slow = grads(True), grads(False)
    names = ["o", "new_state", "dq", "dk", "dv"] + (["dg"] if gated else []) + (["dstate"] if with_state else [])
    for name, a, r in zip(names, fast, slow):
        assert torch.isfinite(a).all(), name
        assert_close(name, a, r, factor=GRAD_FACTOR)


# ---------------------------------------------------------------------------------------------- slopes
def test_lightning_slopes():
    torch.testing.assert_close(flashops.lightning_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    six = flashops.lightning_slopes(6)  # 4 from the power-of-two schedule, then odd entries of the 8-head one
    torch.testing.assert_close(six, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]))
    last = flashops.lightning_slopes(4, layer_idx=3, num_layers=4)
    torch.testing.assert_close(last, flashops.lightning_slopes(4) * 1e-5)


def test_default_slopes_are_the_alibi_schedule(device):
    q, k, v, _, _ = _make(1, 9, 4, 16, 16, device, torch.float32, gated=False)
    o, _ = flashops.lightning_attention(q, k, v, backend="torch")
    o_r, _ = ref.lightning_attention(q, k, v, flashops.lightning_slopes(4, device=device))
    assert_close("o", o, o_r)


# -------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(device):
    q, k, v, g, h0 = _make(2, 8, 2, 16, 16, device, torch.float32, gated=True)
    gla = flashops.gated_linear_attention
    light = flashops.lightning_attention
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        gla(q[0], k[0], v[0], g[0])
    with pytest.raises(TypeError, match="k must have dtype"):
        gla(q, k.to(torch.int32), v, g)
    with pytest.raises(ValueError, match="v has dtype"):
        gla(q, k, v.half(), g)
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        gla(q, k[:, :4], v, g)
    with pytest.raises(ValueError, match="v must match q"):
        gla(q, k, v[:, :, :1], g)
    with pytest.raises(ValueError, match="head dim 300"):
        light(torch.randn(1, 4, 1, 300, device=device), torch.randn(1, 4, 1, 300, device=device),
              torch.randn(1, 4, 1, 8, device=device))
    with pytest.raises(ValueError, match="g must have the shape of q"):
        gla(q, k, v, g[..., :8])
    with pytest.raises(ValueError, match="slopes must have shape"):
        light(q, k, v, torch.ones(3, device=device))
    if device.type == "cpu":  # checked on CPU only (a GPU check would sync every call)
        with pytest.raises(ValueError, match="slopes must be >= 0"):
            light(q, k, v, torch.tensor([0.1, -0.1], device=device))
    with pytest.raises(ValueError, match="slopes is a constant"):
        light(q, k, v, torch.ones(2, device=device, requires_grad=True))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gla(q, k, v, g, initial_state=h0[:1])
    with pytest.raises(ValueError, match="packed as"):
        gla(q, k, v, g, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype int32 or int64"):
        gla(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0.0, 8.0], device=device))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        gla(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 5], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="scale must be a float"):
        gla(q, k, v, g, scale="big")
    with pytest.raises(ValueError, match="not a backend"):
        light(q, k, v, backend="cuda")
    if device.type == "cpu":
        with pytest.raises(_dispatch.BackendError, match="bfloat16"):
            light(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton")
    with pytest.raises(ValueError, match="state must have shape"):
        flashops.lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], state=h0[:, :, :4])
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        flashops.lightning_attention_step(q, k, v)
    if device.type == "cpu" and torch.cuda.is_available():  # pragma: no cover - mixed-device machines only
        with pytest.raises(ValueError, match="device"):
            gla(q, k, v, g.cuda())


# ---------------------------------------------------------------------------------- custom ops, compile
def test_opcheck(device):
    q, k, v, g, h0 = _make(1, 20, 2, 16, 16, device, torch.float32, gated=True)
    slopes = torch.rand(2, device=device)
    req = [x.requires_grad_(True) for x in (q, k, v, g, h0)]
    torch.library.opcheck(torch.ops.flashops.linear_attention_chunk_fwd.default,
                          (*req[:4], None, req[4], None, 0.25, True, "torch"))
    torch.library.opcheck(torch.ops.flashops.linear_attention_chunk_fwd.default,
                          (*req[:3], None, slopes, None, None, 0.25, False, "torch"))
    torch.library.opcheck(torch.ops.flashops.linear_attention_noncausal_fwd.default,
                          (*req[:3], req[4], None, 0.25, True, "torch"))
    torch.library.opcheck(torch.ops.flashops.linear_attention_step_fwd.default,
                          (req[0][:, 0], req[1][:, 0], req[2][:, 0], req[3][:, 0], None, req[4], 0.25, "torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    require(L.GLA, backend, torch.float32, device)
    q, k, v, g, h0 = _make(1, 20, 2, 16, 16, device, torch.float32, gated=True)

    def step(q, k, v, g, h0):
        o, final = flashops.gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                                                   backend=backend)
        o2, _ = flashops.lightning_attention(q, k, v, torch.full((2,), 0.1, device=q.device), backend=backend)
        o3, s = flashops.gated_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], h0, backend=backend)
        return o.sum() + final.sum() + o2.sum() + o3.sum() + s.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_in = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    comp_in = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    eager = step(*eager_in)
    eager.backward()
    out = compiled(*comp_in)
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------------- gates out of domain
def test_out_of_domain_gates_raise_on_cpu():
    """Checked where it is free (CPU tensors): NaN or negative slopes, NaN or positive log-gates."""
    q, k, v, g, _ = _make(1, 9, 2, 8, 8, "cpu", torch.float32, gated=True)
    for slopes in ([float("nan"), 0.5], [0.5, -1e-3]):
        with pytest.raises(ValueError, match=r"slopes must be >= 0 .* at index \(\d,\)"):
            flashops.lightning_attention(q, k, v, torch.tensor(slopes))
    for bad in (float("nan"), 0.25):
        g_bad = g.clone()
        g_bad[0, 5, 1, 3] = bad
        with pytest.raises(ValueError, match=r"g must be <= 0 .* at index \(0, 5, 1, 3\)"):
            flashops.gated_linear_attention(q, k, v, g_bad)
        with pytest.raises(ValueError, match=r"g_t must be <= 0"):
            flashops.gated_linear_attention_step(q[:, 5], k[:, 5], v[:, 5], state=None, g_t=g_bad[:, 5])
    o, _ = flashops.gated_linear_attention(q, k, v, g.masked_fill(g < -1, float("-inf")))  # -inf: forget all
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_domain_gates_give_nan_from_where_they_apply(backend, device):
    """Where values are not checked (accelerators: a check would sync the host), every backend gives the
    same answer: NaN in the bad head from the bad position on, everything else unchanged. (The backends are
    called directly here, past the CPU check.) Triton used to treat a NaN slope as the 30 cap."""
    require(L.GLA, backend, torch.float32, device)
    lightning, gla = _dispatch.get(L.LIGHTNING, backend).load(), _dispatch.get(L.GLA, backend).load()
    q, k, v, g, _ = _make(1, 70, 2, 8, 8, device, torch.float32, gated=True)
    slopes = torch.tensor([0.3, 0.5], device=device)
    for bad_slope in (float("nan"), -0.5):
        bad_slopes = torch.tensor([bad_slope, 0.5], device=device)
        o, final = lightning.chunk_forward(q, k, v, None, bad_slopes, 0.5, None, None, True)
        clean, clean_final = lightning.chunk_forward(q, k, v, None, slopes, 0.5, None, None, True)
        assert o[:, :, 0].isnan().all() and final[:, 0].isnan().all(), f"slope {bad_slope}"
        assert torch.equal(o[:, :, 1], clean[:, :, 1]) and torch.equal(final[:, 1], clean_final[:, 1])
    for bad in (float("nan"), 0.25):
        g_bad = g.clone()
        g_bad[0, 40, 1, 3] = bad
        o, final = gla.chunk_forward(q, k, v, g_bad, None, 0.5, None, None, True)
        clean, clean_final = gla.chunk_forward(q, k, v, g, None, 0.5, None, None, True)
        assert o[:, 40:, 1].isnan().all() and final[:, 1].isnan().any(), f"log-gate {bad}"
        assert torch.equal(o[:, :40], clean[:, :40]) and torch.equal(o[:, :, 0], clean[:, :, 0])
