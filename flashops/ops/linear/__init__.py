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
from ..._custom_ops import BACKEND, OpArgs, eager, register_autograd
from ..._numerics import compute_dtype
from ..._triton_utils import triton_reasons
from ..._validation import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_dim,
    check_same,
    check_tensor,
    check_values,
    values_on_host,
)
from .args import ChunkBackend, NoncausalBackend, StepBackend

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


_TRITON_MODULES = {
    LIGHTNING: ("triton_lightning", "Triton chunked kernels: per-chunk states, then every chunk in parallel"),
    GLA: ("triton_gla", "Triton chunked kernels: gate cumsum, per-chunk states, then every chunk in parallel"),
    NONCAUSAL: ("triton_noncausal", "Triton: segment states reduced per sequence, then applied chunk by chunk"),
    LIGHTNING_STEP: ("triton_step", "Triton: one fused recurrent step per (batch, head)"),
    GLA_STEP: ("triton_step", "Triton: one fused recurrent step per (batch, head)"),
}
for _op, (_module, _what) in _TRITON_MODULES.items():
    _dispatch.register(_op, _dispatch.Backend(
        "triton", _dispatch.PRIORITY_TRITON, _triton_supports, f"{__name__}.{_module}", _what))
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


def _contiguous_like(t: Optional[Tensor], ref: Tensor) -> Tensor:
    """The fake of a gradient: like ``t`` and contiguous, or the empty stand-in for None."""
    return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else ref.new_empty(0)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_states(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]


# The argument lists of the custom ops, written once.
_QKV = OpArgs(("q", Tensor), ("k", Tensor), ("v", Tensor))
_DECAY = OpArgs(("g", Optional[Tensor]), ("slopes", Optional[Tensor]))
CHUNK_ARGS = _QKV + _DECAY + OpArgs(("initial_state", Optional[Tensor]), ("cu_seqlens", Optional[Tensor]),
                                    ("scale", float), ("output_final_state", bool)) + BACKEND
CHUNK_BWD_ARGS = OpArgs(("do", Tensor), ("dht", Optional[Tensor])) + CHUNK_ARGS.without("output_final_state")
NONCAUSAL_ARGS = CHUNK_ARGS.without("g", "slopes")
NONCAUSAL_BWD_ARGS = OpArgs(("do", Tensor), ("dht", Optional[Tensor])) + NONCAUSAL_ARGS.without("output_final_state")
STEP_ARGS = _QKV + _DECAY + OpArgs(("state", Optional[Tensor]), ("scale", float)) + BACKEND
STEP_BWD_ARGS = OpArgs(("do", Tensor), ("d_new", Optional[Tensor])) + STEP_ARGS


# ------------------------------------------------------------------------------------ causal custom ops
def _run_chunk_fwd(a) -> tuple[Tensor, Tensor]:
    impl: ChunkBackend = _backend(GLA if a.g is not None else LIGHTNING, a.backend)
    o, final = impl.chunk_forward(a.q, a.k, a.v, a.g, a.slopes, a.scale, a.initial_state, a.cu_seqlens,
                                  a.output_final_state)
    return o, _empty_like_none(final, a.q.new_empty(0, dtype=compute_dtype(a.q.dtype)))


def _states_fake(a, output: bool) -> Tensor:
    state_dtype = compute_dtype(a.q.dtype)
    if not output:
        return a.q.new_empty(0, dtype=state_dtype)
    q, v = a.q, a.v
    return q.new_empty((_num_states(q, a.cu_seqlens), q.shape[2], q.shape[3], v.shape[3]), dtype=state_dtype)


def _outputs_fake(a) -> tuple[Tensor, Tensor]:
    return a.q.new_empty((*a.q.shape[:3], a.v.shape[-1])), _states_fake(a, a.output_final_state)


def _run_chunk_bwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl: ChunkBackend = _backend(GLA if a.g is not None else LIGHTNING, a.backend)
    dq, dk, dv, dg, dh0 = impl.chunk_backward(a.do, a.dht, a.q, a.k, a.v, a.g, a.slopes, a.scale, a.initial_state,
                                              a.cu_seqlens)
    return dq, dk, dv, _empty_like_none(dg, a.q), _empty_like_none(dh0, a.q)


def _qkv_grads_fake(a) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_contiguous_like(t, a.q) for t in (a.q, a.k, a.v))


