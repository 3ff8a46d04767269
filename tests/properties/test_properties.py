"""Property tests: random shapes (0, 1 and awkward primes included), dtypes and feature combinations per op,
output and every gradient against the op's reference by the package's tolerance rule (flashops.testing).

Each op is explored on every backend; the Triton interpreter is slow, so it gets a quarter of the examples
(and smaller shapes) of the torch backend. Profiles: see conftest.py.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flashops
from flashops import _dispatch
from flashops.ops.attention import reference as attention_ref
from flashops.ops.linear import reference as linear_ref
from flashops.ops.lla import reference as lla_ref
from flashops.ops.ssm import reference as ssm_ref
from flashops.testing import GRAD_FACTOR, assert_close

from ..conftest import DEVICE

BACKENDS = ["triton", "torch"]
LENGTHS = [0, 1, 2, 13, 31, 67]  # 0, 1 and primes across tile and chunk boundaries (16, 32, 64)
SMALL_LENGTHS = [0, 1, 2, 13, 31]
BATCHES = [1, 2, 1, 2, 0]  # an empty batch in a fifth of the examples (tests/invariants checks it on every op)


def _explore(backend: str, strategy, check):
    """Run ``check(example)`` on examples of ``strategy``: the profile's count on the torch backend, a
    quarter on Triton (the interpreter is slow)."""
    budget = settings().max_examples
    settings(max_examples=budget if backend != "triton" else max(2, budget // 4))(given(strategy)(check))()


def _supported(op: str, backend: str, dtype, **features) -> bool:
    return not _dispatch.get(op, backend).supports(_dispatch.Request(DEVICE, dtype, features))


def _dtypes(op: str, backend: str):
    return st.sampled_from([d for d in (torch.float32, torch.float16, torch.bfloat16)
                            if _supported(op, backend, d, head_dim=16, head_dim_k=16, head_dim_v=16)])


def _tensors(gen, dtype, *shapes, scale=1.0):
    return [(torch.randn(s, generator=gen) * scale).to(DEVICE, dtype) for s in shapes]


def _compare(name, op, reference, inputs, dtype, grad_seed=1):
    """op(*inputs) against reference(*inputs in fp32) (and, for half types, reference in the input dtype as
    the baseline), outputs and the gradients of every input."""
    def run(fn, xs, cast=None):
        leaves = [x.detach().to(cast or x.dtype).requires_grad_() for x in xs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(grad_seed)
        douts = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
        # an empty result may not be in the graph (the references build some from scratch)
        linked = [(o, d) for o, d in zip(outs, douts) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in linked], leaves, [d for _, d in linked], allow_unused=True) \
            if linked else [None] * len(leaves)
        return outs, [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]

    outs, grads = run(op, inputs)
    ref_outs, ref_grads = run(reference, inputs, torch.float32)
    low = dtype in (torch.float16, torch.bfloat16)
    base_outs, base_grads = run(lambda *xs: reference(*xs, upcast=False), inputs) if low else (None, None)
    for i, (a, r) in enumerate(zip(outs, ref_outs)):
        assert_close(f"{name} output {i}", a, r, base_outs[i] if low else None, dtype=dtype)
    for i, (a, r) in enumerate(zip(grads, ref_grads)):
        assert_close(f"{name} grad {i}", a, r, base_grads[i] if low else None, factor=GRAD_FACTOR, dtype=dtype)


# -------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention(backend):
    lengths = LENGTHS if backend == "torch" else SMALL_LENGTHS

    @st.composite
    def examples(draw):
        return dict(b=draw(st.sampled_from(BATCHES)), t_q=draw(st.sampled_from(lengths)),
                    t_k=draw(st.sampled_from(lengths)), h_kv=draw(st.sampled_from([1, 2])),
                    group=draw(st.sampled_from([1, 3])), d=draw(st.sampled_from([1, 7, 16, 31])),
                    causal=draw(st.booleans()), left=draw(st.sampled_from([-1, 0, 5])),
                    softcap=draw(st.sampled_from([0.0, 2.5])), alibi=draw(st.booleans()),
                    dtype=draw(_dtypes("attention", backend)), seed=draw(st.integers(0, 2**16)))

    def check(x):
        gen = torch.Generator().manual_seed(x["seed"])
        h = x["h_kv"] * x["group"]
        q, k, v = _tensors(gen, x["dtype"], (x["b"], x["t_q"], h, x["d"]), (x["b"], x["t_k"], x["h_kv"], x["d"]),
                           (x["b"], x["t_k"], x["h_kv"], x["d"]))
        slopes = (torch.rand(h, generator=gen) * 0.5).to(DEVICE) if x["alibi"] else None
        kwargs = dict(causal=x["causal"], window_size=(x["left"], -1), softcap=x["softcap"], alibi_slopes=slopes)

        def op(q, k, v):
            return flashops.flash_attention(q, k, v, return_lse=True, backend=backend, **kwargs)

        def ref(q, k, v, upcast=True):
            return attention_ref.attention(q, k, v, upcast=upcast, **kwargs)

        _compare("flash_attention", op, ref, [q, k, v], x["dtype"])

    _explore(backend, examples(), check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_varlen(backend):
    @st.composite
    def examples(draw):
        lengths_q = draw(st.lists(st.sampled_from(SMALL_LENGTHS), min_size=1, max_size=4))
        same = draw(st.booleans())
        lengths_k = lengths_q if same else draw(st.lists(st.sampled_from(SMALL_LENGTHS), min_size=len(lengths_q),
                                                         max_size=len(lengths_q)))
        return dict(lengths_q=lengths_q, lengths_k=lengths_k, causal=draw(st.booleans()),
                    d=draw(st.sampled_from([3, 16])), seed=draw(st.integers(0, 2**16)))

    def check(x):
        gen = torch.Generator().manual_seed(x["seed"])
        cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                      for n in (x["lengths_q"], x["lengths_k"]))
        q, k, v = _tensors(gen, torch.float32, (1, int(cu_q[-1]), 4, x["d"]), (1, int(cu_k[-1]), 2, x["d"]),
                           (1, int(cu_k[-1]), 2, x["d"]))

        def op(q, k, v):
            return flashops.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=x["causal"], return_lse=True,
                                                   backend=backend)

        def ref(q, k, v, upcast=True):
            return attention_ref.attention(q, k, v, causal=x["causal"], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           upcast=upcast)

        _compare("flash_attention_varlen", op, ref, [q, k, v], torch.float32)

    _explore(backend, examples(), check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_with_kvcache(backend):
    """Against flash_attention on each sequence's prefix: the cached keys [leftpad, cache_seqlens) then the new
    ones. Contiguous and paged caches (pages shuffled, entries past the end pointing nowhere), appending or not,
    Tq up to 5, windows, softcap, ALiBi per head or per sequence, split counts; float64 on the torch path (the
    oracle: flash_attention in float64)."""
    dtypes = [d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
              if _supported("attention_kvcache", backend, d, head_dim=16, paged=False)]

    @st.composite
    def examples(draw):
        b, t_q = draw(st.sampled_from(BATCHES)), draw(st.sampled_from([1, 2, 5]))
        t_new = draw(st.sampled_from([0, t_q]))
        page_size = draw(st.sampled_from([None, 16, 32]))
        capacity = draw(st.sampled_from([t_new + 1, 37, 80]))
        if page_size:
            capacity = -(-capacity // page_size) * page_size
        lengths = [draw(st.integers(0, capacity - t_new)) for _ in range(b)]
        causal = draw(st.booleans())
        return dict(b=b, t_q=t_q, t_new=t_new, page_size=page_size, capacity=capacity, lengths=lengths,
                    leftpad=[draw(st.integers(0, n + t_new)) for n in lengths] if draw(st.booleans()) else None,
                    h_kv=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 3])),
                    d=draw(st.sampled_from([8, 16, 40])), causal=causal,
                    window=(draw(st.sampled_from([-1, 0, 5])), -1 if causal else draw(st.sampled_from([-1, 0, 2]))),
                    softcap=draw(st.sampled_from([0.0, 2.5])), alibi=draw(st.sampled_from([None, "head", "batch"])),
                    num_splits=draw(st.sampled_from([0, 1, 3])), dtype=draw(st.sampled_from(dtypes)),
                    seed=draw(st.integers(0, 2**16)))

    def check(x):
        gen = torch.Generator().manual_seed(x["seed"])
        b, t_q, t_new, h_kv, d, dtype = x["b"], x["t_q"], x["t_new"], x["h_kv"], x["d"], x["dtype"]
        h = h_kv * x["group"]
        q, k, v = _tensors(gen, dtype, (b, t_q, h, d), (b, t_new, h_kv, d), (b, t_new, h_kv, d))
        caches = _tensors(gen, dtype, (b, x["capacity"], h_kv, d), (b, x["capacity"], h_kv, d))
        k_cache, v_cache, table = _paged(caches, x["page_size"], [n + t_new for n in x["lengths"]], gen)
        slopes = {None: None, "head": (h,), "batch": (b, h)}[x["alibi"]]
        slopes = None if slopes is None else torch.rand(slopes, generator=gen).to(DEVICE)
        lengths = torch.tensor(x["lengths"], dtype=torch.int32, device=DEVICE)
        leftpad = None if x["leftpad"] is None else torch.tensor(x["leftpad"], dtype=torch.int32, device=DEVICE)
        options = dict(causal=x["causal"], window_size=x["window"], softcap=x["softcap"])
        out, lse = flashops.flash_attention_with_kvcache(
            q, k_cache, v_cache, k if t_new else None, v if t_new else None, cache_seqlens=lengths,
            cache_leftpad=leftpad, block_table=table, alibi_slopes=slopes, num_splits=x["num_splits"],
            return_lse=True, backend=backend, **options)
        oracle = torch.float64 if dtype == torch.float64 else torch.float32
        for i in range(b):
            start = 0 if leftpad is None else x["leftpad"][i]
            keys, values = (torch.cat([c[i, :x["lengths"][i]], new[i]])[start:][None] for c, new in ((caches[0], k),
                                                                                                      (caches[1], v)))
            row_slopes = slopes[i] if x["alibi"] == "batch" else slopes
            want, want_lse = flashops.flash_attention(q[i:i + 1].to(oracle), keys.to(oracle), values.to(oracle),
                                                      alibi_slopes=row_slopes, return_lse=True, backend="torch",
                                                      **options)
            base = None
            if dtype in (torch.float16, torch.bfloat16):
                base = attention_ref.attention(q[i:i + 1], keys, values, alibi_slopes=row_slopes, upcast=False,
                                               **options)[0]
            assert_close(f"kvcache out of sequence {i}", out[i:i + 1], want, base, dtype=dtype)
            assert_close(f"kvcache lse of sequence {i}", lse[i:i + 1], want_lse.float(), dtype=torch.float32)

    _explore(backend, examples(), check)


def _paged(caches, page_size, used_lengths, gen):
    """(k_cache, v_cache, block_table) holding the logical caches ``[B, capacity, Hkv, D]``: as they are, or in
    pages of ``page_size`` in shuffled order (one spare page), block-table entries past a sequence's last used
    page naming no page."""
    if page_size is None:
        return caches[0].clone(), caches[1].clone(), None
    b, capacity = caches[0].shape[:2]
    per_sequence = capacity // page_size
    order = torch.randperm(b * per_sequence + 1, generator=gen)
    table = order[:b * per_sequence].reshape(b, per_sequence).to(DEVICE, torch.int32)
    pools = [c.new_zeros(b * per_sequence + 1, page_size, *c.shape[2:]) for c in caches]
    for pool, cache in zip(pools, caches):
        pool[table.long().flatten()] = cache.reshape(b * per_sequence, page_size, *cache.shape[2:])
    used = torch.tensor([-(-n // page_size) for n in used_lengths], device=DEVICE)
    table[torch.arange(per_sequence, device=DEVICE)[None, :] >= used[:, None]] = 10**6
    return pools[0], pools[1], table


# ----------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention(backend, gated):
    lengths = LENGTHS + [129] if backend == "torch" else SMALL_LENGTHS

    @st.composite
    def examples(draw):
        return dict(b=draw(st.sampled_from(BATCHES)), t=draw(st.sampled_from(lengths)),
                    h_kv=draw(st.sampled_from([1, 3])), group=draw(st.sampled_from([1, 2])),
                    slopes_per_kv=draw(st.booleans()), reverse=draw(st.booleans()),
                    d_k=draw(st.sampled_from([1, 5, 16])), d_v=draw(st.sampled_from([1, 7, 16])),
                    with_state=draw(st.booleans()), dtype=draw(_dtypes(flashops.ops.linear.GLA, backend)),
                    seed=draw(st.integers(0, 2**16)))

    def check(x):
        gen = torch.Generator().manual_seed(x["seed"])
        b, t, h_kv = x["b"], x["t"], x["h_kv"]
        h = h_kv * x["group"]  # GQA: query head i reads kv head i // group
        q, k, v = _tensors(gen, x["dtype"], (b, t, h, x["d_k"]), (b, t, h_kv, x["d_k"]), (b, t, h_kv, x["d_v"]))
        inputs = [q, k, v]
        if gated:
            inputs.append(F.logsigmoid(torch.randn(b, t, h_kv, x["d_k"], generator=gen) * 2).to(DEVICE) / 4)
        slope_heads = h_kv if x["slopes_per_kv"] else h
        slopes = None if gated else (torch.rand(slope_heads, generator=gen) * 0.3).to(DEVICE)
        state_heads = h_kv if gated else slope_heads
        if x["with_state"]:
            inputs.append(torch.randn(b, state_heads, x["d_k"], x["d_v"], generator=gen).to(DEVICE))

        def op(q, k, v, *rest):
            g, h0 = (rest[0], rest[1:]) if gated else (slopes, rest)
            fn = flashops.gated_linear_attention if gated else flashops.lightning_attention
            return fn(q, k, v, g, initial_state=h0[0] if h0 else None, output_final_state=True,
                      reverse=x["reverse"], backend=backend)

        def ref(q, k, v, *rest, upcast=True):
            g, h0 = (rest[0], rest[1:]) if gated else (slopes, rest)
            fn = linear_ref.gated_linear_attention if gated else linear_ref.lightning_attention
            return fn(q, k, v, g, initial_state=h0[0] if h0 else None, output_final_state=True,
                      reverse=x["reverse"], upcast=upcast)

        _compare("gated_linear_attention" if gated else "lightning_attention", op, ref, inputs, x["dtype"])

    _explore(backend, examples(), check)


# -------------------------------------------------------------------------------------------------- LLA
@pytest.mark.parametrize("backend", BACKENDS)
def test_local_linear_attention(backend):
    @st.composite
    def examples(draw):
        t_q = draw(st.sampled_from(SMALL_LENGTHS))
        return dict(b=draw(st.sampled_from(BATCHES)), t_q=t_q,
                    t_k=draw(st.sampled_from([t_q, t_q + 3])), group=draw(st.sampled_from([1, 2])),
                    d=draw(st.sampled_from([1, 4, 8])), causal=draw(st.booleans()),
                    ridge=draw(st.sampled_from([0.3, 3.0])), seed=draw(st.integers(0, 2**16)))

    def check(x):
        gen = torch.Generator().manual_seed(x["seed"])
        h = 2 * x["group"]
        q, k, v = _tensors(gen, torch.float32, (x["b"], x["t_q"], h, x["d"]), (x["b"], x["t_k"], 2, x["d"]),
                           (x["b"], x["t_k"], 2, x["d"]))
        kwargs = dict(ridge_lambda=x["ridge"], causal=x["causal"])

        def op(q, k, v):
            return flashops.local_linear_attention(q, k, v, backend=backend, cg_max_iters=64, cg_tol=1e-7, **kwargs)

        def ref(q, k, v, upcast=True):
            return lla_ref.local_linear_attention(q, k, v, upcast=upcast, **kwargs)

        _compare("local_linear_attention", op, ref, [q, k, v], torch.float32)

    _explore(backend, examples(), check)


# -------------------------------------------------------------------------------------------------- SSM
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_scans(backend):
    if not _supported("selective_scan", backend, torch.float32, state_size=3):
        pytest.skip(f"selective_scan/{backend} is not available here")

    @st.composite
    def examples(draw):
        return dict(b=draw(st.sampled_from(BATCHES)), dim=draw(st.sampled_from([1, 5])),
                    t=draw(st.sampled_from(LENGTHS if backend != "triton" else SMALL_LENGTHS)),
                    reverse=draw(st.booleans()),
                    softplus=draw(st.booleans()), groups=draw(st.sampled_from([0, 1])),
                    seed=draw(st.integers(0, 2**16)))

    def check(x):
        gen = torch.Generator().manual_seed(x["seed"])
        b, dim, t = x["b"], x["dim"], x["t"]
        a = torch.rand(b, dim, t, generator=gen).to(DEVICE)
        h_in, h0 = _tensors(gen, torch.float32, (b, dim, t), (b, dim))
        _compare("linear_scan", lambda a, h_in, h0: flashops.linear_scan(a, h_in, h0, x["reverse"], backend=backend),
                 lambda a, h_in, h0, upcast=True: ssm_ref.linear_scan(a, h_in, h0, x["reverse"]),
                 [a, h_in, h0], torch.float32)
        bc = (b, 1, 3, t) if x["groups"] else (b, 3, t)
        u, delta, z, B, C = _tensors(gen, torch.float32, (b, dim, t), (b, dim, t), (b, dim, t), bc, bc)
        A = -torch.rand(dim, 3, generator=gen).to(DEVICE) - 0.1

        def op(u, delta, z, B, C, A):
            return flashops.selective_scan(u, delta, A, B, C, z=z, delta_softplus=x["softplus"],
                                           return_last_state=True, backend=backend)

        def ref(u, delta, z, B, C, A, upcast=True):
            return ssm_ref.selective_scan(u, delta, A, B, C, z=z, delta_softplus=x["softplus"],
                                          return_last_state=True)

        _compare("selective_scan", op, ref, [u, delta.abs() * 0.5, z, B, C, A], torch.float32)

    _explore(backend, examples(), check)
