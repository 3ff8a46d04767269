"""Decode steps of the recurrent families: one token against a state that is read once and written once, so the
figure of merit is bandwidth (the CUDA kernels' target: >= 80% of HBM bandwidth at B = 64).

Ops (forward only: decoding), inputs in the case's dtype, states fp32:
  lightning_attention_step     q, k, v ``[B, H, D]``, state ``[B, H, D, D]``, default slopes, scale 1.
  gated_linear_attention_step  the same with log-gates g = logsigmoid(N(0, 1)) / 16 ``[B, H, D]``.
  selective_state_update       x, dt, z ``[B, D]``, state ``[B, D, N]``, A ``[D, N]`` (fp32, as Mamba), B, C ``[B, N]``,
                               D and dt_bias ``[D]`` (fp32), softplus.
Sweeps: GPU full bf16, B = 64: linear steps H = 16, D in {64, 128, 256}; selective_state_update D in {2048, 5120}
(Mamba-1.4b / 2.8b widths), N = 16. GPU quick: D = 128 / D = 5120. CPU quick fp32: B = 2, H = 2, D = 16 / D = 8, N = 4.
Bytes: the state read and written (8 bytes per fp32 element) plus every vector read or written once.
Reference: ``flashops/ops/linear/reference.py`` ``recurrent_step``; ``flashops/ops/ssm/reference.py``
``selective_scan`` over one position (its output and last state are the step's y and new state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import flashops
from flashops.ops.linear import reference as linear_reference
from flashops.ops.ssm import reference as ssm_reference

from ..registry import Op, case, flashops_providers

MODES = ("fwd",)
BATCH = 64


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -------------------------------------------------------------------------------- linear-attention steps
def _linear_cases(op: str):
    def cases(sweep, device):
        if device.type == "cuda":
            dims = (128,) if sweep == "quick" else (64, 128, 256)
            return [case(op, torch.bfloat16, MODES, B=BATCH, H=16, D=d) for d in dims]
        return [case(op, torch.float32, MODES, B=2, H=2, D=16)]

    return cases


def _linear_inputs(gated: bool):
    def make(c, device, generator):
        b, h, d = c["B"], c["H"], c["D"]
        draw = lambda *shape: torch.randn(shape, generator=generator, device=device)  # noqa: E731
        inputs = {"q": draw(b, h, d).to(c.dtype), "k": draw(b, h, d).to(c.dtype), "v": draw(b, h, d).to(c.dtype),
                  "state": draw(b, h, d, d)}
        if gated:
            inputs["g"] = (F.logsigmoid(draw(b, h, d)) / 16).to(c.dtype)
        return inputs

    return make


def _log_gate(inputs, gated: bool):
    if gated:
        return inputs["g"]
    heads = inputs["q"].shape[1]
    return -flashops.lightning_slopes(heads, device=inputs["q"].device)[None, :, None]


def _linear_reference(gated: bool):
    def reference(inputs, c, upcast):
        return linear_reference.recurrent_step(inputs["q"], inputs["k"], inputs["v"], _log_gate(inputs, gated),
                                               inputs["state"], scale=1.0, upcast=upcast)

    return reference


def _lightning_call(inputs, c, backend):
    return flashops.lightning_attention_step(inputs["q"], inputs["k"], inputs["v"], state=inputs["state"],
                                             scale=1.0, backend=backend)


def _gla_call(inputs, c, backend):
    return flashops.gated_linear_attention_step(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["state"],
                                                scale=1.0, backend=backend)


def _linear_bytes(gated: bool):
    def count(c, mode):
        b, h, d = c["B"], c["H"], c["D"]
        vectors = (4 + gated) * b * h * d * _element_size(c.dtype)  # q, k, v, o (and g)
        return 2 * 4 * b * h * d * d + vectors

    return count


def _linear_op(name: str, gated: bool, call) -> Op:
    return Op(name=name, family="recurrent_steps", cases=_linear_cases(name), make_inputs=_linear_inputs(gated),
              reference=_linear_reference(gated), flops=lambda c, mode: 4.0 * c["B"] * c["H"] * c["D"] ** 2,
              flop_formula="4*B*H*D^2 (state update and readout)", bytes_moved=_linear_bytes(gated),
              byte_formula="8*B*H*D^2 (fp32 state read + written) + (4 or 5)*B*H*D*e",
              providers=flashops_providers(name, call), outputs=("o", "state"), x="D", panels=("B",))


# ------------------------------------------------------------------------------------ selective state update
def _state_update_cases(sweep, device):
    if device.type == "cuda":
        dims = (5120,) if sweep == "quick" else (2048, 5120)
        return [case("selective_state_update", torch.bfloat16, MODES, B=BATCH, D=d, N=16) for d in dims]
    return [case("selective_state_update", torch.float32, MODES, B=2, D=8, N=4)]


def _state_update_inputs(c, device, generator):
    b, d, n = c["B"], c["D"], c["N"]
    draw = lambda *shape: torch.randn(shape, generator=generator, device=device)  # noqa: E731
    return {"state": draw(b, d, n), "x": draw(b, d).to(c.dtype), "dt": (0.5 * draw(b, d)).to(c.dtype),
            "A": -torch.rand(d, n, generator=generator, device=device) * 4 - 0.5, "B": draw(b, n).to(c.dtype),
            "C": draw(b, n).to(c.dtype), "D": draw(d), "z": draw(b, d).to(c.dtype), "dt_bias": 0.1 * draw(d)}


def _state_update_reference(inputs, c, upcast):
    sequence = {name: inputs[name][..., None] for name in ("x", "dt", "B", "C", "z")}
    out, last = ssm_reference.selective_scan(sequence["x"], sequence["dt"], inputs["A"], sequence["B"], sequence["C"],
                                             inputs["D"], sequence["z"], inputs["dt_bias"], delta_softplus=True,
                                             initial_state=inputs["state"], return_last_state=True)
    return out[..., 0], last


def _state_update_call(inputs, c, backend):
    return flashops.selective_state_update(*(inputs[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z",
                                                                 "dt_bias")), dt_softplus=True, backend=backend)


def _state_update_bytes(c, mode):
    b, d, n = c["B"], c["D"], c["N"]
    return 2 * 4 * b * d * n + (4 * b * d + 2 * b * n) * _element_size(c.dtype) + 4 * (d * n + 2 * d)


OPS = [
    _linear_op("lightning_attention_step", False, _lightning_call),
    _linear_op("gated_linear_attention_step", True, _gla_call),
    Op(name="selective_state_update", family="recurrent_steps", cases=_state_update_cases,
       make_inputs=_state_update_inputs, reference=_state_update_reference,
       flops=lambda c, mode: 0.0, flop_formula="memory bound: see GB/s", bytes_moved=_state_update_bytes,
       byte_formula="8*B*D*N (fp32 state read + written) + (4*B*D + 2*B*N)*e + 4*(D*N + 2*D)",
       providers=flashops_providers("selective_state_update", _state_update_call), outputs=("y", "state"),
       x="D", panels=("N",)),
]