def _chunk_bwd_fake(a) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (*_qkv_grads_fake(a), _contiguous_like(a.g, a.q), _contiguous_like(a.initial_state, a.q))


_chunk_fwd, _chunk_fwd_impl = CHUNK_ARGS.custom_op(
    "flashops::linear_attention_chunk_fwd", _run_chunk_fwd, fake=_outputs_fake, returns=tuple[Tensor, Tensor])
_chunk_bwd, _chunk_bwd_impl = CHUNK_BWD_ARGS.custom_op(
    "flashops::linear_attention_chunk_bwd", _run_chunk_bwd, fake=_chunk_bwd_fake,
    returns=tuple[Tensor, Tensor, Tensor, Tensor, Tensor])
_chunk_bwd_call = eager(_chunk_bwd, _chunk_bwd_impl)


def _chunk_setup(ctx, inputs, output):
    CHUNK_ARGS.save(ctx, inputs)


def _chunk_backward(ctx, do, d_final):
    a, _ = CHUNK_ARGS.saved(ctx)
    dht = d_final if a.output_final_state else None
    dq, dk, dv, dg, dh0 = _chunk_bwd_call(*CHUNK_BWD_ARGS.values(
        do=_last_dim_contiguous(do), dht=dht, **CHUNK_BWD_ARGS.without("do", "dht").pick(a)))
    return CHUNK_ARGS.grads(q=dq, k=dk, v=dv, g=dg if a.g is not None else None,
                            initial_state=dh0 if a.initial_state is not None else None)


_chunk = register_autograd(_chunk_fwd, _chunk_fwd_impl, _chunk_backward, _chunk_setup)


# -------------------------------------------------------------------------------- non-causal custom ops
def _run_noncausal_fwd(a) -> tuple[Tensor, Tensor]:
    impl: NoncausalBackend = _backend(NONCAUSAL, a.backend)
    o, final = impl.noncausal_forward(a.q, a.k, a.v, a.scale, a.initial_state, a.cu_seqlens, a.output_final_state)
    return o, _empty_like_none(final, a.q.new_empty(0, dtype=compute_dtype(a.q.dtype)))


def _run_noncausal_bwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl: NoncausalBackend = _backend(NONCAUSAL, a.backend)
    dq, dk, dv, dh0 = impl.noncausal_backward(a.do, a.dht, a.q, a.k, a.v, a.scale, a.initial_state, a.cu_seqlens)
    return dq, dk, dv, _empty_like_none(dh0, a.q)


_noncausal_fwd, _noncausal_fwd_impl = NONCAUSAL_ARGS.custom_op(
    "flashops::linear_attention_noncausal_fwd", _run_noncausal_fwd, fake=_outputs_fake, returns=tuple[Tensor, Tensor])
_noncausal_bwd, _noncausal_bwd_impl = NONCAUSAL_BWD_ARGS.custom_op(
    "flashops::linear_attention_noncausal_bwd", _run_noncausal_bwd,
    fake=lambda a: (*_qkv_grads_fake(a), _contiguous_like(a.initial_state, a.q)),
    returns=tuple[Tensor, Tensor, Tensor, Tensor])
_noncausal_bwd_call = eager(_noncausal_bwd, _noncausal_bwd_impl)


def _noncausal_setup(ctx, inputs, output):
    NONCAUSAL_ARGS.save(ctx, inputs)


def _noncausal_backward(ctx, do, d_final):
    a, _ = NONCAUSAL_ARGS.saved(ctx)
    dht = d_final if a.output_final_state else None
    dq, dk, dv, dh0 = _noncausal_bwd_call(*NONCAUSAL_BWD_ARGS.values(
        do=_last_dim_contiguous(do), dht=dht, **NONCAUSAL_BWD_ARGS.without("do", "dht").pick(a)))
    return NONCAUSAL_ARGS.grads(q=dq, k=dk, v=dv, initial_state=dh0 if a.initial_state is not None else None)


_noncausal = register_autograd(_noncausal_fwd, _noncausal_fwd_impl, _noncausal_backward, _noncausal_setup)


# ------------------------------------------------------------------------------------ step custom ops
def _run_step_fwd(a) -> tuple[Tensor, Tensor]:
    impl: StepBackend = _backend(GLA_STEP if a.g is not None else LIGHTNING_STEP, a.backend)
    return impl.step_forward(a.q, a.k, a.v, a.g, a.slopes, a.state, a.scale)


