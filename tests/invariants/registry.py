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
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import flashops
from flashops import nn as fnn

ATTENTION_BACKENDS = ("triton", "torch")
SCAN_BACKENDS = ("triton", "cpp", "torch")
NO_BACKEND = ("default",)  # plain PyTorch ops without dispatch


@dataclass(frozen=True)
class Site:
    """Input entries to poison (name -> index) and the output entries allowed to change (output position ->
    index; ``...`` for the whole output). Empty ``changes``: the entries are masked out. ``independent``: the
    poisoned entries and the outputs they reach form a problem of their own (a sequence of a varlen batch),
    so even the backward leaves every gradient outside the poisoned entries unchanged."""

    name: str
    inputs: dict
    changes: dict = field(default_factory=dict)
    independent: bool = False


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
        return [Site("sequence 0", {n: along(1, first) for n in ("q", "k", "v")}, {0: along(1, first)},
                     independent=True),
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


# ----------------------------------------------------------------------------------------------- linear
def _linear_cases():
    def make(gated=False, varlen=False):
        def build(b, t, dtype, device):
            g = _gen(5)
            if varlen:
                cu = torch.tensor([0, *itertools.accumulate([t // 3, 0, t - t // 3])], dtype=torch.int32,
                                  device=device)
                n, b = 3, 1
            x = dict(q=randn(b, t, 1, 16, dtype=dtype, device=device, gen=g),
                     k=randn(b, t, 1, 16, dtype=dtype, device=device, gen=g),
                     v=randn(b, t, 1, 12, dtype=dtype, device=device, gen=g))
            states = n if varlen else b
            x["h0"] = randn(states, 1, 16, 12, dtype=dtype, device=device, gen=g)
            if gated:
                x["g"] = F.logsigmoid(randn(b, t, 1, 16, dtype=dtype, device=device, gen=g, scale=2.0)) / 4
            if varlen:
                x["cu"] = cu
            return x
        return build

    def lightning(x, backend):
        return flashops.lightning_attention(x["q"], x["k"], x["v"], initial_state=x["h0"], output_final_state=True,
                                            cu_seqlens=x.get("cu"), backend=backend)

    def gla(x, backend):
        return flashops.gated_linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"],
                                               output_final_state=True, backend=backend)

    def plain(causal):
        return lambda x, backend: flashops.linear_attention(x["q"], x["k"], x["v"], causal=causal,
                                                            initial_state=x["h0"], output_final_state=True,
                                                            backend=backend)

    def causal_sites(names):
        return lambda x: [future(x, names, 1, {0: 1, 1: None})] if x["q"].shape[1] > 2 else []

    def varlen_sites(x):
        cu = x["cu"].tolist()
        if cu[1] == 0:
            return []
        first = along(1, slice(0, cu[1]))
        return [Site("sequence 0", {**{n: first for n in ("q", "k", "v")}, "h0": (0,)}, {0: first, 1: (0,)},
                     independent=True)]

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
        Case("lightning_attention", ATTENTION_BACKENDS, make(), lightning, causal_sites(("q", "k", "v")), length=70),
        Case("lightning_attention[varlen]", ATTENTION_BACKENDS, make(varlen=True), lightning, varlen_sites,
             length=70, empty=("length",)),
        # g is not poisoned here: a NaN log-gate is out of domain (tests/ops/test_linear.py covers it).
        Case("gated_linear_attention", ATTENTION_BACKENDS, make(gated=True), gla,
             causal_sites(("q", "k", "v")), length=27),
        Case("linear_attention[causal]", ATTENTION_BACKENDS, make(), plain(True), causal_sites(("q", "k", "v")),
             length=70),
        Case("linear_attention[non-causal]", ATTENTION_BACKENDS, make(), plain(False), length=70),
        Case("lightning_attention_step", ATTENTION_BACKENDS, step_make(False), lightning_step, empty=("batch",)),
        Case("gated_linear_attention_step", ATTENTION_BACKENDS, step_make(True), gla_step, empty=("batch",)),
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
                                               dt_softplus=True)

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
             fp64_backends=scan_fp64),
        Case("selective_state_update", NO_BACKEND, update_make, update, empty=("batch",), fp64_backends=NO_BACKEND),
        Case("vandermonde_kernel", ATTENTION_BACKENDS, vandermonde_make, vandermonde, batch=3, length=17),
        Case("s4d_kernel", ATTENTION_BACKENDS, s4d_make, s4d, batch=3, length=17),
        Case("cauchy_kernel", ATTENTION_BACKENDS, cauchy_make, cauchy, batch=3, length=17),
        Case("dplr_kernel", ATTENTION_BACKENDS, dplr_make, dplr, batch=2, length=17),
        Case("krylov_kernel", NO_BACKEND, krylov_make, krylov, batch=3, length=17, fp64_backends=NO_BACKEND),
        # An FFT mixes every position: a NaN anywhere in u reaches every output, so it has no sites
        # (docs/ssm.md; the scans are the causal, contained alternative).
        Case("fft_conv", NO_BACKEND, conv_make, conv, fp64_backends=NO_BACKEND),
    ]


CASES = _attention_cases() + _linear_cases() + _lla_cases() + _ssm_cases()
