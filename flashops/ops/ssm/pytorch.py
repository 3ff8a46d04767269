"""The PyTorch path of the ssm family: CPU and fallback on any device, with bounded memory.

Scans walk time in blocks whose size adapts to the number of channels, so the largest temporary is a few
``channels x block`` tensors; inside a block, a log-depth doubling scan (Hillis-Steele) composes the affine
maps, and the fp32 state is carried from block to block. The selective-scan backward recomputes one block at
a time from the states saved at the block starts and differentiates it with autograd. Kernel generators
(Vandermonde, Cauchy) loop over L in chunks and never hold ``[H, N, L]``. Signatures match triton_*.py.

Conjugates are ``conj_physical``: these functions run inside custom ops, and a lazy ``conj()`` view loses its
conjugate bit there under AOT tracing (torch.compile), which silently gives wrong results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import state_spacing

# Elements in one block temporary (fp32): 2**22 = 16 MiB.
BLOCK_ELEMENTS = 1 << 22


def _time_block(channels: int, length: int, multiple: int = 1) -> int:
    block = max(multiple, BLOCK_ELEMENTS // max(1, channels))
    block = block // multiple * multiple
    return max(multiple, min(block, -(-length // multiple) * multiple))


def _doubling_scan(a: torch.Tensor, b: torch.Tensor):
    """Inclusive scan of h -> a h + b along the last dim: returns (prod a_0..t, h_t with h_{-1} = 0).
    Out of place, so that autograd can differentiate it (the selective-scan backward does)."""
    k = 1
    length = a.shape[-1]
    while k < length:
        b = torch.cat([b[..., :k], a[..., k:] * b[..., :-k] + b[..., k:]], dim=-1)
        a = torch.cat([a[..., :k], a[..., k:] * a[..., :-k]], dim=-1)
        k *= 2
    return a, b


def _real_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 compute for fp16/bf16/fp32 inputs; float64 stays float64 (gradcheck runs through this path)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_compute(x, complex_: bool, dtype=None):
    if x is None:
        return None
    x = x.to(dtype or _real_dtype(x))
    return torch.view_as_complex(x.contiguous()) if complex_ else x


def _as_storage(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(x) if x.is_complex() else x).to(like.dtype)


# ------------------------------------------------------------------------------------- linear scan
def _linear_scan(a, b, h0, reverse: bool):
    """h_t = a_t h_{t-1} + b_t on compute tensors [B, D, L] (fp32 or complex64), block by block."""
    if reverse:
        return _linear_scan(a.flip(-1), b.flip(-1), h0, False).flip(-1)
    batch, dim, length = b.shape
    out = torch.empty_like(b)
    carry = b.new_zeros(b.shape[:-1]) if h0 is None else h0.to(b.dtype)  # (b[..., 0] fails when L = 0)
    block = _time_block(batch * dim * 4, length)
    for t0 in range(0, length, block):
        t1 = min(t0 + block, length)
        prod, h = _doubling_scan(a[..., t0:t1], b[..., t0:t1])
        h = h + prod * carry[..., None]
        out[..., t0:t1] = h
        carry = h[..., -1]
    return out


def linear_scan_fwd(a, b, initial_state, reverse: bool):
    complex_ = b.dim() == 4
    dtype = _real_dtype(b)
    h = _linear_scan(_as_compute(a, complex_, dtype), _as_compute(b, complex_, dtype),
                     _as_compute(initial_state, complex_, dtype), reverse)
    return _as_storage(h, b)


def linear_scan_bwd(dh, a, h, initial_state, reverse: bool):
    complex_ = dh.dim() == 4
    dtype = _real_dtype(dh)
    ac, gc, hc = (_as_compute(x, complex_, dtype) for x in (a, dh, h))
    h0 = _as_compute(initial_state, complex_, dtype)
    zero = torch.zeros_like(ac[..., :1])
    h0_col = zero if h0 is None else h0[..., None].to(hc.dtype)
    if reverse:  # adjoint runs forward: g_t = dh_t + conj(a_{t-1}) g_{t-1}; previous state is h_{t+1}
        gates = torch.cat([zero, ac[..., :-1]], -1).conj_physical()
        prev = torch.cat([hc[..., 1:], h0_col], -1)
        first = -1
    else:
        gates = torch.cat([ac[..., 1:], zero], -1).conj_physical()
        prev = torch.cat([h0_col, hc[..., :-1]], -1)
        first = 0
    g = _linear_scan(gates, gc, None, not reverse)
    da = g * prev.conj_physical()
    dh0 = None
    if initial_state is not None:
        dh0 = _as_storage(ac[..., first].conj_physical() * g[..., first], initial_state) if ac.shape[-1] else \
            torch.zeros_like(initial_state)
    return _as_storage(da, a), _as_storage(g, dh), dh0


# ----------------------------------------------------------------------------------- selective scan
def _per_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C [B, N, T] / [B, G, N, T] -> [B, D, N, T] (a broadcast view for one group)."""
    if x.dim() == 3:
        return x[:, None]
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def _group_sum(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, D, N, T] per-channel gradient -> the shape of B / C ([B, N, T] or [B, G, N, T])."""
    if like.dim() == 3:
        return x.sum(1)
    groups = like.shape[1]
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:]).sum(2)


def _block_inputs(u, delta, A, B, bias, softplus, cdt):
    """raw = delta + bias, dt, gates exp(dt A) [B, D, N, T] and inputs dt u B [B, D, N, T] of one block."""
    raw = delta.to(cdt)
    if bias is not None:
        raw = raw + bias.to(cdt)[:, None]
    dt = F.softplus(raw) if softplus else raw
    gates = torch.exp(dt[:, :, None, :] * A.to(cdt)[None, :, :, None])
    inputs = (dt * u.to(cdt))[:, :, None, :] * _per_channel(B.to(cdt), u.shape[1])
    return raw, dt, gates, inputs


def _readout(h, u, C, D, cdt):
    y = (h * _per_channel(C.to(cdt), u.shape[1])).sum(2)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u.to(cdt)
    return y


def _block_len(u, n_state):
    spacing = state_spacing(n_state)
    return spacing, _time_block(u.shape[0] * u.shape[1] * n_state * 12, u.shape[2], spacing)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus: bool):
    batch, dim, length = u.shape
    n_state = A.shape[1]
    cdt = _real_dtype(u)
    spacing, block = _block_len(u, n_state)
    out = torch.empty_like(u)
    saved = torch.empty(batch, dim, n_state, -(-length // spacing), device=u.device, dtype=cdt)
    h = torch.zeros(batch, dim, n_state, device=u.device, dtype=cdt) if initial_state is None \
        else initial_state.to(cdt)
    for t0 in range(0, length, block):
        sl = slice(t0, min(t0 + block, length))
        _, _, gates, inputs = _block_inputs(u[..., sl], delta[..., sl], A, B[..., sl], delta_bias, softplus, cdt)
        prod, states = _doubling_scan(gates, inputs)
        states = states + prod * h[..., None]
        y = _readout(states, u[..., sl], C[..., sl], D, cdt)
        if z is not None:
            y = y * F.silu(z[..., sl].to(cdt))
        out[..., sl] = y.to(u.dtype)
        # saved[k] = state before step k * spacing: the block start, then the ends of its tiles
        saved[..., t0 // spacing] = h
        ends = states[..., spacing - 1 : sl.stop - t0 - 1 : spacing]
        saved[..., t0 // spacing + 1 : t0 // spacing + 1 + ends.shape[-1]] = ends
        h = states[..., -1]
    return out, h.contiguous(), saved


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, softplus: bool):
    """Blocks from the last to the first: recompute the states from the saved block start, then run the adjoint
    lambda_t = C_t dy_t + exp(dt_{t+1} A) lambda_{t+1} (a reverse scan) and read every gradient off it."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    cdt = _real_dtype(u)
    spacing, block = _block_len(u, n_state)
    A_c = A.to(cdt)
    dA = torch.zeros(dim, n_state, dtype=cdt, device=u.device)
    dD = torch.zeros(dim, dtype=cdt, device=u.device)
    dbias = torch.zeros(dim, dtype=cdt, device=u.device)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dz = torch.empty_like(z) if z is not None else None
    # mu = exp(dt A) lambda at the first step after the current block (the adjoint carried backwards)
    mu = torch.zeros(batch, dim, n_state, device=u.device, dtype=cdt) if dlast is None else dlast.to(cdt)
    for t0 in reversed(range(0, length, block)):
        sl = slice(t0, min(t0 + block, length))
        u_b = u[..., sl].to(cdt)
        raw, dt, gates, inputs = _block_inputs(u[..., sl], delta[..., sl], A, B[..., sl], delta_bias, softplus, cdt)
        prod, states = _doubling_scan(gates, inputs)
        states = states + prod * ckpt[..., t0 // spacing].to(cdt)[..., None]
        g_out = dout[..., sl].to(cdt)
        if z is not None:
            zz = z[..., sl].to(cdt)
            sig = torch.sigmoid(zz)
            y = _readout(states, u_b, C[..., sl], D, cdt)
            dz[..., sl] = (g_out * y * sig * (1 + zz * (1 - sig))).to(dz.dtype)
            dy = g_out * zz * sig
        else:
            dy = g_out
        adjoint_in = dy[:, :, None, :] * _per_channel(C[..., sl].to(cdt), dim)
        shifted = torch.cat([gates[..., 1:], torch.ones_like(gates[..., :1])], dim=-1)  # gate of t + 1; mu: 1
        decay, lam = _doubling_scan(shifted.flip(-1), adjoint_in.flip(-1))
        lam = (lam + decay * mu[..., None]).flip(-1)
        mu = gates[..., 0] * lam[..., 0]
        q = lam * (states - inputs)  # lambda_t exp(dt_t A) h_{t-1}
        b_ch = _per_channel(B[..., sl].to(cdt), dim)
        lam_b = (lam * b_ch).sum(2)
        ddt = lam_b * u_b + (q * A_c[None, :, :, None]).sum(2)
        dA += (q * dt[:, :, None, :]).sum((0, 3))
        du_b = lam_b * dt
        if D is not None:
            du_b = du_b + dy * D.to(cdt)[:, None]
            dD += (dy * u_b).sum((0, 2))
        if softplus:
            ddt = ddt * torch.sigmoid(raw)
        dbias += ddt.sum((0, 2))
        du[..., sl] = du_b.to(du.dtype)
        ddelta[..., sl] = ddt.to(ddelta.dtype)
        dB[..., sl] = _group_sum(lam * (dt * u_b)[:, :, None, :], B).to(dB.dtype)
        dC[..., sl] = _group_sum(states * dy[:, :, None, :], C).to(dC.dtype)
    return (du, ddelta, dA.to(A.dtype), dB, dC, dD.to(D.dtype) if D is not None else None, dz,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None,
            mu.to(initial_state.dtype) if initial_state is not None else None)


# ------------------------------------------------------------------------------- selective state update
def _step_parts(state, x, dt, A, B, C, dt_bias, softplus: bool):
    """The compute dtype and the pieces of one step: raw dt + bias, dt, x, state, A, the gates exp(dt A), B and C
    per channel ([B, D, N], or [B, 1, N] when shared), the new state."""
    cdt = torch.float64 if state.dtype == torch.float64 else torch.float32
    dim = x.shape[1]
    raw = dt.to(cdt) + (dt_bias.to(cdt) if dt_bias is not None else 0.0)
    step = F.softplus(raw) if softplus else raw

    def per_channel(t):
        t = t.to(cdt)
        return t[:, None] if t.dim() == 2 else t.repeat_interleave(dim // t.shape[1], dim=1)

    x_c, s, a = x.to(cdt), state.to(cdt), A.to(cdt)
    gates = torch.exp(step[..., None] * a)
    b_c, c_c = per_channel(B), per_channel(C)
    new_state = gates * s + (step * x_c)[..., None] * b_c
    return cdt, raw, step, x_c, s, a, gates, b_c, c_c, new_state


def selective_state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, softplus: bool):
    """Returns (y [B, D] in x's dtype, new state [B, D, N] in the state's dtype); fp32 (fp64 for an fp64 state)."""
    cdt, _, _, x_c, _, _, _, _, c_c, new_state = _step_parts(state, x, dt, A, B, C, dt_bias, softplus)
    y = (new_state * c_c).sum(-1)
    if D is not None:
        y = y + D.to(cdt) * x_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), new_state.to(state.dtype)


