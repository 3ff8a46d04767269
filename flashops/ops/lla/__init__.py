"""Local Linear Attention (LLA, Zuo et al. 2025): public functions, input checks, autograd wiring.

For each query, LLA fits an affine model to the visible keys/values by softmax-kernel-weighted ridge
regression and returns its intercept at the query: softmax attention plus a local linear correction
(docs/lla.md). ``local_linear_attention`` is the training op (forward and exact backward through the solve);
``local_linear_attention_decode`` is the one-token inference step against a KV cache.

Both funnel into custom ops (``flashops::lla_fwd`` / ``flashops::lla_bwd``, ``flashops::lla_decode``) so that
``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ... import _dispatch
from ..._custom_ops import BACKEND, OpArgs, eager, register_autograd
from ..._numerics import compute_dtype
from ..._triton_utils import triton_reasons
from ..._validation import check_attention_inputs, check_tensor, pick_scale
from .args import LLAArgs, LLABackend, LLADecodeBackend

OP = "local_linear_attention"
DECODE_OP = "local_linear_attention_decode"
MAX_HEAD_DIM = 256
TRITON_MAX_HEAD_DIM = 128
_LAYOUT = "[B, T, H, D]"
# CG tolerance (relative residual) when none is given: about the accuracy the input dtype can carry.
DEFAULT_CG_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-4}


# ----------------------------------------------------------------------------------------------- backends
def _torch_supports(req: _dispatch.Request) -> list:
    return []


def _triton_supports(req: _dispatch.Request) -> list:
    reasons = triton_reasons(req.device, req.dtype)
    if req.get("head_dim", 0) > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim {req['head_dim']} > {TRITON_MAX_HEAD_DIM} (the CG tile keeps several "
                       f"[BLOCK_M, D] vectors in registers)")
    return reasons


for _op, _module, _what in (
        (OP, "triton", "FlashLLA: blockwise streaming, matrix-free CG solve, implicit-differentiation backward"),
        (DECODE_OP, "triton_decode", "split-KV decode: exact D x D statistics per split, merged, one direct solve")):
    _dispatch.register(_op, _dispatch.Backend("triton", _dispatch.PRIORITY_TRITON, _triton_supports,
                                              f"{__name__}.{_module}", _what))
    _dispatch.register(_op, _dispatch.Backend(
        "torch", _dispatch.PRIORITY_TORCH, _torch_supports, f"{__name__}.pytorch",
        "chunked PyTorch: weights kept per query chunk, matrix-free CG (linear memory in T); exact D x D decode"))
    _dispatch.register_probe(_op, lambda device, dtype: _dispatch.Request(device, dtype, {"head_dim": 64}))


# --------------------------------------------------------------------------------------------- custom ops
# The argument lists of the custom ops, written once.
_ARGS = OpArgs.fields(LLAArgs)
_INPUTS = OpArgs(("q", Tensor), ("k", Tensor), ("v", Tensor))
_STATS = OpArgs(("out", Tensor), ("lse", Tensor), ("k_bar", Tensor), ("z", Tensor))
FWD_ARGS = _INPUTS + OpArgs(("ridge", Tensor)) + _ARGS + BACKEND
BWD_ARGS = OpArgs(("dout", Tensor)) + _INPUTS + _STATS + OpArgs(("ridge", Tensor)) + _ARGS + BACKEND
DECODE_ARGS = (OpArgs(("q", Tensor), ("k_cache", Tensor), ("v_cache", Tensor), ("cache_seqlens", Optional[Tensor]),
                      ("ridge", Tensor), ("softmax_scale", float)) + BACKEND)


def _run_lla_fwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend: LLABackend = _dispatch.get(OP, a.backend).load()
    return backend.forward(a.q, a.k, a.v, a.ridge, LLAArgs(**_ARGS.pick(a)))


def _lla_fwd_fake(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, t_q, h, _ = a.q.shape
    dt = compute_dtype(a.q.dtype)
    stats = a.q.new_empty(a.q.shape, dtype=dt)
    return torch.empty_like(a.q), a.q.new_empty((b, h, t_q), dtype=dt), stats, torch.empty_like(stats)


def _run_lla_bwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend: LLABackend = _dispatch.get(OP, a.backend).load()
    dq, dk, dv, dridge = backend.backward(a.dout, a.q, a.k, a.v, a.out, a.lse, a.k_bar, a.z, a.ridge,
                                          LLAArgs(**_ARGS.pick(a)))
    return dq, dk, dv, dridge.contiguous()


def _lla_bwd_fake(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, t_q, h, _ = a.q.shape
    return (torch.empty_like(a.q), torch.empty_like(a.k), torch.empty_like(a.v),
            a.q.new_empty((b, t_q, h), dtype=compute_dtype(a.q.dtype)))


_lla_fwd, _lla_fwd_impl = FWD_ARGS.custom_op("flashops::lla_fwd", _run_lla_fwd, fake=_lla_fwd_fake,
                                             returns=tuple[Tensor, Tensor, Tensor, Tensor])
_lla_bwd, _lla_bwd_impl = BWD_ARGS.custom_op("flashops::lla_bwd", _run_lla_bwd, fake=_lla_bwd_fake,
                                             returns=tuple[Tensor, Tensor, Tensor, Tensor])
_lla_bwd_call = eager(_lla_bwd, _lla_bwd_impl)


def _setup_context(ctx, inputs, output):
    out, lse, k_bar, z = output
    ctx.mark_non_differentiable(lse, k_bar, z)
    FWD_ARGS.save(ctx, inputs, output)


def _backward(ctx, dout, _dlse, _dk_bar, _dz):
    a, (out, lse, k_bar, z) = FWD_ARGS.saved(ctx)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dridge = _lla_bwd_call(*BWD_ARGS.values(dout=dout, out=out, lse=lse, k_bar=k_bar, z=z,
                                                        **FWD_ARGS.pick(a)))
    return FWD_ARGS.grads(q=dq, k=dk, v=dv, ridge=dridge if FWD_ARGS.needs_grad(ctx, "ridge") else None)


_lla = register_autograd(_lla_fwd, _lla_fwd_impl, _backward, _setup_context)


def _run_lla_decode(a) -> Tensor:
    backend: LLADecodeBackend = _dispatch.get(DECODE_OP, a.backend).load()
    return backend.decode(a.q, a.k_cache, a.v_cache, a.cache_seqlens, a.ridge,
                          LLAArgs(softmax_scale=a.softmax_scale, causal=False))


_lla_decode, _lla_decode_impl = DECODE_ARGS.custom_op(
    "flashops::lla_decode", _run_lla_decode, fake=lambda a: torch.empty_like(a.q), returns=Tensor)
_lla_decode_call = eager(_lla_decode, _lla_decode_impl)


# ------------------------------------------------------------------------------------------- validation
def _check_qkv(q, k, v, names=("q", "k", "v")):
    check_attention_inputs(q, k, v, names=names, layout=_LAYOUT, max_head_dim=MAX_HEAD_DIM)


def _can_inspect(t: Tensor) -> bool:
    """Whether ``t``'s values can be inspected now (not while tracing, not on meta tensors)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _ridge(ridge_lambda, b: int, t_q: int, h: int, device, dtype) -> Tensor:
    """ridge_lambda as a view broadcast to [B, Tq, H] in the compute dtype of the inputs ``dtype`` (fp32; fp64
    for fp64), differentiable when it is a tensor."""
    if isinstance(ridge_lambda, Tensor):
        check_tensor("ridge_lambda", ridge_lambda, dtypes=(torch.float16, torch.bfloat16, torch.float32,
                                                           torch.float64))
        if ridge_lambda.device != torch.device(device):
            raise ValueError(f"ridge_lambda is on device {ridge_lambda.device} but q is on {device}")
        try:
            torch.broadcast_shapes(ridge_lambda.shape, (b, t_q, h))
        except RuntimeError:
            raise ValueError(f"ridge_lambda of shape {tuple(ridge_lambda.shape)} does not broadcast to "
                             f"[B, Tq, H] = {(b, t_q, h)}; use a scalar, [H], [B, 1, H] or [B, Tq, H]") from None
        if _can_inspect(ridge_lambda) and ridge_lambda.numel():
            if not bool(((ridge_lambda > 0) & torch.isfinite(ridge_lambda)).all()):
                raise ValueError(f"ridge_lambda must be finite and > 0 everywhere, got min "
                                 f"{float(ridge_lambda.min())}")
        return ridge_lambda.to(compute_dtype(dtype)).expand(b, t_q, h)
    if isinstance(ridge_lambda, bool) or not isinstance(ridge_lambda, (int, float)):
        raise TypeError(f"ridge_lambda must be a float or a tensor, got {type(ridge_lambda).__name__}")
    if not (math.isfinite(ridge_lambda) and ridge_lambda > 0):
        raise ValueError(f"ridge_lambda must be finite and > 0, got {ridge_lambda!r}")
    return torch.full((1, 1, 1), float(ridge_lambda), device=device, dtype=compute_dtype(dtype)).expand(b, t_q, h)


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return float(softmax_scale)


