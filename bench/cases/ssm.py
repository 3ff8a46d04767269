"""State-space ops: the scans (memory bound, reported in GB/s), the S4D Vandermonde kernel, and an S4D
convolution layer against the naive materialized kernel.

Ops and sweeps (GPU full / GPU quick / CPU quick):
  linear_scan         a, b ``[B, D, L]``; (B, D, L) in {(8, 1024, 4k), (4, 2048, 16k), (2, 64, 64k)} and the CUDA
                      bandwidth grid B = 8, D in {2048, 4096}, L in {2k, 8k, 16k}, fp32 and bf16 /
                      (4, 2048, 16k) / (2, 8, 256) fp32. Bytes: fwd 3*N*e (read a, b, write h), bwd 5*N*e (read dh,
                      a, h, write da, db), fwd+bwd 8*N*e, N = B*D*L, e = element size.
  selective_scan      Mamba-1 with z, D, delta_bias, softplus; (B, D, N, L) in {(8, 2048, 16, 2k), (4, 1536, 16, 8k)}
                      bf16 (A, D, delta_bias fp32) / (4, 1536, 16, 8k) / (1, 8, 4, 96) fp32. Bytes: fwd
                      (4*B*D*L + 2*B*N*L)*e (u, delta, z read, out written; B, C read), bwd (7*B*D*L + 4*B*N*L)*e,
                      fwd+bwd their sum (saved chunk states not counted).
  selective_scan_bandwidth  the CUDA bandwidth grid (B = 8, D in {2048, 4096}, N = 16, L in {2k, 8k, 16k}) bf16,
                      GPU only (quick: D = 2048, L = 8k); gradients of the per-batch inputs (u, delta, z, B, C),
                      checked on the last batch element (an independent sub-problem for those).
  vandermonde_kernel  S4D's kernel ``K[c, h, l] = 2 Re(sum_n w[c,h,n] z[h,n]^l)``, C = 1, (H, N, L) in
                      {(256, 32, 16k), (1024, 32, 4k), (256, 32, 64k), (256, 64, 16k)} fp32 / (256, 32, 16k) /
                      (8, 8, 128).
                      FLOPs: 8*C*H*N*L per direction (one complex multiply-add per term; exponentials not
                      counted); bwd 2x fwd.
  cauchy_kernel       S4's Cauchy product ``sum_n v/(z - w) + conj(v)/(z - conj w)``: M = 4 rows (C~, P^* times B, P),
                      (H, N, L) in {(256, 64, 16k), (256, 32, 64k)} / (256, 64, 16k) / M = 2, (4, 8, 128), fp32; z at
                      S4's frequencies, poles dt (-1/2 + i pi n). Peer ``naive-materialized`` builds the [H, N, L]
                      reciprocals (the issue's target for the CUDA kernel: >= 5x it at N = 64, L = 16k). FLOPs
                      8*M*H*N*L per direction.
  s4d_conv            the S4D layer's convolution path: ZOH kernel of length L, then ``fft_conv`` with a D
                      skip; u ``[B, H, L]``, B = 8, H = 256, N = 64, L in {4k, 16k} fp32 / L = 16k / (2, 8, 8, 256).
                      The peer ``naive-materialized`` builds the ``[H, N, L]`` Vandermonde matrix (the issue's
                      target: flashops >= 10x faster at L = 16k). Time only (FFT cost dominates, FLOPs not stated).
Memory scaling (peak memory of forward + backward vs L; GPU / CPU full, CPU quick: Vandermonde only):
  linear_scan B=1, D=1024 / 16, L = 4k, 16k, 64k / 1k, 4k, 16k; selective_scan B=1, D=256 / 8, N=16 / 4,
  L = 2k, 8k, 32k / 512, 2k, 8k; vandermonde_kernel H=256 / 8, N=32, L = 4k, 16k, 64k (CPU quick: N=32, L =
  512, 2k), with the naive materialized kernel beside it (the issue: memory linear in N + L, not N * L).
Checks: scans against the float64-capable loops in ``flashops/ops/ssm/reference.py`` (run here in fp32 and in
the input dtype); linear_scan and the Vandermonde kernel past their budgets are checked on the last channels
(channels are independent); selective_scan always on the whole problem (B and C are shared across channels,
A and D across the batch, so no slice is an independent sub-problem).
"""

from __future__ import annotations

import math

