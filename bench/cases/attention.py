"""Exact attention: flashops.flash_attention vs torch SDPA (each backend), FlexAttention and flash-attn.

Sweeps (inputs ``[B, T, H, D]``, T_q = T_k = T, no GQA):
  GPU full:  bf16, D in {64, 128} with H = 32 / 16 (H * D = 2048), T = 512 .. 16k at B * T = 16k tokens,
             causal and not.
  GPU quick: the same at D = 128, T in {1k, 4k}.
  CPU quick: fp32, D = 64, H = 4, T in {128, 512} at B * T = 512 tokens, causal and not.
  CPU full:  fp32, D in {64, 128} with H = 8 / 4, T = 256 .. 4096 at B * T = 4096 tokens.
FLOPs (FlashAttention convention): forward 4 * B * H * T_q * T_k * D (two matmuls), halved when causal;
backward 2.5x forward; forward + backward 3.5x forward.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

import flashops
from flashops.ops.attention import reference as attention_reference

from ..registry import Case, Op, Provider, Unsupported, case, flashops_providers, module_missing

GPU_TOKENS, CPU_TOKENS_QUICK, CPU_TOKENS_FULL = 16384, 512, 4096
GPU_HEADS = {64: 32, 128: 16}
CPU_HEADS = {64: 8, 128: 4}
CPU_HEADS_QUICK = {64: 4}
# Bytes of one fp32 [B, H, T, T] score matrix above which the check runs on a slice of batch and heads
# (the reference's forward + backward holds about five of them).
CHECK_BUDGET = 2**30


# ------------------------------------------------------------------------------------------------- cases
def _sweep(dtype, dims, heads, lengths, tokens):
    return [case("flash_attention", dtype, B=max(1, tokens // t), T=t, H=heads[d], D=d, causal=causal)
            for d in dims for causal in (False, True) for t in lengths]


def cases(sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        if sweep == "quick":
            return _sweep(torch.bfloat16, (128,), GPU_HEADS, (1024, 4096), GPU_TOKENS)
        return _sweep(torch.bfloat16, (64, 128), GPU_HEADS, (512, 1024, 2048, 4096, 8192, 16384), GPU_TOKENS)
    if sweep == "quick":
        return _sweep(torch.float32, (64,), CPU_HEADS_QUICK, (128, 512), CPU_TOKENS_QUICK)
    return _sweep(torch.float32, (64, 128), CPU_HEADS, (256, 512, 1024, 2048, 4096), CPU_TOKENS_FULL)


def memory_cases(sweep: str, device: torch.device) -> list:
    """Peak memory of forward + backward vs T at B = 1 (non-causal: the materialized reference's worst case)."""
    if device.type == "cuda":
        lengths = (1024, 2048, 4096, 8192) if sweep == "quick" else (1024, 2048, 4096, 8192, 16384, 32768)
        return [case("flash_attention", torch.bfloat16, ("fwd+bwd",), B=1, T=t, H=8, D=128, causal=False)
                for t in lengths]
    lengths = (512, 1024, 2048) if sweep == "quick" else (512, 1024, 2048, 4096)
    return [case("flash_attention", torch.float32, ("fwd+bwd",), B=1, T=t, H=4, D=64, causal=False)
            for t in lengths]


def make_inputs(c, device, generator) -> dict:
    shape = (c["B"], c["T"], c["H"], c["D"])
    return {name: torch.randn(shape, generator=generator, device=device).to(c.dtype) for name in ("q", "k", "v")}


def reference(inputs, c, upcast):
    out, _ = attention_reference.attention(inputs["q"], inputs["k"], inputs["v"], causal=c["causal"], upcast=upcast)
    return out


def flops(c, mode) -> float:
    forward = 4 * c["B"] * c["H"] * c["T"] * c["T"] * c["D"] * (0.5 if c["causal"] else 1.0)
    return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


# The fast memory of an H100 / H200 (GH100): 132 SMs, each with up to 228 KiB of shared memory for its blocks.
SM_COUNT, SM_SRAM_BYTES = 132, 228 * 1024


def traffic_bound(c, mode, sm_count: int = SM_COUNT, sram_bytes: int = SM_SRAM_BYTES) -> float:
    """A lower bound on the bytes any exact-attention algorithm that forms its scores as dot products moves
    between global memory and ``sm_count`` SRAMs of ``sram_bytes`` (Saha and Ye's bound, with the constants of
    the derivation in docs/benchmarks.md#io-accounting): ``f * P * D^2 / (M + 3 D^2) - sm_count * M`` elements,
    M the SRAM in elements of the input dtype, P the (query, key) pairs the mask keeps, f the score matrices
    formed: 1 forward (Q K^T), 2 with a backward (Q K^T and dO V^T). Zero when the problem is too small for
    the bound to exceed the SRAMs' contents (the minimum traffic then rules)."""
    element = torch.empty((), dtype=c.dtype).element_size()
    m, d, t = sram_bytes / element, c["D"], c["T"]
    pairs = c["B"] * c["H"] * (t * (t + 1) / 2 if c["causal"] else t * t)
    products = 1 if mode == "fwd" else 2
    return max(0.0, products * pairs * d * d / (m + 3 * d * d) - sm_count * m) * element


def check_slice(c, device):
    """Past the budget, check the last batch element and the last heads (large offsets are where indexing
    bugs show) with the reference over all T keys; every head is computed the same way."""
    per_head = c["T"] * c["T"] * 4
    if c["B"] * c["H"] * per_head <= CHECK_BUDGET:
        return None, ""
    heads = max(1, min(c["H"], CHECK_BUDGET // per_head))

    def narrow(name, x):
        return x[-1:, :, -heads:]

    return narrow, (f"large T checked on batch {c['B'] - 1}, heads {c['H'] - heads}..{c['H'] - 1} "
                    f"(the full fp32 reference would need {c['B'] * c['H'] * per_head / 2**30:.1f} GiB per matrix)")


# --------------------------------------------------------------------------------------------- providers
def _flashops(inputs, c, backend):
    return flashops.flash_attention(inputs["q"], inputs["k"], inputs["v"], causal=c["causal"], backend=backend)


def _heads_first(inputs):
    return (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))  # [B, H, T, D] views for torch's APIs


def _sdpa(backend_name: str, short: str) -> Provider:
    """torch SDPA restricted to one backend with ``sdpa_kernel``; a backend that declines the inputs is
    skipped with torch's own reasons."""

    def backend():
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, backend_name, None)

    def unavailable():
        try:
            from torch.nn.attention import sdpa_kernel  # noqa: F401
        except ImportError:
            return "this torch has no torch.nn.attention.sdpa_kernel"
        return None if backend() is not None else f"this torch has no SDPBackend.{backend_name}"

    def call(inputs, c):
        from torch.nn.attention import sdpa_kernel

        q, k, v = _heads_first(inputs)
        with sdpa_kernel([backend()]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=c["causal"]).transpose(1, 2)

    def run(inputs, c):
        try:
            return call(inputs, c)
        except RuntimeError as error:
            if "No available kernel" not in str(error) and "No viable backend" not in str(error):
                raise
        with warnings.catch_warnings(record=True) as caught:  # once more, to collect torch's reasons
            warnings.simplefilter("always")
            try:
                call(inputs, c)
            except RuntimeError:
                pass
        why = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        q = inputs["q"]
        raise Unsupported(f"SDPA {backend_name} has no kernel for these inputs ({q.device.type}, "
                          f"{c.dtype_name}, D={q.shape[-1]})" + (f": {why}" if why else ""))

    return Provider(f"sdpa-{short}", run, unavailable=unavailable, errors_are_skips=True)


@functools.cache
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Each (causal, head dim, grad mode) is its own graph; past dynamo's recompile limit flex_attention
    # would silently run eagerly (materializing the scores), so raise the limit.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    # The bwd mode replays one backward (retain_graph=True), which compiled graphs with donated buffers refuse.
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=16)
def _causal_block_mask(t_q: int, t_k: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = t_k - t_q  # bottom-right alignment, as flashops

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, t_q, t_k, device=device)


