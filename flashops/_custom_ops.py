"""Custom ops with a cheap eager path.

Every public op is a ``torch.library.custom_op`` pair (forward, backward) with a fake kernel and
``register_autograd``, so torch.compile, export and fake-tensor tracing see an opaque, well-described op.
The dispatcher round trip of a custom op with autograd costs several hundred microseconds of Python per call
(argument re-binding and pytree handling in ``torch._library``; measured 0.5-1.1 ms on the development CPU
against ~55 us for the rest of an attention call), which dominates short GPU kernels. So eager calls on
plain tensors run the implementation directly under an equivalent ``torch.autograd.Function`` that reuses
the op's own ``setup_context`` and ``backward``; everything else goes through the dispatcher.
"""

from __future__ import annotations

from typing import Callable

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
