"""KV-cache attention: both backends against the reference for every option, the in-place append slot by slot,
NaN in unwritten slots, split-count choice, bad inputs, opcheck, torch.compile and (on a GPU) CUDA graphs.

Every cache here is filled with NaN except the slots a sequence holds: a NaN that reaches an output is a bug.
"""


import pytest
import torch

import flashops
from flashops import _dispatch
from flashops.ops.attention import pytorch_kvcache, triton_kvcache
from flashops.ops.attention.reference import attention_with_kvcache as reference
from flashops.testing import assert_close

from ..conftest import DEVICE, ON_GPU

BACKENDS = ["triton", "torch"]


def require(backend, dtype, **features):
    features.setdefault("head_dim", 32)
    reasons = _dispatch.get("attention_kvcache", backend).supports(_dispatch.Request(DEVICE, dtype, features))
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def make_cache(b, capacity, h_kv, d, seqlens, *, t_new=0, leftpad=None, page_size=None, shared_pages=0,
               dtype=torch.float32):
    """(k_cache, v_cache, block_table): sequence b holds random keys in [leftpad[b], seqlens[b]), NaN everywhere
    else. Paged: pages of all sequences shuffled, two spare pages, entries past the pages a sequence uses after
    appending ``t_new`` tokens set to an id that does not exist; the first ``shared_pages`` pages of sequence 1
    are those of sequence 0."""
    leftpad = leftpad or [0] * b
    logical = [torch.full((2, capacity, h_kv, d), float("nan"), device=DEVICE, dtype=dtype) for _ in range(b)]
    for i in range(b):
        for cache in logical[i]:
            cache[leftpad[i]:seqlens[i]] = torch.randn(seqlens[i] - leftpad[i], h_kv, d, device=DEVICE).to(dtype)
    if shared_pages:
        logical[1][:, :shared_pages * page_size] = logical[0][:, :shared_pages * page_size]
    if page_size is None:
        return torch.stack([c[0] for c in logical]), torch.stack([c[1] for c in logical]), None
    max_pages = capacity // page_size
    num_pages = b * max_pages + 2
    order = torch.randperm(num_pages, device=DEVICE).to(torch.int32)
    table = order[:b * max_pages].reshape(b, max_pages).clone()
    table[1, :shared_pages] = table[0, :shared_pages]
    pages = torch.full((2, num_pages, page_size, h_kv, d), float("nan"), device=DEVICE, dtype=dtype)
    for i in range(b):
        used = -(-(seqlens[i] + t_new) // page_size)
        for p in range(max_pages):
            if p < used:
                pages[:, int(table[i, p])] = logical[i][:, p * page_size:(p + 1) * page_size]
            else:
                table[i, p] = 10**6  # never read
    return pages[0], pages[1], table


def run_and_compare(backend, *, b=3, t_q=1, h=8, h_kv=2, d=32, capacity=96, seqlens=(0, 1, 95), t_new=1,
                    leftpad=None, page_size=None, shared_pages=0, dtype=torch.float32, **kwargs):
    """Run the op (cache appended in place) and the reference on a copy; compare out, lse and the caches
    bit for bit. Returns (out, lse)."""
    require(backend, dtype, head_dim=d, paged=page_size is not None)
    num_splits = kwargs.pop("num_splits", 0)
    seqlens = list(seqlens)
    k_cache, v_cache, table = make_cache(b, capacity, h_kv, d, seqlens, t_new=t_new, leftpad=leftpad,
                                         page_size=page_size, shared_pages=shared_pages, dtype=dtype)
    q = torch.randn(b, t_q, h, d, device=DEVICE).to(dtype)
    k = torch.randn(b, t_new, h_kv, d, device=DEVICE).to(dtype) if t_new else None
    v = torch.randn(b, t_new, h_kv, d, device=DEVICE).to(dtype) if t_new else None
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    pad = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32, device=DEVICE)
    common = dict(cache_seqlens=lengths, cache_leftpad=pad, block_table=table, **kwargs)
    oracle = torch.float64 if dtype == torch.float64 else torch.float32  # the reference computes in it
    want_out, want_lse, want_k, want_v = reference(*(None if x is None else x.to(oracle)
                                                     for x in (q, k_cache, v_cache, k, v)),
                                                   upcast=dtype != torch.float64, **common)
    base = None
    if dtype != torch.float32:
        base = reference(q, k_cache, v_cache, k, v, upcast=False, **common)[0]
    out, lse = flashops.flash_attention_with_kvcache(q, k_cache, v_cache, k, v, return_lse=True, backend=backend,
                                                     num_splits=num_splits, **common)
    assert torch.isfinite(out).all(), "NaN from an unwritten slot reached the output"
    # The reference normalizes by an fp32 log-sum-exp even in fp64: fp64 is held to the fp32 bound.
    assert_close("out", out, want_out, base, dtype=torch.float32 if dtype == torch.float64 else dtype)
    assert_close("lse", lse, want_lse)
    for name, got, want in (("k_cache", k_cache, want_k), ("v_cache", v_cache, want_v)):
        assert torch.equal(got.view(torch.uint8), want.to(dtype).view(torch.uint8)), f"{name} differs"
    return out, lse


