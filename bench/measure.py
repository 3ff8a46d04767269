"""Measuring one provider on one case: the correctness check against the reference, time and peak memory."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from flashops.testing import FORWARD_FACTOR, GRAD_FACTOR, Comparison, compare

from .registry import Case, Op, Provider


# ----------------------------------------------------------------------------------------------- outputs
def as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def named_outputs(op: Op, outputs) -> dict:
    """Outputs by name (``op.outputs``), dropping ``None`` entries (e.g. an optional final state)."""
    values = as_tuple(outputs)
    if len(values) > len(op.outputs):
        raise ValueError(f"{op.name}: got {len(values)} outputs but op.outputs names {len(op.outputs)}: "
                         f"{op.outputs}")
    return {name: t for name, t in zip(op.outputs, values) if isinstance(t, torch.Tensor)}


def differentiable_outputs(outs: dict) -> dict:
    return {n: t for n, t in outs.items() if t.is_floating_point() and t.requires_grad}


def leaves(op: Op, inputs: dict) -> list:
    return [inputs[name] for name in op.differentiable]


def grads(op: Op, inputs: dict, outs: dict, douts: dict, retain_graph: bool = False) -> dict:
    """Gradients of sum(out * dout) with respect to ``op.differentiable``; ``None`` where none flows."""
    diff = differentiable_outputs(outs)
    got = torch.autograd.grad([diff[n] for n in diff], leaves(op, inputs), [douts[n] for n in diff],
                              retain_graph=retain_graph, allow_unused=True)
    return dict(zip(op.differentiable, got))


# ------------------------------------------------------------------------------------------------ inputs
def prepare_inputs(op: Op, raw: dict, dtype: Optional[torch.dtype] = None, requires_grad: bool = True) -> dict:
    """Fresh leaves: floating inputs cast to ``dtype`` (if given), ``op.differentiable`` ones requiring grad."""
    out = {}
    for name, t in raw.items():
        if isinstance(t, torch.Tensor):
            t = t.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if requires_grad and name in op.differentiable:
                t.requires_grad_(True)
        out[name] = t
    return out


def make_douts(outs: dict, generator: torch.Generator) -> dict:
    """A fixed random output gradient per differentiable output (shared by every provider of a case)."""
    return {n: torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32).to(t.dtype)
            for n, t in differentiable_outputs(outs).items()}


# ------------------------------------------------------------------------------------------------- check
@dataclass
class Reference:
    """The oracle (fp32, from fp32 copies) and the baseline (same math in the input dtype) on the checked
    part of a case: outputs and, when wanted, gradients."""

    out: dict
    base_out: Optional[dict]
    grads: Optional[dict] = None
    base_grads: Optional[dict] = None


def _narrow(slicer, items: dict) -> dict:
    return dict(items) if slicer is None else {n: slicer(n, t) for n, t in items.items()}


def compute_reference(op: Op, case: Case, inputs: dict, douts: Optional[dict], slicer, want_grads: bool,
                      ) -> Reference:
    checked = _narrow(slicer, {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)})
    checked = {**inputs, **checked}
    low_precision = case.dtype not in (torch.float32, torch.float64)

    def run(dtype, upcast):
        x = prepare_inputs(op, checked, dtype=dtype, requires_grad=want_grads)
        with torch.set_grad_enabled(want_grads):
            outs = named_outputs(op, op.reference(x, case, upcast))
        g = None
        if want_grads:
            d = _narrow(slicer, douts)
            g = grads(op, x, outs, {n: d[n].to(outs[n].dtype) for n in d})
            g = {n: t.detach() for n, t in g.items()}
        return {n: t.detach() for n, t in outs.items()}, g

    out, g = run(torch.float32, True)
    base_out, base_g = run(None, False) if low_precision else (None, None)
    return Reference(out, base_out, g, base_g)


@dataclass
class Check:
    """The verdict of one provider on one case: forward and gradient comparisons (worst first)."""

    forward: list = field(default_factory=list)  # list[Comparison]
    backward: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # gradients the provider did not produce

    @staticmethod
    def _worst(comparisons) -> Optional[Comparison]:
        return max(comparisons, key=lambda c: c.error / c.bound if c.bound > 0 else float("inf"), default=None)

    def ok(self, mode: str) -> bool:
        parts = self.forward if mode == "fwd" else self.forward + self.backward
        return all(c.ok for c in parts) and (mode == "fwd" or not self.missing)

    def error(self, mode: str) -> Optional[Comparison]:
        """The comparison closest to (or furthest past) its bound among those that ``mode`` depends on."""
        return self._worst(self.forward if mode == "fwd" else self.forward + self.backward)

    def reason(self, mode: str) -> str:
        if mode != "fwd" and self.missing:
            return "no gradient for " + ", ".join(self.missing)
        worst = self.error(mode)
        return str(worst) if worst is not None else ""


def check_provider(op: Op, provider: Provider, case: Case, inputs: dict, douts: dict, reference: Reference,
                   slicer, want_grads: bool) -> Check:
    """Run ``provider`` on the full inputs and compare (the checked part of) its outputs and gradients
    with the reference by the tolerance rule of ``flashops.testing``."""
    result = Check()
    with torch.no_grad():
        outs = named_outputs(op, provider.run(inputs, case))
    _compare_all(result.forward, _narrow(slicer, outs), reference.out, reference.base_out, FORWARD_FACTOR, case)
    del outs
    if want_grads:
        outs = named_outputs(op, provider.run(inputs, case))
        _compare_all(result.forward, _narrow(slicer, {n: t.detach() for n, t in outs.items()}),
                     reference.out, reference.base_out, FORWARD_FACTOR, case, suffix=" (with grad)")
        got = grads(op, inputs, outs, douts)
        result.missing = [n for n, g in got.items() if g is None]
        got = {f"grad_{n}": g for n, g in _narrow(slicer, {n: g for n, g in got.items() if g is not None}).items()}
        _compare_all(result.backward, got, {f"grad_{n}": g for n, g in reference.grads.items()},
                     None if reference.base_grads is None else
                     {f"grad_{n}": g for n, g in reference.base_grads.items()}, GRAD_FACTOR, case)
    return result


def _compare_all(into: list, actual: dict, ref: dict, base: Optional[dict], factor: float, case: Case,
                 suffix: str = ""):
    for name, value in actual.items():
        into.append(compare(name + suffix, value, ref[name], None if base is None else base[name],
                            factor=factor, dtype=case.dtype))


# ------------------------------------------------------------------------------------------ timing, memory
def mode_fn(op: Op, provider: Provider, case: Case, inputs: dict, douts: dict, mode: str) -> Callable:
    """A no-argument callable that runs one ``mode`` call (fwd: inference forward without autograd; bwd: the
    backward of a forward made once beforehand; fwd+bwd: both)."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return provider.run(inputs, case)
        return fwd
    if mode == "bwd":
        outs = named_outputs(op, provider.run(inputs, case))
        return lambda: grads(op, inputs, outs, douts, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: grads(op, inputs, named_outputs(op, provider.run(inputs, case)), douts)
    raise ValueError(f"unknown mode {mode!r}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0  # timed calls per function: as many as fit in this, within [min_reps, max_reps]
    min_reps: int = 5
    max_reps: int = 100
    # The timed calls of all functions of a case are spread over this many rounds; each round calls every
    # function in turn, so a burst of load from elsewhere hits all of them alike.
    rounds: int = 10
    # CPU: time a call by the CPU time of the process instead of the wall clock (see _CpuClock)
    cpu_time: bool = False


@dataclass
class Samples:
    """The timed calls of one function, in milliseconds, and their spread."""

    times: list

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def minimum(self) -> float:
        return min(self.times)

    @property
    def maximum(self) -> float:
        return max(self.times)

    def _quartiles(self) -> tuple:
        if len(self.times) < 2:
            return self.times[0], self.times[0]
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q1, q3

    @property
    def q1(self) -> float:
        return self._quartiles()[0]

    @property
    def q3(self) -> float:
        return self._quartiles()[1]

    def overlaps(self, other: Samples) -> bool:
        """Whether the interquartile ranges overlap: the two cannot be told apart at this noise."""
        return self.q1 <= other.q3 and other.q1 <= self.q3


class _WallClock:
    """CPU timing: wall clock around each call."""

    def __init__(self):
        self.pending = []

    def call(self, key, fn):
        start = time.perf_counter()
        fn()
        self.pending.append((key, (time.perf_counter() - start) * 1e3))

    def collect(self) -> list:
        done, self.pending = self.pending, []
        return done


class _CpuClock(_WallClock):
    """CPU timing by the process's CPU time (every thread's): the time slices other processes take on a shared
    machine do not count (their contention for caches and memory bandwidth still does). With one thread it is
    the call's compute time; with more it adds up the threads' times (work, not latency)."""

    def call(self, key, fn):
        start = time.process_time()
        fn()
        self.pending.append((key, (time.process_time() - start) * 1e3))


class _CudaEvents:
    """GPU timing as triton's do_bench: the L2 cache is flushed before each call, CUDA events around it."""

    FLUSH_BYTES = 256 * 2**20

    def __init__(self, device):
        self.flush = torch.empty(self.FLUSH_BYTES, dtype=torch.int8, device=device)
        self.device = device
        self.pending = []

    def call(self, key, fn):
        self.flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        self.pending.append((key, begin, end))

    def collect(self) -> list:
        torch.cuda.synchronize(self.device)
        done = [(key, begin.elapsed_time(end)) for key, begin, end in self.pending]
        self.pending = []
        return done


def time_interleaved(fns: dict, device: torch.device, timing: Timing) -> tuple:
    """Time every function of ``fns`` (key -> no-argument callable) with interleaved repetitions.

    Each function is warmed up on its own (its first call may compile, autotune or allocate) and its per-call
    time estimated; it then gets ``rep_ms / estimate`` timed calls (within ``[min_reps, max_reps]``), spread over
    ``timing.rounds`` rounds in which every function takes its turn, in an order that rotates from round to
    round. Returns ``(samples, failures)``: key -> :class:`Samples`, and key -> the exception a function raised
    (it is dropped from the later rounds)."""
    timer = _CudaEvents(device) if device.type == "cuda" else _CpuClock() if timing.cpu_time else _WallClock()
    failures, estimates = {}, {}
    for key, fn in fns.items():
        try:
            estimates[key] = _warm_up(timer, key, fn, timing.warmup_ms)
        except Exception as error:  # noqa: BLE001 - reported per function by the caller
            failures[key] = error
    reps = {key: min(timing.max_reps, max(timing.min_reps, math.ceil(timing.rep_ms / max(est, 1e-6))))
            for key, est in estimates.items()}
    order = list(reps)
    if not order:
        return {}, failures
    rounds = max(1, min(timing.rounds, max(reps.values())))
    bursts = {key: math.ceil(n / rounds) for key, n in reps.items()}
    times = {key: [] for key in order}
    for r in range(rounds):
        shift = r % len(order)
        for key in order[shift:] + order[:shift]:
            if key in failures:
                continue
            try:
                for _ in range(bursts[key]):
                    timer.call(key, fns[key])
            except Exception as error:  # noqa: BLE001
                failures[key] = error
        for key, ms in timer.collect():
            times[key].append(ms)
    return {key: Samples(t) for key, t in times.items() if key not in failures and t}, failures


def _warm_up(timer, key, fn, warmup_ms: float) -> float:
    """Run ``fn`` for about ``warmup_ms`` (at least twice: the first call may compile); returns the median time
    of the calls after the first, in milliseconds."""
    fn()
    seen = []
    while not seen or sum(seen) < warmup_ms:
        timer.call(key, fn)
        seen += [ms for _, ms in timer.collect()]
        if len(seen) >= 1000:
            break
    return statistics.median(seen)


def capture_graph(fn: Callable, device: torch.device) -> tuple:
    """``fn`` captured in a CUDA graph: ``(replay, None)``, or ``(None, why)`` when it cannot be (not a GPU, or
    the call synchronises with the host, allocates outside the graph's pool, runs CPU work...)."""
    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):  # capture needs warm caches (autotuning, allocator) on a side stream
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # noqa: BLE001 - the reason is reported next to the eager time
        torch.cuda.synchronize(device)
        lines = str(error).strip().splitlines()
        return None, f"not capturable: {type(error).__name__}: {lines[0][:200] if lines else ''}"
    return graph.replay, None


def peak_memory_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak GPU memory allocated by one call of ``fn`` beyond what was allocated before it (MiB); ``None``
    on the CPU, where the allocator keeps no such statistic (see the memory-scaling sweep instead)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / 2**20
