"""Linear attention: Lightning Attention-2, GLA and non-causal linear attention, against fla, lightning-attn
and exact attention at the same shapes.

Ops (inputs ``[B, T, H, D]``, K = V = D):
  lightning_attention     flashops backends; fla ``chunk_simple_gla(g_gamma=-slopes)``; lightning-attn
                          ``lightning_attn_func(q, k, v, slopes[:, None, None])`` on ``[B, H, T, D]`` views (it makes
                          them contiguous itself: that copy is part of its time). Default slopes, scale = 1
                          (Lightning's convention; lightning-attn has no scale argument).
  gated_linear_attention  flashops backends; fla ``chunk_gla``. g = logsigmoid(N(0, 1)) / 16, scale = 1/sqrt(D).
  linear_attention        the non-causal op (``causal=False``); flashops backends.
  linear_vs_exact         ``flashops.flash_attention(causal=True)`` at the shapes above: the exact-attention time
                          that linear attention is compared with. A separate op because it computes something
                          else: it is checked against exact attention, not against linear attention.
  lightning_attention_gqa, gated_linear_attention_gqa
                          GQA: k, v (and g) with HKV < H heads. Against the same op on k, v (, g) repeated to H
                          heads in Python ("flashops-<backend>-repeated-kv", and fla, whose layers do that).
  lightning_attention_reverse, gated_linear_attention_reverse
                          ``reverse=True``: against the forward op on time-flipped inputs with its output flipped
                          back ("flashops-<backend>-flipped", the design the in-kernel reverse avoids) and fla's
                          ``fused_recurrent_{simple_gla,gla}(reverse=True)`` (fla's chunk ops have no reverse).
Sweeps:
  GPU full:  bf16, B * T = 65536 tokens, T in {2k, 8k, 32k, 64k}, H = 16, D in {64, 128}; fwd and fwd+bwd.
             Flatness: linear attention's time per token should not grow with T. linear_vs_exact: the same
             shapes, forward only at 64k (see ``exact_check_slice``).
  GPU quick: D = 128, T in {2k, 32k}.
  CPU quick: fp32, B * T = 256, T in {64, 256}, H = 2, D = 32.
  CPU full:  fp32, B * T = 4096, T in {256, 1024, 4096}, H = 4, D in {32, 64}.
  Memory (fwd+bwd vs T, B = 1): GPU bf16 H = 8, D = 128, T in {2k, 8k, 32k}; CPU quick: Lightning only.
  GQA and reverse ops: GPU bf16 B * T = 65536, T in {2k, 32k} (quick: 8k), H = 16 (HKV = 4 for GQA), D = 128;
  CPU fp32 B = 1, T = 256 (full: also 1024), H = 4 (HKV = 1: MQA), D = 32.
FLOPs (docs/linear.md; causal chunked form, chunk C = 64; H = query heads): forward ``B*T*H*(2C(K+V) + 4KV)``;
Lightning backward
2x forward; GLA backward 2x forward + ``4*B*T*H*C*K`` (its intra-chunk gate terms); non-causal forward
``4*B*T*H*K*V``, backward 2x forward. linear_vs_exact: the FlashAttention convention (``2*B*H*T^2*D`` causal fwd).
Reference: the family's ``reference.py`` quadratic form on 64-position pieces, each starting from the state the
previous piece returned (exact, and linear in T; the per-step recurrence would be a Python loop over every
position). Past 32k head-tokens the check runs on the last batch element and the last heads.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F

import flashops
from flashops.ops.linear import reference as linear_reference

from ..registry import Case, Op, Provider, case, flashops_providers, module_missing
from .attention import exact_attention_baseline, exact_case

GPU_TOKENS, GPU_HEADS, GPU_DIMS, GPU_LENGTHS = 65536, 16, (64, 128), (2048, 8192, 32768, 65536)
GPU_QUICK_LENGTHS = (2048, 32768)
MODES = ("fwd", "fwd+bwd")
LIGHTNING_SCALE = 1.0
CHUNK = 64  # the kernels' chunk, used by the FLOP formula and as the reference's piece length
# Head-tokens (heads x T) above which the check runs on a slice; the reference's autograd graph holds about
# 10 MB per 64-position piece and head at D = 128.
CHECK_HEAD_TOKENS = 32768


# ------------------------------------------------------------------------------------------------- cases
def _sweep(op: str, sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        dims, lengths = (GPU_DIMS, GPU_LENGTHS) if sweep == "full" else ((128,), GPU_QUICK_LENGTHS)
        return [case(op, torch.bfloat16, MODES, B=GPU_TOKENS // t, T=t, H=GPU_HEADS, D=d)
                for d in dims for t in lengths]
    if sweep == "quick":
        return [case(op, torch.float32, MODES, B=256 // t, T=t, H=2, D=32) for t in (64, 256)]
    return [case(op, torch.float32, MODES, B=4096 // t, T=t, H=4, D=d) for d in (32, 64) for t in (256, 1024, 4096)]


def _memory_sweep(op: str, on_cpu_quick: bool):
    def cases(sweep: str, device: torch.device) -> list:
        if device.type == "cuda":
            lengths = (2048, 8192) if sweep == "quick" else (2048, 8192, 32768)
            return [case(op, torch.bfloat16, ("fwd+bwd",), B=1, T=t, H=8, D=128) for t in lengths]
        if sweep == "quick" and not on_cpu_quick:
            return []
        lengths = (256, 1024) if sweep == "quick" else (512, 2048, 8192)
        return [case(op, torch.float32, ("fwd+bwd",), B=1, T=t, H=2, D=32) for t in lengths]

    return cases


def _variant_sweep(op: str, sweep: str, device: torch.device) -> list:
    """The GQA and reverse ops: fewer points (their behaviour in T is the plain ops')."""
    gqa = op.endswith("_gqa")
    if device.type == "cuda":
        lengths = (8192,) if sweep == "quick" else (2048, 32768)
        return [case(op, torch.bfloat16, MODES, B=GPU_TOKENS // t, T=t, H=GPU_HEADS, HKV=4 if gqa else GPU_HEADS,
                     D=128) for t in lengths]
    lengths = (256,) if sweep == "quick" else (256, 1024)
    return [case(op, torch.float32, MODES, B=1, T=t, H=4, HKV=1 if gqa else 4, D=32) for t in lengths]


def _qkv(c: Case, device, generator) -> dict:
    q_shape = (c["B"], c["T"], c["H"], c["D"])
    kv_shape = (c["B"], c["T"], c.get("HKV", c["H"]), c["D"])
    return {name: torch.randn(shape, generator=generator, device=device).to(c.dtype)
            for name, shape in (("q", q_shape), ("k", kv_shape), ("v", kv_shape))}


def lightning_inputs(c, device, generator) -> dict:
    return {**_qkv(c, device, generator), "slopes": flashops.lightning_slopes(c["H"], device=device)}


def gla_inputs(c, device, generator) -> dict:
    inputs = _qkv(c, device, generator)
    logits = torch.randn(inputs["k"].shape, generator=generator, device=device)
    return {**inputs, "g": (F.logsigmoid(logits) / 16).to(c.dtype)}


# --------------------------------------------------------------------------------------------- reference
def _pieces(call, inputs: dict, per_position: tuple, upcast: bool, reverse: bool = False):
    """The causal reference over CHUNK-position pieces, each starting from the state the previous one (in the
    recurrence's direction) returned: ``call(q, k, v, *per_position_inputs, initial_state=..., ...)`` is a
    reference.py function."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    state, outs = None, []
    starts = range(0, q.shape[1], CHUNK)
    for start in (reversed(starts) if reverse else starts):
        piece = slice(start, start + CHUNK)
        o, state = call(q[:, piece], k[:, piece], v[:, piece], *(inputs[n][:, piece] for n in per_position),
                        initial_state=state, output_final_state=True, method="quadratic", upcast=upcast,
                        reverse=reverse)
        outs.append(o)
    return torch.cat(outs[::-1] if reverse else outs, dim=1)


def _is_reverse(c) -> bool:
    return c.op.endswith("_reverse")


def lightning_reference(inputs, c, upcast):
    def call(q, k, v, **kwargs):
        return linear_reference.lightning_attention(q, k, v, inputs["slopes"], scale=LIGHTNING_SCALE, **kwargs)

    return _pieces(call, inputs, (), upcast, _is_reverse(c))


def gla_reference(inputs, c, upcast):
    def call(q, k, v, g, **kwargs):
        return linear_reference.gated_linear_attention(q, k, v, g, scale=c["D"] ** -0.5, **kwargs)

    return _pieces(call, inputs, ("g",), upcast, _is_reverse(c))


def noncausal_reference(inputs, c, upcast):
    return linear_reference.noncausal_linear_attention(inputs["q"], inputs["k"], inputs["v"], upcast=upcast)[0]


def check_slice(c, device):
    """Batch elements and heads are independent: past CHECK_HEAD_TOKENS check the last batch element and the
    last heads (large offsets are where indexing bugs show), over the whole sequence."""
    b, t, h = c["B"], c["T"], c["H"]
    if b * h * t <= CHECK_HEAD_TOKENS:
        return None, ""
    heads = max(1, min(h, CHECK_HEAD_TOKENS // t))

    def narrow(name, x):
        return x[-heads:] if name == "slopes" else x[-1:, :, -heads:]

    if c.get("HKV", h) != h:  # GQA: no slice (the heads of q and k/v would have to be narrowed by groups)
        return None, ""

    return narrow, f"checked on batch {b - 1}, heads {h - heads}..{h - 1}, all positions"


# ------------------------------------------------------------------------------------------------- FLOPs
def _causal_forward(c) -> float:
    d = c["D"]
    return c["B"] * c["T"] * c["H"] * (2 * CHUNK * (d + d) + 4 * d * d)


def lightning_flops(c, mode) -> float:
    return _causal_forward(c) * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]


def gla_flops(c, mode) -> float:
    forward = _causal_forward(c)
    backward = 2 * forward + 4 * c["B"] * c["T"] * c["H"] * CHUNK * c["D"]
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def noncausal_flops(c, mode) -> float:
    return 4 * c["B"] * c["T"] * c["H"] * c["D"] ** 2 * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]


# --------------------------------------------------------------------------------------------- providers
def _features(c) -> dict:
    return {"head_dim_k": c["D"], "head_dim_v": c["D"], "varlen": False}


def _lightning(inputs, c, backend, reverse=None):
    reverse = _is_reverse(c) if reverse is None else reverse
    return flashops.lightning_attention(inputs["q"], inputs["k"], inputs["v"], inputs["slopes"],
                                        scale=LIGHTNING_SCALE, reverse=reverse, backend=backend)[0]


def _gla(inputs, c, backend, reverse=None):
    reverse = _is_reverse(c) if reverse is None else reverse
    return flashops.gated_linear_attention(inputs["q"], inputs["k"], inputs["v"], inputs["g"],
                                           scale=c["D"] ** -0.5, reverse=reverse, backend=backend)[0]


def _repeated_kv(inputs: dict, c) -> dict:
    """k, v (and g) repeated to the query heads in Python (head j serves query heads j * group ...), as fla's
    layers implement GQA."""
    group = c["H"] // c["HKV"]
    return {n: x.repeat_interleave(group, dim=2) if n in ("k", "v", "g") else x for n, x in inputs.items()}


def _flipped(call):
    """``call`` run forward on time-flipped inputs, its output flipped back: reverse built from the forward op."""
    def run(inputs, c, backend):
        flipped = {n: x.flip(1) if x.dim() == 4 else x for n, x in inputs.items()}
        return call(flipped, c, backend, reverse=False).flip(1)

    return run


def _with_repeated_kv(call):
    def run(inputs, c, backend):
        return call(_repeated_kv(inputs, c), c, backend)

    return run


def _alternative(op: str, call, label: str, transform) -> list:
    """flashops providers computing ``op``'s result by ``transform(call)`` (the design a variant op is measured
    against), named ``flashops-<backend>-<label>``."""
    providers = flashops_providers(op, transform(call), _features)
    for p in providers:
        p.name = f"{p.name}-{label}"
    return providers


def _noncausal(inputs, c, backend):
    return flashops.linear_attention(inputs["q"], inputs["k"], inputs["v"], causal=False, backend=backend)[0]


def _cuda_only(package):
    def supports(c, mode, device):
        return None if device.type == "cuda" else f"{package} runs on CUDA only"

    return supports


def _fla_layout(fn) -> dict:
    """fla versions before the [B, T, H, D]-only API take ``head_first`` (its default changed over time)."""
    return {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}


def _fla_simple_gla(inputs, c):
    from fla.ops.simple_gla import chunk_simple_gla

    inputs = _repeated_kv(inputs, c) if c.get("HKV", c["H"]) != c["H"] else inputs
    return chunk_simple_gla(inputs["q"], inputs["k"], inputs["v"], g_gamma=-inputs["slopes"], scale=LIGHTNING_SCALE,
                            **_fla_layout(chunk_simple_gla))[0]


def _fla_gla(inputs, c):
    from fla.ops.gla import chunk_gla

    inputs = _repeated_kv(inputs, c) if c.get("HKV", c["H"]) != c["H"] else inputs
    return chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=c["D"] ** -0.5,
                     **_fla_layout(chunk_gla))[0]


def _fla_reverse(module: str, function: str, decay: str):
    def run(inputs, c):
        fn = getattr(importlib.import_module(module), function)
        gate = {"g_gamma": -inputs["slopes"]} if decay == "slopes" else {"gk": inputs["g"]}
        scale = LIGHTNING_SCALE if decay == "slopes" else c["D"] ** -0.5
        return fn(inputs["q"], inputs["k"], inputs["v"], **gate, scale=scale, reverse=True, **_fla_layout(fn))[0]

    return run


def _lightning_attn(inputs, c):
    from lightning_attn.ops import lightning_attn_func

    q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))  # [B, H, T, D] views
    return lightning_attn_func(q, k, v, inputs["slopes"][:, None, None]).transpose(1, 2)


# ------------------------------------------------------------------------------------------------- ops
def _op(name, make_inputs, reference, flops, formula, providers, differentiable, memory_on_cpu_quick=False,
        slice_check=True, variant=False) -> Op:
    return Op(name=name, family="linear",
              cases=lambda sweep, device: (_variant_sweep if variant else _sweep)(name, sweep, device),
              make_inputs=make_inputs, reference=reference, flops=flops, flop_formula=formula, providers=providers,
              differentiable=differentiable, outputs=("out",), x="T", panels=("D",),
              check_slice=check_slice if slice_check else (lambda c, device: (None, "")),
              memory_cases=None if variant else _memory_sweep(name, memory_on_cpu_quick))


def _fla(run, module: str = "fla") -> Provider:
    return Provider("fla", run, unavailable=module_missing(module), supports=_cuda_only("fla"), errors_are_skips=True)


CAUSAL_FORMULA = "fwd = B*T*H*(2*64*(K+V) + 4*K*V) (chunk 64, H query heads); "
LIGHTNING_FORMULA = CAUSAL_FORMULA + "bwd = 2x fwd; fwd+bwd = 3x fwd"
GLA_FORMULA = CAUSAL_FORMULA + "bwd = 2x fwd + 4*B*T*H*64*K; fwd+bwd = fwd + bwd"
OPS = [
    _op("lightning_attention", lightning_inputs, lightning_reference, lightning_flops, LIGHTNING_FORMULA,
        [*flashops_providers("lightning_attention", _lightning, _features), _fla(_fla_simple_gla),
         Provider("lightning-attn", _lightning_attn, unavailable=module_missing("lightning_attn"),
                  supports=_cuda_only("lightning-attn"), errors_are_skips=True)],
        ("q", "k", "v"), memory_on_cpu_quick=True),
    _op("gated_linear_attention", gla_inputs, gla_reference, gla_flops, GLA_FORMULA,
        [*flashops_providers("gated_linear_attention", _gla, _features), _fla(_fla_gla)],
        ("q", "k", "v", "g")),
    _op("lightning_attention_gqa", lightning_inputs, lightning_reference, lightning_flops, LIGHTNING_FORMULA,
        [*flashops_providers("lightning_attention", _lightning, _features),
         *_alternative("lightning_attention", _lightning, "repeated-kv", _with_repeated_kv),
         _fla(_fla_simple_gla)],
        ("q", "k", "v"), variant=True),
    _op("gated_linear_attention_gqa", gla_inputs, gla_reference, gla_flops, GLA_FORMULA,
        [*flashops_providers("gated_linear_attention", _gla, _features),
         *_alternative("gated_linear_attention", _gla, "repeated-kv", _with_repeated_kv),
         _fla(_fla_gla)],
        ("q", "k", "v", "g"), variant=True),
    _op("lightning_attention_reverse", lightning_inputs, lightning_reference, lightning_flops, LIGHTNING_FORMULA,
        [*flashops_providers("lightning_attention", _lightning, _features),
         *_alternative("lightning_attention", _lightning, "flipped", _flipped),
         _fla(_fla_reverse("fla.ops.simple_gla", "fused_recurrent_simple_gla", "slopes"))],
        ("q", "k", "v"), variant=True),
    _op("gated_linear_attention_reverse", gla_inputs, gla_reference, gla_flops, GLA_FORMULA,
        [*flashops_providers("gated_linear_attention", _gla, _features),
         *_alternative("gated_linear_attention", _gla, "flipped", _flipped),
         _fla(_fla_reverse("fla.ops.gla", "fused_recurrent_gla", "gates"))],
        ("q", "k", "v", "g"), variant=True),
    _op("linear_attention", _qkv, noncausal_reference, noncausal_flops,
        "non-causal: fwd = 4*B*T*H*K*V; bwd = 2x fwd; fwd+bwd = 3x fwd",
        flashops_providers("noncausal_linear_attention", _noncausal, _features), ("q", "k", "v"),
        slice_check=False),
    exact_attention_baseline(
        "linear_vs_exact", "linear",
        lambda sweep, device: [exact_case("linear_vs_exact", c) for c in _sweep("linear_vs_exact", sweep, device)]),
]
