"""Public scans: ``linear_scan``, ``selective_scan`` and ``selective_state_update`` (one recurrent step):
validated, dispatched, custom ops with autograd.

Each scan funnels into a ``torch.library.custom_op`` pair (``flashops::<op>_fwd`` / ``_bwd``) that looks up
the chosen backend by name, so ``torch.compile(fullgraph=True)`` traces through without a graph break; eager
calls on plain tensors skip the dispatcher round trip (``flashops._custom_ops``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ... import _cuda, _dispatch, _ext
from ..._custom_ops import BACKEND, OpArgs, eager, register_autograd
from ..._triton_utils import triton_reasons
from ..._validation import check_same, check_tensor
from .args import LinearScanBackend, SelectiveScanBackend, StateUpdateBackend
from .common import contiguous_like, fresh, state_spacing

LINEAR_SCAN = "linear_scan"
SELECTIVE_SCAN = "selective_scan"
SELECTIVE_STATE_UPDATE = "selective_state_update"
_SEQ = "[B, D, L]"


def _torch_supports(req: _dispatch.Request) -> list:
    return []


def _triton_supports(req: _dispatch.Request) -> list:
    if req.dtype == torch.float64:
        return ["float64 runs on the cpp and torch backends (the Triton kernels compute in fp32)"]
    return triton_reasons(req.device, req.dtype)


def _cpp_supports(req: _dispatch.Request) -> list:
    if torch.device(req.device).type != "cpu":
        return [f"CPU tensors only, got {req.device}"]
    return _ext.unavailable_reasons()  # builds the extension on first use


def _cuda_selective_supports(req: _dispatch.Request) -> list:
    reasons = _cuda.supports(req)
    if torch.are_deterministic_algorithms_enabled():
        reasons.append("its backward adds dB and dC over the channels with atomics, and deterministic algorithms "
                       "are enabled")
    return reasons


for _op, _supports, _what in (
    (LINEAR_SCAN, _cuda.supports, "block-wide chunked scan (warp shuffles), one block per row; fwd + bwd"),
    (SELECTIVE_SCAN, _cuda_selective_supports,
     "block per (batch, channel), chunks of 2048 steps, states recomputed per chunk in the backward"),
):
    _dispatch.register(_op, _dispatch.Backend("cuda", _dispatch.PRIORITY_CUDA_EXT, _supports,
                                              f"{__package__}.cuda_scan", _what, forced_only=True))

_dispatch.register(SELECTIVE_STATE_UPDATE, _dispatch.Backend(
    "cuda", _dispatch.PRIORITY_CUDA_EXT, _cuda.supports, f"{__package__}.cuda_step",
    "one read and one write of the state, a group of lanes per channel; fwd + bwd", forced_only=True))
_dispatch.register(SELECTIVE_STATE_UPDATE, _dispatch.Backend(
    "torch", _dispatch.PRIORITY_TORCH, _torch_supports, f"{__package__}.pytorch",
    "PyTorch (fp32 state; fp64 for fp64 inputs), the backward written out"))
_dispatch.register_probe(SELECTIVE_STATE_UPDATE, lambda device, dtype: _dispatch.Request(device, dtype, {}))

for _op, _triton_module, _what in (
    (LINEAR_SCAN, "triton_linear_scan", "tl.associative_scan over time tiles with an fp32 carry"),
    (SELECTIVE_SCAN, "triton_selective_scan", "fused Mamba-1 scan, states recomputed in the backward from saved tiles"),
):
    _dispatch.register(_op, _dispatch.Backend(
        "triton", _dispatch.PRIORITY_TRITON, _triton_supports, f"{__package__}.{_triton_module}", _what))
    _dispatch.register(_op, _ext.ExtensionBackend(
        "cpp", _dispatch.PRIORITY_CPU_EXT, _cpp_supports, "flashops._C",
        "C++ scan (csrc/ssm/scan_cpu.cpp): channel blocks in parallel, states recomputed in the backward"))
    _dispatch.register(_op, _dispatch.Backend(
        "torch", _dispatch.PRIORITY_TORCH, _torch_supports, f"{__package__}.pytorch",
        "blocked log-depth scan in PyTorch (CPU and fallback)"))
    _dispatch.register_probe(_op, lambda device, dtype: _dispatch.Request(device, dtype, {}))


def _empty_if_none(x: Optional[Tensor], like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0)


def _contiguous_grad(g: Tensor) -> Tensor:
    # Incoming gradients can be expanded (stride 0) or transposed; the kernels want a unit last stride.
    return g if g.stride(-1) == 1 and 0 not in g.stride() else g.contiguous()


# ------------------------------------------------------------------------------------------ linear scan
# The argument lists of the custom ops, written once.
LINEAR_SCAN_ARGS = (OpArgs(("a", Tensor), ("b", Tensor), ("initial_state", Optional[Tensor]), ("reverse", bool))
                    + BACKEND)
LINEAR_SCAN_BWD_ARGS = (OpArgs(("dh", Tensor), ("a", Tensor), ("h", Tensor), ("initial_state", Optional[Tensor]),
                               ("reverse", bool)) + BACKEND)


def _linear_scan_backend(a) -> LinearScanBackend:
    return _dispatch.get(LINEAR_SCAN, a.backend).load()


def _run_linear_scan_fwd(a) -> Tensor:
    return fresh(_linear_scan_backend(a).linear_scan_fwd(a.a, a.b, a.initial_state, a.reverse))


def _run_linear_scan_bwd(a) -> tuple[Tensor, Tensor, Tensor]:
    da, db, dh0 = _linear_scan_backend(a).linear_scan_bwd(a.dh, a.a, a.h, a.initial_state, a.reverse)
    return fresh(da), fresh(db), fresh(_empty_if_none(dh0, a.a))


_linear_scan_fwd, _linear_scan_fwd_impl = LINEAR_SCAN_ARGS.custom_op(
    "flashops::linear_scan_fwd", _run_linear_scan_fwd, returns=Tensor, fake=lambda a: contiguous_like(a.b))
_linear_scan_bwd, _linear_scan_bwd_impl = LINEAR_SCAN_BWD_ARGS.custom_op(
    "flashops::linear_scan_bwd", _run_linear_scan_bwd, returns=tuple[Tensor, Tensor, Tensor],
    fake=lambda a: (contiguous_like(a.a), contiguous_like(a.dh),
                    torch.empty_like(a.initial_state) if a.initial_state is not None else a.a.new_empty(0)))
_linear_scan_bwd_call = eager(_linear_scan_bwd, _linear_scan_bwd_impl)


def _linear_setup(ctx, inputs, output):
    LINEAR_SCAN_ARGS.save(ctx, inputs, (output,), skip=("b",))  # the backward needs the states, not b


def _linear_backward(ctx, dh):
    a, (h,) = LINEAR_SCAN_ARGS.saved(ctx)
    da, db, dh0 = _linear_scan_bwd_call(*LINEAR_SCAN_BWD_ARGS.values(
        dh=_contiguous_grad(dh), a=a.a, h=h, initial_state=a.initial_state, reverse=a.reverse, backend=a.backend))
    return LINEAR_SCAN_ARGS.grads(a=da, b=db, initial_state=dh0 if a.initial_state is not None else None)


_linear_scan = register_autograd(_linear_scan_fwd, _linear_scan_fwd_impl, _linear_backward, _linear_setup)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_pairs(name: str, x) -> tuple[Tensor, str]:
    """A real tensor, complex tensor or (re, im) pair -> (storage, kind); complex storage is [..., 2] pairs."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} given as a pair must be (real, imag), got {len(x)} items")
        re, im = x
        check_tensor(f"{name}[0]", re, dtypes=_FLOATS)
        check_tensor(f"{name}[1]", im, dtypes=_FLOATS)
        if re.shape != im.shape or re.dtype != im.dtype:
            raise ValueError(f"{name}: real and imaginary parts must match, got {tuple(re.shape)} {re.dtype} "
                             f"and {tuple(im.shape)} {im.dtype}")
        return torch.stack([re, im], dim=-1), "pair"
    if isinstance(x, torch.Tensor) and x.is_complex():
        if x.dtype not in (torch.complex64, torch.complex128):
            raise TypeError(f"{name} must be complex64 or complex128 (or a (re, im) pair), got {x.dtype}")
        if x.dim() and x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")
        return torch.view_as_real(x), "complex"
    check_tensor(name, x, dtypes=_FLOATS)
    return x, "real"