import torch

import flashops
from flashops.ops.ssm import reference as ssm_reference

from ..registry import Op, Provider, case, flashops_providers

SCAN_CHECK_CHANNELS = 64
# The CUDA kernels' bandwidth targets (issue 14: >= 75% of HBM bandwidth, faster than Triton): B = 8,
# D = 2048..4096, L = 2k..16k; (B, D, L).
BANDWIDTH_SHAPES = tuple((8, d, length) for d in (2048, 4096) for length in (2048, 8192, 16384))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _channel_slice(channels: int, dim_of: dict, limit: int):
    """Narrow every tensor named in ``dim_of`` to its last ``limit`` channels along the given dim."""
    def narrow(name, x):
        dim = dim_of.get(name)
        return x if dim is None else x.narrow(dim, x.shape[dim] - limit, limit)

    return narrow, f"checked on the last {limit} of {channels} channels"


# ------------------------------------------------------------------------------------------- linear scan
def _scan_cases(sweep, device):
    if device.type == "cuda":
        if sweep == "quick":
            return [case("linear_scan", torch.float32, B=4, D=2048, L=16384)]
        shapes = ((8, 1024, 4096), (4, 2048, 16384), (2, 64, 65536))
        return [case("linear_scan", dtype, B=b, D=d, L=length) for dtype in (torch.float32, torch.bfloat16)
                for b, d, length in shapes + BANDWIDTH_SHAPES]
    return [case("linear_scan", torch.float32, B=2, D=8, L=length) for length in (64, 256)]


def _scan_inputs(c, device, generator):
    shape = (c["B"], c["D"], c["L"])
    # Gates in (0.5, 1): long memory, the hard case for accuracy.
    a = 0.5 + 0.5 * torch.rand(shape, generator=generator, device=device)
    b = torch.randn(shape, generator=generator, device=device)
    return {"a": a.to(c.dtype), "b": b.to(c.dtype)}


def _scan_reference(inputs, c, upcast):
    return ssm_reference.linear_scan(inputs["a"], inputs["b"])


def _scan_bytes(c, mode):
    n = c["B"] * c["D"] * c["L"] * _element_size(c.dtype)
    return {"fwd": 3 * n, "bwd": 5 * n, "fwd+bwd": 8 * n}[mode]


def _scan_check_slice(c, device):
    if c["D"] <= SCAN_CHECK_CHANNELS:
        return None, ""
    return _channel_slice(c["D"], {"a": 1, "b": 1, "out": 1}, SCAN_CHECK_CHANNELS)


# ---------------------------------------------------------------------------------------- selective scan
def _selective_cases(sweep, device):
    if device.type == "cuda":
        if sweep == "quick":
            return [case("selective_scan", torch.float32, ("fwd", "fwd+bwd"), B=4, D=1536, N=16, L=8192)]
        return [case("selective_scan", torch.bfloat16, ("fwd", "fwd+bwd"), B=b, D=d, N=16, L=length)
                for b, d, length in ((8, 2048, 2048), (4, 1536, 8192))]
    return [case("selective_scan", torch.float32, ("fwd", "fwd+bwd"), B=1, D=8, N=4, L=96)]


def _selective_inputs(c, device, generator):
    b, d, n, length = c["B"], c["D"], c["N"], c["L"]
    draw = lambda *shape: torch.randn(shape, generator=generator, device=device)  # noqa: E731
    return {
        "u": draw(b, d, length).to(c.dtype),
        "delta": (0.5 * draw(b, d, length)).to(c.dtype),
        "A": -torch.rand(d, n, generator=generator, device=device) * 4 - 0.5,  # fp32, as in Mamba
        "B": draw(b, n, length).to(c.dtype),
        "C": draw(b, n, length).to(c.dtype),
        "D": draw(d),
        "z": draw(b, d, length).to(c.dtype),
        "delta_bias": torch.full((d,), math.log(math.expm1(0.01)), device=device) + 0.1 * draw(d),
    }


_SELECTIVE_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _selective_reference(inputs, c, upcast):
    return ssm_reference.selective_scan(*(inputs[n] for n in _SELECTIVE_ARGS), delta_softplus=True)


def _selective_call(inputs, c, backend):
    return flashops.selective_scan(*(inputs[n] for n in _SELECTIVE_ARGS), delta_softplus=True, backend=backend)


