"""The CUDA backend of ``selective_state_update`` (csrc/cuda/ssm/state_update.cu): one recurrent step, forward and
backward: the ``StateUpdateBackend`` contract (args.py)."""

from __future__ import annotations

import torch

from ... import _cuda
from .cuda_scan import SELECTIVE_TYPES, row_strides

_THREADS = 128


def _expression(kind: str, c_type: str, weight: str) -> str:
    return f"flashops::selective_state_update_{kind}_kernel<{c_type}, {weight}>"


STATE_UPDATE = _cuda.Program("ssm/state_update.cu", [
    _expression(kind, c_type, weight) for kind in ("fwd", "bwd") for c_type, weight in SELECTIVE_TYPES])


def _operands(state, x, dt, A, B, C, D, z, dt_bias):
    """The kernels' operands: x, dt, z in one dtype (x's, else fp32), B and C as [B, G, N] in that dtype or fp32,
    the state, A, D and dt_bias fp32 (unit last strides)."""
    inputs = [t for t in (x, dt, z) if t is not None]
    dtype = x.dtype if all(t.dtype == x.dtype for t in inputs) else torch.float32
    x, dt = x.to(dtype), dt.to(dtype)
    z = z.to(dtype) if z is not None else None
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    weight = dtype if Bg.dtype == Cg.dtype == dtype else torch.float32
    Bg, Cg = (t.to(weight) for t in (Bg, Cg))
    Bg, Cg, state = (t if t.stride(-1) == 1 else t.contiguous() for t in (Bg, Cg, state.float()))
    A, D, dt_bias = (t.float().contiguous() if t is not None else None for t in (A, D, dt_bias))
    return state, x, dt, A, Bg, Cg, D, z, dt_bias, _cuda.C_TYPES[dtype], _cuda.C_TYPES[weight]


def _lanes(n_state: int) -> int:
    """Threads per channel: a power of two up to a warp, about one state each."""
    return min(32, 1 << max(0, (n_state - 1).bit_length()))


def _launch(kind, state, x, dt, z, Bg, Cg, c_type, weight, softplus, **arguments):
    batch, dim, n_state = state.shape
    lanes = _lanes(n_state)
    rows = batch * dim
    STATE_UPDATE.kernel(_expression(kind, c_type, weight))(
        grid=-(-rows * lanes // _THREADS), block=_THREADS, state=state, x=x, dt=dt, z=z, B=Bg, C=Cg,
        stride_state_b=state.stride(0), stride_state_d=state.stride(1), **row_strides("x", x),
        **row_strides("dt", dt), **row_strides("z", z),
        stride_B_b=Bg.stride(0), stride_B_g=Bg.stride(1), stride_C_b=Cg.stride(0), stride_C_g=Cg.stride(1),
        rows=rows, dim=dim, n_groups=Bg.shape[1], n_state=n_state, lanes=lanes, softplus_dt=softplus, **arguments)


def selective_state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, softplus: bool):
    """Returns (y [B, D] in x's dtype, new state [B, D, N] in the state's dtype)."""
    state32, x_, dt_, A_, Bg, Cg, D_, z_, bias_, c_type, weight = _operands(state, x, dt, A, B, C, D, z, dt_bias)
    batch, dim, n_state = state.shape
    y = torch.empty(batch, dim, device=x.device, dtype=x_.dtype)
    new_state = torch.empty(batch, dim, n_state, device=x.device, dtype=torch.float32)
    if y.numel():
        _launch("fwd", state32, x_, dt_, z_, Bg, Cg, c_type, weight, softplus, A=A_, D=D_, dt_bias=bias_, y=y,
                new_state=new_state)
    return y.to(x.dtype), new_state.to(state.dtype)


def selective_state_update_bwd(dy, d_new_state, state, x, dt, A, B, C, D, z, dt_bias, softplus: bool):
    """Gradients (d_state, dx, ddt, dA, dB, dC, dD, dz, d_dt_bias), None where an input is None."""
    state32, x_, dt_, A_, Bg, Cg, D_, z_, bias_, c_type, weight = _operands(state, x, dt, A, B, C, D, z, dt_bias)
    batch, dim, n_state = state.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    d_state = torch.zeros(batch, dim, n_state, **f32)
    dx, ddt = (torch.zeros(batch, dim, device=x.device, dtype=x_.dtype) for _ in range(2))
    dz = torch.zeros_like(dx) if z is not None else None
    parts = {name: torch.zeros(batch, dim, n_state, **f32) for name in ("dA_part", "dB_part", "dC_part")}
    dD_part, dbias_part = torch.zeros(batch, dim, **f32), torch.zeros(batch, dim, **f32)
    if dx.numel():
        d_new = d_new_state.float().contiguous() if d_new_state is not None else None
        _launch("bwd", state32, x_, dt_, z_, Bg, Cg, c_type, weight, softplus, dy=dy.to(x_.dtype).contiguous(),
                d_new_state=d_new, A=A_, D=D_, dt_bias=bias_, d_state=d_state, dx=dx, ddt=ddt, dz=dz,
                dD_part=dD_part, dbias_part=dbias_part, **parts)
    groups = Bg.shape[1]

    def per_group(part):  # [B, D, N] channel shares -> the shape of B / C
        summed = part.reshape(batch, groups, dim // groups, n_state).sum(2)
        return summed if B.dim() == 3 else summed[:, 0]

    return (d_state.to(state.dtype), dx.to(x.dtype), ddt.to(dt.dtype), parts["dA_part"].sum(0).to(A.dtype),
            per_group(parts["dB_part"]).to(B.dtype), per_group(parts["dC_part"]).to(C.dtype),
            dD_part.sum(0).to(D.dtype) if D is not None else None, dz.to(z.dtype) if dz is not None else None,
            dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else None)