def _solver(cg_max_iters, cg_tol, cg_preconditioner, dtype) -> tuple[int, float, bool]:
    if isinstance(cg_max_iters, bool) or not isinstance(cg_max_iters, int) or cg_max_iters < 1:
        raise ValueError(f"cg_max_iters must be an int >= 1, got {cg_max_iters!r}")
    if cg_tol is None:
        cg_tol = DEFAULT_CG_TOL[dtype]
    if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not (0 <= cg_tol < 1):
        raise ValueError(f"cg_tol must be a float in [0, 1) (relative residual), got {cg_tol!r}")
    if not isinstance(cg_preconditioner, bool):
        raise TypeError(f"cg_preconditioner must be a bool, got {type(cg_preconditioner).__name__}")
    return cg_max_iters, float(cg_tol), cg_preconditioner


# ------------------------------------------------------------------------------------------ public API
def local_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, ridge_lambda: Union[float, Tensor], softmax_scale: Optional[float] = None,
    scale: Optional[float] = None, causal: bool = True, cg_max_iters: int = 32, cg_tol: Optional[float] = None,
    cg_preconditioner: bool = False, backend: Optional[str] = None,
) -> Tensor:
    """Local Linear Attention: per query, the intercept of a softmax-kernel-weighted local ridge regression.

    With ``s_ij = softmax_j(softmax_scale * q_i . k_j)`` over the visible keys, k_bar/v_bar the s-weighted
    means and C_kk, C_vk the s-weighted (centred) covariances of keys and values::

        o_i = v_bar_i + C_vk,i (C_kk,i + ridge_lambda_i I)^{-1} (q_i - k_bar_i)

    i.e. ``argmin_b min_W sum_j s_ij ||v_j - b - W (k_j - q_i)||^2 + ridge_lambda_i ||W||_F^2``. Large
    ``ridge_lambda`` gives softmax attention; small gives a local linear fit (docs/lla.md for conventions).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]`` with ``H % Hkv == 0`` (GQA/MQA). fp16, bf16 or fp32
            (fp64 on the torch backend); D up to 256 (128 on the Triton backend); stride(-1) == 1.
        ridge_lambda: > 0; a float or a tensor broadcastable to ``[B, Tq, H]`` (e.g. ``[H]`` per head). A
            tensor that requires grad gets its exact gradient.
        softmax_scale: multiplies q.k; default ``1/sqrt(D)``. ``scale=`` is the same argument.
        causal: query i sees keys j <= i + Tk - Tq (bottom-right aligned, as flash-attn). Otherwise all keys.
        cg_max_iters, cg_tol, cg_preconditioner: the matrix-free conjugate-gradient solve (every backend,
            forward and backward): at most ``cg_max_iters`` iterations, stopping per query when the relative
            residual is <= ``cg_tol`` (default 1e-12 for fp64, 1e-6 for fp32, 1e-4 for fp16/bf16), optionally
            with a Jacobi preconditioner (off by default: it rarely helps here, docs/lla.md). CG converges in at
            most D iterations in exact arithmetic; ill-conditioned systems (tiny ridge) need more.
        backend: force ``"triton"`` or ``"torch"``; default: the first that supports the inputs.

    Returns:
        ``out`` ``[B, Tq, H, D]`` in the input dtype. A query that sees no key gives zeros.

    Example:
        >>> q, k, v = (torch.randn(2, 1024, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> out = flashops.local_linear_attention(q, k, v, ridge_lambda=1.0)
    """
    _check_qkv(q, k, v)
    b, t_q, h, d = q.shape
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = _scale(pick_scale(softmax_scale, scale), d)
    iters, tol, precond = _solver(cg_max_iters, cg_tol, cg_preconditioner, q.dtype)
    ridge = _ridge(ridge_lambda, b, t_q, h, q.device, q.dtype)
    chosen = _dispatch.select(OP, _dispatch.Request(q.device, q.dtype, {"head_dim": d}), backend)
    out, _, _, _ = _lla(*FWD_ARGS.values(q=q, k=k, v=v, ridge=ridge, softmax_scale=scale, causal=causal,
                                         cg_max_iters=iters, cg_tol=tol, cg_preconditioner=precond,
                                         backend=chosen.name))
    return out


