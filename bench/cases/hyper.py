"""HyperAttention against exact attention, with its relative error against exact attention beside every time.

Ops (inputs ``[B, T, H, D]``; plan settings ``lsh_num_projs = 7``, ``block_size = sample_size = block``,
``min_seq_len = min_len``; B = 1):
  hyper_attention  ``flashops.hyper_attention`` on each flashops backend (the backend runs its exact-attention
                   pieces). Every call draws its plan (LSH, sort, samples) from a generator seeded with PLAN_SEED,
                   so the plan's cost is timed and every call makes the same plan as the check's reference.
                   Extra metric ``rel_err_vs_exact`` = ||o - o_exact|| / ||o_exact|| (Frobenius, fp32), o_exact
                   from ``flashops.flash_attention`` (checked by the attention benchmark), on every timed row.
  hyper_vs_exact   ``flashops.flash_attention`` at the same shapes: the exact time HyperAttention is read
                   against (an op of its own, checked against exact attention).
Inputs (``data``): ``random`` (i.i.d. N(0, 1): diffuse attention, the hard case for sampling) and ``planted``
(as tests/ops/test_hyper.py: q, k of norm 4 * D^(1/4), each key a near copy of one query at a random position,
so every query has one key with logit ~16 against a spread of ~2: concentrated attention; with causal masking
about half of the partners are visible).
Sweeps:
  GPU full:  bf16, B = 1, H = 32, D in {64, 128}, T in {4k .. 128k} (powers of two), causal and not,
             block = 256, min_len = 4096 (the authors' defaults); ``planted`` at D = 64. fwd and fwd+bwd up to
             T = 32k, forward only beyond (see ``check_slice``). The issue's target: causal forward at 128k
             (131072) at least 4x faster than exact.
  GPU quick: D = 64, causal, random, T in {16k, 128k}.
  CPU quick: fp32, H = 2, D = 16, T = 256, block = 32, min_len = 64 (two causal levels), both data kinds.
  Memory (fwd+bwd vs T): GPU bf16 causal, H = 4, D = 64, T in {4k, 8k, 16k}; CPU full sweep only.
FLOPs: attention-equivalent, FlashAttention's count at the same shape (``4*B*H*T^2*D``, halved when causal;
bwd 2.5x, fwd+bwd 3.5x), so times compare directly with hyper_vs_exact's.
Check: against ``flashops/ops/hyper/reference.py`` built from the same plan (dense ``[T, T]`` weights: one
head's forward + backward needs about 7 * T^2 * 4 bytes, 28 GB at 32k). Up to 32k on the last heads that fit;
beyond, forward only on an exact sub-problem of one head: causal, the plan's first segment of at most 32k
positions (its own causal problem with the lower levels of the plan); non-causal, the last 1024 queries
against all keys (the plan's blocks restricted to those queries).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F

import flashops
from flashops.ops.hyper import reference as hyper_reference
from flashops.ops.hyper.plan import causal_split

from ..registry import Op, case, flashops_providers
from . import attention as attention_cases
from .attention import exact_attention_baseline, exact_case

PLAN_SEED = 20231017
LSH_PROJS = 7
GPU_HEADS, GPU_LENGTHS = 32, tuple(4096 << i for i in range(6))  # 4k .. 128k
# Largest T whose dense reference (one head, forward + backward) is checked; beyond, forward only on a slice.
DENSE_MAX_T = 32768
CHECK_BYTES = 2**33  # memory the check's reference may use, at about 7 * T^2 * 4 bytes per head
CHECK_ROWS = 1024


# ------------------------------------------------------------------------------------------------- cases
def _modes(t: int) -> tuple:
    return ("fwd", "fwd+bwd") if t <= DENSE_MAX_T else ("fwd",)


def _gpu_shapes(sweep: str) -> list:
    """(T, D, causal, data) of the GPU sweeps."""
    if sweep == "quick":
        return [(t, 64, True, "random") for t in (16384, 131072)]
    return [(t, d, causal, data) for d in (64, 128) for causal in (True, False)
            for data in (("random", "planted") if d == 64 else ("random",)) for t in GPU_LENGTHS]


def cases(sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        return [case("hyper_attention", torch.bfloat16, _modes(t), B=1, T=t, H=GPU_HEADS, D=d, causal=causal,
                     data=data, block=256, min_len=4096) for t, d, causal, data in _gpu_shapes(sweep)]
    lengths = (256,) if sweep == "quick" else (256, 1024, 2048)
    return [case("hyper_attention", torch.float32, _modes(t), B=1, T=t, H=2, D=16, causal=causal, data=data,
                 block=32, min_len=64) for causal in (True, False) for data in ("random", "planted") for t in lengths]


def exact_cases(sweep: str, device: torch.device) -> list:
    """hyper_vs_exact: hyper_attention's shapes (one case per shape, whatever the data)."""
    shapes = {(c["T"], c["H"], c["D"], c["causal"], c.dtype): c for c in cases(sweep, device)}
    return [exact_case("hyper_vs_exact", c, causal=c["causal"]) for c in shapes.values()]


