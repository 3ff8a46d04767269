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
FLOPs: attention-equivalent, i.e. FlashAttention's count at the same shape (causal fwd ``2*B*H*T^2*D``, bwd
2.5x, fwd+bwd 3.5x), so the TFLOP/s of LLA and of lla_vs_exact compare directly. The work LLA does is larger
and data dependent: by docs/lla.md about ``(5 + 3*iters)`` forward and ``(16 + 3*iters)`` backward T x T x D
products (halved when causal) against 2 and 5 for exact attention, iters = CG iterations (about 9 at ridge 1,
D = 64). Decode: ``B*H*T*(4*D^2 + 6*D)`` (the cache's D x D moments and the weighted sums).
Reference: ``flashops/ops/lla/reference.py``. It materializes a ``[Tq, Tk, D]`` product per head, so it runs on
query-row pieces under activation checkpointing when that product would pass 1 GiB (each piece of queries
with the keys it sees: the same math, peak memory of one piece); past 16k head-tokens the check runs on the
last batch element and the last heads.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

import flashops
from flashops.ops.lla import reference as lla_reference

from ..registry import Op, case, flashops_providers
from .attention import exact_attention_baseline, exact_case

RIDGE = 1.0
MODES = ("fwd", "fwd+bwd")
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


def flops(c, mode) -> float:
    """Attention-equivalent (see the module docstring): causal exact attention's count at this shape."""
    return 2 * c["B"] * c["H"] * c["T"] ** 2 * c["D"] * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


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
        flop_formula="attention-equivalent: fwd = 2*B*H*T*T*D (causal); bwd = 2.5x fwd; fwd+bwd = 3.5x fwd",
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
