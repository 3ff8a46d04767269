"""Custom ops with a cheap eager path.

Every public op is a ``torch.library.custom_op`` pair (forward, backward) with a fake kernel and
``register_autograd``, so torch.compile, export and fake-tensor tracing see an opaque, well-described op.
The dispatcher round trip of a custom op with autograd costs several hundred microseconds of Python per call
(argument re-binding and pytree handling in ``torch._library``; measured 0.5-1.1 ms on the development CPU
against ~55 us for the rest of an attention call), which dominates short GPU kernels. So eager calls on
plain tensors run the implementation directly under an equivalent ``torch.autograd.Function`` that reuses
the op's own ``setup_context`` and ``backward``; everything else goes through the dispatcher.

A custom op's argument list is written once, as an :class:`OpArgs`; the op's schema (order and types), named
access to a call's arguments, the tensors saved for the backward and the gradient tuple (None for every
input without a gradient) are all derived from it.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import operator
import typing
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch.utils import _python_dispatch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def needs_dispatcher(x) -> bool:
    """True while tracing (torch.compile, export, make_fx) or for tensor subclasses (fake, functional) and
    meta tensors: those must see the registered custom op and its fake kernel."""
    return (torch.compiler.is_compiling() or (isinstance(x, torch.Tensor) and (x.is_meta or type(x) not in _PLAIN))
            or _python_dispatch._get_current_dispatch_mode() is not None)


def eager(op, impl: Callable) -> Callable:
    """``impl`` for eager calls on plain tensors, the custom op ``op`` otherwise (no autograd involved:
    for backward ops and ops without gradients)."""
    def call(*args):
        return (op if needs_dispatcher(args[0]) else impl)(*args)

    call.__name__ = getattr(impl, "__name__", "call")
    return call


def register_autograd(op, impl: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """Register ``backward``/``setup_context`` on the custom op ``op`` (whose eager implementation is
    ``impl``) and return the function to call: the op itself when dispatching is needed, else an
    ``autograd.Function`` that runs ``impl`` and the same ``setup_context``/``backward``."""
    op.register_autograd(backward, setup_context=setup_context)

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Eager.__name__ = f"{getattr(impl, '__name__', 'op')}_eager"

    def call(*args):
        return op(*args) if needs_dispatcher(args[0]) else _Eager.apply(*args)

    call.__name__ = getattr(impl, "__name__", "call")
    return call


def _is_tensor_type(annotation) -> bool:
    return annotation is torch.Tensor or annotation == Optional[torch.Tensor]


class OpArgs:
    """The argument list of a custom op: ``(name, type)`` pairs in schema order, written once.

    Example (the attention forward op takes q, k, v, the fields of ``AttentionArgs`` and the backend name)::

        ARGS = OpArgs.fields(AttentionArgs)
        FWD = OpArgs(("q", Tensor), ("k", Tensor), ("v", Tensor)) + ARGS + BACKEND
        _fwd = FWD.custom_op("flashops::attention_fwd", lambda a: ..., fake=lambda a: ..., returns=...)
        out, lse = _fwd(*FWD.values(q=q, k=k, v=v, **ARGS.pick(args), backend=name))  # args: an AttentionArgs
        # in setup_context: FWD.save(ctx, inputs, output); in backward: a, outputs = FWD.saved(ctx) and
        return FWD.grads(q=dq, k=dk, v=dv)  # None for every other input
    """

    def __init__(self, *params: tuple[str, Any]):
        self.params = tuple(params)
        self.names = tuple(name for name, _ in self.params)
        self.index = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError(f"duplicate argument names in {self.names}")
        self.signature = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in self.params])
        # What runs on every call of an op is precomputed or generated (host overhead counts for short kernels):
        # a named tuple of the arguments, and values() / grads() as plain functions with keyword-only parameters,
        # so that Python itself rejects a missing or unknown name.
        self._record = collections.namedtuple("Arguments", self.names)
        self._getter = operator.attrgetter(*self.names)
        self._tensor_slots = tuple(i for i, (_, t) in enumerate(self.params) if _is_tensor_type(t))
        self._saved_slots = {(): self._tensor_slots}
        listed = ", ".join(self.names)
        code = (f"def values(*, {listed}):\n    return ({listed},)\n"
                f"def grads(*, {', '.join(n + '=None' for n in self.names)}):\n    return ({listed},)\n")
        generated: dict = {}
        exec(code, generated)
        self.values, self.grads = generated["values"], generated["grads"]
        self.values.__doc__ = "The positional arguments of a call, in schema order, from keyword ones (all of them)."
        self.grads.__doc__ = "The backward's return value: one entry per input in schema order, None where not named."

    @classmethod
    def fields(cls, dataclass_type) -> OpArgs:
        """The fields of a dataclass of normalized arguments (e.g. ``AttentionArgs``), in declaration order."""
        hints = typing.get_type_hints(dataclass_type)
        return cls(*((f.name, hints[f.name]) for f in dataclasses.fields(dataclass_type)))

    def pick(self, arguments) -> dict:
        """This list's arguments, by name, out of anything that has them as attributes: bound arguments (e.g. a
        larger op's) or a dataclass instance of :meth:`fields`."""
        if type(arguments) is self._record:
            return dict(zip(self.names, arguments))
        values = self._getter(arguments)
        return dict(zip(self.names, values if len(self.names) > 1 else (values,)))

    def __add__(self, other: OpArgs) -> OpArgs:
        return OpArgs(*self.params, *other.params)

    def without(self, *names: str) -> OpArgs:
        return OpArgs(*((n, t) for n, t in self.params if n not in names))

    def bind(self, args: tuple, kwargs: Optional[dict] = None):
        """A call's arguments by name (a named tuple)."""
        if not kwargs and len(args) == len(self.names):
            return self._record(*args)
        return self._record(**self.signature.bind(*args, **(kwargs or {})).arguments)

    def custom_op(self, qualname: str, impl: Callable[[SimpleNamespace], Any], *, returns,
                  fake: Callable[[SimpleNamespace], Any], mutates: tuple[str, ...] = ()):
        """``torch.library.custom_op`` with this argument list; ``impl`` and ``fake`` take the bound arguments
        (a named tuple: ``a.q``); ``mutates`` names the tensor arguments the op writes in place (e.g. a cache).
        Returns ``(op, prototype)``: the prototype is the op's plain Python implementation (the eager path)."""
        def prototype(*args, **kwargs):
            return impl(self.bind(args, kwargs))

        def fake_prototype(*args, **kwargs):
            return fake(self.bind(args, kwargs))

        prototype.__signature__ = self.signature.replace(return_annotation=returns)
        prototype.__name__ = qualname.split("::")[-1]
        unknown = [n for n in mutates if n not in self.index]
        if unknown:
            raise ValueError(f"{qualname}: mutates {unknown}, which are not arguments ({self.names})")
        op = torch.library.custom_op(qualname, prototype, mutates_args=tuple(mutates))
        op.register_fake(fake_prototype)
        return op, prototype

    # --------------------------------------------------------------------------------------- autograd
    def save(self, ctx, inputs: tuple, outputs: tuple = (), *, skip: tuple = ()) -> None:
        """setup_context: save the tensor inputs (but those in ``skip``, which the backward does not need) and
        ``outputs`` for the backward; keep the other arguments on ctx."""
        if skip not in self._saved_slots:
            self._saved_slots[skip] = tuple(i for i in self._tensor_slots if self.names[i] not in skip)
        slots = self._saved_slots[skip]
        ctx.save_for_backward(*[inputs[i] for i in slots], *outputs)
        others = list(inputs)
        for i in self._tensor_slots:
            others[i] = None  # tensors travel through save_for_backward only
        ctx.op_saved_slots, ctx.op_others = slots, others

    def saved(self, ctx) -> tuple:
        """``(arguments, outputs)`` in the backward: the forward's arguments by name (None for tensors not saved)
        and the outputs ``save`` was given."""
        tensors = ctx.saved_tensors
        values = list(ctx.op_others)
        for i, t in zip(ctx.op_saved_slots, tensors):
            values[i] = t
        return self._record(*values), tuple(tensors[len(ctx.op_saved_slots):])

    def needs_grad(self, ctx, name: str) -> bool:
        return bool(ctx.needs_input_grad[self.index[name]])


BACKEND = OpArgs(("backend", str))