def local_linear_attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, *, ridge_lambda: Union[float, Tensor],
    cache_seqlens: Optional[Tensor] = None, softmax_scale: Optional[float] = None, scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """One decoding step of LLA: a single new query per sequence against its KV cache (inference only).

    Equals the last row of :func:`local_linear_attention` (causal) over the cached keys, computed in one
    pass over the cache with exact D x D statistics (no CG) split across programs and merged by max
    rescaling, then one D x D solve per (batch, head). Working memory is independent of the cache length.

    Args:
        q: ``[B, 1, H, D]``, the new token's query (its key/value must already be in the cache).
        k_cache, v_cache: ``[B, Tmax, Hkv, D]``.
        cache_seqlens: optional int32 ``[B]``: sequence b uses keys ``[0, cache_seqlens[b])``; default Tmax.
        ridge_lambda: as in :func:`local_linear_attention` (broadcastable to ``[B, 1, H]``).
        softmax_scale (or ``scale``), backend: as in :func:`local_linear_attention`.

    Returns:
        ``out`` ``[B, 1, H, D]`` in the input dtype.
    """
    _check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    b, t_q, h, d = q.shape
    if t_q != 1:
        raise ValueError(f"q must hold one new token per sequence ([B, 1, H, D]), got shape {tuple(q.shape)}; "
                         f"use local_linear_attention for several")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, Tensor):
            raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
        if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (b,):
            raise ValueError(f"cache_seqlens must be int32 of shape ({b},), got {cache_seqlens.dtype} "
                             f"{tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens is on device {cache_seqlens.device} but q is on {q.device}")
        if _can_inspect(cache_seqlens) and b:
            lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
            if lo < 0 or hi > k_cache.shape[1]:
                raise ValueError(f"cache_seqlens must be in [0, {k_cache.shape[1]}] (the cache length), "
                                 f"got values in [{lo}, {hi}]")
    ridge = _ridge(ridge_lambda, b, 1, h, q.device, q.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache, ridge)):
        raise RuntimeError("local_linear_attention_decode is inference-only (no backward); call it under "
                           "torch.no_grad() or use local_linear_attention for training")
    scale = _scale(pick_scale(softmax_scale, scale), d)
    chosen = _dispatch.select(DECODE_OP, _dispatch.Request(q.device, q.dtype, {"head_dim": d}), backend)
    return _lla_decode_call(*DECODE_ARGS.values(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                                                ridge=ridge, softmax_scale=scale, backend=chosen.name))


__all__ = ["local_linear_attention", "local_linear_attention_decode"]
