"""Linear attention: Lightning Attention-2 (per-head constant decay), gated linear attention (GLA), plain
and non-causal linear attention, and single-step decoding.

Every causal op funnels into one custom-op pair (``flashops::linear_attention_chunk_fwd/bwd``), the
non-causal op and the decode step into their own pairs, so ``torch.compile(fullgraph=True)`` traces
through without graph breaks. Conventions: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, log-gates g
``[B, T, H, K]``, states fp32 ``[N, H, K, V]`` (N = B, or the number of packed sequences); every op
returns ``(o, final_state)`` with ``final_state`` None unless ``output_final_state``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from ... import _cuda, _dispatch
from ..._custom_ops import eager, register_autograd
from ..._triton_utils import triton_reasons
from ..._numerics import compute_dtype
from ..._validation import (FLOAT_DTYPES, check_cu_seqlens, check_dim, check_same, check_tensor, check_values,
                            values_on_host)

LIGHTNING = "lightning_attention"
GLA = "gated_linear_attention"
NONCAUSAL = "noncausal_linear_attention"
LIGHTNING_STEP = "lightning_attention_step"
GLA_STEP = "gated_linear_attention_step"
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------- backends
def _torch_supports(req: _dispatch.Request) -> list:
    return []


def _triton_supports(req: _dispatch.Request) -> list:
    return triton_reasons(req.device, req.dtype)


for _op in (LIGHTNING, GLA, NONCAUSAL, LIGHTNING_STEP, GLA_STEP):
    _dispatch.register(_op, _dispatch.Backend(
        "triton", _dispatch.PRIORITY_TRITON, _triton_supports, f"{__name__}.triton",
        "Triton chunked kernels (two-pass: per-chunk states, then all chunks in parallel), fwd + bwd"))
    _dispatch.register(_op, _dispatch.Backend(
        "torch", _dispatch.PRIORITY_TORCH, _torch_supports, f"{__name__}.pytorch",
        "chunked PyTorch (one Python iteration per 64-position chunk; CPU and fallback)"))
    _dispatch.register_probe(_op, lambda device, dtype: _dispatch.Request(
        device, dtype, {"head_dim_k": 128, "head_dim_v": 128}))
for _op in (LIGHTNING_STEP, GLA_STEP):
    _dispatch.register(_op, _dispatch.Backend(
        "cuda", _dispatch.PRIORITY_CUDA_EXT, _cuda.supports, f"{__name__}.cuda_step",
        "CUDA kernel: one read and one write of the state, a block of 4 warps per (batch, head), fwd + bwd",
        forced_only=True))


def _backend(op: str, name: str):
    return _dispatch.get(op, name).load()


def _empty_like_none(t: Optional[Tensor], ref: Tensor) -> Tensor:
    """Custom ops return tensors only: an empty tensor stands for None."""
    return t if t is not None else ref.new_empty(0)


# ------------------------------------------------------------------------------------ causal custom ops
def _chunk_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], slopes: Optional[Tensor],
    initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float, output_final_state: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    impl = _backend(GLA if g is not None else LIGHTNING, backend)
    o, final = impl.chunk_forward(q, k, v, g, slopes, scale, initial_state, cu_seqlens, output_final_state)
    return o, _empty_like_none(final, q.new_empty(0, dtype=compute_dtype(q.dtype)))


_chunk_fwd = torch.library.custom_op("flashops::linear_attention_chunk_fwd", _chunk_fwd_impl, mutates_args=())


def _num_states(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]


@_chunk_fwd.register_fake
def _chunk_fwd_fake(q, k, v, g, slopes, initial_state, cu_seqlens, scale, output_final_state, backend):
    o = q.new_empty((*q.shape[:3], v.shape[-1]))
    state_dtype = compute_dtype(q.dtype)
    if output_final_state:
        final = q.new_empty((_num_states(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[3]), dtype=state_dtype)
    else:
        final = q.new_empty(0, dtype=state_dtype)
    return o, final


def _chunk_bwd_impl(
    do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor],
    slopes: Optional[Tensor], initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend(GLA if g is not None else LIGHTNING, backend)
    dq, dk, dv, dg, dh0 = impl.chunk_backward(do, dht, q, k, v, g, slopes, scale, initial_state, cu_seqlens)
    return dq, dk, dv, _empty_like_none(dg, q), _empty_like_none(dh0, q)


_chunk_bwd = torch.library.custom_op("flashops::linear_attention_chunk_bwd", _chunk_bwd_impl, mutates_args=())
_chunk_bwd_call = eager(_chunk_bwd, _chunk_bwd_impl)


@_chunk_bwd.register_fake
def _chunk_bwd_fake(do, dht, q, k, v, g, slopes, initial_state, cu_seqlens, scale, backend):
    dg = torch.empty_like(g, memory_format=torch.contiguous_format) if g is not None else q.new_empty(0)
    dh0 = (torch.empty_like(initial_state, memory_format=torch.contiguous_format) if initial_state is not None
           else q.new_empty(0))
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dg, dh0)


def _chunk_setup(ctx, inputs, output):
    q, k, v, g, slopes, initial_state, cu_seqlens, scale, output_final_state, backend = inputs
    ctx.save_for_backward(q, k, v, g, slopes, initial_state, cu_seqlens)
    ctx.config = (scale, output_final_state, backend)


def _chunk_backward(ctx, do, d_final):
    q, k, v, g, slopes, initial_state, cu_seqlens = ctx.saved_tensors
    scale, output_final_state, backend = ctx.config
    dht = d_final if output_final_state else None
    dq, dk, dv, dg, dh0 = _chunk_bwd_call(_last_dim_contiguous(do), dht, q, k, v, g, slopes, initial_state, cu_seqlens,
                                     scale, backend)
    return (dq, dk, dv, dg if g is not None else None, None, dh0 if initial_state is not None else None,
            None, None, None, None)


_chunk = register_autograd(_chunk_fwd, _chunk_fwd_impl, _chunk_backward, _chunk_setup)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# -------------------------------------------------------------------------------- non-causal custom ops
def _noncausal_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
    output_final_state: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    o, final = _backend(NONCAUSAL, backend).noncausal_forward(q, k, v, scale, initial_state, cu_seqlens,
                                                               output_final_state)
    return o, _empty_like_none(final, q.new_empty(0, dtype=compute_dtype(q.dtype)))


_noncausal_fwd = torch.library.custom_op(
    "flashops::linear_attention_noncausal_fwd", _noncausal_fwd_impl, mutates_args=())


@_noncausal_fwd.register_fake
def _noncausal_fwd_fake(q, k, v, initial_state, cu_seqlens, scale, output_final_state, backend):
    return _chunk_fwd_fake(q, k, v, None, None, initial_state, cu_seqlens, scale, output_final_state, backend)


def _noncausal_bwd_impl(
    do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dh0 = _backend(NONCAUSAL, backend).noncausal_backward(do, dht, q, k, v, scale, initial_state,
                                                                      cu_seqlens)
    return dq, dk, dv, _empty_like_none(dh0, q)


_noncausal_bwd = torch.library.custom_op(
    "flashops::linear_attention_noncausal_bwd", _noncausal_bwd_impl, mutates_args=())
_noncausal_bwd_call = eager(_noncausal_bwd, _noncausal_bwd_impl)


@_noncausal_bwd.register_fake
def _noncausal_bwd_fake(do, dht, q, k, v, initial_state, cu_seqlens, scale, backend):
    return _chunk_bwd_fake(do, dht, q, k, v, None, None, initial_state, cu_seqlens, scale, backend)[:3] + (
        torch.empty_like(initial_state, memory_format=torch.contiguous_format) if initial_state is not None
        else q.new_empty(0),)


def _noncausal_setup(ctx, inputs, output):
    q, k, v, initial_state, cu_seqlens, scale, output_final_state, backend = inputs
    ctx.save_for_backward(q, k, v, initial_state, cu_seqlens)
    ctx.config = (scale, output_final_state, backend)


def _noncausal_backward(ctx, do, d_final):
    q, k, v, initial_state, cu_seqlens = ctx.saved_tensors
    scale, output_final_state, backend = ctx.config
    dht = d_final if output_final_state else None
    dq, dk, dv, dh0 = _noncausal_bwd_call(_last_dim_contiguous(do), dht, q, k, v, initial_state, cu_seqlens, scale,
                                     backend)
    return dq, dk, dv, dh0 if initial_state is not None else None, None, None, None, None


_noncausal = register_autograd(_noncausal_fwd, _noncausal_fwd_impl, _noncausal_backward, _noncausal_setup)


# ------------------------------------------------------------------------------------ step custom ops
def _step_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], slopes: Optional[Tensor], state: Optional[Tensor],
    scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    impl = _backend(GLA_STEP if g is not None else LIGHTNING_STEP, backend)
    return impl.step_forward(q, k, v, g, slopes, state, scale)


_step_fwd = torch.library.custom_op("flashops::linear_attention_step_fwd", _step_fwd_impl, mutates_args=())


@_step_fwd.register_fake
def _step_fwd_fake(q, k, v, g, slopes, state, scale, backend):
    return q.new_empty(v.shape), q.new_empty((*q.shape, v.shape[-1]), dtype=compute_dtype(q.dtype))


def _step_bwd_impl(
    do: Tensor, d_new: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor],
    slopes: Optional[Tensor], state: Optional[Tensor], scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend(GLA_STEP if g is not None else LIGHTNING_STEP, backend)
    dq, dk, dv, dg, d_state = impl.step_backward(do, d_new, q, k, v, g, slopes, state, scale)
    return dq, dk, dv, _empty_like_none(dg, q), _empty_like_none(d_state, q)


_step_bwd = torch.library.custom_op("flashops::linear_attention_step_bwd", _step_bwd_impl, mutates_args=())
_step_bwd_call = eager(_step_bwd, _step_bwd_impl)


@_step_bwd.register_fake
def _step_bwd_fake(do, d_new, q, k, v, g, slopes, state, scale, backend):
    dg = torch.empty_like(g, memory_format=torch.contiguous_format) if g is not None else q.new_empty(0)
    ds = torch.empty_like(state, memory_format=torch.contiguous_format) if state is not None else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dg, ds)


def _step_setup(ctx, inputs, output):
    q, k, v, g, slopes, state, scale, backend = inputs
    ctx.save_for_backward(q, k, v, g, slopes, state)
    ctx.config = (scale, backend)


def _step_backward(ctx, do, d_new):
    q, k, v, g, slopes, state = ctx.saved_tensors
    scale, backend = ctx.config
    dq, dk, dv, dg, d_state = _step_bwd_call(do.contiguous(), d_new, q, k, v, g, slopes, state, scale, backend)
    return dq, dk, dv, dg if g is not None else None, None, d_state if state is not None else None, None, None


_step = register_autograd(_step_fwd, _step_fwd_impl, _step_backward, _step_setup)


# ------------------------------------------------------------------------------------------- validation
_LAYOUT = "[B, T, H, D]"


def _check_qkv(q, k, v, layout=_LAYOUT, ndim=4):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim, layout=layout)
    check_same((("q", q), ("k", k), ("v", v)), "device")
    check_same((("q", q), ("k", k), ("v", v)), "dtype")
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must match q in every dimension but the last, got q {tuple(q.shape)} and "
                         f"v {tuple(v.shape)}")
    check_dim("q", q.shape[-1], 1, MAX_HEAD_DIM)
    check_dim("v", v.shape[-1], 1, MAX_HEAD_DIM)


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    return float(scale)


def _check_varlen(q, cu_seqlens):
    if cu_seqlens is None:
        return None
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the inputs must be packed as [1, total_T, H, D], got q {tuple(q.shape)}")
    return check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[1], q.device)


def _check_state(name, state, n: int, heads: int, d_k: int, d_v: int, device, what="sequences"):
    if state is None:
        return None
    check_tensor(name, state, ndim=4, layout="[N, H, K, V]")
    if tuple(state.shape) != (n, heads, d_k, d_v):
        raise ValueError(f"{name} must have shape [N, H, K, V] = {(n, heads, d_k, d_v)} (N = number of {what}), "
                         f"got {tuple(state.shape)}")
    if state.device != device:
        raise ValueError(f"{name} is on device {state.device} but q is on {device}")
    return state


def _check_gates(name, g, q, gate_shape):
    check_tensor(name, g, ndim=len(gate_shape), dtypes=FLOAT_DTYPES)
    if tuple(g.shape) != tuple(gate_shape):
        raise ValueError(f"{name} must have the shape of q {tuple(gate_shape)} (log-gates per key dim), "
                         f"got {tuple(g.shape)}")
    if g.device != q.device:
        raise ValueError(f"{name} is on device {g.device} but q is on {q.device}")
    if values_on_host(g):
        check_values(name, g, g <= 0, "<= 0 (a log-gate; -inf forgets everything), not NaN")
    return g


_DEFAULT_SLOPES: dict = {}


def _default_slopes(heads: int, device) -> Tensor:
    """lightning_slopes(heads), made once per device: building it from a Python list is a host-to-device
    copy that waits for the GPU queue on every call."""
    if torch.compiler.is_compiling():
        return lightning_slopes(heads, device=device)
    key = (heads, str(device))
    if key not in _DEFAULT_SLOPES:
        _DEFAULT_SLOPES[key] = lightning_slopes(heads, device=device)
    return _DEFAULT_SLOPES[key]


def _check_slopes(slopes, heads: int, device):
    if slopes is None:
        return _default_slopes(heads, device)
    check_tensor("slopes", slopes, ndim=1, dtypes=FLOAT_DTYPES)
    if slopes.shape[0] != heads:
        raise ValueError(f"slopes must have shape [H] = ({heads},), got {tuple(slopes.shape)}")
    if slopes.device != device:
        raise ValueError(f"slopes is on device {slopes.device} but q is on {device}")
    if slopes.requires_grad:
        raise ValueError("slopes is a constant of the op (no gradient is computed for it): pass slopes.detach()")
    if values_on_host(slopes):
        check_values("slopes", slopes, slopes >= 0, ">= 0 (decay exp(-slope) <= 1; inf forgets everything), not NaN")
    return slopes.to(compute_dtype(slopes.dtype)).contiguous()


def _select(op: str, q: Tensor, v: Tensor, backend: Optional[str], **features) -> str:
    features.update(head_dim_k=q.shape[-1], head_dim_v=v.shape[-1])
    return _dispatch.select(op, _dispatch.Request(q.device, q.dtype, features), backend).name


# ------------------------------------------------------------------------------------------ public API
def lightning_slopes(num_heads: int, *, layer_idx: int = 0, num_layers: int = 1, device=None) -> Tensor:
    """ALiBi-style per-head decay rates for Lightning Attention (fp32 ``[H]``).

    For ``H`` a power of two, ``slope_h = 2^(-8 (h + 1) / H)``; otherwise the ALiBi recipe (the slopes of
    the nearest lower power of two, then every other slope of the next power of two). With ``num_layers > 1``
    they are scaled as in TransNormerLLM by ``1 - layer_idx / (num_layers - 1) + 1e-5`` (the last layer
    decays least).
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not (isinstance(num_layers, int) and num_layers >= 1 and isinstance(layer_idx, int)
            and 0 <= layer_idx < num_layers):
        raise ValueError(f"need 0 <= layer_idx < num_layers, got layer_idx={layer_idx!r}, num_layers={num_layers!r}")

    def power_of_two(n: int) -> list:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(lower)
    if lower != num_heads:
        slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
    factor = 1.0 if num_layers == 1 else 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return torch.tensor(slopes, dtype=torch.float32, device=device) * factor


