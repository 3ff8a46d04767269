"""Custom-op argument lists written once (flashops/_custom_ops.OpArgs) and the backend contracts of every family
(the Protocols in ops/<family>/args.py): every registered Python backend implements its family's contract."""

import inspect
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor

import flashops  # noqa: F401  (registers every op)
from flashops import _dispatch, _ext
from flashops._custom_ops import BACKEND, OpArgs, register_autograd
from flashops.ops.attention.args import AttentionBackend, KVCacheBackend
from flashops.ops.linear.args import ChunkBackend, NoncausalBackend, StepBackend
from flashops.ops.lla.args import LLABackend, LLADecodeBackend
from flashops.ops.ssm.args import (
    CauchyBackend,
    LinearScanBackend,
    SelectiveScanBackend,
    StateUpdateBackend,
    VandermondeBackend,
)

CONTRACTS = {
    "attention": AttentionBackend, "attention_kvcache": KVCacheBackend,
    "lightning_attention": ChunkBackend, "gated_linear_attention": ChunkBackend,
    "noncausal_linear_attention": NoncausalBackend,
    "lightning_attention_step": StepBackend, "gated_linear_attention_step": StepBackend,
    "local_linear_attention": LLABackend, "local_linear_attention_decode": LLADecodeBackend,
    "linear_scan": LinearScanBackend, "selective_scan": SelectiveScanBackend,
    "selective_state_update": StateUpdateBackend,
    "vandermonde_kernel": VandermondeBackend, "cauchy_kernel": CauchyBackend,
}


@dataclass(frozen=True, kw_only=True)
class _Options:
    mask: Optional[Tensor] = None
    scale: float
    steps: int = 3


def test_every_op_has_a_contract_and_every_python_backend_implements_it():
    assert set(CONTRACTS) == set(_dispatch.ops())
    for op, contract in CONTRACTS.items():
        methods = [n for n, f in vars(contract).items() if callable(f) and not n.startswith("_")]
        assert methods, contract
        for backend in _dispatch.backends(op):
            if isinstance(backend, _ext.ExtensionBackend):
                continue  # C++ functions (pybind11) have no Python signature to compare
            module = backend.load()
            for name in methods:
                wanted = list(inspect.signature(getattr(contract, name)).parameters)[1:]  # without self
                got = list(inspect.signature(getattr(module, name)).parameters)
                assert got[:len(wanted)] == wanted, f"{op}/{backend.name}: {name}{tuple(got)} vs {tuple(wanted)}"


def test_opargs_order_names_values_grads_and_dataclass_fields():
    args = OpArgs(("q", Tensor), ("k", Tensor)) + OpArgs.fields(_Options) + BACKEND
    assert args.names == ("q", "k", "mask", "scale", "steps", "backend")
    assert args.without("k", "steps").names == ("q", "mask", "scale", "backend")
    options = _Options(scale=0.5)
    values = args.values(q=1, k=2, **OpArgs.fields(_Options).pick(options), backend="torch")
    assert values == (1, 2, None, 0.5, 3, "torch")
    bound = args.bind(values)
    assert (bound.q, bound.scale, bound.backend) == (1, 0.5, "torch")
    assert _Options(**OpArgs.fields(_Options).pick(bound)) == options
    assert args.grads(k="dk", mask="dmask") == (None, "dk", "dmask", None, None, None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'extra'"):
        args.values(q=1, k=2, mask=None, scale=1.0, steps=1, backend="x", extra=0)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'backend'"):
        args.values(q=1, k=2, mask=None, scale=1.0, steps=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        args.grads(nope=1)


def test_opargs_custom_op_schema_fake_autograd_and_saved_tensors():
    args = OpArgs(("x", Tensor), ("bias", Optional[Tensor]), ("unused", Tensor), ("alpha", float)) + BACKEND
    calls = []

    def impl(a):
        calls.append(a.backend)
        return a.x * a.alpha + (a.bias if a.bias is not None else 0)

    op, prototype = args.custom_op("flashops_test::scaled_add", impl, returns=Tensor,
                                   fake=lambda a: torch.empty_like(a.x))
    assert str(op._opoverload._schema) == (
        "flashops_test::scaled_add(Tensor x, Tensor? bias, Tensor unused, float alpha, str backend) -> Tensor")

    def setup(ctx, inputs, output):
        args.save(ctx, inputs, skip=("unused",))

    def backward(ctx, grad):
        a, outputs = args.saved(ctx)
        assert a.unused is None and a.alpha == 2.0 and outputs == ()
        return args.grads(x=grad * a.alpha, bias=grad if args.needs_grad(ctx, "bias") else None)

    call = register_autograd(op, prototype, backward, setup)
    x = torch.randn(4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    out = call(*args.values(x=x, bias=bias, unused=torch.zeros(1), alpha=2.0, backend="cpu"))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), 2.0))
    torch.testing.assert_close(bias.grad, torch.ones(4))
    torch.library.opcheck(op, args.values(x=torch.randn(3), bias=None, unused=torch.zeros(1), alpha=3.0,
                                          backend="cpu"))
    assert calls and set(calls) == {"cpu"}


def test_opargs_custom_op_that_writes_an_argument_in_place():
    args = OpArgs(("cache", Tensor), ("x", Tensor)) + BACKEND

    def impl(a):
        a.cache.add_(a.x)
        return a.cache.sum().reshape(1)

    op, _ = args.custom_op("flashops_test::accumulate", impl, returns=Tensor, mutates=("cache",),
                           fake=lambda a: a.x.new_empty(1))
    assert str(op._opoverload._schema) == (
        "flashops_test::accumulate(Tensor(a0!) cache, Tensor x, str backend) -> Tensor")
    cache = torch.zeros(3)
    torch.testing.assert_close(op(cache, torch.ones(3), "cpu"), torch.tensor([3.0]))
    torch.testing.assert_close(cache, torch.ones(3))
    torch.library.opcheck(op, (torch.zeros(3), torch.ones(3), "cpu"))
    with pytest.raises(ValueError, match=r"mutates \['state'\], which are not arguments"):
        args.custom_op("flashops_test::bad", impl, returns=Tensor, mutates=("state",), fake=lambda a: a.x)