def _promote(x: Tensor) -> Tensor:
    return torch.stack([x, torch.zeros_like(x)], dim=-1)


def linear_scan(a, b, initial_state=None, reverse: bool = False, *, backend: Optional[str] = None):
    """First-order diagonal linear recurrence along the last dimension.

    ``h_t = a_t * h_{t-1} + b_t`` for t = 0..L-1 with ``h_{-1} = initial_state`` (0 if None), or with
    ``reverse=True`` ``h_t = a_t * h_{t+1} + b_t`` from t = L-1 down with ``h_L = initial_state``.

    Args:
        a, b: ``[B, D, L]`` (time last, stride(-1) == 1), same shape and dtype. Real (fp16, bf16, fp32;
            fp64 on the cpp and torch backends), complex tensors (complex64 / complex128), or complex numbers as
            ``(real, imag)`` pairs of real tensors (e.g. fp16). A real one next to a complex one is promoted.
        initial_state: ``[B, D]``, real, complex or a pair.
        reverse: scan from the end.
        backend: ``"triton"``, ``"cpp"`` (CPU, C++ extension) or ``"torch"``; default: the first that
            supports the inputs.

    Returns:
        All states ``h [B, D, L]`` in b's dtype: complex if a or b is a complex tensor, else a pair if a or b
        is a pair, else real. The state is carried in fp32 (fp64 for fp64 inputs). Gradients flow to a, b
        and initial_state.

    Example:
        >>> a = torch.rand(2, 64, 4096, device="cuda"); b = torch.randn(2, 64, 4096, device="cuda")
        >>> h = flashops.linear_scan(a, b)
    """
    a_s, a_kind = _as_pairs("a", a)
    b_s, b_kind = _as_pairs("b", b)
    kinds = {a_kind, b_kind}
    complex_ = kinds != {"real"}
    if complex_:
        a_s = _promote(a_s) if a_kind == "real" else a_s
        b_s = _promote(b_s) if b_kind == "real" else b_s
    rank = 4 if complex_ else 3
    if a_s.dim() != rank or b_s.dim() != rank:
        raise ValueError(f"a and b must have 3 dimensions {_SEQ}, got shapes {tuple(a_s.shape[:a_s.dim() - complex_])}"
                         f" and {tuple(b_s.shape[:b_s.dim() - complex_])}")
    if a_s.shape != b_s.shape:
        raise ValueError(f"a and b must have the same shape {_SEQ}, got {tuple(a_s.shape[:3])} and "
                         f"{tuple(b_s.shape[:3])}")
    check_same((("a", a_s), ("b", b_s)), "device")
    if a_s.dtype != b_s.dtype:
        raise ValueError(f"a and b must have the same dtype, got {a_s.dtype} and {b_s.dtype}")
    h0 = None
    if initial_state is not None:
        h0, h_kind = _as_pairs("initial_state", initial_state)
        if complex_ and h_kind == "real":
            h0 = _promote(h0)
        elif not complex_ and h_kind != "real":
            raise TypeError("initial_state is complex but a and b are real")
        want = tuple(b_s.shape[:2]) + ((2,) if complex_ else ())
        if tuple(h0.shape) != want:
            raise ValueError(f"initial_state must have shape {tuple(b_s.shape[:2])} ([B, D]), got "
                             f"{tuple(h0.shape[:h0.dim() - complex_])}")
        if h0.device != b_s.device:
            raise ValueError(f"initial_state is on {h0.device} but b is on {b_s.device}")
        h0 = h0.to(b_s.dtype)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    request = _dispatch.Request(b_s.device, b_s.dtype, {"complex": complex_})
    chosen = _dispatch.select(LINEAR_SCAN, request, backend)
    h = _linear_scan(*LINEAR_SCAN_ARGS.values(a=a_s, b=b_s, initial_state=h0, reverse=reverse, backend=chosen.name))
    if "complex" in kinds:
        return torch.view_as_complex(h)
    if "pair" in kinds:
        return h[..., 0], h[..., 1]
    return h


