"""Convolution kernels of linear time-invariant SSMs and the FFT convolution that applies them.

* ``vandermonde_kernel`` (dispatched custom op): ``K_l = s Re(sum_n w_n z_n^l)``, the kernel of a diagonal
  SSM, computed without materializing ``[H, N, L]``; ``s4d_kernel`` wraps it with a discretization.
* ``cauchy_kernel`` (dispatched custom op) and ``dplr_kernel``: S4's diagonal-plus-low-rank kernel through a
  Cauchy product at the roots of unity and the Woodbury identity.
* ``krylov`` / ``krylov_kernel``: dense A (LSSL) by repeated squaring, O(N^2 L) per channel; plain PyTorch.
* ``fft_conv``: causal (or bidirectional) convolution by zero-padded fp32 FFTs, plus the D skip term.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ... import _cuda, _dispatch
from ..._custom_ops import BACKEND, OpArgs, eager, register_autograd
from ..._triton_utils import triton_reasons
from .args import CauchyBackend, VandermondeBackend
from .common import contiguous_like, fresh
from .discretization import discretize

VANDERMONDE = "vandermonde_kernel"
CAUCHY = "cauchy_kernel"


def _torch_supports(req: _dispatch.Request) -> list:
    return []


def _triton_supports(req: _dispatch.Request) -> list:
    if req.dtype == torch.float64:
        return ["float64 / complex128 runs on the torch backend only (the Triton kernels compute in fp32)"]
    return triton_reasons(req.device, torch.float32)


for _op, _what in ((VANDERMONDE, "powers by multiplication from an exact start every 8 steps, state sum in registers"),
                   (CAUCHY, "reciprocals shared by 4 rows, state sum in registers; reductions over L split")):
    _dispatch.register(_op, _dispatch.Backend("cuda", _dispatch.PRIORITY_CUDA_EXT, _cuda.supports,
                                              f"{__package__}.cuda_conv", _what, forced_only=True))

for _op, _module, _what in (
        (VANDERMONDE, "triton_vandermonde", "fused powers and state reduction, one program per (L tile, channel)"),
        (CAUCHY, "triton_cauchy", "fused reciprocals and state reduction, one program per (L tile, row)")):
    _dispatch.register(_op, _dispatch.Backend(
        "triton", _dispatch.PRIORITY_TRITON, _triton_supports, f"{__package__}.{_module}", _what))
    _dispatch.register(_op, _dispatch.Backend(
        "torch", _dispatch.PRIORITY_TORCH, _torch_supports, f"{__package__}.pytorch",
        "PyTorch, chunked over L (CPU and fallback)"))
    _dispatch.register_probe(_op, lambda device, dtype: _dispatch.Request(device, torch.float32, {}))


def _complex_dtype(*xs) -> torch.dtype:
    wide = any(x.dtype in (torch.float64, torch.complex128) for x in xs)
    return torch.complex128 if wide else torch.complex64


def _check_tensor(name: str, x, ndims: tuple, layout: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_complex() or x.is_floating_point()):
        raise TypeError(f"{name} must be a real or complex floating-point tensor, got {x.dtype}")
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def _check_length(L) -> int:
    if not isinstance(L, int) or isinstance(L, bool) or L < 0:
        raise ValueError(f"L must be an int >= 0, got {L!r}")
    return L


# -------------------------------------------------------------------------------------------- Vandermonde
# The argument lists of the custom ops, written once.
VANDERMONDE_ARGS = OpArgs(("x", Tensor), ("w", Tensor), ("length", int), ("conj", bool)) + BACKEND
VANDERMONDE_BWD_ARGS = OpArgs(("dk", Tensor)) + VANDERMONDE_ARGS


def _vandermonde_backend(a) -> VandermondeBackend:
    return _dispatch.get(VANDERMONDE, a.backend).load()


def _run_vandermonde_fwd(a) -> Tensor:
    return fresh(_vandermonde_backend(a).vandermonde_fwd(a.x, a.w, a.length, a.conj))


def _run_vandermonde_bwd(a) -> tuple[Tensor, Tensor]:
    dx, dw = _vandermonde_backend(a).vandermonde_bwd(a.dk, a.x, a.w, a.length, a.conj)
    return fresh(dx.contiguous()), fresh(dw.contiguous())


_vandermonde_fwd, _vandermonde_fwd_impl = VANDERMONDE_ARGS.custom_op(
    "flashops::vandermonde_fwd", _run_vandermonde_fwd, returns=Tensor,
    fake=lambda a: a.x.new_empty(a.w.shape[0], a.w.shape[1], a.length))
_vandermonde_bwd, _vandermonde_bwd_impl = VANDERMONDE_BWD_ARGS.custom_op(
    "flashops::vandermonde_bwd", _run_vandermonde_bwd, returns=tuple[Tensor, Tensor],
    fake=lambda a: (contiguous_like(a.x), contiguous_like(a.w)))
_vandermonde_bwd_call = eager(_vandermonde_bwd, _vandermonde_bwd_impl)


def _vandermonde_setup(ctx, inputs, output):
    VANDERMONDE_ARGS.save(ctx, inputs)


def _vandermonde_backward(ctx, dk):
    a, _ = VANDERMONDE_ARGS.saved(ctx)
    dx, dw = _vandermonde_bwd_call(*VANDERMONDE_BWD_ARGS.values(dk=dk.contiguous(), **VANDERMONDE_ARGS.pick(a)))
    return VANDERMONDE_ARGS.grads(x=dx, w=dw)


_vandermonde = register_autograd(_vandermonde_fwd, _vandermonde_fwd_impl, _vandermonde_backward,
                                 _vandermonde_setup)


def vandermonde_kernel(log_z: Tensor, w: Tensor, L: int, *, conj: Optional[bool] = None,
                       backend: Optional[str] = None) -> Tensor:
    """Kernel of a diagonal SSM: ``K[c, h, l] = s * Re(sum_n w[c, h, n] * exp(log_z[h, n] * l))``.

    ``z = exp(log_z)`` is the discrete state multiplier (``log_z = dt A`` for ZOH, ``log(dA)`` in general)
    and ``w = C * dB``. With conjugate-pair halves (S4D's N/2 complex states) ``s = 2``; with real states
    ``s = 1``. The ``[H, N, L]`` Vandermonde matrix is never stored: memory is O(C H L + H N).

    Args:
        log_z: ``[H, N]`` complex (or real).
        w: ``[C, H, N]`` or ``[H, N]``, complex (or real).
        L: kernel length.
        conj: conjugate-pair halves (``s = 2``); default: True when log_z is complex.
        backend: ``"triton"`` or ``"torch"``.

    Returns:
        ``K [C, H, L]`` (``[H, L]`` for a 2-D w), float32 (float64 for complex128 inputs, torch backend).
        Differentiable in log_z and w.
    """
    _check_tensor("log_z", log_z, (2,), "[H, N]")
    _check_tensor("w", w, (2, 3), "[C, H, N] or [H, N]")
    L = _check_length(L)
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    if tuple(w3.shape[1:]) != tuple(log_z.shape):
        raise ValueError(f"w must have shape [C, {log_z.shape[0]}, {log_z.shape[1]}] to match log_z "
                         f"{tuple(log_z.shape)}, got {tuple(w.shape)}")
    if w.device != log_z.device:
        raise ValueError(f"w is on {w.device} but log_z is on {log_z.device}")
    if conj is None:
        conj = log_z.is_complex()
    cdt = _complex_dtype(log_z, w)
    x = torch.view_as_real(log_z.to(cdt))
    w_pairs = torch.view_as_real(w3.to(cdt))
    request = _dispatch.Request(log_z.device, x.dtype, {})
    chosen = _dispatch.select(VANDERMONDE, request, backend)
    k = _vandermonde(*VANDERMONDE_ARGS.values(x=x, w=w_pairs, length=L, conj=bool(conj), backend=chosen.name))
    return k.squeeze(0) if squeeze else k


def s4d_kernel(A: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int, discretization: str = "zoh", *,
               backend: Optional[str] = None) -> Tensor:
    """Convolution kernel of a diagonal SSM (S4D): discretize, then :func:`vandermonde_kernel`.

    Args:
        A: ``[H, N]`` complex (one state per conjugate pair; the kernel takes ``2 Re``) or real (real states).
        B: broadcastable to ``[H, N]``. C: ``[C, H, N]`` or ``[H, N]``. dt: ``[H]`` positive step sizes.
        discretization: ``"zoh"`` (default), ``"bilinear"``, ``"euler"``, ``"backward_euler"`` or
            ``"zoh_euler"`` (see :func:`flashops.ops.ssm.discretize`).

    Returns ``K [C, H, L]`` with ``K_l = s Re(C dA^l dB)``; differentiable in A, B, C and dt.
    """
    _check_tensor("A", A, (2,), "[H, N]")
    _check_tensor("C", C, (2, 3), "[C, H, N] or [H, N]")
    if not isinstance(dt, torch.Tensor) or tuple(dt.shape) != (A.shape[0],):
        raise ValueError(f"dt must be a tensor of shape [H={A.shape[0]}], got "
                         f"{tuple(dt.shape) if isinstance(dt, torch.Tensor) else type(dt).__name__}")
    dA, dB = discretize(A, torch.as_tensor(B, device=A.device).expand_as(A), dt, discretization, diagonal=True)
    log_z = dt[:, None] * A if discretization in ("zoh", "zoh_euler") else torch.log(dA.to(_complex_dtype(dA)))
    return vandermonde_kernel(log_z, C * dB, L, conj=A.is_complex(), backend=backend)


# ------------------------------------------------------------------------------------------------ Cauchy
CAUCHY_ARGS = OpArgs(("v", Tensor), ("z", Tensor), ("w", Tensor)) + BACKEND
CAUCHY_BWD_ARGS = OpArgs(("dout", Tensor), ("v", Tensor), ("z", Tensor), ("w", Tensor), ("want_dz", bool)) + BACKEND


def _cauchy_backend(a) -> CauchyBackend:
    return _dispatch.get(CAUCHY, a.backend).load()


def _run_cauchy_fwd(a) -> Tensor:
    return fresh(_cauchy_backend(a).cauchy_fwd(a.v, a.z, a.w))


def _run_cauchy_bwd(a) -> tuple[Tensor, Tensor, Tensor]:
    dv, dz, dw = _cauchy_backend(a).cauchy_bwd(a.dout, a.v, a.z, a.w, a.want_dz)
    return (fresh(dv.contiguous()), fresh(dz.contiguous()) if dz is not None else a.v.new_empty(0),
            fresh(dw.contiguous()))


_cauchy_fwd, _cauchy_fwd_impl = CAUCHY_ARGS.custom_op(
    "flashops::cauchy_fwd", _run_cauchy_fwd, returns=Tensor,
    fake=lambda a: a.v.new_empty(a.v.shape[0], a.v.shape[1], a.z.shape[0], 2))
_cauchy_bwd, _cauchy_bwd_impl = CAUCHY_BWD_ARGS.custom_op(
    "flashops::cauchy_bwd", _run_cauchy_bwd, returns=tuple[Tensor, Tensor, Tensor],
    fake=lambda a: (contiguous_like(a.v), contiguous_like(a.z) if a.want_dz else a.v.new_empty(0),
                    contiguous_like(a.w)))
_cauchy_bwd_call = eager(_cauchy_bwd, _cauchy_bwd_impl)


def _cauchy_setup(ctx, inputs, output):
    CAUCHY_ARGS.save(ctx, inputs)


def _cauchy_backward(ctx, dout):
    a, _ = CAUCHY_ARGS.saved(ctx)
    want_dz = CAUCHY_ARGS.needs_grad(ctx, "z")
    dv, dz, dw = _cauchy_bwd_call(*CAUCHY_BWD_ARGS.values(dout=dout.contiguous(), want_dz=want_dz,
                                                          **CAUCHY_ARGS.pick(a)))
    return CAUCHY_ARGS.grads(v=dv, z=dz if want_dz else None, w=dw)


_cauchy = register_autograd(_cauchy_fwd, _cauchy_fwd_impl, _cauchy_backward, _cauchy_setup)


def cauchy_kernel(v: Tensor, z: Tensor, w: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Cauchy product over conjugate-pair halves:
    ``out[..., l] = sum_n v[..., n] / (z[l] - w[n]) + conj(v[..., n]) / (z[l] - conj(w[n]))``.

    Args:
        v: ``[*M, *G, N]`` complex. w: ``[*G, N]`` complex (its shape is the trailing part of v's, so one
            ``w`` row serves every leading index of v). z: ``[L]`` complex evaluation points.

    Returns ``[*M, *G, L]`` complex (complex64; complex128 for complex128 inputs on the torch backend).
    The ``[*, N, L]`` matrix of reciprocals is never stored. Differentiable in v, z and w.
    """
    for name, t in (("v", v), ("z", z), ("w", w)):
        _check_tensor(name, t, tuple(range(1, 9)), "[..., N]" if name != "z" else "[L]")
    if z.dim() != 1:
        raise ValueError(f"z must have shape [L], got {tuple(z.shape)}")
    g_shape = tuple(w.shape[:-1])
    n_state = w.shape[-1]
    if v.dim() < w.dim() or tuple(v.shape[v.dim() - w.dim():]) != tuple(w.shape):
        raise ValueError(f"the trailing dimensions of v must equal w's shape {tuple(w.shape)}, got v "
                         f"{tuple(v.shape)}")
    if not (v.device == z.device == w.device):
        raise ValueError(f"v, z and w must be on one device, got {v.device}, {z.device}, {w.device}")
    m_shape = tuple(v.shape[: v.dim() - w.dim()])
    cdt = _complex_dtype(v, z, w)
    groups = math.prod(g_shape)
    v3 = torch.view_as_real(v.to(cdt).reshape(math.prod(m_shape), groups, n_state))
    w2 = torch.view_as_real(w.to(cdt).reshape(groups, n_state))
    z1 = torch.view_as_real(z.to(cdt))
    request = _dispatch.Request(v.device, v3.dtype, {})
    chosen = _dispatch.select(CAUCHY, request, backend)
    out = torch.view_as_complex(_cauchy(*CAUCHY_ARGS.values(v=v3, z=z1, w=w2, backend=chosen.name)))
    return out.reshape(*m_shape, *g_shape, z.shape[0])


def dplr_kernel(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int, *,
                backend: Optional[str] = None) -> Tensor:
    """S4 kernel of ``A = diag(Lambda) - P P^*`` (conjugate-pair halves), bilinear discretization.

    ``C`` is S4's ``C~ = C (I - dA^L)``: the truncated generating function of the kernel at the L-th roots of
    unity ``omega`` is ``2/(1+omega) C~ (z - A)^{-1} B`` with ``z = 2/dt (1-omega)/(1+omega)``; the Woodbury
    identity reduces ``(z - A)^{-1}`` to four Cauchy products, and an inverse real FFT gives the kernel. The
    Nyquist bin of an even L (``omega = -1``, z infinite) uses its limit ``dt/2 C~ B``. The resolvent of
    ``diag(Lambda)`` must exist at every ``z``: an eigenvalue at 0 (FouT's zero pair) meets ``z = 0`` and gives
    NaN, so keep ``Re(Lambda) < 0`` (as S4 does) or use the Krylov kernel.

    Args:
        Lambda: ``[H, N]`` complex. P: ``[r, H, N]`` complex. B: ``[H, N]``. C: ``[C, H, N]``. dt: ``[H]``.

    Returns ``K [C, H, L]`` (real; float64 for complex128 inputs on the torch backend), differentiable in
    every input.
    """
    _check_tensor("Lambda", Lambda, (2,), "[H, N]")
    _check_tensor("P", P, (3,), "[r, H, N]")
    _check_tensor("C", C, (3,), "[C, H, N]")
    L = _check_length(L)
    shape = tuple(Lambda.shape)
    if tuple(P.shape[1:]) != shape or tuple(C.shape[1:]) != shape or tuple(torch.as_tensor(B).shape) != shape:
        raise ValueError(f"P [r, H, N], B [H, N] and C [C, H, N] must match Lambda {shape}, got P "
                         f"{tuple(P.shape)}, B {tuple(torch.as_tensor(B).shape)}, C {tuple(C.shape)}")
    if not isinstance(dt, torch.Tensor) or tuple(dt.shape) != (shape[0],):
        raise ValueError(f"dt must be a tensor of shape [H={shape[0]}]")
    cdt = _complex_dtype(Lambda, P, B, C, dt)
    rdt = torch.float64 if cdt == torch.complex128 else torch.float32
    if L == 0 or 0 in shape or C.shape[0] == 0:  # the FFT below cannot take an empty size
        return _empty_output((C.shape[0], shape[0], L), rdt, Lambda, P, torch.as_tensor(B), C, dt)
    Lambda, P, B, C = (t.to(cdt) for t in (Lambda, P, B, C))
    dt = dt.to(rdt)
    rank, n_c = P.shape[0], C.shape[0]
    freq = torch.arange(L // 2 + 1, dtype=torch.float64, device=Lambda.device)
    omega = torch.exp(-2j * math.pi * freq / L)
    nyquist = L % 2 == 0
    if nyquist:
        omega = omega[:-1]
    z = (2 * (1 - omega) / (1 + omega)).to(cdt)  # dt is folded into w (and the result), as in S4
    left = torch.cat([C, P.conj()], dim=0)  # [C + r, H, N]
    right = torch.cat([B[None], P], dim=0)  # [1 + r, H, N]
    v = left[:, None] * right[None]  # [C + r, 1 + r, H, N]
    r = cauchy_kernel(v, z, Lambda * dt[:, None], backend=backend) * dt[:, None]  # [C + r, 1 + r, H, F]
    k00, k01 = r[:n_c, 0], r[:n_c, 1:]  # [C, H, F], [C, r, H, F]
    k10, k11 = r[n_c:, 0], r[n_c:, 1:]  # [r, H, F], [r, r, H, F]
    eye = torch.eye(rank, dtype=cdt, device=Lambda.device)
    # Woodbury: C~ R B - (C~ R P) (I + P^* R P)^{-1} (P^* R B), solved per (h, frequency)
    system = (eye[:, :, None, None] + k11).permute(2, 3, 0, 1)  # [H, F, r, r]
    rhs = k10.permute(1, 2, 0)[..., None]  # [H, F, r, 1]
    corr = torch.linalg.solve(system, rhs)[..., 0]  # [H, F, r]
    khat = k00 - torch.einsum("cjhf,hfj->chf", k01, corr)
    khat = khat * (2 / (1 + omega)).to(cdt)
    if nyquist:
        last = dt * (C * B).sum(-1).real  # [C, H]
        khat = torch.cat([khat, last[..., None].to(cdt)], dim=-1)
    return torch.fft.irfft(khat, n=L)


def _empty_output(shape, dtype, *inputs) -> Tensor:
    """A result of ``shape``, which holds no element, that still depends on ``inputs``: a backward through it
    gives them zero gradients instead of failing."""
    total = sum(x.real.sum() for x in inputs)
    return total.to(dtype).expand(shape)


# ------------------------------------------------------------------------------------------------ Krylov
def krylov(dA: Tensor, b: Tensor, L: int) -> Tensor:
    """Krylov matrix ``[b, dA b, ..., dA^{L-1} b]`` -> ``[..., H, N, L]`` by repeated squaring
    (log2 L matrix products). dA ``[H, N, N]`` (or ``[N, N]``), b ``[..., H, N]``. Differentiable."""
    L = _check_length(L)
    x = b[..., None]
    power = dA
    while x.shape[-1] < L:
        need = L - x.shape[-1]
        x = torch.cat([x, power @ x[..., :need]], dim=-1)
        if x.shape[-1] < L:
            power = power @ power
    return x[..., :L]


def krylov_kernel(dA: Tensor, dB: Tensor, C: Tensor, L: int) -> Tensor:
    """Kernel of a dense SSM (LSSL): ``K[c, h, l] = C[c, h] dA[h]^l dB[h]``, O(N^2 L) per channel.

    dA ``[H, N, N]`` (or ``[N, N]`` shared), dB ``[H, N]``, C ``[C, H, N]`` or ``[H, N]`` -> ``[C, H, L]``
    (``[H, L]`` for a 2-D C). Plain differentiable PyTorch (no dispatch)."""
    if dA.dim() not in (2, 3) or dA.shape[-1] != dA.shape[-2]:
        raise ValueError(f"dA must have shape [H, N, N] or [N, N], got {tuple(dA.shape)}")
    if dB.dim() != 2 or dB.shape[-1] != dA.shape[-1]:
        raise ValueError(f"dB must have shape [H, N] with N={dA.shape[-1]}, got {tuple(dB.shape)}")
    squeeze = C.dim() == 2
    C3 = C.unsqueeze(0) if squeeze else C
    if C3.dim() != 3 or tuple(C3.shape[1:]) != tuple(dB.shape):
        raise ValueError(f"C must have shape [C, {dB.shape[0]}, {dB.shape[1]}], got {tuple(C.shape)}")
    k = torch.einsum("chn,hnl->chl", C3.to(dB.dtype), krylov(dA, dB, L))
    return k.squeeze(0) if squeeze else k


# ------------------------------------------------------------------------------------------- FFT conv
def _fast_length(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT-friendly)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fft_conv(u: Tensor, K: Tensor, D: Optional[Tensor] = None, *, K_backward: Optional[Tensor] = None) -> Tensor:
    """Causal convolution of each channel with its kernel, by FFT (fp32, zero-padded: no circular wrap).

    ``y[b, c, h, t] = sum_j K[c, h, j] u[b, h, t-j] + sum_j K_backward[c, h, j] u[b, h, t+1+j] + D[c, h] u[b, h, t]``

    Args:
        u: ``[B, H, L]`` (any float dtype). K: ``[C, H, Lk]`` or ``[H, Lk]`` (taps beyond L are ignored).
        D: skip weights ``[C, H]`` or ``[H]``, or None.
        K_backward: optional anti-causal kernel of K's shape (a bidirectional layer).

    Returns ``[B, C, H, L]`` (``[B, H, L]`` for a 2-D K) in u's dtype. Differentiable in u, K, D.
    """
    if not isinstance(u, torch.Tensor) or u.dim() != 3 or not u.is_floating_point():
        raise ValueError(f"u must be a float tensor [B, H, L], got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    squeeze = K.dim() == 2
    K3 = K.unsqueeze(0) if squeeze else K
    batch, heads, length = u.shape
    if K3.dim() != 3 or K3.shape[1] != heads:
        raise ValueError(f"K must have shape [C, {heads}, Lk] or [{heads}, Lk], got {tuple(K.shape)}")
    if K_backward is not None and tuple(K_backward.shape) != tuple(K.shape):
        raise ValueError(f"K_backward must have K's shape {tuple(K.shape)}, got {tuple(K_backward.shape)}")
    D2 = None
    if D is not None:
        D2 = D.unsqueeze(0) if D.dim() == 1 else D
        if tuple(D2.shape) != (K3.shape[0], heads):
            raise ValueError(f"D must have shape [{K3.shape[0]}, {heads}] or [{heads}], got {tuple(D.shape)}")
    for name, t in (("K", K), ("D", D), ("K_backward", K_backward)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    if u.numel() == 0 or K3.shape[0] == 0:  # the FFT below cannot take an empty batch
        y = _empty_output((batch, K3.shape[0], heads, length), u.dtype, u, K, *([] if D is None else [D]))
        return y.squeeze(1) if squeeze else y
    taps = min(K3.shape[-1], length)
    k = K3[..., :taps].to(cdt)
    back = 0
    if K_backward is not None:
        back = min(K_backward.shape[-1], max(length - 1, 0))
    n = _fast_length(max(1, length + max(taps, back)))
    k_circ = torch.nn.functional.pad(k, (0, n - taps))
    if K_backward is not None and back > 0:
        kb = (K_backward.unsqueeze(0) if squeeze else K_backward)[..., :back].to(cdt)
        k_circ = k_circ + torch.nn.functional.pad(kb.flip(-1), (n - back, 0))
    y = torch.fft.irfft(torch.fft.rfft(u.to(cdt), n=n)[:, None] * torch.fft.rfft(k_circ, n=n)[None], n=n)
    y = y[..., :length]
    if D2 is not None:
        y = y + D2.to(cdt)[None, :, :, None] * u.to(cdt)[:, None]
    y = y.to(u.dtype)
    return y.squeeze(1) if squeeze else y