def _step_fwd_fake(a) -> tuple[Tensor, Tensor]:
    return a.q.new_empty(a.v.shape), a.q.new_empty((*a.q.shape, a.v.shape[-1]), dtype=compute_dtype(a.q.dtype))


def _run_step_bwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl: StepBackend = _backend(GLA_STEP if a.g is not None else LIGHTNING_STEP, a.backend)
    dq, dk, dv, dg, d_state = impl.step_backward(a.do, a.d_new, a.q, a.k, a.v, a.g, a.slopes, a.state, a.scale)
    return dq, dk, dv, _empty_like_none(dg, a.q), _empty_like_none(d_state, a.q)


_step_fwd, _step_fwd_impl = STEP_ARGS.custom_op(
    "flashops::linear_attention_step_fwd", _run_step_fwd, fake=_step_fwd_fake, returns=tuple[Tensor, Tensor])
_step_bwd, _step_bwd_impl = STEP_BWD_ARGS.custom_op(
    "flashops::linear_attention_step_bwd", _run_step_bwd,
    fake=lambda a: (*_qkv_grads_fake(a), _contiguous_like(a.g, a.q), _contiguous_like(a.state, a.q)),
    returns=tuple[Tensor, Tensor, Tensor, Tensor, Tensor])
_step_bwd_call = eager(_step_bwd, _step_bwd_impl)


def _step_setup(ctx, inputs, output):
    STEP_ARGS.save(ctx, inputs)


def _step_backward(ctx, do, d_new):
    a, _ = STEP_ARGS.saved(ctx)
    dq, dk, dv, dg, d_state = _step_bwd_call(*STEP_BWD_ARGS.values(do=do.contiguous(), d_new=d_new,
                                                                    **STEP_ARGS.pick(a)))
    return STEP_ARGS.grads(q=dq, k=dk, v=dv, g=dg if a.g is not None else None,
                           state=d_state if a.state is not None else None)


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
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``. fp16, bf16 or fp32 (fp64 on the torch backend; same
            dtype); K, V in 1..256; stride(-1) == 1. Any T (0 included).
        slopes: decay rates ``[H]``, >= 0 (inf forgets everything), treated as constants (no gradient).
            Default :func:`lightning_slopes` ``(H)``. CPU tensors are checked (ValueError on a NaN or negative
            slope); elsewhere a check would sync the host every call, so it is skipped and such a slope makes
            its head's outputs and state NaN on every backend.
        scale: multiplies q; default ``1/sqrt(K)`` (Lightning's published models use ``scale=1.0``).
        initial_state: fp32 ``[N, H, K, V]`` (N = B, or the number of sequences with cu_seqlens); it gets a
            gradient.
        output_final_state: also return the state after the last position, fp32 ``[N, H, K, V]``.
        cu_seqlens: int32 or int64 ``[N + 1]`` for packed sequences ``[1, total_T, H, D]`` (empty sequences
            allowed); each sequence starts from its own initial state (or zeros).
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
    o, final = _chunk(*CHUNK_ARGS.values(q=q, k=k, v=v, g=None, slopes=slopes, initial_state=initial_state,
                                         cu_seqlens=cu_seqlens, scale=scale,
                                         output_final_state=bool(output_final_state), backend=name))
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
    o, final = _chunk(*CHUNK_ARGS.values(q=q, k=k, v=v, g=g, slopes=None, initial_state=initial_state,
                                         cu_seqlens=cu_seqlens, scale=scale,
                                         output_final_state=bool(output_final_state), backend=name))
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
    o, final = _noncausal(*NONCAUSAL_ARGS.values(q=q, k=k, v=v, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                                 scale=scale, output_final_state=bool(output_final_state),
                                                 backend=name))
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
    return _step(*STEP_ARGS.values(q=q_t, k=k_t, v=v_t, g=None, slopes=slopes, state=state, scale=scale, backend=name))


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
    return _step(*STEP_ARGS.values(q=q_t, k=k_t, v=v_t, g=g_t, slopes=None, state=state, scale=scale, backend=name))


__all__ = [
    "lightning_attention", "gated_linear_attention", "linear_attention", "lightning_attention_step",
    "gated_linear_attention_step", "lightning_slopes",
]