def _selective_bytes(c, mode):
    e = _element_size(c.dtype)
    bdl, bnl = c["B"] * c["D"] * c["L"], c["B"] * c["N"] * c["L"]
    fwd, bwd = (4 * bdl + 2 * bnl) * e, (7 * bdl + 4 * bnl) * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _bandwidth_cases(sweep, device):
    if device.type != "cuda":
        return []
    shapes = BANDWIDTH_SHAPES if sweep == "full" else ((8, 2048, 8192),)
    return [case("selective_scan_bandwidth", torch.bfloat16, ("fwd", "fwd+bwd"), B=b, D=d, N=16, L=length)
            for b, d, length in shapes]


def _last_batch_element(c, device):
    dims = {name: 0 for name in ("u", "delta", "B", "C", "z", "out")}
    narrow = lambda name, x: x if name not in dims else x[-1:]  # noqa: E731
    return narrow, f"checked on the last of {c['B']} batch elements"


# ------------------------------------------------------------------------------------ vandermonde kernel
def _vandermonde_cases(sweep, device):
    if device.type == "cuda":
        if sweep == "quick":
            return [case("vandermonde_kernel", torch.float32, ("fwd", "fwd+bwd"), H=256, N=32, L=16384)]
        shapes = ((256, 32, 16384), (1024, 32, 4096), (256, 32, 65536), (256, 64, 16384))
        return [case("vandermonde_kernel", torch.float32, ("fwd", "fwd+bwd"), H=h, N=n, L=length)
                for h, n, length in shapes]
    return [case("vandermonde_kernel", torch.float32, ("fwd", "fwd+bwd"), H=8, N=8, L=128)]


def _diagonal_ssm(h, n, device, generator):
    """S4D-Lin-like state: log z = dt * A with Re < 0, and w = C * dB (real and imaginary parts)."""
    dt = torch.exp(torch.rand(h, 1, generator=generator, device=device) * math.log(100) + math.log(1e-3))
    a_re = -0.5 * torch.ones(h, n, device=device)
    a_im = math.pi * torch.arange(n, device=device).float().expand(h, n)
    w = torch.randn(2, 1, h, n, generator=generator, device=device) * 0.5
    return {"log_z_re": dt * a_re, "log_z_im": dt * a_im, "w_re": w[0], "w_im": w[1]}


def _vandermonde_inputs(c, device, generator):
    return _diagonal_ssm(c["H"], c["N"], device, generator)


def _complex(inputs):
    return (torch.complex(inputs["log_z_re"].float(), inputs["log_z_im"].float()),
            torch.complex(inputs["w_re"].float(), inputs["w_im"].float()))


def _vandermonde_reference(inputs, c, upcast):
    log_z, w = _complex(inputs)
    return ssm_reference.vandermonde(log_z, w, c["L"])


def _vandermonde_call(inputs, c, backend):
    log_z, w = _complex(inputs)
    return flashops.vandermonde_kernel(log_z, w, c["L"], backend=backend)


def _vandermonde_flops(c, mode):
    forward = 8 * c["H"] * c["N"] * c["L"]
    return {"fwd": forward, "bwd": 2 * forward, "fwd+bwd": 3 * forward}[mode]


def _vandermonde_check_slice(c, device):
    heads = 16
    if c["H"] * c["L"] <= heads * 16384:
        return None, ""
    dims = {"log_z_re": 0, "log_z_im": 0, "w_re": 1, "w_im": 1, "out": 1}
    return _channel_slice(c["H"], dims, heads)


# ------------------------------------------------------------------------------------------ Cauchy kernel
def _cauchy_cases(sweep, device):
    if device.type == "cuda":
        shapes = ((256, 64, 16384),) if sweep == "quick" else ((256, 64, 16384), (256, 32, 65536))
        return [case("cauchy_kernel", torch.float32, ("fwd", "fwd+bwd"), M=4, H=h, N=n, L=length)
                for h, n, length in shapes]
    return [case("cauchy_kernel", torch.float32, ("fwd", "fwd+bwd"), M=2, H=4, N=8, L=128)]