def memory_cases(sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        lengths = (4096, 16384) if sweep == "quick" else (4096, 8192, 16384)
        return [case("hyper_attention", torch.bfloat16, ("fwd+bwd",), B=1, T=t, H=4, D=64, causal=True,
                     data="random", block=256, min_len=4096) for t in lengths]
    if sweep == "quick":
        return []
    return [case("hyper_attention", torch.float32, ("fwd+bwd",), B=1, T=t, H=2, D=16, causal=True, data="random",
                 block=32, min_len=64) for t in (512, 1024, 2048)]


def _plan_settings(c) -> dict:
    return dict(causal=c["causal"], lsh_num_projs=LSH_PROJS, block_size=c["block"], sample_size=c["block"],
                min_seq_len=c["min_len"])


def _plan_generator(device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(PLAN_SEED)


def _qkv(c, device, generator) -> tuple:
    shape = (c["B"], c["T"], c["H"], c["D"])
    draw = lambda: torch.randn(shape, generator=generator, device=device)  # noqa: E731
    if c["data"] == "random":
        return draw(), draw(), draw()
    norm = 4.0 * c["D"] ** 0.25  # partner logit norm^2 / sqrt(D) = 16
    q = F.normalize(draw(), dim=-1) * norm
    k = F.normalize(draw(), dim=-1) * norm
    partner = torch.randperm(c["T"], generator=generator, device=device)
    k[:, partner] = q + 0.01 * draw()  # the key at partner[i] is a near copy of query i
    return q, k, draw()


def make_inputs(c, device, generator) -> dict:
    q, k, v = (x.to(c.dtype) for x in _qkv(c, device, generator))
    # The plan every call draws (same seed, same inputs): what the reference is built from.
    plan = flashops.hyper_attention_plan(q, k, generator=_plan_generator(device), **_plan_settings(c))
    return {"q": q, "k": k, "v": v, "plan": plan}


# --------------------------------------------------------------------------------------------- reference
def _select_problems(level, keep_rows):
    return dataclasses.replace(level, q_perm=level.q_perm[keep_rows], k_perm=level.k_perm[keep_rows],
                               samples=level.samples[keep_rows])


def _last_heads(level, heads: int):
    return dataclasses.replace(level, q_perm=level.q_perm[..., -heads:], k_perm=level.k_perm[..., -heads:],
                               samples=level.samples[..., -heads:])


def _last_queries(level, t_q: int, rows: int):
    """A one-head non-causal level restricted to its last ``rows`` query positions: the kept sorted slots in
    their order, renumbered from 0, with each block's share of them as the new block bounds."""
    perm = level.q_perm[0, :, 0]
    first = t_q - rows
    kept = perm >= first
    sizes = torch.tensor([b - a for a, b in zip(level.q_bounds[:-1], level.q_bounds[1:])], device=perm.device)
    block = torch.repeat_interleave(torch.arange(len(sizes), device=perm.device), sizes)
    counts = torch.bincount(block[kept], minlength=len(sizes)).tolist()
    return dataclasses.replace(level, q_perm=(perm[kept] - first).view(1, -1, 1),
                               q_bounds=tuple(itertools.accumulate(counts, initial=0)))


def restrict_plan(plan, q, k):
    """The plan of the sub-problem that ``check_slice`` cut out (read from the narrowed q, k): the last batch
    elements and heads; causal: the first segment of ``Tq`` positions; non-causal: the last ``Tq`` queries."""
    b, t_q, h = q.shape[:3]
    t_k = k.shape[1]
    if (b, t_q, t_k, h) == (plan.batch, plan.seq_len_q, plan.seq_len_k, plan.heads):
        return plan
    batches = range(plan.batch - b, plan.batch)
    levels = [_last_heads(level, h) for level in plan.levels]
    padded = plan.padded_len
    if plan.causal:
        depth = (plan.padded_len // t_q).bit_length() - 1 if t_q < plan.seq_len_q else 0
        if t_q < plan.seq_len_q and (t_q << depth) != plan.padded_len:
            raise ValueError(f"a causal check slice must be a segment of the plan, got {t_q} of {plan.padded_len}")
        padded = plan.padded_len >> depth
        # Level l holds B * 2^l problems, batch-major; the first segment of length padded_len / 2^depth
        # contains the first 2^(l - depth) problems of each batch element, for l >= depth.
        def first_problems(l):
            return torch.tensor([n * (1 << l) + s for n in batches for s in range(1 << (l - depth))], device=q.device)

        levels = [_select_problems(level, first_problems(l)) for l, level in enumerate(levels) if l >= depth]
    else:
        levels = [_select_problems(level, torch.tensor(list(batches), device=q.device)) for level in levels]
        if t_q < plan.seq_len_q and levels:
            if b != 1 or h != 1:
                raise ValueError("a non-causal check on some queries must be cut to one batch element and head")
            levels = [_last_queries(levels[0], plan.seq_len_q, t_q)]
    return dataclasses.replace(plan, batch=b, seq_len_q=t_q, seq_len_k=t_k, heads=h, kv_heads=h, padded_len=padded,
                               levels=tuple(levels))


def reference(inputs, c, upcast):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    plan = restrict_plan(inputs["plan"], q, k)
    return hyper_reference.hyper_attention(q, k, v, plan, dtype=torch.float32 if upcast else q.dtype)[0]


def check_slice(c, device):
    """Up to DENSE_MAX_T the last batch element and the last heads that fit CHECK_BYTES (at least one);
    beyond (forward-only cases) an exact sub-problem of the last head (see the module docstring)."""
    b, t, h = c["B"], c["T"], c["H"]
    per_head = 7 * t * t * 4
    if t <= DENSE_MAX_T:
        if b * h * per_head <= CHECK_BYTES:
            return None, ""
        heads = max(1, min(h, CHECK_BYTES // per_head))
        return (lambda name, x: x[-1:, :, -heads:]), f"checked on batch {b - 1}, heads {h - heads}..{h - 1}"
    if c["causal"]:
        levels, base = causal_split(t, c["min_len"])
        segment = base << levels
        while segment > DENSE_MAX_T:
            segment //= 2
        return ((lambda name, x: x[-1:, :segment, -1:]),
                f"T > {DENSE_MAX_T // 1024}k: forward checked on positions 0..{segment - 1} of head {h - 1} "
                f"(the plan's first {segment // 1024}k-token segment, a causal problem of its own)")

    def narrow(name, x):
        x = x[-1:, :, -1:]
        return x[:, -CHECK_ROWS:] if name in ("q", "out") else x

    return narrow, (f"T > {DENSE_MAX_T // 1024}k: forward checked on the last {CHECK_ROWS} queries of head {h - 1} "
                    f"against all keys")


# ------------------------------------------------------------------------------------- providers, metric
def _hyper(inputs, c, backend):
    q = inputs["q"]
    return flashops.hyper_attention(q, inputs["k"], inputs["v"], generator=_plan_generator(q.device), backend=backend,
                                    **_plan_settings(c))


def relative_error_vs_exact(outs, inputs, c) -> dict:
    exact = flashops.flash_attention(inputs["q"], inputs["k"], inputs["v"], causal=c["causal"]).float()
    error = torch.linalg.vector_norm(outs["out"].float() - exact) / torch.linalg.vector_norm(exact)
    return {"rel_err_vs_exact": float(error)}


OPS = [
    Op(
        name="hyper_attention",
        family="hyper",
        cases=cases,
        make_inputs=make_inputs,
        reference=reference,
        flops=attention_cases.flops,
        flop_formula="attention-equivalent: fwd = 4*B*H*T*T*D (halved when causal); bwd = 2.5x fwd; "
                     "fwd+bwd = 3.5x fwd",
        providers=flashops_providers("attention", _hyper, lambda c: {"head_dim": c["D"]}),
        differentiable=("q", "k", "v"),
        x="T",
        panels=("D", "causal", "data"),
        check_slice=check_slice,
        memory_cases=memory_cases,
        extra_metrics=relative_error_vs_exact,
    ),
    exact_attention_baseline("hyper_vs_exact", "hyper", exact_cases),
]