# --------------------------------------------------------------------------------------- selective scan
# Backends that keep fp64 states for fp64 inputs (the Triton kernels compute in fp32).
_FP64_STATE_BACKENDS = ("torch", "cpp")


SELECTIVE_SCAN_ARGS = (OpArgs(("u", Tensor), ("delta", Tensor), ("A", Tensor), ("B", Tensor), ("C", Tensor),
                              ("D", Optional[Tensor]), ("z", Optional[Tensor]), ("delta_bias", Optional[Tensor]),
                              ("initial_state", Optional[Tensor]), ("delta_softplus", bool)) + BACKEND)
SELECTIVE_SCAN_BWD_ARGS = (OpArgs(("dout", Tensor), ("dlast", Optional[Tensor]))
                           + SELECTIVE_SCAN_ARGS.without("delta_softplus", "backend")
                           + OpArgs(("saved", Tensor), ("delta_softplus", bool)) + BACKEND)
# The inputs that get a gradient, in the order the backends return them.
_SELECTIVE_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _selective_scan_backend(a) -> SelectiveScanBackend:
    return _dispatch.get(SELECTIVE_SCAN, a.backend).load()


def _run_selective_scan_fwd(a) -> tuple[Tensor, Tensor, Tensor]:
    out = _selective_scan_backend(a).selective_scan_fwd(a.u, a.delta, a.A, a.B, a.C, a.D, a.z, a.delta_bias,
                                                        a.initial_state, a.delta_softplus)
    return tuple(fresh(t) for t in out)