def _cauchy_inputs(c, device, generator):
    """S4's use: v = (C~ | P^*) x (B | P) products [M, H, N], poles w = dt Lambda [H, N] (S4D-Lin-like), z at
    the roots-of-unity transform 2 (1 - omega) / (1 + omega), purely imaginary."""
    m, h, n, length = c["M"], c["H"], c["N"], c["L"]
    draw = lambda *shape: torch.randn(shape, generator=generator, device=device)  # noqa: E731
    dt = torch.exp(torch.rand(h, 1, generator=generator, device=device) * math.log(100) + math.log(1e-3))
    omega = torch.arange(length, device=device) * (math.pi / length)
    return {"v_re": draw(m, h, n), "v_im": draw(m, h, n), "w_re": (-0.5 * dt).expand(h, n).contiguous(),
            "w_im": dt * math.pi * torch.arange(n, device=device), "z_im": 2 * torch.tan(omega / 2)}


def _cauchy_complex(inputs):
    return (torch.complex(inputs["v_re"], inputs["v_im"]), torch.complex(torch.zeros_like(inputs["z_im"]),
                                                                         inputs["z_im"]),
            torch.complex(inputs["w_re"], inputs["w_im"]))


def _cauchy_reference(inputs, c, upcast):
    return torch.view_as_real(ssm_reference.cauchy(*_cauchy_complex(inputs)))


def _cauchy_call(inputs, c, backend):
    return torch.view_as_real(flashops.cauchy_kernel(*_cauchy_complex(inputs), backend=backend))


def _naive_cauchy(inputs, c):
    """The materialized form: both [H, N, L] matrices of reciprocals, then contractions."""
    v, z, w = _cauchy_complex(inputs)
    r1 = 1 / (z[None, None] - w[..., None])
    r2 = 1 / (z[None, None] - w.conj()[..., None])
    return torch.view_as_real(torch.einsum("mhn,hnl->mhl", v, r1) + torch.einsum("mhn,hnl->mhl", v.conj(), r2))


def _cauchy_flops(c, mode):
    forward = 8 * c["M"] * c["H"] * c["N"] * c["L"]
    return {"fwd": forward, "bwd": 2 * forward, "fwd+bwd": 3 * forward}[mode]


def _cauchy_check_slice(c, device):
    if c["H"] <= 16:
        return None, ""
    return _channel_slice(c["H"], {"v_re": 1, "v_im": 1, "w_re": 0, "w_im": 0, "out": 1}, 16)


# ------------------------------------------------------------------------------------------ S4D conv
def _conv_cases(sweep, device):
    if device.type == "cuda":
        lengths = (16384,) if sweep == "quick" else (4096, 16384)
        return [case("s4d_conv", torch.float32, ("fwd",), B=8, H=256, N=64, L=length) for length in lengths]
    return [case("s4d_conv", torch.float32, ("fwd",), B=2, H=8, N=8, L=256)]


