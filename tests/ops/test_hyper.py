"""HyperAttention: the op against a materialized reference built from the same plan (outputs, LSE and every
gradient), exactness when blocks or samples cover T, error behaviour, causality, reproducibility, errors."""

import math

import pytest
import torch

import flashops
from flashops.ops.hyper import HyperPlan, hyper_attention, hyper_attention_plan, reference
from flashops.ops.hyper.plan import bucket_ranks, inverse_gray
from flashops.testing import max_abs_error

from ..conftest import DEVICE
from ..helpers import BACKENDS, assert_all_close, require


def make_qkv(b, t_q, t_k, h, h_kv, d, dtype=torch.float32, requires_grad=True):
    q = torch.randn(b, t_q, h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, t_k, h_kv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, t_k, h_kv, d, device=DEVICE, dtype=dtype)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def seeded(seed=0):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def run_and_compare(q, k, v, backend, plan, **kwargs):
    """The op under ``plan`` vs the float64 reference under the same plan: out, lse, dq, dk, dv."""
    out, lse = hyper_attention(q, k, v, plan=plan, return_lse=True, backend=backend, causal=plan.causal, **kwargs)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (d_out, d_lse))

    def reference_run(dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o, l = reference.hyper_attention(*leaves, plan, dtype=dtype, **kwargs)
        return (o, l, *torch.autograd.grad((o, l), leaves, (d_out.to(dtype), d_lse)))

    names = ["out", "lse", "dq", "dk", "dv"]
    actual = dict(zip(names, (out, lse, *grads)))
    # The float64 oracle in the outputs' dtype (the LSE stays float64).
    oracle = {name: t if name == "lse" else t.to(actual[name].dtype)
              for name, t in zip(names, reference_run(torch.float64))}
    baseline = None if q.dtype == torch.float32 else dict(zip(names, reference_run(q.dtype)))
    assert_all_close(actual, oracle, baseline, q.dtype)


# ------------------------------------------------------------------------------------ against the reference
# (causal, B, Tq, Tk, H, Hkv, block_size, sample_size, min_seq_len): equal and unequal blocks (dense and varlen
# packing), Tq != Tk, GQA, causal with padding (T=77) and without (T=96), blocks partly covered by samples.
SHAPES = [
    (False, 2, 96, 96, 2, 1, 16, 8, 16),
    (False, 1, 37, 100, 2, 2, 16, 24, 16),
    (True, 1, 77, 77, 2, 1, 16, 8, 12),
    (True, 2, 96, 96, 2, 2, 8, 8, 24),
]
TRITON_SHAPES = [SHAPES[0], SHAPES[2]]  # the interpreter is slow: one non-causal and one causal case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "causal{}-B{}-Tq{}-Tk{}-H{}-Hkv{}-bs{}-m{}-min{}".format(*s))
def test_matches_reference_fp32(backend, shape):
    if backend == "triton" and shape not in TRITON_SHAPES and DEVICE.type == "cpu":
        pytest.skip("triton interpreter: covered by the other shapes (slow on CPU)")
    require("attention", backend, torch.float32)
    causal, b, t_q, t_k, h, h_kv, block, samples, min_len = shape
    q, k, v = make_qkv(b, t_q, t_k, h, h_kv, 16)
    plan = hyper_attention_plan(q, k, causal=causal, lsh_num_projs=3, block_size=block, sample_size=samples,
                                min_seq_len=min_len, generator=seeded())
    assert not plan.exact
    run_and_compare(q, k, v, backend, plan)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_half(backend, dtype):
    require("attention", backend, dtype)
    q, k, v = make_qkv(1, 80, 80, 2, 1, 32, dtype)
    plan = hyper_attention_plan(q, k, causal=True, lsh_num_projs=4, block_size=16, sample_size=8, min_seq_len=20,
                                generator=seeded())
    run_and_compare(q, k, v, backend, plan, softmax_scale=0.3)


def test_plan_is_reproducible_and_consistent_with_the_reference():
    q, k, v = make_qkv(1, 64, 64, 2, 1, 16)
    kwargs = dict(causal=True, lsh_num_projs=4, block_size=8, sample_size=4, min_seq_len=16)
    a = hyper_attention(q, k, v, generator=seeded(3), backend="torch", **kwargs)
    b = hyper_attention(q, k, v, generator=seeded(3), backend="torch", **kwargs)
    c = hyper_attention(q, k, v, generator=seeded(4), backend="torch", **kwargs)
    assert torch.equal(a, b)
    assert max_abs_error(a, c) > 1e-3
    # Drawing inside the call is the same as drawing the plan first with the same generator state.
    plan = hyper_attention_plan(q, k, generator=seeded(3), **kwargs)
    assert torch.equal(hyper_attention(q, k, v, plan=plan, causal=True, backend="torch"), a)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cover", ["blocks", "samples"])
def test_equals_exact_attention_when_blocks_or_samples_cover_t(backend, causal, cover):
    require("attention", backend, torch.float32)
    t = 72
    q, k, v = make_qkv(1, t, t, 2, 1, 16, requires_grad=False)
    # min_seq_len below T so that the approximation itself runs (recursion included when causal).
    block, samples = (t, 4) if cover == "blocks" else (16, t)
    out = hyper_attention(q, k, v, causal=causal, block_size=block, sample_size=samples, min_seq_len=10,
                          lsh_num_projs=5, generator=seeded(), backend=backend)
    want, _ = reference.exact_attention(q, k, v, causal=causal)
    assert relative_error(out, want) < 1e-5


def test_short_sequences_are_exact_attention():
    q, k, v = make_qkv(2, 50, 50, 2, 2, 16, requires_grad=False)
    for causal in (False, True):
        plan = hyper_attention_plan(q, k, causal=causal, min_seq_len=50)
        assert plan.exact
        out, lse = hyper_attention(q, k, v, causal=causal, min_seq_len=50, return_lse=True, backend="torch")
        want, want_lse = flashops.flash_attention(q, k, v, causal=causal, return_lse=True, backend="torch")
        assert torch.equal(out, want) and torch.equal(lse, want_lse)


# ---------------------------------------------------------------------------------------------- error
def test_error_decreases_as_blocks_and_samples_grow():
    t, trials = 256, 6
    q, k, v = make_qkv(1, t, t, 2, 2, 16, requires_grad=False)
    q = q * 2.0  # moderately peaked attention
    want, _ = reference.exact_attention(q, k, v)
    errors = []
    for size in (8, 16, 32, 64, 128):
        runs = [relative_error(hyper_attention(q, k, v, block_size=size, sample_size=size, min_seq_len=8,
                                               lsh_num_projs=4, generator=seeded(s), backend="torch"), want)
                for s in range(trials)]
        errors.append(sum(runs) / trials)
    assert all(a > 1.15 * b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_lsh_blocks_find_planted_large_entries():
    """Every query has one partner key in its direction with a large score, at a random position.
    sortLSH puts partners in the same block; uniform sampling with the same key budget misses most."""
    t, d, block, samples, trials = 256, 32, 16, 16, 4
    g = seeded(7)
    q = torch.nn.functional.normalize(torch.randn(1, t, 1, d, device=DEVICE, generator=g), dim=-1) * 4.0
    k = torch.nn.functional.normalize(torch.randn(1, t, 1, d, device=DEVICE, generator=g), dim=-1) * 4.0
    partner = torch.randperm(t, device=DEVICE, generator=g)
    k[:, partner] = q + 0.01 * torch.randn(q.shape, device=DEVICE, generator=g)
    v = torch.randn(1, t, 1, d, device=DEVICE, generator=g)
    scale = 1.0
    want, _ = reference.exact_attention(q, k, v, softmax_scale=scale)

    def hyper(projections, seed):
        return relative_error(hyper_attention(q, k, v, softmax_scale=scale, lsh_num_projs=projections,
                                              block_size=block, sample_size=samples, min_seq_len=8,
                                              generator=seeded(seed), backend="torch"), want)

    def uniform(seed):  # the sampling estimator alone with the same budget of block + samples keys per query
        m = block + samples
        idx = torch.randint(0, t, (t, m), device=DEVICE, generator=seeded(100 + seed))
        s = torch.einsum("id,imd->im", q[0, :, 0].double(), k[0, idx, 0].double()) * scale
        p = torch.softmax(s, dim=-1)
        return relative_error(torch.einsum("im,imd->id", p, v[0, idx, 0].double()), want[0, :, 0])

    with_lsh = sum(hyper(8, s) for s in range(trials)) / trials
    without_lsh = sum(hyper(0, s) for s in range(trials)) / trials
    sampling = sum(uniform(s) for s in range(trials)) / trials
    assert with_lsh < 0.4 * sampling, (with_lsh, sampling)
    assert with_lsh < 0.4 * without_lsh, (with_lsh, without_lsh)


# ---------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_output_never_depends_on_future_keys(backend):
    require("attention", backend, torch.float32)
    t, cut = 90, 53
    q, k, v = make_qkv(1, t, t, 2, 1, 16, requires_grad=False)
    kwargs = dict(causal=True, lsh_num_projs=4, block_size=8, sample_size=4, min_seq_len=12, backend=backend)
    out = hyper_attention(q, k, v, generator=seeded(), **kwargs)
    k2, v2 = k.clone(), v.clone()
    k2[:, cut:] = torch.randn_like(k2[:, cut:]) * 10
    v2[:, cut:] = torch.randn_like(v2[:, cut:]) * 10
    out2 = hyper_attention(q, k2, v2, generator=seeded(), **kwargs)
    assert torch.equal(out[:, :cut], out2[:, :cut])
    assert not torch.equal(out[:, cut:], out2[:, cut:])


# ---------------------------------------------------------------------------------------------- the plan
def test_gray_order_puts_one_bit_neighbours_next_to_each_other():
    bits = 7
    codes = torch.arange(1 << bits)
    ranks = inverse_gray(codes, bits)
    assert torch.equal(torch.sort(ranks).values, codes)  # a bijection
    by_rank = torch.empty_like(codes)
    by_rank[ranks] = codes
    flips = by_rank[1:] ^ by_rank[:-1]
    assert bool(((flips & (flips - 1)) == 0).all())  # consecutive buckets differ in exactly one bit


def test_bucket_ranks_are_angular():
    proj = torch.randn(16, 6, device=DEVICE)
    x = torch.randn(1, 10, 2, 16, device=DEVICE)
    assert torch.equal(bucket_ranks(x, proj), bucket_ranks(3.0 * x, proj))  # scale-invariant
    flipped = bucket_ranks(-x, proj)
    # -x sets the complementary bits: its Gray code is the bitwise complement.
    gray = lambda r: r ^ (r >> 1)  # noqa: E731
    assert torch.equal(gray(bucket_ranks(x, proj)) ^ gray(flipped), torch.full_like(flipped, 63))


def test_samples_lie_outside_their_block_and_are_uniform():
    # lsh_num_projs=0 keeps the keys in place, so that block i is always keys [16i, 16i + 16).
    t, block, samples, rows = 64, 16, 8, 128
    q, k, _ = make_qkv(rows // 2, t, t, 2, 2, 16, requires_grad=False)
    level = hyper_attention_plan(q, k, lsh_num_projs=0, block_size=block, sample_size=samples, min_seq_len=8,
                                 generator=seeded()).levels[0]
    assert level.k_bounds == (0, 16, 32, 48, 64) and level.sample_bounds == (0, 8, 16, 24, 32)
    assert all(abs(w - math.log(48 / 8)) < 1e-12 for w in level.log_weights)
    for i in range(4):
        picked = level.samples[:, 8 * i:8 * (i + 1)].flatten().cpu()
        own = (picked >= 16 * i) & (picked < 16 * (i + 1))
        assert not bool(own.any())
        counts = torch.bincount(picked, minlength=t).double()
        outside = torch.cat([counts[:16 * i], counts[16 * (i + 1):]])
        # chi-square against uniform over the 48 outside keys: 47 degrees of freedom, sd ~9.7
        expected = picked.numel() / 48
        chi2 = float(((outside - expected) ** 2 / expected).sum())
        assert chi2 < 47 + 6 * 9.7, chi2


# ---------------------------------------------------------------------------------------------- API
def test_bad_inputs_raise_clear_errors():
    q, k, v = make_qkv(1, 32, 32, 2, 1, 16, requires_grad=False)
    cases = [
        (lambda: hyper_attention(q[0], k, v), ValueError, "q must have 4 dimensions"),
        (lambda: hyper_attention(q, k.long(), v), TypeError, "k must have dtype"),
        (lambda: hyper_attention(q, k, v.half()), ValueError, "dtype"),
        (lambda: hyper_attention(q, k, v[:, :31]), ValueError, "k and v must have the same shape"),
        (lambda: hyper_attention(*(torch.randn(1, 32, h, 16) for h in (3, 2, 2))), ValueError,
         "multiple of the number of key/value"),
        (lambda: hyper_attention(q, k[:, :20], v[:, :20], causal=True), ValueError, "same length"),
        (lambda: hyper_attention(q, k, v, block_size=0), ValueError, "block_size must be an int >= 1"),
        (lambda: hyper_attention(q, k, v, sample_size=-1), ValueError, "sample_size must be an int >= 0"),
        (lambda: hyper_attention(q, k, v, lsh_num_projs=31), ValueError, "lsh_num_projs must be an int in [0, 30]"),
        (lambda: hyper_attention(q, k, v, lsh_num_projs=True), ValueError, "lsh_num_projs"),
        (lambda: hyper_attention(q, k, v, min_seq_len=0), ValueError, "min_seq_len must be an int >= 1"),
        (lambda: hyper_attention(q, k, v, generator=0), TypeError, "generator must be a torch.Generator"),
        (lambda: hyper_attention(q, k, v, softmax_scale="x"), TypeError, "softmax_scale must be a float"),
        (lambda: hyper_attention(q, k, v, plan="x"), TypeError, "plan must be a HyperPlan"),
        (lambda: hyper_attention(q, k, v, causal=True, plan=hyper_attention_plan(q, k)), ValueError,
         "plan was drawn for"),
        (lambda: hyper_attention(*(torch.randn(1, 8, 1, 300) for _ in range(3))), ValueError, "head dim"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            call()


def test_public_exports():
    assert flashops.hyper_attention is hyper_attention
    assert flashops.hyper_attention_plan is hyper_attention_plan
    assert isinstance(hyper_attention_plan(*make_qkv(1, 20, 20, 1, 1, 8, requires_grad=False)[:2], min_seq_len=4),
                      HyperPlan)


def test_compile_fullgraph_no_graph_break():
    q, k, v = make_qkv(1, 48, 48, 2, 1, 16)
    plan = hyper_attention_plan(q, k, causal=True, lsh_num_projs=3, block_size=8, sample_size=4, min_seq_len=12,
                                generator=seeded())

    def loss(q, k, v):
        out, lse = hyper_attention(q, k, v, causal=True, plan=plan, return_lse=True, backend="torch")
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert max_abs_error(a, b) < 1e-5

    # Drawing the plan inside the compiled region (global RNG) also traces without a graph break.
    def drawn(q, k, v):
        return hyper_attention(q, k, v, causal=True, lsh_num_projs=3, block_size=8, sample_size=4,
                               min_seq_len=12, backend="torch")

    out = torch.compile(drawn, fullgraph=True, backend="aot_eager")(q, k, v)
    exact, _ = reference.exact_attention(q, k, v, causal=True)
    assert out.shape == q.shape and relative_error(out, exact) < 1.0
