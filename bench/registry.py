"""The benchmark registry: ops (with their case sweeps, inputs, FLOPs and reference) and providers.

Each op family contributes one file ``bench/cases/<family>.py`` that defines ``OPS``, a list of :class:`Op`.
:func:`load_ops` imports every such file; a file whose family is not importable (e.g. not merged yet) is
skipped with a note. The contract is documented in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
SWEEPS = ("quick", "full")


class Unsupported(Exception):
    """Raised by a provider that cannot run a case; the case is reported as SKIP with this message."""


@dataclass(frozen=True)
class Case:
    """One benchmark point: an op at one shape (``params``) and dtype, measured in ``modes``."""

    op: str
    params: tuple  # ((name, value), ...) in display order; use case["T"] to read one
    dtype: torch.dtype
    modes: tuple = MODES

    def __getitem__(self, key):
        return dict(self.params)[key]

    def get(self, key, default=None):
        return dict(self.params).get(key, default)

    @property
    def shape(self) -> str:
        """The params as one string, e.g. ``B=4 T=256 H=2 D=64 causal=1``."""
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.params)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def case(op: str, dtype: torch.dtype, modes=MODES, **params) -> Case:
    return Case(op, tuple(params.items()), dtype, tuple(modes))


@dataclass
class Provider:
    """Something that computes an op: a flashops backend or a peer library.

    ``run(inputs, case)`` returns a tensor or a tuple of tensors (``None`` entries are ignored), in the order
    of :attr:`Op.outputs`. It may raise :class:`Unsupported`. ``unavailable()`` says why the provider cannot
    be used at all here (e.g. a package is not installed), ``supports(case, mode, device)`` why it cannot
    run one case in one mode; both return ``None`` when it can.
    """

    name: str
    run: Callable[[dict, Case], Any]
    peer: bool = True  # False for flashops's own backends; the speedup column compares against peers
    unavailable: Callable[[], Optional[str]] = lambda: None
    supports: Callable[[Case, str, torch.device], Optional[str]] = lambda case, mode, device: None
    # Exceptions raised by a peer on an input it does not handle become SKIP with the message; a flashops
    # backend that raises is an ERROR (a bug to fix), not a skip.
    errors_are_skips: bool = False


@dataclass
class Op:
    """An op to benchmark; everything the framework needs to sweep, check and time it."""

    name: str
    family: str
    # sweep ("quick" or "full") and device -> the cases to run
    cases: Callable[[str, torch.device], list]
    # case, device, generator -> dict of input tensors (leaves, without requires_grad)
    make_inputs: Callable[[Case, torch.device, torch.Generator], dict]
    # inputs, case, upcast -> outputs, in the order of ``outputs``. upcast=True: the fp32 oracle (inputs are
    # already fp32 copies); upcast=False: the same math in the input dtype (the tolerance rule's baseline).
    reference: Callable[[dict, Case, bool], Any]
    # case, mode -> floating-point operations of one call; ``flop_formula`` states the convention in words
    flops: Callable[[Case, str], float]
    flop_formula: str
    providers: list
    differentiable: tuple = ()  # names of the inputs that get gradients in bwd modes
    outputs: tuple = ("out",)
    x: str = "T"  # the swept param on the plots' x axis
    panels: tuple = ()  # params that split plots into panels (e.g. causal, head dim)
    # case, device -> (slice_fn, note) for checking big cases on a part of the problem (see docs), or
    # (None, "") to check the whole problem. slice_fn(name, tensor) narrows an input, an output (by its
    # name in ``outputs``) or a gradient (by the name of its input).
    check_slice: Callable[[Case, torch.device], tuple] = lambda case, device: (None, "")
    # sweep and device -> cases of the memory-scaling sweep (peak memory vs ``x``), or None for none
    memory_cases: Optional[Callable[[str, torch.device], list]] = None
    # providers measured in the memory sweep, besides the materialized reference (None: flashops's own)
    memory_providers: Optional[tuple] = None
    # outputs (by name), inputs, case -> {metric name: value}: extra metrics of a provider's forward output,
    # reported next to each of its timings (e.g. an approximation's error against exact attention), or None
    extra_metrics: Optional[Callable[[dict, dict, Case], dict]] = None
    # call, case, mode -> what one call of a provider in a mode did, for work that depends on the data (e.g. the
    # iterations of an iterative solver): runs call() (no arguments) once and returns {"flops": ..., **metrics};
    # "flops" replaces flops(case, mode) in that provider's rate (None: no rate), the rest are reported as
    # extra metrics. None: every provider's work is flops(case, mode).
    measured_work: Optional[Callable[[Callable[[], Any], Case, str], dict]] = None
    # case, mode -> bytes one call must move through device memory (each input read once, each output written
    # once), for memory-bound ops; reported as GB/s next to the time. ``byte_formula`` states it in words.
    bytes_moved: Optional[Callable[[Case, str], float]] = None
    byte_formula: str = ""
    # case, mode -> bytes that any algorithm must move between global memory and the SRAM of an H100/H200 (a
    # lower bound, e.g. exact attention's); ``python -m bench --io`` reports it next to the counted traffic
    traffic_bound: Optional[Callable[[Case, str], float]] = None
    # Its providers communicate over torch.distributed (every rank must make the same calls): timing and
    # verdicts are agreed between the ranks (bench/distributed.py).
    collective: bool = False

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"{self.name}: no provider {name!r}; providers: {[p.name for p in self.providers]}")


@dataclass
class Registry:
    ops: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # case files that could not be loaded, and why

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(f"no benchmarked op {name!r}; ops: {[o.name for o in self.ops]}")


_REGISTRY: Optional[Registry] = None


def load_ops() -> Registry:
    """Import every ``bench/cases/*.py`` once and collect its ``OPS``."""
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    from . import cases as cases_pkg

    registry = Registry()
    for info in sorted(pkgutil.iter_modules(cases_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{cases_pkg.__name__}.{info.name}")
        except ImportError as error:
            registry.notes.append(f"bench/cases/{info.name}.py not loaded: {error}")
            continue
        except Exception:  # a broken case file must not hide the others, but its error must be seen
            registry.notes.append(f"bench/cases/{info.name}.py failed to load:\n{traceback.format_exc()}")
            continue
        registry.ops.extend(getattr(module, "OPS", []))
    _REGISTRY = registry
    return registry


def name_matches(name: str, patterns) -> bool:
    """Whether ``name`` is chosen by shell ``patterns`` (``None``: all): it matches one of the patterns without
    a leading ``!`` (when there are any) and none of those with one, e.g. ``["flashops-*", "!flashops-torch"]``."""
    if patterns is None:
        return True
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    return ((not include or any(fnmatch.fnmatchcase(name, p) for p in include))
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


# ------------------------------------------------------------------------------------- provider helpers
def flashops_providers(op: str, call: Callable[[dict, Case, str], Any],
                       features: Callable[[Case], dict] = lambda case: {}) -> list:
    """One provider per flashops backend registered for ``op`` in ``flashops._dispatch``, named
    ``flashops-<backend>``. ``call(inputs, case, backend_name)`` runs the public op with ``backend=...``;
    ``features(case)`` gives the dispatch request's features, so a backend that declines says why."""
    from flashops import _dispatch

    def make(backend):
        def supports(case: Case, mode: str, device: torch.device):
            reasons = backend.supports(_dispatch.Request(device, case.dtype, features(case)))
            return "; ".join(reasons) if reasons else None

        return Provider(f"flashops-{backend.name}", lambda inputs, case: call(inputs, case, backend.name),
                        peer=False, supports=supports)

    return [make(b) for b in _dispatch.backends(op)]


def module_missing(name: str) -> Callable[[], Optional[str]]:
    """``unavailable`` for a peer package: the reason when ``name`` cannot be imported."""

    def check():
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or a package built for another torch/CUDA
            return f"{name} is not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        return None

    return check