def selective_state_update_bwd(dy, d_new_state, state, x, dt, A, B, C, D, z, dt_bias, softplus: bool):
    """Gradients (d_state, dx, ddt, dA, dB, dC, dD, dz, d_dt_bias), None where an input is None."""
    cdt, raw, step, x_c, s, a, gates, b_c, c_c, new_state = _step_parts(state, x, dt, A, B, C, dt_bias, softplus)
    batch, dim, n_state = state.shape
    skip = D.to(cdt) if D is not None else None
    y0 = (new_state * c_c).sum(-1) + (skip * x_c if skip is not None else 0.0)
    g = dy.to(cdt)
    dz = None
    if z is not None:
        z_c = z.to(cdt)
        sig = torch.sigmoid(z_c)
        dz = (g * y0 * sig * (1 + z_c * (1 - sig))).to(z.dtype)
        g = g * z_c * sig  # dL/dy before the gate
    d_new = g[..., None] * c_c + (d_new_state.to(cdt) if d_new_state is not None else 0.0)
    d_gate = d_new * s * gates  # through exp(dt A)
    lam_b = (d_new * b_c).sum(-1)
    d_step = (d_gate * a).sum(-1) + lam_b * x_c
    d_raw = d_step * torch.sigmoid(raw) if softplus else d_step
    dx = lam_b * step + (g * skip if skip is not None else 0.0)

    def per_group(t, like):  # [B, D, N] channel shares -> the shape of B / C
        groups = 1 if like.dim() == 2 else like.shape[1]
        summed = t.reshape(batch, groups, dim // groups, n_state).sum(2)
        return (summed[:, 0] if like.dim() == 2 else summed).to(like.dtype)

    dA = (d_gate * step[..., None]).sum(0)
    return ((gates * d_new).to(state.dtype), dx.to(x.dtype), d_raw.to(dt.dtype), dA.to(A.dtype),
            per_group(d_new * (step * x_c)[..., None], B), per_group(g[..., None] * new_state, C),
            (g * x_c).sum(0).to(D.dtype) if D is not None else None, dz,
            d_raw.sum(0).to(dt_bias.dtype) if dt_bias is not None else None)


# -------------------------------------------------------------------------------------- Vandermonde
def _l_chunk(rows: int, length: int) -> int:
    return max(1, min(length, BLOCK_ELEMENTS // max(1, rows)))


def _powers(x: torch.Tensor, l0: int, l1: int) -> torch.Tensor:
    ls = torch.arange(l0, l1, device=x.device, dtype=x.real.dtype)
    return torch.exp(x[..., None] * ls)


def vandermonde_fwd(x, w, length: int, conj: bool):
    xc, wc = torch.view_as_complex(x.contiguous()), torch.view_as_complex(w.contiguous())
    n_copies, n_heads, n_state = wc.shape
    k = torch.empty(n_copies, n_heads, length, device=x.device, dtype=x.dtype)
    step = _l_chunk(n_heads * max(n_state, n_copies), length)
    scale = 2.0 if conj else 1.0
    for l0 in range(0, length, step):
        l1 = min(l0 + step, length)
        k[..., l0:l1] = scale * torch.einsum("chn,hnl->chl", wc, _powers(xc, l0, l1)).real
    return k


def vandermonde_bwd(dk, x, w, length: int, conj: bool):
    xc, wc = torch.view_as_complex(x.contiguous()), torch.view_as_complex(w.contiguous())
    n_copies, n_heads, n_state = wc.shape
    g = dk.to(x.dtype)
    s0 = torch.zeros_like(wc)
    s1 = torch.zeros_like(wc)
    step = _l_chunk(n_heads * max(n_state, n_copies), length)
    for l0 in range(0, length, step):
        l1 = min(l0 + step, length)
        conj_pow = _powers(xc, l0, l1).conj_physical()
        gl = g[..., l0:l1].to(conj_pow.dtype)
        s0 += torch.einsum("chl,hnl->chn", gl, conj_pow)
        s1 += torch.einsum("chl,hnl->chn", gl * torch.arange(l0, l1, device=x.device, dtype=x.dtype), conj_pow)
    scale = 2.0 if conj else 1.0
    return torch.view_as_real(scale * (wc.conj_physical() * s1).sum(0)), torch.view_as_real(scale * s0)


# ------------------------------------------------------------------------------------------- Cauchy
def _reciprocals(z, w, l0, l1):
    """r1 = 1/(z - w), r2 = 1/(z - conj w) for z[l0:l1]: [G, N, l]."""
    zl = z[l0:l1]
    return 1.0 / (zl - w[..., None]), 1.0 / (zl - w.conj_physical()[..., None])


def cauchy_fwd(v, z, w):
    vc, zc, wc = (torch.view_as_complex(t.contiguous()) for t in (v, z, w))
    n_m, n_groups, n_state = vc.shape
    length = zc.shape[0]
    out = torch.empty(n_m, n_groups, length, dtype=vc.dtype, device=v.device)
    step = _l_chunk(n_groups * n_state * 2, length)
    for l0 in range(0, length, step):
        l1 = min(l0 + step, length)
        r1, r2 = _reciprocals(zc, wc, l0, l1)
        out[..., l0:l1] = torch.einsum("mgn,gnl->mgl", vc, r1) + torch.einsum("mgn,gnl->mgl", vc.conj_physical(), r2)
    return torch.view_as_real(out)


def cauchy_bwd(dout, v, z, w, want_dz: bool):
    vc, zc, wc = (torch.view_as_complex(t.contiguous()) for t in (v, z, w))
    g = torch.view_as_complex(dout.to(v.dtype).contiguous())
    length = zc.shape[0]
    t1 = torch.zeros_like(vc)
    t2 = torch.zeros_like(vc)
    s1 = torch.zeros_like(vc)
    s2 = torch.zeros_like(vc)
    dz = torch.zeros_like(zc) if want_dz else None
    step = _l_chunk(vc.shape[1] * vc.shape[2] * 2, length)
    for l0 in range(0, length, step):
        l1 = min(l0 + step, length)
        r1, r2 = _reciprocals(zc, wc, l0, l1)
        c1, c2 = r1.conj_physical(), r2.conj_physical()
        gl = g[..., l0:l1]
        t1 += torch.einsum("mgl,gnl->mgn", gl, c1)
        t2 += torch.einsum("mgl,gnl->mgn", gl, c2)
        s1 += torch.einsum("mgl,gnl->mgn", gl, c1 * c1)
        s2 += torch.einsum("mgl,gnl->mgn", gl, c2 * c2)
        if want_dz:
            deriv = (torch.einsum("mgn,gnl->mgl", vc, r1 * r1)
                     + torch.einsum("mgn,gnl->mgl", vc.conj_physical(), r2 * r2))
            dz[l0:l1] = -(deriv.conj_physical() * gl).sum((0, 1))
    dv = t1 + t2.conj_physical()
    dw = (vc.conj_physical() * (s1 + s2.conj_physical())).sum(0)
    return torch.view_as_real(dv), (torch.view_as_real(dz) if want_dz else None), torch.view_as_real(dw)
