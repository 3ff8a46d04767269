"""The CUDA backend of the scans: ``linear_scan`` (csrc/cuda/ssm/linear_scan.cu) and ``selective_scan``
(csrc/cuda/ssm/selective_scan.cu), forward and backward: the ``LinearScanBackend`` and ``SelectiveScanBackend``
contracts (args.py).

Kernels compute in fp32 and take fp16 / bf16 / fp32 tensors as they are (B and C of the selective scan in u's
dtype or fp32; the small parameters A, D, delta_bias and the states in fp32). Every block owns one row (one
batch entry and channel) and walks it in chunks; see the .cu files for the algorithms.
"""

from __future__ import annotations

import torch

from ... import _cuda
from .common import CUDA_SCAN_CHUNK, linear_scan_backward, linear_scan_forward, selective_scan_grads

_TYPES = tuple(_cuda.C_TYPES.items())

# ------------------------------------------------------------------------------------------- linear scan
# (threads, items per thread) by row length: short rows leave fewer threads idle.
_LINEAR_SHAPES = ((128, 32, 4), (512, 64, 8), (None, 128, 16))  # (longest row, threads, items)


def _linear_expression(threads: int, items: int, c_type: str, width: int) -> str:
    return f"flashops::linear_scan_kernel<{threads}, {items}, {c_type}, {width}>"


LINEAR_SCAN = _cuda.Program("ssm/linear_scan.cu", [
    _linear_expression(threads, items, c_type, width)
    for _, threads, items in _LINEAR_SHAPES for _, c_type in _TYPES for width in (1, 2)])


def _linear_shape(length: int) -> tuple:
    for longest, threads, items in _LINEAR_SHAPES:
        if longest is None or length <= longest:
            return threads, items
    raise AssertionError("unreachable")


def _unit_time_stride(t):
    """[B, D, L] with time stride 1, or [B, D, L, 2] pairs with strides (.., 2, 1): what the kernels index."""
    if t is None:
        return None
    want = (2, 1) if t.dim() == 4 else (1,)
    return t if tuple(t.stride()[2:]) == want else t.contiguous()


def _pair_contiguous(t):
    """[B, D] or [B, D, 2] states: the (re, im) pair must be adjacent."""
    return t if t is None or t.dim() == 2 or t.stride(-1) == 1 else t.contiguous()


def row_strides(name: str, t) -> dict:
    """The kernels' ``stride_<name>_b`` and ``stride_<name>_d`` of a [B, D, ...] tensor (0 for an absent one)."""
    b, d = (t.stride(0), t.stride(1)) if t is not None else (0, 0)
    return {f"stride_{name}_b": b, f"stride_{name}_d": d}


def _run_linear(gate, x, init, out, *, reverse, gate_shift, conj_gate, prev=None, prev_init=None, dgate=None):
    batch, dim, length = x.shape[:3]
    width = 2 if x.dim() == 4 else 1
    gate, x, prev = _unit_time_stride(gate), _unit_time_stride(x), _unit_time_stride(prev)
    init, prev_init = _pair_contiguous(init), _pair_contiguous(prev_init)
    threads, items = _linear_shape(length)
    kernel = LINEAR_SCAN.kernel(_linear_expression(threads, items, _cuda.C_TYPES[x.dtype], width))
    kernel(
        grid=batch * dim, block=threads,
        gate=gate, x=x, init=init, out=out, prev=prev, prev_init=prev_init, dgate=dgate,
        **row_strides("gate", gate), **row_strides("x", x), **row_strides("init", init), **row_strides("out", out),
        **row_strides("prev", prev), **row_strides("prev_init", prev_init), **row_strides("dgate", dgate),
        dim=dim, length=length, reverse=reverse, gate_shift=gate_shift, conj_gate=conj_gate,
    )


def linear_scan_fwd(a, b, initial_state, reverse: bool):
    """a, b: [B, D, L] real or [B, D, L, 2] complex pairs; initial_state [B, D] / [B, D, 2] or None."""
    return linear_scan_forward(_run_linear, a, b, initial_state, reverse)


def linear_scan_bwd(dh, a, h, initial_state, reverse: bool):
    """Gradients (da, db, d initial_state or None) of linear_scan_fwd."""
    return linear_scan_backward(_run_linear, dh, a, h, initial_state, reverse)


# ---------------------------------------------------------------------------------------- selective scan
# (threads, items) of the two kernels; both walk the same chunks, whose entering states the forward saves.
_FWD_SHAPE = (128, 16)
_BWD_SHAPE = (256, 8)
assert _FWD_SHAPE[0] * _FWD_SHAPE[1] == _BWD_SHAPE[0] * _BWD_SHAPE[1] == CUDA_SCAN_CHUNK
# (input, weight) element types: B and C in u's dtype or fp32
SELECTIVE_TYPES = tuple(dict.fromkeys((c_type, weight) for c_type in _cuda.C_TYPES.values()
                                       for weight in (c_type, "float")))


def _selective_expression(kind: str, c_type: str, weight: str) -> str:
    threads, items = _FWD_SHAPE if kind == "fwd" else _BWD_SHAPE
    return f"flashops::selective_scan_{kind}_kernel<{threads}, {items}, {c_type}, {weight}>"


