"""Local Linear Attention: flashops's backends, exact attention at the same shapes, and decoding.

Ops (inputs ``[B, T, H, D]``, causal, ``ridge_lambda = 1.0``, default CG controls):
  local_linear_attention         flashops backends (no peer library implements LLA).
  lla_vs_exact                   ``flashops.flash_attention(causal=True)`` at the same shapes: the exact-attention
                                 time LLA is read against (an op of its own, checked against exact attention).
  local_linear_attention_decode  one new query per sequence against a KV cache of T keys (inference: fwd only).
Sweeps:
  GPU full:  bf16, B = 2, H = 16, D in {64, 128}, T in {1k, 2k, 4k, 8k}; fwd and fwd+bwd.
  GPU quick: D = 128, T in {1k, 4k}.
  CPU quick: fp32, B = 1, H = 2, D = 16, T in {64, 192}.   CPU full: fp32, B = 1, H = 4, D in {32, 64}, T to 1k.
  Decode:    GPU bf16, B = 8, H = 16, D in {64, 128}, cache T in {1k, 4k, 16k, 64k}; CPU fp32 tiny.
  Memory (fwd+bwd vs T, B = 1): GPU bf16 H = 8, D = 64, T in {1k .. 8k}; CPU full sweep only.
FLOPs: LLA's own count, with the CG iterations each provider actually ran (``flashops.ops.lla.cg_stats``, read
from one call per provider and mode, reported as ``cg_iters_fwd`` / ``cg_iters_bwd``: per-tile iterations weighted by
the tile's (query, key) pairs). Over the P visible (query, key) pairs (causal: ``B*H*T*(T+1)/2``) the algorithm makes
``4 + 2*iters_fwd`` forward and ``10 + 2*iters_bwd`` backward products of 2*D flops per pair (docs/lla.md, which
lists them), so ``fwd = 2*D*P*(4 + 2*iters_fwd)``. Recomputation is not counted (the Triton kernels recompute the
logits on every pass over the keys). Exact attention's causal forward is ``2*B*H*T^2*D`` (2 products per pair):
lla_vs_exact's rate, read beside LLA's, compares the efficiency of the two at equal shapes. ``flops(case, mode)``
(planning only, e.g. gpu_check's time estimate) assumes ``ESTIMATED_ITERS``. Decode: ``B*H*T*(4*D^2 + 6*D)``
(the cache's D x D moments and the weighted sums).
Reference: ``flashops/ops/lla/reference.py``. It materializes a ``[Tq, Tk, D]`` product per head, so it runs on
query-row pieces under activation checkpointing when that product would pass 1 GiB (each piece of queries
with the keys it sees: the same math, peak memory of one piece); past 16k head-tokens the check runs on the
last batch element and the last heads.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

import flashops
from flashops.ops.lla import cg_stats
from flashops.ops.lla import reference as lla_reference

from ..registry import Op, case, flashops_providers
from .attention import exact_attention_baseline, exact_case

RIDGE = 1.0
MODES = ("fwd", "fwd+bwd")
# CG iterations assumed where none were measured (planning): about what ridge 1 needs at D = 64 (docs/lla.md)
ESTIMATED_ITERS = 16
GPU_BATCH, GPU_HEADS = 2, 16
CHECK_HEAD_TOKENS = 16384
REFERENCE_PIECE_BYTES = 2**30


# ------------------------------------------------------------------------------------------------- cases
def _sweep(op: str, sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        dims, lengths = ((64, 128), (1024, 2048, 4096, 8192)) if sweep == "full" else ((128,), (1024, 4096))
        return [case(op, torch.bfloat16, MODES, B=GPU_BATCH, T=t, H=GPU_HEADS, D=d) for d in dims for t in lengths]
    if sweep == "quick":
        return [case(op, torch.float32, MODES, B=1, T=t, H=2, D=16) for t in (64, 192)]
    return [case(op, torch.float32, MODES, B=1, T=t, H=4, D=d) for d in (32, 64) for t in (256, 512, 1024)]


def memory_cases(sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        lengths = (1024, 4096) if sweep == "quick" else (1024, 2048, 4096, 8192)
        return [case("local_linear_attention", torch.bfloat16, ("fwd+bwd",), B=1, T=t, H=8, D=64) for t in lengths]
    if sweep == "quick":
        return []
    return [case("local_linear_attention", torch.float32, ("fwd+bwd",), B=1, T=t, H=2, D=32)
            for t in (256, 512, 1024)]


def decode_cases(sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        dims, lengths = ((64, 128), (1024, 4096, 16384, 65536)) if sweep == "full" else ((128,), (4096, 65536))
        return [case("local_linear_attention_decode", torch.bfloat16, ("fwd",), B=8, T=t, H=16, D=d)
                for d in dims for t in lengths]
    lengths = (64, 512) if sweep == "quick" else (256, 1024, 4096)
    return [case("local_linear_attention_decode", torch.float32, ("fwd",), B=2, T=t, H=2, D=16) for t in lengths]


def make_inputs(c, device, generator) -> dict:
    shape = (c["B"], c["T"], c["H"], c["D"])
    return {name: torch.randn(shape, generator=generator, device=device).to(c.dtype) for name in ("q", "k", "v")}


def decode_inputs(c, device, generator) -> dict:
    b, t, h, d = c["B"], c["T"], c["H"], c["D"]
    draw = lambda *shape: torch.randn(shape, generator=generator, device=device).to(c.dtype)  # noqa: E731
    return {"q": draw(b, 1, h, d), "k_cache": draw(b, t, h, d), "v_cache": draw(b, t, h, d)}


# --------------------------------------------------------------------------------------------- reference
def _lla(q, k, v, upcast):
    return lla_reference.local_linear_attention(q, k, v, ridge_lambda=RIDGE, causal=True, upcast=upcast)


def reference(inputs, c, upcast):
    """The reference, on pieces of query rows (each with the keys it sees; causal masks are bottom-right
    aligned) recomputed in the backward, when one ``[rows, T, D]`` product would pass the piece budget."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    b, t, h, d = q.shape
    rows = max(1, REFERENCE_PIECE_BYTES // (b * h * t * d * 4))
    if rows >= t:
        return _lla(q, k, v, upcast)
    pieces = [checkpoint(_lla, q[:, start:start + rows], k[:, :start + rows], v[:, :start + rows], upcast,
                         use_reentrant=False) for start in range(0, t, rows)]
    return torch.cat(pieces, dim=1)


def decode_reference(inputs, c, upcast):
    return _lla(inputs["q"], inputs["k_cache"], inputs["v_cache"], upcast)


def check_slice(c, device):
    """Batch elements and heads are independent: past CHECK_HEAD_TOKENS check the last batch element and the
    last heads over the whole sequence."""
    b, t, h = c["B"], c["T"], c["H"]
    if b * h * t <= CHECK_HEAD_TOKENS:
        return None, ""
    heads = max(1, min(h, CHECK_HEAD_TOKENS // t))
    return (lambda name, x: x[-1:, :, -heads:]), f"checked on batch {b - 1}, heads {h - heads}..{h - 1}"


def lla_flops(c, mode, iters_fwd: float, iters_bwd: float) -> float:
    """LLA's own count at these CG iterations (see the module docstring)."""
    pairs = c["B"] * c["H"] * c["T"] * (c["T"] + 1) / 2
    products = (4 + 2 * iters_fwd if mode != "bwd" else 0.0) + (10 + 2 * iters_bwd if mode != "fwd" else 0.0)
    return 2 * c["D"] * pairs * products


def flops(c, mode) -> float:
    return lla_flops(c, mode, ESTIMATED_ITERS, ESTIMATED_ITERS)


def measured_work(call, c, mode) -> dict:
    """The CG iterations one call ran, and the FLOPs they make; no rate when a solve the mode needs reported
    nothing (a backend that does not record its iterations)."""
    with cg_stats.record_cg() as solves:
        call()
    stages = [s for s, runs in (("fwd", mode != "bwd"), ("bwd", mode != "fwd")) if runs]
    if not all(any(solve.stage == s for solve in solves) for s in stages):
        return {"flops": None}
    iters = {s: cg_stats.mean_iterations(solves, s) for s in ("fwd", "bwd")}
    return {"flops": lla_flops(c, mode, iters["fwd"], iters["bwd"]), **{f"cg_iters_{s}": iters[s] for s in stages}}


def decode_flops(c, mode) -> float:
    d = c["D"]
    return c["B"] * c["H"] * c["T"] * (4 * d * d + 6 * d)


# --------------------------------------------------------------------------------------------- providers
def _features(c) -> dict:
    return {"head_dim": c["D"]}


def _lla_call(inputs, c, backend):
    return flashops.local_linear_attention(inputs["q"], inputs["k"], inputs["v"], ridge_lambda=RIDGE, causal=True,
                                           backend=backend)


def _decode_call(inputs, c, backend):
    return flashops.local_linear_attention_decode(inputs["q"], inputs["k_cache"], inputs["v_cache"],
                                                  ridge_lambda=RIDGE, backend=backend)


OPS = [
    Op(
        name="local_linear_attention",
        family="lla",
        cases=lambda sweep, device: _sweep("local_linear_attention", sweep, device),
        make_inputs=make_inputs,
        reference=reference,
        flops=flops,
        flop_formula="LLA's own, with the CG iterations run: P = B*H*T*(T+1)/2 (causal); "
                     "fwd = 2*D*P*(4 + 2*iters_fwd); bwd = 2*D*P*(10 + 2*iters_bwd)",
        measured_work=measured_work,
        providers=flashops_providers("local_linear_attention", _lla_call, _features),
        differentiable=("q", "k", "v"),
        x="T",
        panels=("D",),
        check_slice=check_slice,
        memory_cases=memory_cases,
    ),
    exact_attention_baseline(
        "lla_vs_exact", "lla",
        lambda sweep, device: [exact_case("lla_vs_exact", c) for c in _sweep("lla_vs_exact", sweep, device)]),
    Op(
        name="local_linear_attention_decode",
        family="lla",
        cases=decode_cases,
        make_inputs=decode_inputs,
        reference=decode_reference,
        flops=decode_flops,
        flop_formula="fwd = B*H*T*(4*D*D + 6*D) (T = cache length)",
        providers=flashops_providers("local_linear_attention_decode", _decode_call, _features),
        x="T",
        panels=("D",),
    ),
]