# ------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_kv", [8, 2, 1], ids=lambda n: f"group{8 // n}")
def test_contiguous_decode_lengths_0_1_full(backend, h_kv):
    # Appending one token to caches holding 0, 1 and capacity - 1 tokens; then attending without appending
    # to caches holding 0 (nothing visible), 1 and capacity tokens.
    run_and_compare(backend, h_kv=h_kv, seqlens=(0, 1, 95), t_new=1, num_splits=3)
    out, lse = run_and_compare(backend, h_kv=h_kv, seqlens=(0, 1, 96), t_new=0)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size,shared", [(16, 0), (32, 1), (48, 2)])
def test_paged_shuffled_and_shared_pages(backend, page_size, shared):
    seqlens = (2 * page_size + 3, 2 * page_size + 1, 5 * page_size - 4)
    run_and_compare(backend, capacity=5 * page_size, seqlens=seqlens, t_new=4, t_q=4, page_size=page_size,
                    shared_pages=shared, num_splits=2, d=40)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_speculative_queries_are_bottom_right_causal(backend, paged):
    # Tq = 4 new tokens, GQA 4: 16 rows in one tile; one sequence has fewer keys than queries.
    run_and_compare(backend, t_q=4, t_new=4, seqlens=(0, 30, 60), capacity=64, page_size=16 if paged else None,
                    num_splits=3)
    # Without appending: more queries than visible keys for the first sequence.
    run_and_compare(backend, t_q=4, t_new=0, seqlens=(2, 30, 64), capacity=64, page_size=16 if paged else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(8, 0), (20, -1), (0, 0)])