def _flex_unavailable():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as error:
        return f"this torch has no FlexAttention ({error})"
    return None


def _flex_supports(c, mode, device):
    if device.type != "cuda":
        return ("FlexAttention is measured on CUDA only (on the CPU it has no backward and compiling it "
                "takes over a minute per shape)")
    return None


def _flex(inputs, c):
    q, k, v = _heads_first(inputs)
    mask = _causal_block_mask(q.shape[2], k.shape[2], str(q.device)) if c["causal"] else None
    return _compiled_flex()(q, k, v, block_mask=mask).transpose(1, 2)


def _flash_attn_supports(c, mode, device):
    if device.type != "cuda":
        return "flash-attn runs on CUDA only"
    if c.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 or bf16, not {c.dtype_name}"
    return None


def _flash_attn(inputs, c):
    from flash_attn import flash_attn_func

    return flash_attn_func(inputs["q"], inputs["k"], inputs["v"], causal=c["causal"])


PROVIDERS = [
    *flashops_providers("attention", _flashops, lambda c: {"head_dim": c["D"]}),
    _sdpa("FLASH_ATTENTION", "flash"),
    _sdpa("EFFICIENT_ATTENTION", "efficient"),
    _sdpa("CUDNN_ATTENTION", "cudnn"),
    _sdpa("MATH", "math"),
    Provider("flex", _flex, unavailable=_flex_unavailable, supports=_flex_supports, errors_are_skips=True),
    Provider("flash-attn", _flash_attn, unavailable=module_missing("flash_attn"), supports=_flash_attn_supports,
             errors_are_skips=True),
]

