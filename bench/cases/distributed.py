"""Context parallelism (flashops.distributed): ring and Ulysses attention, LASP-2, on every rank of a group.

Run under torchrun (``torchrun --nproc-per-node P -m bench --op ring_attention,lasp2_attention``; see
``bench/distributed.py``) or alone (a group of one: no communication). Every rank makes the full inputs from the
same seed and keeps its zigzag part; times are the slowest rank's.

Ops (inputs ``[B, T, H, D]``, T the whole sequence, P ranks, zigzag layout):
  ring_attention      causal exact attention, K/V heads Hkv (GQA); providers: each attention backend.
  ulysses_attention   the same by all-to-all (skipped where P does not divide H).
  lasp2_attention     Lightning (default slopes: one state per query head, scale 1); lasp2_gla: GLA
                      (g = logsigmoid(N(0, 1)) / 16, one state per kv head). Both with GQA (k, v, g with Hkv heads).
Sweeps: GPU bf16, B = 1, H = 16, Hkv = 4, D = 128, T/P in {8k, 32k} (quick: 8k); CPU fp32, B = 1, H = 4, Hkv = 2,
D = 32, T/P in {64, 256} (quick) or {256, 1024} (full). Modes fwd and fwd+bwd.
Reference: the single-device flashops op on the gathered sequence, in fp32 (its own cases check it against the
family's reference), this rank's part of its output; gradients flow back through the gather.
FLOPs: of the whole sequence (attention: 4*B*H*T*T*D, halved when causal; linear: as bench/cases/linear.py),
divided by the time: the group's aggregate rate.
Traffic (extra metrics, MB sent by this rank, measured with ``flashops.distributed.traffic`` in one forward and
one backward, next to the formulas; e = bytes per element, S = one fp32 state B*H*K*V*4):
  ring     fwd (P-1) * 2*B*(T/P)*Hkv*D*e (the K/V blocks); bwd the same plus P * 2*B*(T/P)*Hkv*D*4 (fp32 dK/dV)
  ulysses  fwd and bwd (P-1)/P * B*(T/P)*D*e * (2H + 2Hkv') (q, k, v in, out back; Hkv' = Hkv repeated to P)
  lasp2    fwd and bwd (P-1) * 2 * S (two chunks per rank; S with H states for Lightning, Hkv for GLA, which adds
           the decay column: K*(V+1)), independent of T
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import flashops
from flashops import distributed as cp

from ..distributed import default_group
from ..registry import Op, Unsupported, case, flashops_providers
from .linear import gla_flops, lightning_flops

LINEAR_SCALE = 1.0
MODES = ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------------- cases
def _sweep(name: str, sweep: str, device: torch.device, gqa: bool) -> list:
    world = default_group(device).size()
    if device.type == "cuda":
        dtype, heads, dim, locals_ = torch.bfloat16, 16, 128, (8192,) if sweep == "quick" else (8192, 32768)
    else:
        dtype, heads, dim, locals_ = torch.float32, 4, 32, (64, 256) if sweep == "quick" else (256, 1024)
    kv = {"Hkv": heads // 4 if device.type == "cuda" else heads // 2} if gqa else {}
    return [case(name, dtype, MODES, P=world, B=1, T=t * world, H=heads, **kv, D=dim) for t in locals_]


def _attention_inputs(c, device, generator) -> dict:
    shapes = {"q": (c["B"], c["T"], c["H"], c["D"]), "k": (c["B"], c["T"], c["Hkv"], c["D"])}
    shapes["v"] = shapes["k"]
    full = {n: torch.randn(s, generator=generator, device=device).to(c.dtype) for n, s in shapes.items()}
    return {n: cp.shard(x).contiguous() for n, x in full.items()}


def _linear_inputs(gated: bool):
    def make(c, device, generator) -> dict:
        shape, kv_shape = (c["B"], c["T"], c["H"], c["D"]), (c["B"], c["T"], c["Hkv"], c["D"])
        full = {n: torch.randn(s, generator=generator, device=device)
                for n, s in (("q", shape), ("k", kv_shape), ("v", kv_shape))}
        if gated:
            full["g"] = F.logsigmoid(torch.randn(kv_shape, generator=generator, device=device)) / 16
        return {n: cp.shard(x.to(c.dtype)).contiguous() for n, x in full.items()}

    return make


# -------------------------------------------------------------------------------------------- reference
def _gathered(inputs: dict) -> dict:
    return {n: cp.unshard(x) for n, x in inputs.items()}


def _backend(inputs: dict):
    """The backend of the reference and of the traffic measurement: automatic on GPUs, the PyTorch path on
    CPUs (where "automatic" may be the Triton interpreter)."""
    return "torch" if inputs["q"].device.type == "cpu" else None


def _attention_reference(inputs, c, upcast):
    full = _gathered(inputs)
    return cp.shard(flashops.flash_attention(full["q"], full["k"], full["v"], causal=True, backend=_backend(inputs)))


def _linear_reference(inputs, c, upcast):
    full = _gathered(inputs)
    options = dict(scale=LINEAR_SCALE, backend=_backend(inputs))
    if "g" in full:
        out, _ = flashops.gated_linear_attention(full["q"], full["k"], full["v"], full["g"], **options)
    else:
        out, _ = flashops.lightning_attention(full["q"], full["k"], full["v"], **options)
    return cp.shard(out)


# ------------------------------------------------------------------------------------------------ FLOPs
def _attention_flops(c, mode) -> float:
    return 2 * c["B"] * c["H"] * c["T"] * c["T"] * c["D"] * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


# ---------------------------------------------------------------------------------------------- traffic
def _per_rank(c) -> tuple[int, int]:
    """(rows of this rank, bytes per element)."""
    return c["T"] // c["P"], torch.empty(0, dtype=c.dtype).element_size()


def _ring_bytes(c) -> tuple[float, float]:
    rows, size = _per_rank(c)
    block = 2 * c["B"] * rows * c["Hkv"] * c["D"]  # K and V elements
    p = c["P"]
    return (p - 1) * block * size, ((p - 1) * block * size + p * block * 4) if p > 1 else 0


def _ulysses_bytes(c) -> tuple[float, float]:
    rows, size = _per_rank(c)
    p, h = c["P"], c["H"]
    h_kv = c["Hkv"] * (p // math.gcd(c["Hkv"], p))
    moved = (p - 1) / p * c["B"] * rows * c["D"] * size * (2 * h + 2 * h_kv)
    return moved, moved


def _lasp2_bytes(gated: bool):
    def formula(c) -> tuple[float, float]:
        state = c["B"] * (c["Hkv"] if gated else c["H"]) * c["D"] * (c["D"] + (1 if gated else 0)) * 4
        moved = (c["P"] - 1) * 2 * state
        return moved, moved

    return formula


def _traffic(run, differentiable: tuple, formula):
    """Extra metrics: MB this rank sent in one forward and in one backward, and the formulas' values."""

    def metrics(outputs, inputs, c) -> dict:
        leaves = {n: (t.detach().requires_grad_() if n in differentiable else t) for n, t in inputs.items()}
        with torch.enable_grad():
            with cp.traffic() as forward:
                out = run(leaves, c, _backend(inputs))
            with cp.traffic() as backward:
                out.backward(torch.ones_like(out))
        expected_fwd, expected_bwd = formula(c)
        return {"sent_MB_fwd": forward.sent / 1e6, "formula_MB_fwd": expected_fwd / 1e6,
                "sent_MB_bwd": backward.sent / 1e6, "formula_MB_bwd": expected_bwd / 1e6}

    return metrics