def lightning_attention(
    q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor] = None, *, scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Causal linear attention with a constant per-head decay (Lightning Attention-2, TransNormerLLM, RetNet).

    ``S_t = exp(-slopes[h]) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, computed chunk-wise: a masked
    ``(Q K^T * D) V`` inside each 64-position chunk (``D[r, c] = exp(-slope (r - c))``) plus ``(Q * decay) S``
    with the fp32 state carried across chunks. ``slopes = 0`` is plain (non-decayed) linear attention.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``. fp16, bf16 or fp32 (fp64 on the torch backend; same dtype); K, V in 1..256;
            stride(-1) == 1. Any T (0 included).
        slopes: decay rates ``[H]``, >= 0 (inf forgets everything), treated as constants (no gradient).
            Default :func:`lightning_slopes` ``(H)``. CPU tensors are checked (ValueError on a NaN or negative
            slope); elsewhere a check would sync the host every call, so it is skipped and such a slope makes
            its head's outputs and state NaN on every backend.
        scale: multiplies q; default ``1/sqrt(K)`` (Lightning's published models use ``scale=1.0``).
        initial_state: fp32 ``[N, H, K, V]`` (N = B, or the number of sequences with cu_seqlens); it gets a
            gradient.
        output_final_state: also return the state after the last position, fp32 ``[N, H, K, V]``.
        cu_seqlens: int32 or int64 ``[N + 1]`` for packed sequences ``[1, total_T, H, D]`` (empty sequences allowed);
            each sequence starts from its own initial state (or zeros).
        backend: ``"triton"`` or ``"torch"``; default: the first that supports the inputs.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in the input dtype, final_state fp32 or None.

    Example:
        >>> q, k, v = (torch.randn(2, 4096, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, _ = flashops.lightning_attention(q, k, v, flashops.lightning_slopes(8, device="cuda"))
    """
    _check_qkv(q, k, v)
    cu_seqlens = _check_varlen(q, cu_seqlens)
    b, t, h, d_k = q.shape
    slopes = _check_slopes(slopes, h, q.device)
    initial_state = _check_state("initial_state", initial_state, _num_states(q, cu_seqlens), h, d_k, v.shape[-1],
                                 q.device)
    scale = _check_scale(scale, d_k)
    name = _select(LIGHTNING, q, v, backend, varlen=cu_seqlens is not None)
    o, final = _chunk(q, k, v, None, slopes, initial_state, cu_seqlens, scale, bool(output_final_state), name)
    return o, (final if output_final_state else None)


def gated_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Gated linear attention (GLA): data-dependent per-key decay.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, chunk-wise with the log-gate
    cumulative sums re-anchored at chunk and 16-row sub-chunk boundaries so that every exponential is <= 1.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (as in :func:`lightning_attention`).
        g: log-gates ``[B, T, H, K]``, <= 0 (e.g. ``logsigmoid(x) / 16``); any float dtype, computed in fp32,
            gets a gradient. Values below -30 act as -30 (a decay of ~1e-13; their gradient is 0): this keeps
            ``g = -inf`` (forget everything) free of NaN. CPU tensors are checked (ValueError on a NaN or
            positive entry); elsewhere the check is skipped (it would sync the host) and such an entry makes
            the outputs at and after it, and the final state, NaN in its (sequence, head) on every backend.
        scale, initial_state, output_final_state, cu_seqlens, backend: as in :func:`lightning_attention`.

    Returns:
        ``(o, final_state)``.
    """
    _check_qkv(q, k, v)
    cu_seqlens = _check_varlen(q, cu_seqlens)
    b, t, h, d_k = q.shape
    g = _check_gates("g", g, q, q.shape)
    initial_state = _check_state("initial_state", initial_state, _num_states(q, cu_seqlens), h, d_k, v.shape[-1],
                                 q.device)
    scale = _check_scale(scale, d_k)
    name = _select(GLA, q, v, backend, varlen=cu_seqlens is not None)
    o, final = _chunk(q, k, v, g, None, initial_state, cu_seqlens, scale, bool(output_final_state), name)
    return o, (final if output_final_state else None)


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Plain linear attention (no decay, no normalization).

    ``causal=True``: ``o_t = scale * q_t (S_0 + sum_{s<=t} k_s^T v_s)``, i.e. :func:`lightning_attention`
    with zero slopes. ``causal=False`` (encoders): ``o_t = scale * q_t (S_0 + K^T V)`` with the sum over the
    whole sequence (per packed sequence with cu_seqlens); the final state is ``S_0 + K^T V``. Feature maps
    (e.g. elu + 1) and normalization are the caller's (see ``flashops.nn.LightningAttention``).
    Arguments as in :func:`lightning_attention`.
    """
    _check_qkv(q, k, v)
    if causal:
        slopes = torch.zeros(q.shape[2], dtype=torch.float32, device=q.device)
        return lightning_attention(q, k, v, slopes, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
    cu_seqlens = _check_varlen(q, cu_seqlens)
    b, t, h, d_k = q.shape
    initial_state = _check_state("initial_state", initial_state, _num_states(q, cu_seqlens), h, d_k, v.shape[-1],
                                 q.device)
    scale = _check_scale(scale, d_k)
    name = _select(NONCAUSAL, q, v, backend, varlen=cu_seqlens is not None)
    o, final = _noncausal(q, k, v, initial_state, cu_seqlens, scale, bool(output_final_state), name)
    return o, (final if output_final_state else None)


_STEP_LAYOUT = "[B, H, D]"


def _check_step(q_t, k_t, v_t, state):
    _check_qkv(q_t, k_t, v_t, layout=_STEP_LAYOUT, ndim=3)
    b, h, d_k = q_t.shape
    return _check_state("state", state, b, h, d_k, v_t.shape[-1], q_t.device, what="batch rows (B)")


def _old_step_order(op: str, decay: str, legacy: bool, first, second):
    """The step ops take (decay, state) in the order of the chunked ops; until 0.1.0 they took (state, decay).
    Shapes tell the two apart (a state is 4-D), so old positional calls keep working, with a warning."""
    if not legacy:
        return first, second
    warnings.warn(f"{op}(q_t, k_t, v_t, state, {decay}) is the old argument order: pass {decay} before state, "
                  f"as in the chunked op ({op}(q_t, k_t, v_t, {decay}, state)), or both by keyword",
                  DeprecationWarning, stacklevel=3)
    return second, first


def _is_state(t) -> bool:
    return isinstance(t, Tensor) and t.dim() == 4


def lightning_attention_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, slopes: Optional[Tensor] = None, state: Optional[Tensor] = None, *,
    scale: Optional[float] = None, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step of :func:`lightning_attention`: q_t, k_t ``[B, H, K]``, v_t ``[B, H, V]``, slopes ``[H]``
    (None = :func:`lightning_slopes`), state fp32 ``[B, H, K, V]`` (None = zeros). Returns
    ``(o_t [B, H, V], new_state fp32)``; differentiable. Feeding a sequence token by token gives the chunked
    op's outputs and final state."""
    legacy = _is_state(slopes) or (slopes is None and isinstance(state, Tensor) and state.dim() == 1)
    slopes, state = _old_step_order(LIGHTNING_STEP, "slopes", legacy, slopes, state)
    state = _check_step(q_t, k_t, v_t, state)
    slopes = _check_slopes(slopes, q_t.shape[1], q_t.device)
    scale = _check_scale(scale, q_t.shape[-1])
    name = _select(LIGHTNING_STEP, q_t, v_t, backend)
    return _step(q_t, k_t, v_t, None, slopes, state, scale, name)


def gated_linear_attention_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, g_t: Tensor, state: Optional[Tensor] = None, *,
    scale: Optional[float] = None, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step of :func:`gated_linear_attention`: q_t, k_t, g_t ``[B, H, K]``, v_t ``[B, H, V]``,
    state fp32 ``[B, H, K, V]`` (None = zeros). Returns ``(o_t, new_state)``; differentiable."""
    g_t, state = _old_step_order(GLA_STEP, "g_t", g_t is None or _is_state(g_t), g_t, state)
    state = _check_step(q_t, k_t, v_t, state)
    g_t = _check_gates("g_t", g_t, q_t, q_t.shape)
    scale = _check_scale(scale, q_t.shape[-1])
    name = _select(GLA_STEP, q_t, v_t, backend)
    return _step(q_t, k_t, v_t, g_t, None, state, scale, name)


__all__ = [
    "lightning_attention", "gated_linear_attention", "linear_attention", "lightning_attention_step",
    "gated_linear_attention_step", "lightning_slopes",
]
