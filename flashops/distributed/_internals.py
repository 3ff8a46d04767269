"""The one door from ``flashops.distributed`` into the package's internals.

Context parallelism calls the exact-attention kernels one key/value block at a time, with windows that
the public ``flash_attention`` cannot express (a block of a remote rank may see none of its diagonal) and
with the *global* output and log-sum-exp in the backward. Everything it needs from below the public API is
here, so that a change of those internals is mended in this file alone:

- ``flashops.ops.attention``: ``OP`` (its dispatch name), ``FWD_ARGS``/``BWD_ARGS`` with
  ``_attention_fwd_impl``/``_attention_bwd_impl`` (the argument lists and plain implementations behind the
  ``flashops::attention_fwd/bwd`` custom ops, whose ``window_left/right`` take any integers), ``_window`` and
  ``_scalars`` (the checks of ``window_size`` and ``softmax_scale``), ``_check_slopes`` (ALiBi slopes);
  ``args.AttentionArgs``; the torch
  backend's ``pytorch.backward`` with ``fused=False`` (see :func:`block_backward`);
- ``flashops._dispatch`` (backend selection) and ``flashops._validation`` (input checks);
- ``flashops.ops.linear.common.LOG_GATE_FLOOR`` (the floor the linear kernels apply to log-gates, which a
  state computed outside them must apply too) and ``flashops.ops.linear``'s input checks (``_check_qkv``,
  ``_check_gates``, ``_check_slopes``, ``_check_state``);
- ``flashops._numerics.compute_dtype`` (fp32 accumulators, fp64 for fp64 inputs, as the kernels' torch paths).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._numerics import compute_dtype
from .._validation import check_attention_inputs, check_tensor
from ..ops import attention as _attention
from ..ops import linear as _linear
from ..ops.attention import pytorch as _attention_pytorch
from ..ops.attention.args import AttentionArgs
from ..ops.linear.common import LOG_GATE_FLOOR

__all__ = ["LOG_GATE_FLOOR", "attention_backend", "block_backward", "block_forward", "check_alibi_slopes",
           "check_attention_inputs", "check_linear_inputs", "check_tensor", "compute_dtype", "parse_window",
           "softmax_scale"]


def parse_window(causal: bool, window_size) -> tuple[Optional[int], Optional[int]]:
    """``window_size`` checked as ``flash_attention`` does: ``(left, right)``, None = unbounded; causal caps
    right at 0."""
    return _attention._window(causal, window_size)


def softmax_scale(value, head_dim: int, softcap: float = 0.0) -> tuple[float, float]:
    """``(softmax_scale, softcap)`` checked as ``flash_attention`` does; None gives ``1/sqrt(head_dim)``."""
    scale, softcap, _ = _attention._scalars(value, softcap, 0.0, head_dim)
    return scale, softcap


def check_alibi_slopes(alibi_slopes: Optional[Tensor], batch: int, heads: int, device) -> Optional[Tensor]:
    """``alibi_slopes`` checked as ``flash_attention`` does: fp32 ``[H]`` or ``[B, H]`` on q's device."""
    return _attention._check_slopes(alibi_slopes, batch, heads, device)


def check_linear_inputs(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], slopes: Optional[Tensor],
                        initial_state: Optional[Tensor], layout: str) -> Optional[Tensor]:
    """q, k, v, then g (GLA) or slopes (Lightning), then the initial state, checked as ``gated_linear_attention`` /
    ``lightning_attention`` check them; returns Lightning's slopes (default ``lightning_slopes(H)``), None with g."""
    _linear._check_qkv(q, k, v, layout=layout)
    if g is not None:
        _linear._check_gates("g", g, k)
        state_heads = k.shape[2]
    else:
        slopes = _linear._check_slopes(slopes, q.shape[2], k.shape[2], q.device)
        state_heads = slopes.shape[0]
    _linear._check_state("initial_state", initial_state, q.shape[0], state_heads, q.shape[3], v.shape[3], q.device,
                         what="batch rows")
    return None if g is not None else slopes


def attention_backend(q: Tensor, backend: Optional[str]) -> str:
    """The attention backend that runs every block of a call (the dispatch rules of ``flash_attention``)."""
    features = {"head_dim": q.shape[-1], "varlen": False, "bias_grad": False, "block_size": None, "dropout": False,
                "deterministic": torch.are_deterministic_algorithms_enabled()}
    return _dispatch.select(_attention.OP, _dispatch.Request(q.device, q.dtype, features), backend).name


def _block_args(q: Tensor, k: Tensor, scale: float, softcap: float, window_left: Optional[int],
                window_right: Optional[int]) -> dict:
    """The attention custom ops' ``AttentionArgs`` fields for a dense block: no varlen, ALiBi, block mask, bias
    or dropout."""
    return vars(AttentionArgs(max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], softmax_scale=scale,
                              window_left=window_left, window_right=window_right, softcap=softcap))


def block_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, softcap: float, window_left: Optional[int],
                  window_right: Optional[int], backend: str) -> tuple[Tensor, Tensor]:
    """Attention of q ``[B, Tq, H, D]`` over one key/value block ``[B, Tk, Hkv, D]``: ``(out, lse)`` with lse
    fp32 ``[B, H, Tq]`` (-inf and out 0 for rows that see no key of the block). Key j is visible to query i
    when ``i + Tk - Tq - window_left <= j <= i + Tk - Tq + window_right`` (None: unbounded on that side)."""
    fields = _block_args(q, k, scale, softcap, window_left, window_right)
    return _attention._attention_fwd_impl(*_attention.FWD_ARGS.values(q=q, k=k, v=v, **fields, backend=backend))


def block_backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   *, scale: float, softcap: float, window_left: Optional[int], window_right: Optional[int],
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The block's share of (dq, dk, dv), given the output and log-sum-exp of the *whole* attention (over
    every block) for these queries: with the global statistics, the FlashAttention backward of one block
    yields exactly that block's terms of the gradients."""
    fields = _block_args(q, k, scale, softcap, window_left, window_right)
    if backend == "torch":
        # The statistics are global: a NaN on another rank reaches them while this block's q, k, v are finite.
        # torch's fused CPU backward forms delta from them, and falling back from it only where they are not
        # finite would change the rounding of every row; the chunked path gives the same bits either way and
        # keeps a poisoned row out of the other rows' gradients.
        grads = _attention_pytorch.backward(dout, dlse, q, k, v, out, lse.contiguous(), AttentionArgs(**fields),
                                            fused=False)
        return grads[0], grads[1], grads[2]
    dq, dk, dv, _ = _attention._attention_bwd_impl(*_attention.BWD_ARGS.values(
        dout=dout, dlse=dlse, q=q, k=k, v=v, out=out, lse=lse.contiguous(), **fields, want_dbias=False,
        backend=backend))
    return dq, dk, dv
