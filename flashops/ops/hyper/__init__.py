"""HyperAttention (Han et al., 2023): approximate softmax attention in near-linear time.

sortLSH finds the large entries of QK^T (queries and keys hashed with one angular LSH, sorted by bucket,
exact attention inside matching blocks), uniform key sampling estimates the rest, and the two are merged
by log-sum-exp. Causal attention halves the sequence recursively, with exact causal attention at the base.
Every piece is a call of the exact attention op (so its Triton kernel on a GPU, and its backward, including
the log-sum-exp gradient that the merge needs). The random choices live in a :class:`HyperPlan`
(see ``plan.py``); ``reference.py`` rebuilds the same approximation, materialized, from a plan.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..._validation import check_attention_inputs, pick_scale
from . import compose
from .plan import HyperLevel, HyperPlan, make_plan

MAX_HEAD_DIM = 256
MAX_LSH_PROJS = 30
_LAYOUT = "[B, T, H, D]"


def _check_qkv(q: Tensor, k: Tensor, v: Optional[Tensor], causal: bool):
    check_attention_inputs(q, k, v, layout=_LAYOUT, max_head_dim=MAX_HEAD_DIM)
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal hyper_attention is self-attention: q and k need the same length, got "
                         f"{q.shape[1]} and {k.shape[1]}")


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        need = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {need}, got {value!r}")
    return value


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def hyper_attention_plan(
    q: Tensor, k: Tensor, *, causal: bool = False, lsh_num_projs: int = 7, block_size: int = 256,
    sample_size: int = 256, min_seq_len: int = 4096, generator: Optional[torch.Generator] = None,
) -> HyperPlan:
    """Draw the random choices of :func:`hyper_attention` (LSH hyperplanes, sort permutations, sampled keys).

    Pass the result as ``plan=`` to reuse the same approximation (e.g. to compare with
    ``flashops.ops.hyper.reference.hyper_attention``); arguments as in :func:`hyper_attention`.
    """
    _check_qkv(q, k, None, causal)
    _check_int("lsh_num_projs", lsh_num_projs, 0, MAX_LSH_PROJS)
    _check_int("block_size", block_size, 1)
    _check_int("sample_size", sample_size, 0)
    _check_int("min_seq_len", min_seq_len, 1)
    _check_generator(generator)
    return make_plan(q, k, causal=bool(causal), lsh_num_projs=lsh_num_projs, block_size=block_size,
                     sample_size=sample_size, min_seq_len=min_seq_len, generator=generator)


def _check_plan(plan, q: Tensor, k: Tensor, causal: bool):
    if not isinstance(plan, HyperPlan):
        raise TypeError(f"plan must be a HyperPlan from hyper_attention_plan, got {type(plan).__name__}")
    want = (bool(causal), q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2])
    got = (plan.causal, plan.batch, plan.seq_len_q, plan.seq_len_k, plan.heads, plan.kv_heads)
    if got != want:
        raise ValueError(f"plan was drawn for (causal, B, Tq, Tk, H, Hkv) = {got}, but the call has {want}")
    if len(plan.levels) > 0 and plan.levels[0].q_perm.device != q.device:
        raise ValueError(f"plan is on device {plan.levels[0].q_perm.device} but q is on {q.device}")


def hyper_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
    scale: Optional[float] = None, lsh_num_projs: int = 7, block_size: int = 256, sample_size: int = 256,
    min_seq_len: int = 4096, generator: Optional[torch.Generator] = None, plan: Optional[HyperPlan] = None,
    return_lse: bool = False, backend: Optional[str] = None,
):
    """HyperAttention: approximate softmax attention in near-linear time (sortLSH + sampled residual).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]`` with ``H % Hkv == 0`` (GQA/MQA). fp16, bf16 or fp32
            (fp64 on the torch backend), D up to 256, any lengths (causal needs ``Tq == Tk``).
        causal: causal self-attention by recursive halving: the lower-left quarter of each halving is the
            non-causal approximation, the diagonal segments of at most ``min_seq_len`` are exact.
        softmax_scale: multiplies q.k; default ``1/sqrt(D)``. ``scale=`` is the same argument.
        lsh_num_projs: hyperplanes of the angular LSH (2**r buckets, ordered so that neighbouring buckets
            differ in one bit); 0 disables hashing (blocks of consecutive positions).
        block_size: keys per sorted block; ``ceil(Tk / block_size)`` blocks of (almost) equal size, and the
            queries cut into as many blocks. A query attends exactly to the keys of its block.
        sample_size: keys drawn uniformly (with replacement) per block from the keys outside the block and
            reweighted by the sampling rate; if no more keys than that lie outside, all are used and the
            block is exact. 0 keeps the block-diagonal part only.
        min_seq_len: at most this many keys (causal: tokens) -> exact attention.
        generator: source of the hyperplanes and samples (default: the global RNG of q's device).
        plan: a :class:`HyperPlan` from :func:`hyper_attention_plan` to reuse instead of drawing one
            (then ``lsh_num_projs``, ``block_size``, ``sample_size``, ``min_seq_len``, ``generator``
            are ignored).
        return_lse: also return the log-sum-exp ``[B, H, Tq]`` (fp32; fp64 for fp64 inputs) of the
            approximation; differentiable.
        backend: passed to the exact attention calls (``"triton"``, ``"torch"``).

    Returns:
        ``out`` ``[B, Tq, H, D]`` in the input dtype, or ``(out, lse)``.

    Example:
        >>> q, k, v = (torch.randn(1, 131072, 32, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> out = flashops.hyper_attention(q, k, v, causal=True)
    """
    _check_qkv(q, k, v, causal)
    softmax_scale = pick_scale(softmax_scale, scale)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if plan is None:
        plan = hyper_attention_plan(q, k, causal=causal, lsh_num_projs=lsh_num_projs, block_size=block_size,
                                    sample_size=sample_size, min_seq_len=min_seq_len, generator=generator)
    else:
        _check_plan(plan, q, k, causal)
    out, lse = compose.run(q, k, v, plan, float(softmax_scale), backend)
    return (out, lse) if return_lse else out


__all__ = ["hyper_attention", "hyper_attention_plan", "HyperPlan", "HyperLevel"]
