"""What every flashops module shares: peer spellings of constructor arguments, parameters that stay fp32 under
``.to(dtype)``, and a one-line configuration for ``extra_repr``. The conventions are in docs/api.md."""

from __future__ import annotations

import functools

import torch
from torch import nn

_BELOW_FP32 = (torch.float16, torch.bfloat16)


def accepts_aliases(**aliases: str):
    """Let a constructor take the spellings of peer libraries: ``@accepts_aliases(hidden_size="embed_dim")``
    maps ``hidden_size=`` (fla) to ``embed_dim=``. Peers' users expect them, so no warning is raised."""

    def wrap(init):
        @functools.wraps(init)
        def renamed(self, *args, **kwargs):
            for alias, name in aliases.items():
                if alias in kwargs:
                    if name in kwargs:
                        raise TypeError(f"{type(self).__name__}() got both {name}= and its alias {alias}=")
                    kwargs[name] = kwargs.pop(alias)
            return init(self, *args, **kwargs)

        return renamed

    return wrap


class KeepsFP32(nn.Module):
    """A module whose ``fp32_names`` (those of its own parameters and buffers it has) stay at least fp32 when
    the module is cast to fp16 or bf16: ``.to(dtype)``, ``.half()`` and ``.bfloat16()`` move them to the new
    device but keep their full-precision values (decay rates, ridges, SSM dynamics lose too much in 8 mantissa
    bits)."""

    fp32_names: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        # detach(): a new tensor on the old storage, which keeps the fp32 values when fn replaces param.data.
        before = {name: getattr(self, name).detach() for name in self.fp32_names
                  if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype not in _BELOW_FP32:
                continue
            kept = old.to(device=new.device, dtype=torch.float32)
            if isinstance(new, nn.Parameter):
                new.data = kept
                if new.grad is not None:  # fn cast the gradient too; it must match the parameter
                    new.grad = new.grad.to(torch.float32)
            else:
                self._buffers[name] = kept
        return self


def check_input(x, embed_dim: int, ndims: tuple[int, ...], layout: str) -> None:
    """``x`` is a tensor of one of the ranks ``ndims`` whose last dimension is the layer's width."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims or x.shape[-1] != embed_dim:
        raise ValueError(f"x must have shape {layout} with C = embed_dim = {embed_dim}, got {tuple(x.shape)}")


def describe(**fields) -> str:
    """``extra_repr`` text: ``name=value`` pairs, strings quoted, ``None`` backends shown as ``'auto'``."""
    parts = []
    for name, value in fields.items():
        if name == "backend" and value is None:
            value = "auto"
        parts.append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")
    return ", ".join(parts)