SELECTIVE_SCAN = _cuda.Program("ssm/selective_scan.cu", [
    _selective_expression(kind, c_type, weight) for kind in ("fwd", "bwd") for c_type, weight in SELECTIVE_TYPES])


def _selective_operands(u, B, C, A, D, delta_bias):
    """B, C as [B, G, N, L] in u's dtype or fp32; A, D, delta_bias fp32 contiguous; the weight type's name."""
    Bg = B.unsqueeze(1) if B.dim() == 3 else B
    Cg = C.unsqueeze(1) if C.dim() == 3 else C
    weight = u.dtype if Bg.dtype == Cg.dtype == u.dtype else torch.float32
    Bg, Cg = (_unit_time_stride(t.to(weight)) for t in (Bg, Cg))
    small = [t.float().contiguous() if t is not None else None for t in (A, D, delta_bias)]
    return Bg, Cg, small, _cuda.C_TYPES[weight]


def _group_strides(name: str, t) -> dict:
    return {f"stride_{name}_b": t.stride(0), f"stride_{name}_g": t.stride(1), f"stride_{name}_n": t.stride(2)}


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus: bool):
    """Returns (out [B, D, L] in u's dtype, last state fp32 [B, D, N], the state entering every chunk fp32
    [B, D, N, ceil(L / CUDA_SCAN_CHUNK)])."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    f32 = dict(device=u.device, dtype=torch.float32)
    out = torch.empty(batch, dim, length, device=u.device, dtype=u.dtype)
    saved = torch.empty(batch, dim, n_state, -(-length // CUDA_SCAN_CHUNK), **f32)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    if length == 0 or out.numel() == 0:
        last = h0.clone() if h0 is not None else torch.zeros(batch, dim, n_state, **f32)
        return out, last, saved
    last = torch.empty(batch, dim, n_state, **f32)
    Bg, Cg, (A32, D32, bias32), weight = _selective_operands(u, B, C, A, D, delta_bias)
    kernel = SELECTIVE_SCAN.kernel(_selective_expression("fwd", _cuda.C_TYPES[u.dtype], weight))
    kernel(grid=batch * dim, block=_FWD_SHAPE[0], shared=2 * n_state * 4,
           u=u, delta=delta, A=A32, B=Bg, C=Cg, D=D32, z=z, delta_bias=bias32, initial_state=h0,
           out=out, last_state=last, saved=saved,
           **row_strides("u", u), **row_strides("delta", delta), **row_strides("z", z),
           **_group_strides("B", Bg), **_group_strides("C", Cg),
           dim=dim, n_groups=Bg.shape[1], n_state=n_state, length=length, softplus_dt=softplus)
    return out, last, saved


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, softplus: bool):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, d initial_state), None where an input is None;
    ckpt: the chunk-entering states selective_scan_fwd saved."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    f32 = dict(device=u.device, dtype=torch.float32)
    Bg, Cg, (A32, D32, bias32), weight = _selective_operands(u, B, C, A, D, delta_bias)
    n_groups = Bg.shape[1]
    du = torch.empty(batch, dim, length, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, length, device=u.device, dtype=delta.dtype)
    dz = torch.empty(batch, dim, length, device=u.device, dtype=z.dtype) if z is not None else None
    dB = torch.zeros(batch, n_groups, n_state, length, **f32)
    dC = torch.zeros(batch, n_groups, n_state, length, **f32)
    dA_part = torch.zeros(batch, dim, n_state, **f32)
    dD_part = torch.zeros(batch, dim, **f32)
    dbias_part = torch.zeros(batch, dim, **f32)
    dlast32 = dlast.float().contiguous() if dlast is not None else None
    if initial_state is None:
        dinitial = None
    elif length == 0 or du.numel() == 0:
        dinitial = dlast32.clone() if dlast32 is not None else torch.zeros(batch, dim, n_state, **f32)
    else:
        dinitial = torch.empty(batch, dim, n_state, **f32)
    if length > 0 and du.numel() > 0:
        dout = _unit_time_stride(dout)
        chunk = CUDA_SCAN_CHUNK
        kernel = SELECTIVE_SCAN.kernel(_selective_expression("bwd", _cuda.C_TYPES[u.dtype], weight))
        kernel(grid=batch * dim, block=_BWD_SHAPE[0], shared=(3 * n_state + 2 * chunk) * 4,
               dout=dout, dlast=dlast32, u=u, delta=delta, A=A32, B=Bg, C=Cg, D=D32, z=z,
               delta_bias=bias32, saved=ckpt.contiguous(), du=du, ddelta=ddelta, dz=dz, dB=dB, dC=dC,
               dA_part=dA_part, dD_part=dD_part, dbias_part=dbias_part, dinitial=dinitial,
               **row_strides("dout", dout), **row_strides("u", u), **row_strides("delta", delta),
               **row_strides("z", z), **_group_strides("B", Bg), **_group_strides("C", Cg),
               dim=dim, n_groups=n_groups, n_state=n_state, length=length, softplus_dt=softplus)
    return selective_scan_grads(du, ddelta, dz, dA_part, dB, dC, dD_part, dbias_part, dinitial, A, B, C, D, delta_bias,
                                initial_state)