def _conv_inputs(c, device, generator):
    ssm = _diagonal_ssm(c["H"], c["N"] // 2, device, generator)
    return {**ssm, "u": torch.randn(c["B"], c["H"], c["L"], generator=generator, device=device),
            "D": torch.randn(c["H"], generator=generator, device=device)}


def _naive_kernel(inputs, length):
    """The materialized form: the whole ``[H, N, L]`` Vandermonde matrix, then a contraction."""
    log_z, w = _complex(inputs)
    powers = torch.exp(log_z[..., None] * torch.arange(length, device=log_z.device))
    return 2 * torch.einsum("chn,hnl->chl", w, powers).real


def _conv(inputs, kernel):
    return flashops.fft_conv(inputs["u"], kernel[0], inputs["D"])


def _conv_reference(inputs, c, upcast):
    log_z, w = _complex(inputs)
    return _conv(inputs, ssm_reference.vandermonde(log_z, w, c["L"]))


def _conv_call(inputs, c, backend):
    log_z, w = _complex(inputs)
    return _conv(inputs, flashops.vandermonde_kernel(log_z, w, c["L"], backend=backend))


def _memory_sweep(op: str, gpu: dict, cpu: dict, gpu_lengths: tuple, cpu_lengths: tuple, cpu_quick=()):
    """Cases of the memory-scaling sweep (one forward + backward, fp32) over L at fixed other sizes."""
    def cases(sweep: str, device: torch.device) -> list:
        if device.type == "cuda":
            return [case(op, torch.float32, ("fwd+bwd",), **gpu, L=length) for length in gpu_lengths]
        lengths = cpu_quick if sweep == "quick" else cpu_lengths
        return [case(op, torch.float32, ("fwd+bwd",), **cpu, L=length) for length in lengths]

    return cases


OPS = [
    Op(name="linear_scan", family="ssm", cases=_scan_cases, make_inputs=_scan_inputs, reference=_scan_reference,
       flops=lambda c, mode: 0.0, flop_formula="memory bound: see GB/s", bytes_moved=_scan_bytes,
       byte_formula="fwd 3*B*D*L*e, bwd 5*B*D*L*e, fwd+bwd 8*B*D*L*e",
       providers=flashops_providers("linear_scan", lambda inputs, c, backend: flashops.linear_scan(
           inputs["a"], inputs["b"], backend=backend)),
       differentiable=("a", "b"), x="L", panels=("B", "D"), check_slice=_scan_check_slice,
       memory_cases=_memory_sweep("linear_scan", dict(B=1, D=1024), dict(B=1, D=16), (4096, 16384, 65536),
                                  (1024, 4096, 16384))),
    Op(name="selective_scan", family="ssm", cases=_selective_cases, make_inputs=_selective_inputs,
       reference=_selective_reference, flops=lambda c, mode: 0.0, flop_formula="memory bound: see GB/s",
       bytes_moved=_selective_bytes,
       byte_formula="fwd (4*B*D*L + 2*B*N*L)*e, bwd (7*B*D*L + 4*B*N*L)*e, fwd+bwd the sum",
       providers=flashops_providers("selective_scan", _selective_call),
       differentiable=_SELECTIVE_ARGS, x="L", panels=("D",),
       memory_cases=_memory_sweep("selective_scan", dict(B=1, D=256, N=16), dict(B=1, D=8, N=4),
                                  (2048, 8192, 32768), (512, 2048, 8192))),
    Op(name="selective_scan_bandwidth", family="ssm", cases=_bandwidth_cases, make_inputs=_selective_inputs,
       reference=_selective_reference, flops=lambda c, mode: 0.0, flop_formula="memory bound: see GB/s",
       bytes_moved=_selective_bytes,
       byte_formula="fwd (4*B*D*L + 2*B*N*L)*e, bwd (7*B*D*L + 4*B*N*L)*e, fwd+bwd the sum",
       providers=flashops_providers("selective_scan", _selective_call),
       differentiable=("u", "delta", "B", "C", "z"), x="L", panels=("D",), check_slice=_last_batch_element),
    Op(name="vandermonde_kernel", family="ssm", cases=_vandermonde_cases, make_inputs=_vandermonde_inputs,
       reference=_vandermonde_reference, flops=_vandermonde_flops,
       flop_formula="fwd 8*H*N*L (one complex multiply-add per term), bwd 2x fwd",
       providers=[*flashops_providers("vandermonde_kernel", _vandermonde_call),
                  Provider("naive-materialized", lambda inputs, c: _naive_kernel(inputs, c["L"]))],
       differentiable=("log_z_re", "log_z_im", "w_re", "w_im"), x="L", panels=("H", "N"),
       check_slice=_vandermonde_check_slice,
       memory_cases=_memory_sweep("vandermonde_kernel", dict(H=256, N=32), dict(H=8, N=32), (4096, 16384, 65536),
                                  (4096, 16384, 65536), cpu_quick=(512, 2048)),
       memory_providers=("naive-materialized",)),
    Op(name="cauchy_kernel", family="ssm", cases=_cauchy_cases, make_inputs=_cauchy_inputs,
       reference=_cauchy_reference, flops=_cauchy_flops,
       flop_formula="fwd 8*M*H*N*L (one complex multiply-add per term and conjugate; reciprocals not counted), "
                    "bwd 2x fwd",
       providers=[*flashops_providers("cauchy_kernel", _cauchy_call),
                  Provider("naive-materialized", _naive_cauchy)],
       differentiable=("v_re", "v_im", "w_re", "w_im"), x="L", panels=("H", "N"), check_slice=_cauchy_check_slice),
    Op(name="s4d_conv", family="ssm", cases=_conv_cases, make_inputs=_conv_inputs, reference=_conv_reference,
       flops=lambda c, mode: 0.0, flop_formula="time only (kernel + FFT convolution)",
       providers=[*flashops_providers("vandermonde_kernel", _conv_call),
                  Provider("naive-materialized", lambda inputs, c: _conv(inputs, _naive_kernel(inputs, c["L"])))],
       x="L", panels=("H", "N")),
]