def _selective_scan_fwd_fake(a) -> tuple[Tensor, Tensor, Tensor]:
    batch, dim, length = a.u.shape
    n_state = a.A.shape[1]
    fp64 = a.u.dtype == torch.float64 and a.backend in _FP64_STATE_BACKENDS
    state_dtype = torch.float64 if fp64 else torch.float32
    n_saved = -(-length // state_spacing(n_state, a.backend))
    return (contiguous_like(a.u), a.u.new_empty(batch, dim, n_state, dtype=state_dtype),
            a.u.new_empty(batch, dim, n_state, n_saved, dtype=state_dtype))


def _run_selective_scan_bwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _selective_scan_backend(a).selective_scan_bwd(
        a.dout, a.dlast, a.u, a.delta, a.A, a.B, a.C, a.D, a.z, a.delta_bias, a.initial_state, a.saved,
        a.delta_softplus)
    return tuple(fresh(_empty_if_none(g, a.u)) for g in grads)


def _selective_scan_bwd_fake(a):
    return tuple(contiguous_like(x) if x is not None else a.u.new_empty(0)
                 for x in (getattr(a, name) for name in _SELECTIVE_GRADS))


_selective_scan_fwd, _selective_scan_fwd_impl = SELECTIVE_SCAN_ARGS.custom_op(
    "flashops::selective_scan_fwd", _run_selective_scan_fwd, fake=_selective_scan_fwd_fake,
    returns=tuple[Tensor, Tensor, Tensor])
_selective_scan_bwd, _selective_scan_bwd_impl = SELECTIVE_SCAN_BWD_ARGS.custom_op(
    "flashops::selective_scan_bwd", _run_selective_scan_bwd, fake=_selective_scan_bwd_fake,
    returns=tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor])
_selective_scan_bwd_call = eager(_selective_scan_bwd, _selective_scan_bwd_impl)


def _selective_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2])
    SELECTIVE_SCAN_ARGS.save(ctx, inputs, (output[2],))


def _selective_backward(ctx, dout, dlast, _dsaved):
    a, (saved,) = SELECTIVE_SCAN_ARGS.saved(ctx)
    grads = _selective_scan_bwd_call(*SELECTIVE_SCAN_BWD_ARGS.values(
        dout=_contiguous_grad(dout), dlast=dlast, saved=saved, **SELECTIVE_SCAN_ARGS.pick(a)))
    return SELECTIVE_SCAN_ARGS.grads(**{name: g for name, g in zip(_SELECTIVE_GRADS, grads)
                                        if getattr(a, name) is not None})


_selective_scan = register_autograd(_selective_scan_fwd, _selective_scan_fwd_impl, _selective_backward,
                                    _selective_setup)