def test_window_and_left_padding(backend, window):
    run_and_compare(backend, t_q=2, t_new=2, seqlens=(40, 9, 70), leftpad=[30, 0, 3], capacity=80,
                    window_size=window, causal=False, num_splits=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_alibi(backend):
    run_and_compare(backend, t_q=2, t_new=1, seqlens=(10, 50, 33), softcap=3.0,
                    alibi_slopes=torch.rand(8, device=DEVICE), num_splits=4, page_size=16)
    run_and_compare(backend, t_q=1, t_new=1, seqlens=(10, 50, 33), softmax_scale=0.3,
                    alibi_slopes=torch.rand(3, 8, device=DEVICE), leftpad=[4, 0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_causal_new_tokens_see_each_other(backend):
    run_and_compare(backend, t_q=3, t_new=3, seqlens=(0, 20, 40), causal=False, capacity=48)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [0, 1, 5, 16])
def test_split_counts_agree(backend, num_splits):
    # 16 splits for at most 96 keys: many splits see nothing, for every sequence.
    run_and_compare(backend, seqlens=(3, 60, 90), t_new=2, t_q=2, num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_two_reference_rule(backend):
    run_and_compare(backend, dtype=torch.float16, seqlens=(5, 64, 90), t_new=1, page_size=32, num_splits=2)


@pytest.mark.skipif(not ON_GPU, reason="the Triton interpreter cannot compute in bfloat16")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_on_gpu(backend):
    run_and_compare(backend, dtype=torch.bfloat16, d=128, seqlens=(5, 1000, 4000), capacity=4096, t_new=1,
                    page_size=64)


@pytest.mark.parametrize("page_size", [None, 16])
def test_torch_path_in_many_chunks(page_size, monkeypatch):
    # Chunks of 20 keys (not page aligned) and of few queries: the online softmax across chunks, the page
    # gather at chunk offsets and the query chunking (the memory bound of long query blocks).
    monkeypatch.setattr(pytorch_kvcache, "TILE_ELEMENTS", 3 * 8 * 2 * 20)
    monkeypatch.setattr(pytorch_kvcache, "MIN_KEY_CHUNK", 20)
    run_and_compare("torch", t_q=5, t_new=3, seqlens=(0, 37, 77), leftpad=[0, 5, 2], capacity=80,
                    page_size=page_size, window_size=(30, 0), alibi_slopes=torch.rand(8, device=DEVICE))


def test_float64_on_the_torch_path():
    run_and_compare("torch", dtype=torch.float64, seqlens=(3, 20, 40), t_new=2, t_q=2)


def test_large_query_tile_spans_several_row_blocks():
    # Tq * G = 72 rows > the 64-row tile: three row blocks on the Triton backend.
    run_and_compare("triton", t_q=9, t_new=9, h=8, h_kv=1, seqlens=(0, 20, 50), capacity=64, num_splits=2)


# ------------------------------------------------------------------------------------------- append, NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_append_changes_exactly_the_new_slots(backend, paged):
    require(backend, torch.float32, paged=paged)
    b, h_kv, d, t_new = 3, 2, 16, 3
    k_cache, v_cache, table = make_cache(b, 64, h_kv, d, [10, 0, 61], t_new=t_new, page_size=16 if paged else None)
    before = k_cache.clone(), v_cache.clone()
    k, v = (torch.randn(b, t_new, h_kv, d, device=DEVICE) for _ in range(2))
    lengths = torch.tensor([10, 0, 61], dtype=torch.int32, device=DEVICE)
    flashops.flash_attention_with_kvcache(torch.randn(b, 1, 4, d, device=DEVICE), k_cache, v_cache, k, v,
                                          cache_seqlens=lengths, block_table=table, backend=backend)
    expected_slots = set()
    for i, n in enumerate(lengths.tolist()):
        for t in range(t_new):
            p = n + t
            slot = (int(table[i, p // 16]), p % 16) if paged else (i, p)
            expected_slots.add(slot)
            assert torch.equal(k_cache[slot], k[i, t]) and torch.equal(v_cache[slot], v[i, t])
    for cache, old in zip((k_cache, v_cache), before):
        changed = (cache.view(torch.int32) != old.view(torch.int32)).flatten(2).any(-1).nonzero().tolist()
        assert {tuple(s) for s in changed} == expected_slots


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_written_key_reaches_only_its_group(backend):
    require(backend, torch.float32, paged=True)
    b, h, h_kv, d = 2, 4, 2, 16
    k_cache, v_cache, table = make_cache(b, 64, h_kv, d, [30, 30], page_size=16)
    k_cache[int(table[0, 1]), 3, 1, 0] = float("nan")  # sequence 0, position 19, kv head 1
    q = torch.randn(b, 1, h, d, device=DEVICE)
    lengths = torch.tensor([30, 30], dtype=torch.int32, device=DEVICE)
    out = flashops.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table,
                                                num_splits=3, backend=backend)
    nan = torch.isnan(out).any(-1)  # [B, Tq, H]
    assert nan[0, 0, 2:].all() and not nan[0, 0, :2].any() and not nan[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_no_queries(backend):
    require(backend, torch.float32)
    k_cache = torch.zeros(0, 16, 1, 16, device=DEVICE)
    out, lse = flashops.flash_attention_with_kvcache(torch.zeros(0, 1, 2, 16, device=DEVICE), k_cache, k_cache,
                                                     cache_seqlens=0, return_lse=True, backend=backend)
    assert out.shape == (0, 1, 2, 16) and lse.shape == (0, 2, 1)
    k_cache = torch.randn(2, 16, 1, 16, device=DEVICE)
    out = flashops.flash_attention_with_kvcache(torch.zeros(2, 0, 2, 16, device=DEVICE), k_cache, k_cache,
                                                cache_seqlens=3, backend=backend)
    assert out.shape == (2, 0, 2, 16)


def test_int_cache_seqlens_and_transposed_cache_views():
    # A [B, Hkv, T, D] buffer (transformers' layout) read through a transposed view, lengths as an int.
    cache = torch.randn(2, 2, 40, 16, device=DEVICE)
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    out = flashops.flash_attention_with_kvcache(q, cache.transpose(1, 2), cache.transpose(1, 2), cache_seqlens=33)
    want = flashops.flash_attention(q, cache.transpose(1, 2)[:, :33], cache.transpose(1, 2)[:, :33], softmax_scale=0.3)
    assert_close("out", out, flashops.flash_attention(q, cache.transpose(1, 2)[:, :33],
                                                      cache.transpose(1, 2)[:, :33]))
    # int64 lengths (what torch.tensor makes) and SDPA's scale= spelling.
    lengths = torch.tensor([33, 33], device=DEVICE)
    assert_close("int64, scale=", flashops.flash_attention_with_kvcache(
        q, cache.transpose(1, 2), cache.transpose(1, 2), cache_seqlens=lengths, scale=0.3), want)


# --------------------------------------------------------------------------------------------- num_splits
def test_choose_num_splits_from_shapes():
    h200_sms = 132
    # B = 1, 8 kv heads, 128k cache: about two waves of programs.
    assert triton_kvcache.choose_num_splits(8, 131072, h200_sms) == 33
    # Enough programs already: no split.
    assert triton_kvcache.choose_num_splits(64 * 8, 131072, h200_sms) == 1
    # Short caches: at least 128 keys per split.
    assert triton_kvcache.choose_num_splits(8, 1024, h200_sms) == 8
    assert triton_kvcache.choose_num_splits(8, 100, h200_sms) == 1
    # MQA at B = 1: capped.
    assert triton_kvcache.choose_num_splits(1, 1 << 20, h200_sms) == triton_kvcache.MAX_SPLITS


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    cache = torch.randn(2, 32, 2, 16, device=DEVICE)
    pages = torch.randn(6, 16, 2, 16, device=DEVICE)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    call = flashops.flash_attention_with_kvcache
    with pytest.raises(ValueError, match=r"cache_seqlens \+ Tnew .* must lie in \[0, 32\]"):
        call(q, cache, cache, q[:, :, :2], q[:, :, :2], cache_seqlens=torch.tensor([3, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table entries of the pages in use must lie in \\[0, 6\\)"):
        call(q, pages, pages, cache_seqlens=20, block_table=torch.tensor([[0, 1], [2, 7]], dtype=torch.int32))
    with pytest.raises(ValueError, match="page size .* multiple of 16, got 24"):
        call(q, pages[:, :12].repeat(1, 2, 1, 1), pages[:, :12].repeat(1, 2, 1, 1), cache_seqlens=3,
             block_table=table)
    with pytest.raises(TypeError, match=r"block_table must have dtype int32 \(or int64\), got torch.int16"):
        call(q, pages, pages, cache_seqlens=3, block_table=table.short())
    with pytest.raises(ValueError, match=r"block_table must have shape \(2, any\)"):
        call(q, pages, pages, cache_seqlens=3, block_table=table[:1])
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        call(q, cache, cache, cache_seqlens=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="softmax_scale= or its alias scale="):
        call(q, cache, cache, cache_seqlens=3, softmax_scale=0.5, scale=0.5)
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(2\)"):
        call(q, cache, cache, cache_seqlens=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad must lie in"):
        call(q, cache, cache, cache_seqlens=4, cache_leftpad=torch.tensor([5, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        call(q, cache.int(), cache, cache_seqlens=3)
    with pytest.raises(ValueError, match="dtype"):
        call(q, cache.half(), cache.half(), cache_seqlens=3)
    with pytest.raises(ValueError, match="k and v must be given together"):
        call(q, cache, cache, q[:, :, :2], cache_seqlens=3)
    with pytest.raises(ValueError, match=r"k must have shape \[2, Tnew, 2, 16\]"):
        call(q, cache, cache, q, q, cache_seqlens=3)
    with pytest.raises(ValueError, match="one sequence per batch entry of q"):
        call(q, cache[:1], cache[:1], cache_seqlens=3)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads in k_cache"):
        call(q[:, :, :3], cache, cache, cache_seqlens=3)
    with pytest.raises(ValueError, match="num_splits must be an int >= 0"):
        call(q, cache, cache, cache_seqlens=3, num_splits=-1)
    with pytest.raises(RuntimeError, match="inference-only"):
        call(q.clone().requires_grad_(), cache, cache, cache_seqlens=3)
    with torch.no_grad():  # the same call is fine without autograd
        call(q.clone().requires_grad_(), cache, cache, cache_seqlens=3)


# -------------------------------------------------------------------------------------- torch integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require(backend, torch.float32, head_dim=16)
    q = torch.randn(2, 2, 4, 16, device=DEVICE)
    cache = torch.randn(2, 48, 2, 16, device=DEVICE)
    k = torch.randn(2, 2, 2, 16, device=DEVICE)
    lengths = torch.tensor([3, 40], dtype=torch.int32, device=DEVICE)
    args = (q, cache, cache.clone(), k, k.clone(), lengths, None, None, None, 0.25, None, 0, 0.0, 2, backend)
    torch.library.opcheck(torch.ops.flashops.attention_kvcache.default, args)


def test_compile_fullgraph_appends_like_eager():
    b, d = 2, 16
    lengths = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)

    def step(q, k_cache, v_cache, k, v, lengths):
        out = flashops.flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                    softcap=4.0, num_splits=2)
        return out * 2

    caches = [torch.randn(b, 32, 2, d, device=DEVICE) for _ in range(2)]
    q, k, v = torch.randn(b, 1, 4, d, device=DEVICE), *(torch.randn(b, 1, 2, d, device=DEVICE) for _ in range(2))
    eager_caches = [c.clone() for c in caches]
    want = step(q, *eager_caches, k, v, lengths)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, *caches, k, v, lengths)
    assert_close("out", got, want)
    for got_cache, want_cache in zip(caches, eager_caches):
        assert torch.equal(got_cache, want_cache)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_replays_for_new_lengths(paged):
    b, h, h_kv, d, capacity = 4, 16, 2, 128, 2048
    k_cache, v_cache, table = make_cache(b, capacity, h_kv, d, [capacity - 1] * b, page_size=64 if paged else None,
                                         dtype=torch.float16)
    q = torch.randn(b, 1, h, d, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(b, 1, h_kv, d, device=DEVICE, dtype=torch.float16) for _ in range(2))
    lengths = torch.tensor([0, 1, 700, capacity - 1], dtype=torch.int32, device=DEVICE)
    call = dict(cache_seqlens=lengths, block_table=table, softcap=30.0)
    flashops.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, **call)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flashops.flash_attention_with_kvcache(q, k_cache, v_cache, k, v, **call)
    for new_lengths in ([5, 9, 1500, 2], [capacity - 1, 0, 64, 63]):
        lengths.copy_(torch.tensor(new_lengths, dtype=torch.int32))
        eager_k, eager_v = k_cache.clone(), v_cache.clone()
        want = flashops.flash_attention_with_kvcache(q, eager_k, eager_v, k, v, **call)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert torch.equal(out, want) and torch.equal(k_cache, eager_k)
