"""What the backends of the ssm family share: the shapes every backend agrees on (the custom ops' fake kernels
need them too), and the host-side halves of the scans and kernels that the Triton and CUDA launchers both run
around their own kernels (the linear scan's forward/backward passes, the selective scan's gradient tuple, the
Vandermonde and Cauchy gradient sums)."""

from __future__ import annotations

import torch


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


# The CUDA selective scan's chunk (threads x items per thread of its kernels; flashops/ops/ssm/cuda_scan.py).
CUDA_SCAN_CHUNK = 2048


def state_spacing(n_state: int, backend: str = "") -> int:
    """Every how many steps ``selective_scan`` saves its state for the backward pass, chosen from N and the
    backend alone so that the saved tensor ``[B, D, N, ceil(L / spacing)]`` has a known shape. The Triton time
    tile (the cpp and torch backends use the same), where larger N gets shorter tiles (the kernels hold
    ``channels x N x spacing`` values in registers); the CUDA kernels' chunk, whose states they recompute."""
    if backend == "cuda":
        return CUDA_SCAN_CHUNK
    block_n = next_power_of_2(n_state)
    return 32 if block_n <= 32 else (16 if block_n <= 64 else 8)


def linear_scan_forward(run, a, b, initial_state, reverse: bool):
    """linear_scan's forward on a backend whose kernel ``run(gate, x, init, out, *, reverse, gate_shift, conj_gate,
    prev=None, prev_init=None, dgate=None)`` computes out_t = gate_{t+shift} out_{t -/+ 1} + x_t (and, with dgate,
    the gate gradient out_t conj(prev_{t-shift})). a, b: [B, D, L] real or [B, D, L, 2] pairs."""
    out = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    if b.numel() == 0:
        return out
    run(a, b, initial_state, out, reverse=reverse, gate_shift=0, conj_gate=False)
    return out


def linear_scan_backward(run, dh, a, h, initial_state, reverse: bool):
    """(da, db, d initial_state or None) with the same kernel: the adjoint g_t = dh_t + conj(a_{t+1}) g_{t+1} is the
    scan run the other way with the gate one step ahead and conjugated; db = g, da_t = g_t conj(h_{t-1})."""
    db = torch.empty(dh.shape, dtype=dh.dtype, device=dh.device)
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if dh.numel() == 0:
        return da.zero_(), db, (None if initial_state is None else torch.zeros_like(initial_state))
    run(a, dh, None, db, reverse=not reverse, gate_shift=-1 if reverse else 1, conj_gate=True, prev=h,
        prev_init=initial_state, dgate=da)
    return da, db, (None if initial_state is None else initial_state_grad(a, db, initial_state, reverse))


def initial_state_grad(a: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor, reverse: bool) -> torch.Tensor:
    """linear_scan's d initial_state = conj(a) g at the scan's first step (a, g: [B, D, L] or [B, D, L, 2] pairs)."""
    first = -1 if reverse else 0
    if a.dim() == 4:
        a0 = torch.view_as_complex(a[:, :, first].float().contiguous()).conj_physical()
        g0 = torch.view_as_complex(g[:, :, first].float().contiguous())
        return torch.view_as_real(a0 * g0).to(initial_state.dtype)
    return (a[:, :, first].float() * g[:, :, first].float()).to(initial_state.dtype)


def selective_scan_grads(du, ddelta, dz, dA_part, dB, dC, dD_part, dbias_part, d_initial, A, B, C, D, delta_bias,
                         initial_state) -> tuple:
    """selective_scan_bwd's result from a kernel's outputs: dA, dD, ddelta_bias summed over their per-batch
    shares ([B, D, N], [B, D], [B, D]), dB and dC [B, G, N, L] back to B's shape, each gradient in its input's
    dtype and None where the input is None."""
    if B.dim() == 3:
        dB, dC = dB.squeeze(1), dC.squeeze(1)
    return (du, ddelta, dA_part.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD_part.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            d_initial.to(initial_state.dtype) if initial_state is not None else None)


def fresh(t: torch.Tensor) -> torch.Tensor:
    """A custom op must return tensors that own their storage: a view (e.g. ``view_as_real`` of a complex
    result) is rebuilt from its base under AOT tracing with the wrong element size. Copy views only."""
    return t if t._base is None else t.clone()


def contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """A fake kernel's gradient: an empty tensor like ``t``, contiguous."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (2 elsewhere: the kernels' host emulation and interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def vandermonde_grads(s0: torch.Tensor, s1: torch.Tensor, w: torch.Tensor, conj: bool) -> tuple:
    """(dx, dw) of the Vandermonde kernel from its partial sums over L ranges, [splits, C, H, N, 2] each:
    S0 = sum_l G conj(z^l) and S1 = sum_l G l conj(z^l); dw = s S0, dx = s sum_c conj(w) S1."""
    scale = 2.0 if conj else 1.0
    s0 = torch.view_as_complex(s0.sum(0))
    s1 = torch.view_as_complex(s1.sum(0))
    wc = torch.view_as_complex(w.contiguous())
    return torch.view_as_real(scale * (wc.conj_physical() * s1).sum(0)), torch.view_as_real(scale * s0)


def cauchy_dz(derivative: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """dz of the Cauchy kernel from ``sum_n v r1^2 + conj(v) r2^2`` ([M, G, L, 2]): the kernel is holomorphic in
    z with derivative minus that sum, so dz = -sum over (m, g) of conj(sum) G."""
    deriv = torch.view_as_complex(derivative)
    return torch.view_as_real(-(deriv.conj_physical() * torch.view_as_complex(dout)).sum((0, 1)))