# ---------------------------------------------------------------------------------------------- providers
def _ring(inputs, c, backend=None):
    return cp.ring_attention(inputs["q"], inputs["k"], inputs["v"], causal=True, backend=backend)


def _ulysses(inputs, c, backend=None):
    if c["H"] % c["P"]:
        raise Unsupported(f"Ulysses splits the heads over the ranks: H = {c['H']} is not divisible by P = {c['P']}")
    return cp.ulysses_attention(inputs["q"], inputs["k"], inputs["v"], causal=True, backend=backend)


def _lasp2(inputs, c, backend=None):
    return cp.lasp2_attention(inputs["q"], inputs["k"], inputs["v"], g=inputs.get("g"), scale=LINEAR_SCALE,
                              backend=backend)[0]


def _attention_op(name, run, formula) -> Op:
    return Op(
        name=name, family="distributed", cases=lambda sweep, device: _sweep(name, sweep, device, gqa=True),
        make_inputs=_attention_inputs, reference=_attention_reference, flops=_attention_flops,
        flop_formula="whole sequence: fwd = 2*B*H*T*T*D (causal); bwd = 2.5x fwd; fwd+bwd = 3.5x fwd",
        providers=flashops_providers("attention", run, lambda c: {"head_dim": c["D"]}),
        differentiable=("q", "k", "v"), panels=("P",), collective=True,
        extra_metrics=_traffic(run, ("q", "k", "v"), formula))


def _linear_op(name, dispatch_op, gated, flops) -> Op:
    differentiable = ("q", "k", "v", "g") if gated else ("q", "k", "v")
    return Op(
        name=name, family="distributed", cases=lambda sweep, device: _sweep(name, sweep, device, gqa=True),
        make_inputs=_linear_inputs(gated), reference=_linear_reference, flops=flops,
        flop_formula="whole sequence, as the linear family (chunk 64)",
        providers=flashops_providers(dispatch_op, _lasp2, lambda c: {"head_dim_k": c["D"], "head_dim_v": c["D"]}),
        differentiable=differentiable, panels=("P",), collective=True,
        extra_metrics=_traffic(_lasp2, differentiable, _lasp2_bytes(gated)))


OPS = [
    _attention_op("ring_attention", _ring, _ring_bytes),
    _attention_op("ulysses_attention", _ulysses, _ulysses_bytes),
    _linear_op("lasp2_attention", "lightning_attention", False, lightning_flops),
    _linear_op("lasp2_gla", "gated_linear_attention", True, gla_flops),
]
