"""The CUDA backend of the linear-attention decode steps (``lightning_attention_step``,
``gated_linear_attention_step``; csrc/cuda/linear/recurrent_step.cu), forward and backward: the ``StepBackend``
contract (args.py)."""

from __future__ import annotations

import torch

from ... import _cuda
from .common import LOG_GATE_FLOOR

_THREADS = 128  # kStepThreads in the kernel file
_TYPES = tuple((c_type, gate) for c_type in _cuda.C_TYPES.values() for gate in dict.fromkeys((c_type, "float")))


def _expression(kind: str, c_type: str, gate: str) -> str:
    return f"flashops::recurrent_step_{kind}_kernel<{c_type}, {gate}>"


RECURRENT_STEP = _cuda.Program("linear/recurrent_step.cu", [
    _expression(kind, c_type, gate) for kind in ("fwd", "bwd") for c_type, gate in _TYPES])


def _gate_type(q, g) -> str:
    """The kernels take log-gates in q's dtype or fp32 (other dtypes are converted)."""
    return _cuda.C_TYPES[q.dtype] if g is not None and g.dtype == q.dtype else "float"


def _vectors(q, k, v, g, slopes):
    if g is not None and _gate_type(q, g) == "float":
        g = g.float()
    return dict(q=q, k=k, v=v, g=g, slopes=slopes.float().contiguous() if slopes is not None else None,
                stride_q_b=q.stride(0), stride_q_h=q.stride(1), stride_k_b=k.stride(0), stride_k_h=k.stride(1),
                stride_v_b=v.stride(0), stride_v_h=v.stride(1),
                stride_g_b=g.stride(0) if g is not None else 0, stride_g_h=g.stride(1) if g is not None else 0), g


def _states(t):
    return t.float().contiguous() if t is not None else None


def step_forward(q, k, v, g, slopes, state, scale):
    """q, k [B, H, K], v [B, H, V], g [B, H, K] or slopes [H]; state [B, H, K, V] or None (zeros).
    Returns (o [B, H, V] in q's dtype, new state fp32 [B, H, K, V])."""
    b, heads, d_k = q.shape
    d_v = v.shape[2]
    o = torch.empty(b, heads, d_v, dtype=q.dtype, device=q.device)
    new_state = torch.empty(b, heads, d_k, d_v, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, new_state.zero_()
    vectors, g = _vectors(q, k, v, g, slopes)
    RECURRENT_STEP.kernel(_expression("fwd", _cuda.C_TYPES[q.dtype], _gate_type(q, g)))(
        grid=b * heads, block=_THREADS, **vectors, state=_states(state), o=o, new_state=new_state, heads=heads,
        k_dim=d_k, v_dim=d_v, scale=scale, log_gate_floor=LOG_GATE_FLOOR)
    return o, new_state


def step_backward(do, d_new, q, k, v, g, slopes, state, scale):
    """Gradients (dq, dk, dv, dg or None, d_state or None) of step_forward."""
    b, heads, d_k = q.shape
    d_v = v.shape[2]
    dq = torch.zeros(b, heads, d_k, dtype=q.dtype, device=q.device)
    dk = torch.zeros(b, heads, d_k, dtype=k.dtype, device=q.device)
    dv = torch.zeros(b, heads, d_v, dtype=v.dtype, device=q.device)
    gate_type = _gate_type(q, g)
    g_dtype = g.dtype if g is not None else None
    dg = torch.zeros(g.shape, dtype=g.dtype if gate_type != "float" else torch.float32, device=q.device) \
        if g is not None else None
    d_state = torch.zeros(b, heads, d_k, d_v, dtype=torch.float32, device=q.device) if state is not None else None
    if dq.numel():
        vectors, g = _vectors(q, k, v, g, slopes)
        RECURRENT_STEP.kernel(_expression("bwd", _cuda.C_TYPES[q.dtype], gate_type))(
            grid=b * heads, block=_THREADS, **vectors, state=_states(state), dout=do.to(q.dtype).contiguous(),
            d_new_state=_states(d_new), dq=dq, dk=dk, dv=dv, dg=dg, d_state=d_state, heads=heads, k_dim=d_k,
            v_dim=d_v, scale=scale, log_gate_floor=LOG_GATE_FLOOR)
    return (dq, dk, dv, dg.to(g_dtype) if dg is not None else None,
            d_state.to(state.dtype) if d_state is not None else None)