# ------------------------------------------------------------------------------ exact-attention baseline
# Past this length exact attention is timed forward only: the check's fp32 reference of one head's backward
# (several [T, T] matrices) would not fit in 80 GB, and no slice of the backward is an independent problem.
EXACT_GRAD_MAX_T = 32768
EXACT_CHECK_ROWS = 1024


def exact_case(name: str, c: Case, causal: bool = True) -> Case:
    """The exact-attention case at the shape of a ``B, T, H, D`` case: its modes, forward only past
    EXACT_GRAD_MAX_T."""
    modes = c.modes if c["T"] <= EXACT_GRAD_MAX_T else ("fwd",)
    return case(name, c.dtype, modes, B=c["B"], T=c["T"], H=c["H"], D=c["D"], causal=causal)


def exact_check_slice(c, device):
    """The attention family's slice (last batch element, last heads) while a backward is checked; for
    forward-only cases past EXACT_GRAD_MAX_T, the last EXACT_CHECK_ROWS queries of the last head against all
    keys, an exact sub-problem (causal masks are bottom-right aligned)."""
    if c.modes != ("fwd",) or c["T"] <= EXACT_GRAD_MAX_T:
        return check_slice(c, device)
    rows = min(EXACT_CHECK_ROWS, c["T"])

    def narrow(name, x):
        x = x[-1:, :, -1:]
        return x[:, -rows:] if name in ("q", "out") else x

    return narrow, (f"T > {EXACT_GRAD_MAX_T // 1024}k: forward checked on the last {rows} queries of batch "
                    f"{c['B'] - 1}, head {c['H'] - 1}, against all keys")


def _exact(inputs, c, backend):
    return flashops.flash_attention(inputs["q"], inputs["k"], inputs["v"], causal=c["causal"], backend=backend)


def exact_attention_baseline(name: str, family: str, cases) -> Op:
    """``flashops.flash_attention`` as an op of its own, at another family's shapes (``cases`` gives
    ``B, T, H, D, causal`` cases named ``name``), so that family's times can be read against exact attention."""
    return Op(
        name=name,
        family=family,
        cases=cases,
        make_inputs=make_inputs,
        reference=reference,
        flops=flops,
        flop_formula="fwd = 4*B*H*T*T*D (halved when causal); bwd = 2.5x fwd; fwd+bwd = 3.5x fwd",
        providers=flashops_providers("attention", _exact, lambda c: {"head_dim": c["D"]}),
        differentiable=("q", "k", "v"),
        x="T",
        panels=("D", "causal"),
        check_slice=exact_check_slice,
        traffic_bound=traffic_bound,
    )


OPS = [
    Op(
        name="flash_attention",
        family="attention",
        cases=cases,
        make_inputs=make_inputs,
        reference=reference,
        flops=flops,
        flop_formula="fwd = 4*B*H*T*T*D (halved when causal); bwd = 2.5x fwd; fwd+bwd = 3.5x fwd",
        providers=PROVIDERS,
        differentiable=("q", "k", "v"),
        outputs=("out",),
        x="T",
        panels=("D", "causal"),
        check_slice=check_slice,
        memory_cases=memory_cases,
        traffic_bound=traffic_bound,
    ),
]