def _check_shape(name, t, shape, layout):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} {layout}, got {tuple(t.shape)}")


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
    return_last_state: bool = False, initial_state: Optional[Tensor] = None, *, backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Mamba-1 selective scan (same arguments, positions and layout as ``mamba_ssm``'s ``selective_scan_fn``,
    plus ``initial_state``)::

        dt = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        (per channel d, state n; ZOH-A / Euler-B)
        y_t = sum_n C_t[n] h_t[n] + D * u_t;   out = y * silu(z)

    Args:
        u, delta: ``[B, D, L]`` (time last, stride(-1) == 1), fp16 / bf16 / fp32 (fp64: cpp and torch backends).
        A: ``[D, N]`` real (usually ``-exp(A_log)``, fp32). Complex A is not supported.
        B, C: ``[B, N, L]`` (shared by all channels) or ``[B, G, N, L]`` (G groups of D/G channels).
        D, delta_bias: ``[D]`` or None. z: ``[B, D, L]`` gate or None.
        initial_state: ``[B, D, N]`` state before u[..., 0], or None for zeros.
        return_last_state: also return the final state ``[B, D, N]`` (fp32); it is differentiable, so a
            chunked run (state passed from chunk to chunk) backpropagates through the chunks.
        backend: ``"triton"``, ``"cpp"`` (CPU, C++ extension) or ``"torch"``; default: the first that
            supports the inputs.

    Returns:
        ``out [B, D, L]`` in u's dtype, or ``(out, last_state)``. Gradients flow to every float input.

    Example:
        >>> out = flashops.selective_scan(u, dt, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True)
    """
    check_tensor("u", u, ndim=3, dtypes=_FLOATS, layout=_SEQ)
    check_tensor("delta", delta, ndim=3, dtypes=_FLOATS, layout=_SEQ)
    batch, dim, length = u.shape
    _check_shape("delta", delta, u.shape, _SEQ)
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.is_complex():
        raise TypeError("A must be real [D, N]; complex A is not supported by selective_scan")
    check_tensor("A", A, ndim=2, dtypes=_FLOATS, layout="[D, N]")
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape [D={dim}, N], got {tuple(A.shape)}")
    n_state = A.shape[1]
    if n_state < 1:
        raise ValueError(f"A must have at least one state (N >= 1), got shape {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t, dtypes=_FLOATS, layout="[B, N, L] or [B, G, N, L]")
        if t.dim() == 2:
            raise ValueError(f"{name} of shape [D, N] (time-invariant) is not supported; pass {name} as "
                             f"[B, N, L] (expand it over time)")
        if t.dim() not in (3, 4) or t.shape[0] != batch or t.shape[-2] != n_state or t.shape[-1] != length:
            raise ValueError(f"{name} must have shape [{batch}, {n_state}, {length}] or [{batch}, G, {n_state}, "
                             f"{length}], got {tuple(t.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    if B.dim() == 4 and (B.shape[1] < 1 or dim % B.shape[1]):
        raise ValueError(f"the number of groups G={B.shape[1]} of B and C must divide D={dim}")
    for name, t, shape, layout in (("D", D, (dim,), "[D]"), ("delta_bias", delta_bias, (dim,), "[D]"),
                                   ("z", z, (batch, dim, length), _SEQ),
                                   ("initial_state", initial_state, (batch, dim, n_state), "[B, D, N]")):
        if t is not None:
            check_tensor(name, t, dtypes=_FLOATS, layout=layout)
            _check_shape(name, t, shape, layout)
    check_same((("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                ("delta_bias", delta_bias), ("initial_state", initial_state)), "device")
    if delta.dtype != u.dtype or (z is not None and z.dtype != u.dtype):
        raise ValueError(f"delta and z must have u's dtype {u.dtype}, got delta {delta.dtype}"
                         + (f" and z {z.dtype}" if z is not None else ""))
    if not isinstance(delta_softplus, bool):
        raise TypeError(f"delta_softplus must be a bool, got {type(delta_softplus).__name__}")
    request = _dispatch.Request(u.device, u.dtype, {"state_size": n_state})
    chosen = _dispatch.select(SELECTIVE_SCAN, request, backend)
    out, last, _ = _selective_scan(*SELECTIVE_SCAN_ARGS.values(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
        delta_softplus=delta_softplus, backend=chosen.name))
    return (out, last) if return_last_state else out


# ------------------------------------------------------------------------------- selective state update
STATE_UPDATE_ARGS = (OpArgs(("state", Tensor), ("x", Tensor), ("dt", Tensor), ("A", Tensor), ("B", Tensor),
                            ("C", Tensor), ("D", Optional[Tensor]), ("z", Optional[Tensor]),
                            ("dt_bias", Optional[Tensor]), ("dt_softplus", bool)) + BACKEND)
STATE_UPDATE_BWD_ARGS = OpArgs(("dy", Tensor), ("d_new_state", Optional[Tensor])) + STATE_UPDATE_ARGS
# The inputs that get a gradient, in the order the backends return them.
_STATE_UPDATE_GRADS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def _state_update_backend(a) -> StateUpdateBackend:
    return _dispatch.get(SELECTIVE_STATE_UPDATE, a.backend).load()


def _run_state_update_fwd(a) -> tuple[Tensor, Tensor]:
    y, new_state = _state_update_backend(a).selective_state_update_fwd(
        a.state, a.x, a.dt, a.A, a.B, a.C, a.D, a.z, a.dt_bias, a.dt_softplus)
    return fresh(y), fresh(new_state)


def _run_state_update_bwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _state_update_backend(a).selective_state_update_bwd(
        a.dy, a.d_new_state, a.state, a.x, a.dt, a.A, a.B, a.C, a.D, a.z, a.dt_bias, a.dt_softplus)
    return tuple(fresh(_empty_if_none(g, a.x)) for g in grads)


def _state_update_bwd_fake(a):
    return tuple(contiguous_like(x) if x is not None else a.x.new_empty(0)
                 for x in (getattr(a, name) for name in _STATE_UPDATE_GRADS))


_state_update_fwd, _state_update_fwd_impl = STATE_UPDATE_ARGS.custom_op(
    "flashops::selective_state_update_fwd", _run_state_update_fwd, returns=tuple[Tensor, Tensor],
    fake=lambda a: (contiguous_like(a.x), contiguous_like(a.state)))
_state_update_bwd, _state_update_bwd_impl = STATE_UPDATE_BWD_ARGS.custom_op(
    "flashops::selective_state_update_bwd", _run_state_update_bwd, fake=_state_update_bwd_fake,
    returns=tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor])
_state_update_bwd_call = eager(_state_update_bwd, _state_update_bwd_impl)


def _state_update_setup(ctx, inputs, output):
    STATE_UPDATE_ARGS.save(ctx, inputs)


def _state_update_backward(ctx, dy, d_new_state):
    a, _ = STATE_UPDATE_ARGS.saved(ctx)
    grads = _state_update_bwd_call(*STATE_UPDATE_BWD_ARGS.values(dy=dy.contiguous(), d_new_state=d_new_state,
                                                                 **STATE_UPDATE_ARGS.pick(a)))
    return STATE_UPDATE_ARGS.grads(**{name: g for name, g in zip(_STATE_UPDATE_GRADS, grads)
                                      if getattr(a, name) is not None})


_state_update = register_autograd(_state_update_fwd, _state_update_fwd_impl, _state_update_backward,
                                  _state_update_setup)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           dt_bias: Optional[Tensor] = None, dt_softplus: bool = False, *,
                           backend: Optional[str] = None):
    """One recurrent step of :func:`selective_scan` for generation (mamba's ``selective_state_update``)::

        dt = softplus(dt + dt_bias) (or without softplus);  new_state = exp(dt A) state + dt x B
        y = (sum_n C new_state + D x) * silu(z)

    state ``[B, D, N]`` (fp32 usually), x / dt / z ``[B, D]``, A ``[D, N]``, B / C ``[B, N]`` or ``[B, G, N]``
    (G groups of D/G channels), D / dt_bias ``[D]``. Returns ``(y [B, D], new_state)``: y in x's dtype, the new
    state in the state's dtype; ``state`` is not modified. Differentiable in every tensor. Running it over
    t = 0..L-1 from ``initial_state`` gives ``selective_scan``'s output and last state.
    ``backend``: ``"cuda"`` (when forced: one read and one write of the state) or ``"torch"``.
    """
    # Decode steps take slices of sequences (x = u[..., t]), so any strides are accepted here.
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias)):
        if t is not None or name in ("state", "x", "dt", "A", "B", "C"):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if state.dim() != 3 or x.dim() != 2 or tuple(state.shape[:2]) != tuple(x.shape):
        raise ValueError(f"state must be [B, D, N] and x [B, D] with matching B, D, got state "
                         f"{tuple(state.shape)} and x {tuple(x.shape)}")
    batch, dim, n_state = state.shape
    for name, t, shape, layout in (("dt", dt, (batch, dim), "[B, D]"), ("z", z, (batch, dim), "[B, D]"),
                                   ("A", A, (dim, n_state), "[D, N]"), ("D", D, (dim,), "[D]"),
                                   ("dt_bias", dt_bias, (dim,), "[D]")):
        _check_shape(name, t, shape, layout)
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (2, 3) or t.shape[0] != batch or t.shape[-1] != n_state:
            raise ValueError(f"{name} must be [B, N] or [B, G, N] with B={batch}, N={n_state}, got {tuple(t.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    if B.dim() == 3 and (B.shape[1] < 1 or dim % B.shape[1]):
        raise ValueError(f"the number of groups G={B.shape[1]} of B and C must divide D={dim}")
    check_same((("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                ("dt_bias", dt_bias)), "device")
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    request = _dispatch.Request(x.device, torch.promote_types(x.dtype, state.dtype), {"state_size": n_state})
    chosen = _dispatch.select(SELECTIVE_STATE_UPDATE, request, backend)
    return _state_update(*STATE_UPDATE_ARGS.values(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z,
                                                    dt_bias=dt_bias, dt_softplus=dt_softplus, backend=chosen.name))
