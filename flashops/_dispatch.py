"""Backend registry: every op lists backends in priority order; the first that supports the inputs runs.

A backend is data: a name, a priority, and a ``supports(request) -> list[str]`` function that returns the
reasons it declines (an empty list means it accepts). An op asks ``select(op, request, backend)``;
``backend=`` or the ``FLASHOPS_BACKEND`` environment variable forces a choice, and when nothing fits, one
error lists every backend with its reasons.

``FLASHOPS_BACKEND`` holds comma-separated entries, each either ``name`` (all ops) or ``op=name``
(one op), e.g. ``FLASHOPS_BACKEND=triton`` or ``FLASHOPS_BACKEND=attention=torch,linear=triton``.

A backend registered with ``forced_only=True`` is never chosen automatically, only when forced: a new backend
stays so for an op until a benchmark in bench/results/ shows it right and faster than the backend it would
displace (then the flag goes).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Lower runs first; matches DESIGN.md: CUDA extension, Triton, CPU extension, pure PyTorch.
PRIORITY_CUDA_EXT = 0
PRIORITY_TRITON = 10
PRIORITY_CPU_EXT = 20
PRIORITY_TORCH = 30


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run these inputs; the message says why, per backend."""


@dataclass(frozen=True)
class Request:
    """What a backend needs to know to accept or decline a call: device, dtype and op features."""

    device: Any
    dtype: Any
    features: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.features[key]

    def get(self, key, default=None):
        return self.features.get(key, default)


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int
    supports: Callable[[Request], list]
    module: str  # import path of the module that implements the op (imported on first use)
    description: str = ""
    forced_only: bool = False  # chosen only by backend= or FLASHOPS_BACKEND, never automatically

    def load(self):
        """The implementing module; imported lazily so that e.g. triton is only needed when used."""
        return importlib.import_module(self.module)


_REGISTRY: dict[str, list[Backend]] = {}
_PROBES: dict[str, Callable[[Any, Any], Request]] = {}


def register_probe(op: str, make_request: Callable[[Any, Any], Request]) -> None:
    """A typical request for ``op`` on (device, dtype); ``flashops.info`` asks backends about it."""
    _PROBES[op] = make_request


def probe(op: str, device, dtype) -> Request | None:
    make = _PROBES.get(op)
    return None if make is None else make(device, dtype)


def register(op: str, backend: Backend) -> Backend:
    backends = _REGISTRY.setdefault(op, [])
    if any(b.name == backend.name for b in backends):
        raise ValueError(f"backend {backend.name!r} is already registered for op {op!r}")
    backends.append(backend)
    backends.sort(key=lambda b: b.priority)
    return backend


def backends(op: str) -> list[Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def ops() -> list[str]:
    return sorted(_REGISTRY)


def get(op: str, name: str) -> Backend:
    for b in backends(op):
        if b.name == name:
            return b
    raise ValueError(
        f"backend={name!r} is not a backend of {op!r}; choose one of {[b.name for b in backends(op)]}"
    )


def forced_backend(op: str) -> str | None:
    """The backend that ``FLASHOPS_BACKEND`` forces for ``op``, if any."""
    spec = os.environ.get("FLASHOPS_BACKEND", "").strip()
    if not spec:
        return None
    everywhere = None
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if "=" in entry:
            name_op, name = (s.strip() for s in entry.split("=", 1))
            if name_op == op:
                return name
        else:
            everywhere = entry
    return everywhere


def explain(op: str, request: Request) -> list[tuple[Backend, list]]:
    """Every backend of ``op`` with the reasons it declines ``request`` (empty list: it accepts)."""
    return [(b, list(b.supports(request))) for b in backends(op)]


FORCED_ONLY = "runs only when forced (backend= or FLASHOPS_BACKEND)"


def _format(op: str, verdicts) -> str:
    lines = []
    for b, reasons in verdicts:
        lines.append(f"  {b.name}: " + ("; ".join(reasons) if reasons else "accepts"))
    return "\n".join(lines)


def select(op: str, request: Request, backend: str | None = None) -> Backend:
    """The backend that runs ``op`` on ``request``: the forced one, else the first that accepts."""
    name = backend if backend is not None else forced_backend(op)
    if name is not None and name != "auto":
        chosen = get(op, name)
        reasons = list(chosen.supports(request))
        if reasons:
            source = "backend=" if backend is not None else "FLASHOPS_BACKEND="
            raise BackendError(
                f"{op}: {source}{name!r} cannot run these inputs: " + "; ".join(reasons)
            )
        return chosen
    verdicts = []
    for b in backends(op):
        if b.forced_only:
            verdicts.append((b, [FORCED_ONLY]))
            continue
        reasons = list(b.supports(request))
        if not reasons:
            return b
        verdicts.append((b, reasons))
    raise BackendError(
        f"{op}: no backend supports these inputs (device={request.device}, dtype={request.dtype}):\n"
        + _format(op, verdicts)
    )
