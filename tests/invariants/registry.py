"""The registry of the invariant suite: every public op (and variant) with the backends it runs on.

An entry (:class:`Case`) says how to build inputs of a given batch size and length (``make``), how to call
the op on a backend (``call``), and where its masks are (``sites``): each :class:`Site` names input entries
to poison with NaN/Inf and the output entries that may change because of them (``changes``). A site whose
``changes`` is empty is *masked out*: no output depends on those entries. See ``test_invariants.py`` for what
is checked.

Adding an op is one entry in ``CASES``::

    Case("my_op", backends=("triton", "torch"), length=40,
         make=lambda b, t, dtype, device: dict(q=..., k=..., v=...),
         call=lambda x, backend: flashops.my_op(x["q"], x["k"], x["v"], backend=backend),
         sites=lambda x: [future(x, ("q", "k", "v"), time_dim=1, outputs={0: 1})])

``make`` returns a dict of inputs; floating/complex tensors among them get gradients unless named in
``constants``. ``call`` returns a tensor or a tuple (None entries allowed). ``empty`` lists which of
"batch"/"length" may be 0 (the op must then still run and give finite results). ``fp64_backends`` are the
backends that compute float64 in float64 (gradcheck runs there). ``grad=False`` marks inference-only ops.
``atomic_backends`` are those whose backward adds with atomics (not bitwise reproducible; they decline under
``torch.use_deterministic_algorithms(True)``). ``reference(x, backend)`` computes the same outputs another way
(checked by the tolerance rule). ``world > 1``: the case runs in a process group of that size (see the
distributed section below).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

import flashops
from flashops import nn as fnn

ATTENTION_BACKENDS = ("triton", "torch")
# The forced-only CUDA kernels (csrc/cuda): on a GPU for real; without one, tests/conftest.py runs their sources
# through the host emulator (a test parametrized with backend="cuda"), or they skip with the reason.
CUDA = ("cuda",)
SCAN_BACKENDS = CUDA + ("triton", "cpp", "torch")
NO_BACKEND = ("default",)  # plain PyTorch ops without dispatch


@dataclass(frozen=True)
class Site:
    """Input entries to poison (name -> index) and the output entries allowed to change (output position ->
    index; ``...`` for the whole output). Empty ``changes``: the entries are masked out. ``grads`` (input name ->
    index, ``...`` for all of it; a name not listed: none of it): the only gradient entries the poison may change
    in the backward of a loss on every output (e.g. a sequence of a varlen batch, a problem of its own: its own
    entries); None: not checked."""

    name: str
    inputs: dict
    changes: dict = field(default_factory=dict)
    grads: Optional[dict] = None


@dataclass(frozen=True)
class Case:
    name: str
    backends: tuple
    make: Callable
    call: Callable
    sites: Callable = lambda x: []
    length: int = 40
    batch: int = 2
    constants: tuple = ()
    empty: tuple = ("batch", "length")
    fp64_backends: tuple = ("torch",)
    grad: bool = True
    atomic_backends: tuple = ()
    reference: Optional[Callable] = None
    world: int = 1


# ------------------------------------------------------------------------------------------------ helpers
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype, device, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def crandn(*shape, dtype, device, gen):
    """Complex normal; ``dtype`` is the real dtype (fp32 -> complex64, fp64 -> complex128)."""
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    return torch.complex(randn(*shape, dtype=torch.float64, device="cpu", gen=gen),
                         randn(*shape, dtype=torch.float64, device="cpu", gen=gen)).to(device=device, dtype=cdt)


def along(dim: int, index) -> tuple:
    """Index ``index`` (a slice or int) along dimension ``dim`` (>= 0)."""
    return (slice(None),) * dim + (index,)


def future(x: dict, names, time_dim: int, outputs: dict, start=None) -> Site:
    """Causal site: inputs ``names`` at time >= t0 may change only outputs at time >= t0 (``outputs``:
    output position -> its time dim, or None for an output without time, e.g. a final state)."""
    length = x[names[0]].shape[time_dim]
    t0 = length // 2 + 1 if start is None else start
    return Site(f"future t>={t0}", {n: along(time_dim, slice(t0, None)) for n in names},
                {i: (... if d is None else along(d, slice(t0, None))) for i, d in outputs.items()})


@contextlib.contextmanager
def forced_backend(spec: str):
    """FLASHOPS_BACKEND=spec for ops called inside (modules pass no backend argument)."""
    old = os.environ.get("FLASHOPS_BACKEND")
    os.environ["FLASHOPS_BACKEND"] = spec
    try:
        yield
    finally:
        if old is None:
            del os.environ["FLASHOPS_BACKEND"]
        else:
            os.environ["FLASHOPS_BACKEND"] = old


def qkv(b, t, dtype, device, heads=2, kv_heads=1, dim=16):
    g = _gen()
    return dict(q=randn(b, t, heads, dim, dtype=dtype, device=device, gen=g),
                k=randn(b, t, kv_heads, dim, dtype=dtype, device=device, gen=g),
                v=randn(b, t, kv_heads, dim, dtype=dtype, device=device, gen=g))


# -------------------------------------------------------------------------------------------- attention
def _attention_cases():
    def flash(x, backend):
        return flashops.flash_attention(x["q"], x["k"], x["v"], causal=True, window_size=(7, -1), softcap=3.0,
                                        alibi_slopes=x["slopes"], backend=backend)

    def flash_make(b, t, dtype, device):
        return dict(qkv(b, t, dtype, device), slopes=torch.tensor([0.25, 0.5], device=device))

    def flash_sites(x):
        t = x["q"].shape[1]
        if t < 12:
            return []
        # the left window: key 3 is seen only by queries 3 .. 3 + 7
        window = Site("left window", {"k": along(1, 3), "v": along(1, 3)}, {0: along(1, slice(3, 11))})
        return [future(x, ("q", "k", "v"), 1, {0: 1}), window]

    def varlen_make(b, t, dtype, device):
        cu = torch.tensor([0, *itertools.accumulate([t // 3, 0, t - t // 3])], dtype=torch.int32, device=device)
        return dict(qkv(1, t, dtype, device, heads=2, kv_heads=2), cu=cu)

    def varlen(x, backend):
        return flashops.flash_attention_varlen(x["q"], x["k"], x["v"], x["cu"], x["cu"], causal=True,
                                               backend=backend)

    def varlen_sites(x):
        cu = x["cu"].tolist()
        if len(cu) < 4 or cu[1] == 0:
            return []
        first = slice(0, cu[1])  # a whole sequence changes only its own rows
        sequence0 = {n: along(1, first) for n in ("q", "k", "v")}
        return [Site("sequence 0", sequence0, {0: along(1, first)}, grads=sequence0),
                future(x, ("q", "k", "v"), 1, {0: 1}, start=cu[-1] - 5)]

    def sparse_make(b, t, dtype, device):
        blocks = -(-t // 16)
        mask = torch.ones(1, 1, blocks, blocks, dtype=torch.bool, device=device).tril()
        if blocks > 2:
            mask[..., :, 1] = False  # key block 1: no query sees it
            mask[..., 2, :] = False  # query block 2 sees no key
        return dict(qkv(b, t, dtype, device), block_mask=mask)

    def sparse(x, backend):
        return flashops.block_sparse_attention(x["q"], x["k"], x["v"], x["block_mask"], block_size=(16, 16),
                                               backend=backend)

    def sparse_sites(x):
        if x["block_mask"].shape[-1] <= 2:
            return []
        return [Site("masked blocks", {"k": along(1, slice(16, 32)), "v": along(1, slice(16, 32)),
                                       "q": along(1, slice(32, 48))})]

    def padded_make(b, t, dtype, device):
        g = _gen(1)
        x = {n: randn(b, 2, t, 16, dtype=dtype, device=device, gen=g) for n in ("query", "key", "value")}
        mask = torch.ones(b, 1, t, t, dtype=torch.bool, device=device).tril()
        if b and t > 5:
            mask[0, ..., :5] = False  # left padding of the first sequence: its queries 0..4 see nothing
        return dict(x, mask=mask)

    def padded(x, backend):
        return flashops.sdpa(x["query"], x["key"], x["value"], attn_mask=x["mask"], backend=backend)

    def padded_sites(x):
        b, _, t, _ = x["query"].shape
        if not b or t <= 5:
            return []
        pad = (0, slice(None), slice(0, 5))
        return [Site("left padding", {"query": pad, "key": pad, "value": pad}),
                future(x, ("query", "key", "value"), 2, {0: 2})]

    def topleft_make(b, t, dtype, device):
        g = _gen(2)
        return dict(query=randn(b, 2, t, 16, dtype=dtype, device=device, gen=g),
                    key=randn(b, 2, t + 9, 16, dtype=dtype, device=device, gen=g),
                    value=randn(b, 2, t + 9, 12, dtype=dtype, device=device, gen=g))

    def topleft(x, backend):
        return flashops.sdpa(x["query"], x["key"], x["value"], is_causal=True, scale=0.3, backend=backend)

    def topleft_sites(x):
        t = x["query"].shape[2]
        beyond = along(2, slice(t, None))  # keys after the last query: nobody sees them (top-left causal)
        return [Site("keys past L", {"key": beyond, "value": beyond})] + (
            [future(x, ("query", "key", "value"), 2, {0: 2})] if t > 2 else [])

    def float_mask_make(b, t, dtype, device):
        g = _gen(3)
        x = {n: randn(b, 3, t, 8, dtype=dtype, device=device, gen=g) for n in ("query", "key", "value")}
        bias = randn(1, 3, t, t, dtype=dtype, device=device, gen=g)
        if t > 4:
            bias[..., t - 4:] = float("-inf")  # the last 4 keys are masked for every query
        return dict(x, mask=bias)

    def float_mask(x, backend):
        return flashops.sdpa(x["query"], x["key"], x["value"], attn_mask=x["mask"], backend=backend)

    def float_mask_sites(x):
        t = x["query"].shape[2]
        if t <= 4:
            return []
        last = along(2, slice(t - 4, None))
        return [Site("-inf columns", {"key": last, "value": last})]

    def mha_make(b, t, dtype, device):
        g = _gen(4)
        padding = torch.zeros(b, t, dtype=torch.bool, device=device)
        if b and t > 3:
            padding[-1, -3:] = True
        return dict(query=randn(b, t, 16, dtype=dtype, device=device, gen=g),
                    key=randn(b, t, 16, dtype=dtype, device=device, gen=g),
                    value=randn(b, t, 16, dtype=dtype, device=device, gen=g), padding=padding)

    def mha(x, backend):
        torch.manual_seed(0)
        module = fnn.MultiheadAttention(16, 2, batch_first=True).to(x["query"].device, x["query"].dtype)
        with forced_backend(f"attention={backend}"):
            return module(x["query"], x["key"], x["value"], key_padding_mask=x["padding"], need_weights=True)

    def mha_sites(x):
        b, t, _ = x["query"].shape
        if not b or t <= 3:
            return []
        pad = (b - 1, slice(t - 3, None))
        return [Site("key padding", {"key": pad, "value": pad})]

    def hyper_make(causal):
        def make(b, t, dtype, device):
            x = qkv(b, t, dtype, device)
            plan = flashops.hyper_attention_plan(x["q"], x["k"], causal=causal, block_size=8, sample_size=8,
                                                 min_seq_len=16, generator=torch.Generator(device).manual_seed(0))
            return dict(x, plan=plan)
        return make

    def hyper(causal):
        return lambda x, backend: flashops.hyper_attention(x["q"], x["k"], x["v"], causal=causal, plan=x["plan"],
                                                           backend=backend)

    return [
        Case("flash_attention[causal,window,softcap,alibi,gqa]", ATTENTION_BACKENDS, flash_make, flash,
             flash_sites, length=45, constants=("slopes",)),
        Case("flash_attention_varlen[causal]", ATTENTION_BACKENDS, varlen_make, varlen, varlen_sites,
             length=45, empty=("length",)),
        Case("block_sparse_attention", ATTENTION_BACKENDS, sparse_make, sparse, sparse_sites, length=48),
        Case("sdpa[bool mask, left padding]", ATTENTION_BACKENDS, padded_make, padded, padded_sites),
        Case("sdpa[is_causal, L<S, Ev!=E, scale]", ATTENTION_BACKENDS, topleft_make, topleft, topleft_sites),
        Case("sdpa[float mask with grad]", ("torch",), float_mask_make, float_mask, float_mask_sites),
        Case("nn.MultiheadAttention[key_padding_mask, need_weights]", ATTENTION_BACKENDS, mha_make, mha, mha_sites,
             length=20),
        Case("hyper_attention[causal, plan]", ATTENTION_BACKENDS, hyper_make(True), hyper(True),
             lambda x: [future(x, ("q", "k", "v"), 1, {0: 1}, start=x["q"].shape[1] - 9)] if x["q"].shape[1] > 16
             else [], length=32),
        # Non-causal plans run the same exact-attention calls as the causal one's off-diagonal pieces, so the
        # Triton path is covered above; here the torch path only (the interpreter is slow).
        Case("hyper_attention[plan]", ("torch",), hyper_make(False), hyper(False), length=32),
    ]


# ----------------------------------------------------------------------------------------- KV-cache decode
KV_NEW = 3  # new tokens (and queries) per call, as in speculative decoding: query t sees new tokens 0..t
KV_WINDOW = 7


def _kv_slots(x: dict, positions: torch.Tensor):
    """Index of the cache entries holding the logical ``positions`` (bool ``[B, capacity]``): the mask itself for
    a contiguous cache, (page, row) entries through the block table for a paged one (positions whose table entry
    names no page are left out: nothing is stored there)."""
    table = x.get("block_table")
    if table is None:
        return positions
    pages, page_size = x["k_cache"].shape[:2]
    b, p = positions.nonzero(as_tuple=True)
    page = table[b, p // page_size].long()
    real = page < pages
    slots = torch.zeros(pages, page_size, dtype=torch.bool, device=positions.device)
    slots[page[real], (p % page_size)[real]] = True
    return slots


def _kv_positions(x: dict, lo, hi) -> torch.Tensor:
    """bool ``[B, capacity]``: the logical positions ``lo[b] <= p < hi[b]``."""
    p = torch.arange(x["capacity"], device=x["q"].device)[None, :]
    return (p >= lo[:, None]) & (p < hi[:, None])


def kv_cache_site(name: str, x: dict, positions, changes=None, values_first=False) -> Site:
    """Poison both caches at the logical ``positions``: the returned caches (outputs 2, 3) keep the poison there;
    ``changes`` names the other outputs that may change (none: no query sees these positions)."""
    slots = _kv_slots(x, positions)
    names = ("v_cache", "k_cache") if values_first else ("k_cache", "v_cache")
    return Site(name, {n: slots for n in names}, {2: slots, 3: slots, **(changes or {})})


def _kvcache_cases():
    def make(paged):
        def build(b, t, dtype, device):
            g = _gen(17)
            x = dict(q=randn(b, KV_NEW, 4, 16, dtype=dtype, device=device, gen=g),
                     k=randn(b, KV_NEW, 2, 16, dtype=dtype, device=device, gen=g),
                     v=randn(b, KV_NEW, 2, 16, dtype=dtype, device=device, gen=g), capacity=t)
            # Sequences: a long one (several 32-key tiles under the interpreter), a short one, only new tokens.
            x["lengths"] = torch.tensor([t - KV_NEW - 4, t // 3, 0], dtype=torch.int32, device=device)[:b]
            if paged:  # pages of 16 in shuffled order and two spare ones; entries past a sequence's end: no page
                page_size, per_sequence = 16, -(-t // 16)
                pages = b * per_sequence + 2
                order = torch.randperm(pages, generator=g).to(device=device, dtype=torch.int32)
                table = order[: b * per_sequence].reshape(b, per_sequence).clone()
                used = -(-(x["lengths"].long() + KV_NEW) // page_size)
                table[torch.arange(per_sequence, device=device)[None, :] >= used[:, None]] = 10**6
                x.update(block_table=table, capacity=per_sequence * page_size,
                         alibi=torch.tensor([0.3, 0.1, 0.2, 0.4], device=device))
                shape = (pages, page_size, 2, 16)
            else:
                x["leftpad"] = torch.tensor([0, 5, 0], dtype=torch.int32, device=device)[:b]
                shape = (b, t, 2, 16)
            x.update(k_cache=randn(*shape, dtype=dtype, device=device, gen=g),
                     v_cache=randn(*shape, dtype=dtype, device=device, gen=g))
            return x
        return build

    def call(**options):
        def run(x, backend):
            # The op appends into the caches: it gets copies (same strides), returned after the call as outputs.
            k_cache, v_cache = (torch.empty_strided(x[n].shape, x[n].stride(), dtype=x[n].dtype,
                                                    device=x[n].device).copy_(x[n]) for n in ("k_cache", "v_cache"))
            out, lse = flashops.flash_attention_with_kvcache(
                x["q"], k_cache, v_cache, x["k"], x["v"], cache_seqlens=x["lengths"], cache_leftpad=x.get("leftpad"),
                block_table=x.get("block_table"), alibi_slopes=x.get("alibi"), return_lse=True, backend=backend,
                **options)
            return out, lse, k_cache, v_cache
        return run

    def prefix_attention(**options):
        """The same outputs another way: the new tokens written into copies of the caches by plain indexing,
        then flash_attention of each sequence's queries over its keys [leftpad, cache_seqlens + Tnew)."""
        def run(x, backend):
            k_cache, v_cache = x["k_cache"].clone(), x["v_cache"].clone()
            b = x["q"].shape[0]
            positions = x["lengths"].long()[:, None] + torch.arange(KV_NEW, device=x["q"].device)  # [B, Tnew]
            table = x.get("block_table")
            if table is None:
                slots = (torch.arange(b, device=positions.device)[:, None].expand_as(positions), positions)
            else:
                page_size = k_cache.shape[1]
                slots = (table.long().gather(1, positions // page_size), positions % page_size)
            k_cache[slots], v_cache[slots] = x["k"], x["v"]
            outs, lses = [], []
            for i in range(b):
                p = torch.arange(int(x["leftpad"][i]) if "leftpad" in x else 0, int(positions[i, -1]) + 1,
                                 device=positions.device)
                where = (i, p) if table is None else (table[i, p // page_size].long(), p % page_size)
                out, lse = flashops.flash_attention(x["q"][i:i + 1], k_cache[where][None], v_cache[where][None],
                                                    causal=True, alibi_slopes=x.get("alibi"), return_lse=True,
                                                    backend=backend, **options)
                outs.append(out)
                lses.append(lse)
            return torch.cat(outs), torch.cat(lses), k_cache, v_cache
        return run

    def sites(x):
        b = x["q"].shape[0]
        if not b:
            return []
        start = x["lengths"].long()
        end = start + KV_NEW
        later = _kv_slots(x, _kv_positions(x, start + 1, end))

        def from_query(t):  # out and lse of queries >= t, and the slots of new tokens >= 1
            return {0: along(1, slice(t, None)), 1: along(2, slice(t, None)), 2: later, 3: later}

        appended = _kv_slots(x, _kv_positions(x, start, end))
        sequence0 = torch.zeros(b, x["capacity"], dtype=torch.bool, device=end.device)
        sequence0[0] = True
        sequence0 = _kv_slots(x, sequence0)
        result = [
            Site("slots being appended (overwritten before use)", {"k_cache": appended, "v_cache": appended}),
            kv_cache_site("past cache_seqlens + Tnew", x, _kv_positions(x, end, torch.full_like(end, x["capacity"]))),
            Site("sequence 0 (its queries, new tokens and slots)",
                 {"q": (0,), "k": (0,), "v": (0,), "k_cache": sequence0, "v_cache": sequence0},
                 {0: (0,), 1: (0,), 2: sequence0, 3: sequence0}),
            # A future token among the new ones: tokens t >= 1 reach queries >= 1 (and their own slots).
            Site("future new tokens", {n: along(1, slice(1, None)) for n in ("q", "k", "v")}, from_query(1)),
            Site("future new value (0 x NaN)", {"v": along(1, slice(KV_NEW - 1, None))}, from_query(KV_NEW - 1)),
        ]
        if "leftpad" in x:
            result.append(kv_cache_site("before cache_leftpad", x, _kv_positions(x, torch.zeros_like(end),
                                                                                 x["leftpad"].long())))
        if "block_table" in x:
            referenced = x["block_table"][x["block_table"] < x["k_cache"].shape[0]].long()
            spare = torch.ones(x["k_cache"].shape[:2], dtype=torch.bool, device=end.device)
            spare[referenced] = False
            edge = start - KV_WINDOW  # query 0 sits at position `start`: the window's first key is seen by it only
            result += [Site("pages of no sequence", {"k_cache": spare, "v_cache": spare}, {2: spare, 3: spare}),
                       kv_cache_site("left of every window", x, _kv_positions(x, torch.zeros_like(end), edge)),
                       kv_cache_site("window edge (query 0 only)", x, _kv_positions(x, edge, edge + 1),
                                     changes={0: along(1, 0), 1: along(2, 0)}, values_first=True)]
        return result

    paged_options = dict(window_size=(KV_WINDOW, -1), softcap=3.0)
    return [
        Case("flash_attention_with_kvcache[contiguous, leftpad, Tq=3, append, num_splits=3, gqa]",
             ATTENTION_BACKENDS, make(paged=False), call(num_splits=3), sites, length=70, batch=3,
             empty=("batch",), grad=False, reference=prefix_attention()),
        Case("flash_attention_with_kvcache[paged shuffled, window, softcap, alibi, Tq=3, append, gqa]",
             ATTENTION_BACKENDS, make(paged=True), call(**paged_options), sites, length=40, batch=3, empty=("batch",),
             grad=False, reference=prefix_attention(**paged_options)),
    ]


# ----------------------------------------------------------------------------------------------- linear
def _linear_cases():
    def make(gated=False, varlen=False, heads=1, kv_heads=1):
        """GQA (kv_heads < heads): Lightning's state follows its default slopes (one per query head), GLA's the
        kv heads."""
        def build(b, t, dtype, device):
            g = _gen(5)
            if varlen:
                cu = torch.tensor([0, *itertools.accumulate([t // 3, 0, t - t // 3])], dtype=torch.int32,
                                  device=device)
                n, b = 3, 1
            x = dict(q=randn(b, t, heads, 16, dtype=dtype, device=device, gen=g),
                     k=randn(b, t, kv_heads, 16, dtype=dtype, device=device, gen=g),
                     v=randn(b, t, kv_heads, 12, dtype=dtype, device=device, gen=g))
            states = n if varlen else b
            x["h0"] = randn(states, kv_heads if gated else heads, 16, 12, dtype=dtype, device=device, gen=g)
            if gated:
                x["g"] = F.logsigmoid(randn(b, t, kv_heads, 16, dtype=dtype, device=device, gen=g, scale=2.0)) / 4
            if varlen:
                x["cu"] = cu
            return x
        return build

    def lightning(reverse=False):
        return lambda x, backend: flashops.lightning_attention(
            x["q"], x["k"], x["v"], initial_state=x["h0"], output_final_state=True, cu_seqlens=x.get("cu"),
            reverse=reverse, backend=backend)

    def gla(reverse=False):
        return lambda x, backend: flashops.gated_linear_attention(
            x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"], output_final_state=True, reverse=reverse,
            backend=backend)

    def plain(causal):
        return lambda x, backend: flashops.linear_attention(x["q"], x["k"], x["v"], causal=causal,
                                                            initial_state=x["h0"], output_final_state=True,
                                                            backend=backend)

    def direction_sites(reverse):
        """k and v from t0 on (causal; before t0 with reverse=True) reach only the outputs from t0 on and the
        final state; q before t0 (from t0 on, reversed) only the outputs before t0. Their gradients (a loss on every
        output) change only where they depend on them: the poisoned k, v reach dq of the rows that see them and dk,
        dv of their own positions; q reaches dk and dv of the positions it sees and the initial state's gradient.
        GLA's dg: a gate's gradient sums q dq - k dk over the rest of its 64-row chunk, where the poison cancels
        only in exact arithmetic (k, v: all of dg may change; q: the gates it sees)."""
        def sites(x):
            t = x["q"].shape[1]
            if t <= 2:
                return []
            t0 = t // 2 + 1
            seen, unseen = along(1, slice(0, t0)), along(1, slice(t0, None))
            if reverse:
                seen, unseen = unseen, seen
            kv_grads = {"q": unseen, "k": unseen, "v": unseen, "g": ...}
            q_grads = {"q": seen, "k": seen, "v": seen, "h0": ..., "g": seen}
            when = "before" if reverse else "from"
            return [Site(f"k, v {when} t0={t0}", {"k": unseen, "v": unseen}, {0: unseen, 1: ...}, grads=kv_grads),
                    Site(f"q not {when} t0={t0}", {"q": seen}, {0: seen}, grads=q_grads)]
        return sites

    def varlen_sites(x):
        cu = x["cu"].tolist()
        if cu[1] == 0:
            return []
        first = along(1, slice(0, cu[1]))
        sequence0 = {**{n: first for n in ("q", "k", "v")}, "h0": (0,)}
        return [Site("sequence 0", sequence0, {0: first, 1: (0,)}, grads=sequence0)]

    def step_make(gated):
        def build(b, t, dtype, device):
            g = _gen(6)
            x = dict(q=randn(b, 2, 16, dtype=dtype, device=device, gen=g),
                     k=randn(b, 2, 16, dtype=dtype, device=device, gen=g),
                     v=randn(b, 2, 12, dtype=dtype, device=device, gen=g),
                     state=randn(b, 2, 16, 12, dtype=dtype, device=device, gen=g))
            if gated:
                x["g"] = F.logsigmoid(randn(b, 2, 16, dtype=dtype, device=device, gen=g))
            return x
        return build

    def lightning_step(x, backend):
        return flashops.lightning_attention_step(x["q"], x["k"], x["v"], state=x["state"], backend=backend)

    def gla_step(x, backend):
        return flashops.gated_linear_attention_step(x["q"], x["k"], x["v"], state=x["state"], g_t=x["g"],
                                                    backend=backend)

    return [
        Case("lightning_attention", ATTENTION_BACKENDS, make(), lightning(), direction_sites(False),
             length=70),
        Case("lightning_attention[varlen]", ATTENTION_BACKENDS, make(varlen=True), lightning(), varlen_sites,
             length=70, empty=("length",)),
        Case("lightning_attention[gqa,reverse]", ATTENTION_BACKENDS, make(heads=4, kv_heads=2), lightning(True),
             direction_sites(True), length=70),
        # g is not poisoned here: a NaN log-gate is out of domain (tests/ops/test_linear.py covers it).
        Case("gated_linear_attention", ATTENTION_BACKENDS, make(gated=True), gla(),
             direction_sites(False), length=27),
        Case("gated_linear_attention[mqa,reverse]", ATTENTION_BACKENDS, make(gated=True, heads=2), gla(True),
             direction_sites(True), length=27),
        Case("linear_attention[causal]", ATTENTION_BACKENDS, make(), plain(True), direction_sites(False),
             length=70),
        Case("linear_attention[non-causal]", ATTENTION_BACKENDS, make(), plain(False), length=70),
        Case("lightning_attention_step", CUDA + ATTENTION_BACKENDS, step_make(False), lightning_step,
             empty=("batch",)),
        Case("gated_linear_attention_step", CUDA + ATTENTION_BACKENDS, step_make(True), gla_step, empty=("batch",)),
    ]


# -------------------------------------------------------------------------------------------------- LLA
def _lla_cases():
    def lla(x, backend):
        return flashops.local_linear_attention(x["q"], x["k"], x["v"], ridge_lambda=x["ridge"], backend=backend)

    def lla_make(b, t, dtype, device):
        x = qkv(b, t, dtype, device, heads=2, kv_heads=1, dim=8)
        return dict(x, ridge=torch.full((2,), 0.5, dtype=dtype, device=device))

    def decode_make(b, t, dtype, device):
        g = _gen(7)
        lengths = torch.tensor([t, min(t, 2), 0], dtype=torch.int32, device=device)[:b]
        return dict(q=randn(b, 1, 2, 8, dtype=dtype, device=device, gen=g),
                    k_cache=randn(b, t, 1, 8, dtype=dtype, device=device, gen=g),
                    v_cache=randn(b, t, 1, 8, dtype=dtype, device=device, gen=g), lengths=lengths)

    def decode(x, backend):
        return flashops.local_linear_attention_decode(x["q"], x["k_cache"], x["v_cache"], ridge_lambda=0.5,
                                                      cache_seqlens=x["lengths"], backend=backend)

    def decode_sites(x):
        t = x["k_cache"].shape[1]
        stale = torch.arange(t, device=x["lengths"].device)[None, :] >= x["lengths"][:, None]  # [B, T]
        if not stale.any():
            return []
        # cache rows past each sequence's length (all of the last one's, length 0) may hold anything
        return [Site("cache past cache_seqlens", {"k_cache": stale, "v_cache": stale})]

    return [
        Case("local_linear_attention[causal,gqa]", ATTENTION_BACKENDS, lla_make, lla,
             lambda x: [future(x, ("q", "k", "v"), 1, {0: 1})] if x["q"].shape[1] > 2 else [], length=19,
             batch=1, constants=("ridge",)),
        Case("local_linear_attention_decode", ATTENTION_BACKENDS, decode_make, decode, decode_sites, length=20,
             batch=3, grad=False),
    ]


# -------------------------------------------------------------------------------------------------- SSM
def _ssm_cases():
    def scan_make(b, t, dtype, device):
        g = _gen(8)
        return dict(a=torch.rand(b, 3, t, generator=g, dtype=torch.float64).to(device, dtype),
                    b=randn(b, 3, t, dtype=dtype, device=device, gen=g),
                    h0=randn(b, 3, dtype=dtype, device=device, gen=g))

    def scan(reverse):
        return lambda x, backend: flashops.linear_scan(x["a"], x["b"], x["h0"], reverse, backend=backend)

    def scan_sites(reverse):
        def sites(x):
            t = x["a"].shape[-1]
            if t <= 2:
                return []
            t0 = t // 2
            span = slice(0, t0) if reverse else slice(t0, None)
            return [Site("future" if not reverse else "past (reverse scan)", {"a": along(2, span), "b": along(2, span)},
                         {0: along(2, span)})]
        return sites

    def selective_make(b, t, dtype, device):
        g = _gen(9)
        x = {n: randn(b, 4, t, dtype=dtype, device=device, gen=g) for n in ("u", "delta", "z")}
        x.update(A=-torch.rand(4, 3, generator=g, dtype=torch.float64).to(device, dtype) - 0.1,
                 B=randn(b, 3, t, dtype=dtype, device=device, gen=g),
                 C=randn(b, 3, t, dtype=dtype, device=device, gen=g),
                 D=randn(4, dtype=dtype, device=device, gen=g), bias=randn(4, dtype=dtype, device=device, gen=g),
                 h0=randn(b, 4, 3, dtype=dtype, device=device, gen=g))
        return x

    def selective(x, backend):
        return flashops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"],
                                       delta_softplus=True, initial_state=x["h0"], return_last_state=True,
                                       backend=backend)

    def selective_sites(x):
        if x["u"].shape[-1] <= 2:
            return []
        return [future(x, ("u", "delta", "z", "B", "C"), 2, {0: 2, 1: None})]

    def update_make(b, t, dtype, device):
        g = _gen(10)
        return dict(state=randn(b, 4, 3, dtype=dtype, device=device, gen=g),
                    x=randn(b, 4, dtype=dtype, device=device, gen=g), dt=randn(b, 4, dtype=dtype, device=device, gen=g),
                    A=-torch.rand(4, 3, generator=g, dtype=torch.float64).to(device, dtype),
                    B=randn(b, 3, dtype=dtype, device=device, gen=g), C=randn(b, 3, dtype=dtype, device=device, gen=g),
                    D=randn(4, dtype=dtype, device=device, gen=g), z=randn(b, 4, dtype=dtype, device=device, gen=g))

    def update(x, backend):
        return flashops.selective_state_update(x["state"], x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                               dt_softplus=True, backend=backend)

    # Kernel generators: "batch" is the number of channels H, "length" the kernel length L.
    def vandermonde_make(b, t, dtype, device):
        g = _gen(11)
        log_z = torch.complex(-torch.rand(b, 3, generator=g, dtype=torch.float64) - 0.05,
                              torch.randn(b, 3, generator=g, dtype=torch.float64))
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        return dict(log_z=log_z.to(device, cdt), w=crandn(2, b, 3, dtype=dtype, device=device, gen=g), L=t)

    def vandermonde(x, backend):
        return flashops.vandermonde_kernel(x["log_z"], x["w"], x["L"], backend=backend)

    def s4d_make(b, t, dtype, device):
        x = vandermonde_make(b, t, dtype, device)
        g = _gen(12)
        return dict(A=x["log_z"], B=crandn(b, 3, dtype=dtype, device=device, gen=g), C=x["w"],
                    dt=torch.rand(b, generator=g, dtype=torch.float64).to(device, dtype) * 0.1 + 0.01, L=t)

    def s4d(x, backend):
        return flashops.s4d_kernel(x["A"], x["B"], x["C"], x["dt"], x["L"], backend=backend)

    def cauchy_make(b, t, dtype, device):
        g = _gen(13)
        w = crandn(b, 3, dtype=dtype, device=device, gen=g)
        return dict(v=crandn(2, b, 3, dtype=dtype, device=device, gen=g),
                    z=crandn(t, dtype=dtype, device=device, gen=g) * 3, w=w - 1.0)

    def cauchy(x, backend):
        return flashops.cauchy_kernel(x["v"], x["z"], x["w"], backend=backend)

    def dplr_make(b, t, dtype, device):
        g = _gen(14)
        lam = torch.complex(-torch.rand(b, 3, generator=g, dtype=torch.float64) - 0.1,
                            torch.randn(b, 3, generator=g, dtype=torch.float64))
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        return dict(Lambda=lam.to(device, cdt), P=crandn(1, b, 3, dtype=dtype, device=device, gen=g) * 0.3,
                    B=crandn(b, 3, dtype=dtype, device=device, gen=g),
                    C=crandn(2, b, 3, dtype=dtype, device=device, gen=g),
                    dt=torch.rand(b, generator=g, dtype=torch.float64).to(device, dtype) * 0.1 + 0.01, L=t)

    def dplr(x, backend):
        return flashops.dplr_kernel(x["Lambda"], x["P"], x["B"], x["C"], x["dt"], x["L"], backend=backend)

    def krylov_make(b, t, dtype, device):
        g = _gen(15)
        return dict(dA=randn(b, 3, 3, dtype=dtype, device=device, gen=g, scale=0.3),
                    dB=randn(b, 3, dtype=dtype, device=device, gen=g),
                    C=randn(2, b, 3, dtype=dtype, device=device, gen=g), L=t)

    def krylov(x, backend):
        return flashops.krylov_kernel(x["dA"], x["dB"], x["C"], x["L"])

    def conv_make(b, t, dtype, device):
        g = _gen(16)
        return dict(u=randn(b, 3, t, dtype=dtype, device=device, gen=g),
                    K=randn(3, t, dtype=dtype, device=device, gen=g), D=randn(3, dtype=dtype, device=device, gen=g))

    def conv(x, backend):
        return flashops.fft_conv(x["u"], x["K"], x["D"])

    scan_fp64 = ("cpp", "torch")
    return [
        Case("linear_scan", SCAN_BACKENDS, scan_make, scan(False), scan_sites(False), length=70,
             fp64_backends=scan_fp64),
        Case("linear_scan[reverse]", SCAN_BACKENDS, scan_make, scan(True), scan_sites(True), length=70,
             fp64_backends=scan_fp64),
        Case("selective_scan", SCAN_BACKENDS, selective_make, selective, selective_sites, length=21,
             fp64_backends=scan_fp64, atomic_backends=CUDA),
        Case("selective_state_update", CUDA + ("torch",), update_make, update, empty=("batch",)),
        Case("vandermonde_kernel", CUDA + ATTENTION_BACKENDS, vandermonde_make, vandermonde, batch=3, length=17),
        Case("s4d_kernel", CUDA + ATTENTION_BACKENDS, s4d_make, s4d, batch=3, length=17),
        Case("cauchy_kernel", CUDA + ATTENTION_BACKENDS, cauchy_make, cauchy, batch=3, length=17),
        Case("dplr_kernel", CUDA + ATTENTION_BACKENDS, dplr_make, dplr, batch=2, length=17),
        Case("krylov_kernel", NO_BACKEND, krylov_make, krylov, batch=3, length=17, fp64_backends=NO_BACKEND),
        # An FFT mixes every position: a NaN anywhere in u reaches every output, so it has no sites
        # (docs/ssm.md; the scans are the causal, contained alternative).
        Case("fft_conv", NO_BACKEND, conv_make, conv, fp64_backends=NO_BACKEND),
    ]


# ------------------------------------------------------------------------------------------- distributed
# Cases with world > 1 run inside a process group (tests/invariants/test_distributed.py). Their ``call`` takes the
# full inputs on every rank, runs the op on this rank's shards and returns the full outputs, differentiably, so
# the checks see one problem: a poisoned position on one rank is checked on every rank's outputs and gradients.
DIST_WORLD = 2
DIST_CHUNK = 5  # rows per layout chunk: odd, so that no kernel block divides a shard


class _WithGradient(torch.autograd.Function):
    """``forward(x)`` whose gradient is ``backward(grad)`` (for the collectives below)."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.transpose = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.transpose(grad), None, None


def to_shard(x, layout):
    """The full sequence -> this rank's part; gradient: every rank's (exact) part gathered into the full one."""
    cp = flashops.distributed
    return _WithGradient.apply(x, lambda t: cp.shard(t, layout=layout),
                               lambda g: cp.unshard(g.contiguous(), layout=layout))


def from_shards(local, layout):
    """This rank's part -> the full sequence (all-gather); gradient: this rank's part of the full one (every rank
    holds the same loss of the full outputs: it counts once, not once per rank)."""
    cp = flashops.distributed
    return _WithGradient.apply(local, lambda t: cp.unshard(t, layout=layout), lambda g: cp.shard(g, layout=layout))


def _summed(grad):
    grad = grad.clone()
    torch.distributed.all_reduce(grad)
    return grad


def held_by_every_rank(x):
    """An input every rank holds (an initial state); gradient: the ranks' parts summed."""
    return _WithGradient.apply(x, torch.clone, _summed)


def counted_once(y):
    """An output every rank holds (a final state); gradient: on rank 0 only."""
    return _WithGradient.apply(y, torch.clone,
                               lambda g: g if torch.distributed.get_rank() == 0 else torch.zeros_like(g))


def window_reach(x: dict, p: int, left, right) -> Site:
    """Poison q, k, v at position ``p`` of an attention where query i sees keys ``i - left .. i + right`` (None:
    unbounded): the outputs and dq of the queries that see p change, and dk, dv of the keys those queries see."""
    t = x["q"].shape[1]

    def rows(lo, hi):
        return along(1, slice(0 if lo is None else max(0, lo), t if hi is None else min(t, hi + 1)))

    queries = rows(None if left is None else p - (right or 0), None if left is None else p + left)
    reach = None if left is None or right is None else left + right
    keys = rows(None if reach is None else p - reach, None if reach is None else p + reach)
    return Site(f"position {p}", {n: along(1, p) for n in ("q", "k", "v")}, {0: queries},
                grads={"q": queries, "k": keys, "v": keys})


ALIBI_SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])  # the four query heads of the distributed exact cases


def _distributed_cases():
    world = DIST_WORLD

    def exact(op_name, layout, **options):
        def run(x, backend):
            op = getattr(flashops.distributed, op_name)
            q, k, v = (to_shard(x[n], layout) for n in ("q", "k", "v"))
            return from_shards(op(q, k, v, layout=layout, backend=backend, **options), layout)
        return run

    def single_exact(**options):
        return lambda x, backend: flashops.flash_attention(x["q"], x["k"], x["v"], backend=backend, **options)

    def with_lse(run):
        """(out, lse as [B, T, H]): return_lse=True, the log-sum-exp laid out like the output for the sites."""
        def call(x, backend):
            out, lse = run(x, backend)
            return out, lse.transpose(1, 2)
        return call

    def exact_lse(op_name, layout, **options):
        def run(x, backend):
            op = getattr(flashops.distributed, op_name)
            q, k, v = (to_shard(x[n], layout) for n in ("q", "k", "v"))
            out, lse = op(q, k, v, layout=layout, backend=backend, return_lse=True, **options)
            return from_shards(out, layout), from_shards(lse.transpose(1, 2), layout)
        return run

    def exact_make(b, t, dtype, device):
        return qkv(b, t, dtype, device, heads=4, kv_heads=2)

    def exact_sites(p, left, right):
        return lambda x: [window_reach(x, p, left, right)] if x["q"].shape[1] > p + 2 else []

    def causal_sites(x):
        t = x["q"].shape[1]
        if t <= 12:
            return []
        later = along(1, slice(12, None))
        return [Site("future t>=12", {n: later for n in ("q", "k", "v")}, {0: later, 1: later},
                     grads={"q": later, "k": ..., "v": ...})]

    def linear_make(gated, kv_heads=2):
        """Two query heads; GLA's state follows the kv heads, Lightning's its default slopes (the query heads)."""
        def build(b, t, dtype, device):
            g = _gen(18)
            x = dict(q=randn(b, t, 2, 8, dtype=dtype, device=device, gen=g),
                     k=randn(b, t, kv_heads, 8, dtype=dtype, device=device, gen=g),
                     v=randn(b, t, kv_heads, 12, dtype=dtype, device=device, gen=g),
                     h0=randn(b, kv_heads if gated else 2, 8, 12,
                              dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device, gen=g))
            if gated:
                x["g"] = F.logsigmoid(randn(b, t, kv_heads, 8, dtype=dtype, device=device, gen=g, scale=2.0)) / 4
            return x
        return build

    def lasp2(layout):
        def run(x, backend):
            shards = {n: to_shard(x[n], layout) for n in ("q", "k", "v", "g") if n in x}
            o, final = flashops.distributed.lasp2_attention(
                shards["q"], shards["k"], shards["v"], g=shards.get("g"), initial_state=held_by_every_rank(x["h0"]),
                output_final_state=True, layout=layout, backend=backend)
            return from_shards(o, layout), counted_once(final)
        return run

    def single_linear(x, backend):
        if "g" in x:
            return flashops.gated_linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"],
                                                   output_final_state=True, backend=backend)
        return flashops.lightning_attention(x["q"], x["k"], x["v"], initial_state=x["h0"], output_final_state=True,
                                            backend=backend)

    def linear_sites(piece):
        def sites(x):
            t = x["q"].shape[1]
            if t <= 12:
                return []
            later, changes = along(1, slice(12, None)), {0: along(1, slice(12, None)), 1: ...}
            # GLA's dg of a poisoned k or v's kernel chunk may turn NaN (docs/linear.md): here the local piece
            # holding row 12; LASP-2 adds nothing.
            call = along(1, slice(12 - 12 % piece, None))
            everything = {n: ... for n in ("q", "k", "v", "g", "h0") if n in x}
            return [
                # Poisoned q: dk and dv of every earlier position take its NaN through the output gradients.
                Site("future q, k, v (t>=12)", {n: later for n in ("q", "k", "v")}, changes,
                     grads={**everything, "q": call}),
                # k, v enter the outputs through the states only: no gradient of another piece or rank changes,
                # nor the initial state's (the fold's backward sends each chunk only its own share).
                Site("future k, v (t>=12)", {n: later for n in ("k", "v")}, changes,
                     grads={"q": later, "k": later, "v": later, **({"g": call} if "g" in x else {})}),
            ]
        return sites

    zigzag = 2 * world * DIST_CHUNK
    contiguous = world * DIST_CHUNK * 2
    causal_window = dict(causal=True, window_size=(4, 0))
    # Triton (its interpreter: the ranks' tensors are on the CPU) runs the windowed ring only, the costliest to get
    # right: causal diagonal blocks, blocks cut by the window, and the global statistics of other ranks' blocks.
    two_sided = dict(window_size=(3, 2))
    return [
        Case("ring_attention[zigzag, causal, gqa]", ("torch",), exact_make,
             exact("ring_attention", "zigzag", causal=True), causal_sites, length=zigzag,
             reference=single_exact(causal=True), world=world),
        Case("ring_attention[zigzag, causal window (4, 0)]", ATTENTION_BACKENDS, exact_make,
             exact("ring_attention", "zigzag", **causal_window), exact_sites(13, 4, 0), length=zigzag,
             reference=single_exact(**causal_window), world=world),
        Case("ring_attention[contiguous, window (3, 2)]", ("torch",), exact_make,
             exact("ring_attention", "contiguous", **two_sided), exact_sites(9, 3, 2), length=contiguous,
             reference=single_exact(**two_sided), world=world),
        Case("ulysses_attention[zigzag, causal window (4, 0)]", ("torch",), exact_make,
             exact("ulysses_attention", "zigzag", **causal_window), exact_sites(13, 4, 0), length=zigzag,
             reference=single_exact(**causal_window), world=world),
        Case("ring_attention[zigzag, causal, gqa, return_lse]", ("torch",), exact_make,
             exact_lse("ring_attention", "zigzag", causal=True), causal_sites, length=zigzag,
             reference=with_lse(single_exact(causal=True, return_lse=True)), world=world),
        Case("ulysses_attention[contiguous, causal, return_lse]", ("torch",), exact_make,
             exact_lse("ulysses_attention", "contiguous", causal=True), causal_sites, length=contiguous,
             reference=with_lse(single_exact(causal=True, return_lse=True)), world=world),
        Case("ring_attention[contiguous, window (3, 2), softcap]", ("torch",), exact_make,
             exact("ring_attention", "contiguous", softcap=2.0, **two_sided), exact_sites(9, 3, 2),
             length=contiguous, reference=single_exact(softcap=2.0, **two_sided), world=world),
        Case("ulysses_attention[zigzag, causal window (4, 0), softcap, alibi]", ("torch",), exact_make,
             exact("ulysses_attention", "zigzag", softcap=2.0, alibi_slopes=ALIBI_SLOPES, **causal_window),
             exact_sites(13, 4, 0), length=zigzag,
             reference=single_exact(softcap=2.0, alibi_slopes=ALIBI_SLOPES, **causal_window), world=world),
        Case("lasp2_attention[lightning, zigzag, states]", ("torch",), linear_make(False), lasp2("zigzag"),
             linear_sites(DIST_CHUNK), length=zigzag, reference=single_linear, world=world),
        Case("lasp2_attention[gla, contiguous, states]", ("torch",), linear_make(True), lasp2("contiguous"),
             linear_sites(2 * DIST_CHUNK), length=contiguous, reference=single_linear, world=world),
        Case("lasp2_attention[lightning, zigzag, states, mqa]", ("torch",), linear_make(False, kv_heads=1),
             lasp2("zigzag"), linear_sites(DIST_CHUNK), length=zigzag, reference=single_linear, world=world),
    ]


CASES = _attention_cases() + _kvcache_cases() + _linear_cases() + _lla_cases() + _ssm_cases() + _distributed_cases()
