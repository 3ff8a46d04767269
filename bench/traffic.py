"""Global-memory traffic of Triton kernels, counted under the Triton interpreter.

Inside :func:`count_traffic` every load and store a kernel issues through the interpreter adds its bytes to the
running launch: the element size times the number of lanes whose mask is true (masked-off lanes move nothing),
attributed to the tensor argument the address falls in. Atomics count as a read and a write. Nothing else is
modelled: a byte counted here is a byte the kernel asks global memory for, whether L2 or HBM serves it on a GPU.

The hooks sit on the interpreter's builder (``create_masked_load`` / ``create_masked_store``, which every load
and store of triton 3.4-3.9 goes through: plain pointers, block pointers and tensor descriptors) and on its grid
executor (one call per kernel launch), so they do not depend on how flashops launches its kernels. Counting
needs ``TRITON_INTERPRET=1`` set before the kernels are defined; outside the context nothing is patched, so the
normal test suite pays nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

_TILE = re.compile(r"^(BLOCK_\w+|B[TKVC])$")  # tile-size constexprs (flashops and fla naming)


@dataclass
class Launch:
    """One kernel launch: its grid, tile sizes, and the bytes it read and wrote (per tensor argument)."""

    kernel: str
    grid: tuple
    tiles: dict
    read: int = 0
    written: int = 0
    read_by: dict = field(default_factory=lambda: defaultdict(int))
    written_by: dict = field(default_factory=lambda: defaultdict(int))
    # (start address, end address, argument name) of each CPU tensor argument, sorted by start
    _ranges: list = field(default_factory=list, repr=False)

    @property
    def sizes(self) -> dict:
        """Bytes spanned by each tensor argument."""
        return {name: end - start for start, end, name in self._ranges}

    def _owner(self, addresses: np.ndarray) -> np.ndarray:
        """Index into ``_ranges`` of the argument each address falls in, -1 when none."""
        if not self._ranges:
            return np.full(addresses.shape, -1)
        starts = np.array([r[0] for r in self._ranges], dtype=np.uint64)
        ends = np.array([r[1] for r in self._ranges], dtype=np.uint64)
        index = np.searchsorted(starts, addresses, side="right") - 1
        inside = (index >= 0) & (addresses < ends[np.maximum(index, 0)])
        return np.where(inside, index, -1)

    def add(self, addresses: np.ndarray, element_size: int, write: bool) -> None:
        total, by = ("written", self.written_by) if write else ("read", self.read_by)
        setattr(self, total, getattr(self, total) + addresses.size * element_size)
        owners, counts = np.unique(self._owner(addresses), return_counts=True)
        for owner, count in zip(owners.tolist(), counts.tolist()):
            by[self._ranges[owner][2] if owner >= 0 else "?"] += count * element_size


@dataclass
class Traffic:
    """Every launch counted inside one :func:`count_traffic` block, in order."""

    launches: list = field(default_factory=list)

    @property
    def read(self) -> int:
        return sum(launch.read for launch in self.launches)

    @property
    def written(self) -> int:
        return sum(launch.written for launch in self.launches)

    def by_kernel(self) -> dict:
        """{kernel name: (launches, bytes read, bytes written)}, in order of first launch."""
        out = {}
        for launch in self.launches:
            n, r, w = out.get(launch.kernel, (0, 0, 0))
            out[launch.kernel] = (n + 1, r + launch.read, w + launch.written)
        return out

    def summary(self) -> str:
        """One line per kernel, e.g.
        ``attention_output_fwd_kernel x1 [BLOCK_M=64 BLOCK_N=32]: Q 1x K 2x V 2x -> O 1x LSE 1x``:
        what each tensor argument moved, in multiples of its size (over all launches of the kernel)."""
        kernels = {}
        for launch in self.launches:
            n, tiles, read, written, sizes = kernels.setdefault(
                launch.kernel, [0, launch.tiles, defaultdict(int), defaultdict(int), defaultdict(int)])
            kernels[launch.kernel][0] = n + 1
            for into, source in ((read, launch.read_by), (written, launch.written_by), (sizes, launch.sizes)):
                for name, count in source.items():
                    into[name] += count

        def times(by, sizes):
            return " ".join(f"{name} {count / sizes[name]:.3g}x" if sizes.get(name) else f"{name} {count} B"
                            for name, count in by.items())

        return "; ".join(f"{kernel} x{n} [{' '.join(f'{k}={v}' for k, v in tiles.items())}]: "
                         f"{times(read, sizes)} -> {times(written, sizes)}"
                         for kernel, (n, tiles, read, written, sizes) in kernels.items())


def _tensor_ranges(bound: dict) -> list:
    """(start, end, name) of each CPU tensor argument, sorted; one tensor passed as several arguments (e.g. as a
    placeholder for absent ones) is one range named ``A=B``."""
    names = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.numel() > 0:
            span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(value.shape, value.stride()))
            start = value.data_ptr()
            names.setdefault((start, start + span * value.element_size()), []).append(name)
    return sorted((start, end, "=".join(found)) for (start, end), found in names.items())


def _launch_record(executor, args, kwargs) -> Launch:
    signature = inspect.signature(executor.fn)
    known = {k: v for k, v in kwargs.items() if k in signature.parameters}
    binding = signature.bind_partial(*args, **known)
    binding.apply_defaults()
    bound = binding.arguments
    grid = executor.grid(bound) if callable(executor.grid) else executor.grid
    tiles = {k: v for k, v in bound.items() if _TILE.match(k) and isinstance(v, int)}
    return Launch(executor.fn.__name__, tuple(int(g) for g in grid), tiles, _ranges=_tensor_ranges(bound))


def _element_size(pointers) -> int:
    return max(1, pointers.get_element_ty().primitive_bitwidth // 8)


def _active(pointers, mask) -> np.ndarray:
    addresses = np.asarray(pointers.data)
    if mask is None:
        return addresses.reshape(-1)
    return addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]


@contextlib.contextmanager
def count_traffic():
    """Count the global-memory traffic of every Triton kernel launched inside the block (interpreter only)::

        with count_traffic() as traffic:
            flashops.flash_attention(q, k, v, backend="triton")
        traffic.read, traffic.written, traffic.by_kernel()
    """
    from flashops._triton_utils import interpreter_enabled

    if not interpreter_enabled():
        raise RuntimeError("counting kernel traffic needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                           "triton is imported (e.g. `TRITON_INTERPRET=1 python -m bench --io`)")
    from triton.runtime import interpreter

    traffic = Traffic()
    current: list[Optional[Launch]] = [None]
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    originals = {name: getattr(builder, name) for name in
                 ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    original_call = executor.__call__

    def record(pointers, mask, write):
        if current[0] is not None:
            current[0].add(_active(pointers, mask), _element_size(pointers), write)

    def masked_load(self, pointers, mask, *rest, **kwargs):
        record(pointers, mask, write=False)
        return originals["create_masked_load"](self, pointers, mask, *rest, **kwargs)

    def masked_store(self, pointers, value, mask, *rest, **kwargs):
        record(pointers, mask, write=True)
        return originals["create_masked_store"](self, pointers, value, mask, *rest, **kwargs)

    def atomic_rmw(self, op, pointers, value, mask, *rest, **kwargs):
        record(pointers, mask, write=False)
        record(pointers, mask, write=True)
        return originals["create_atomic_rmw"](self, op, pointers, value, mask, *rest, **kwargs)

    def atomic_cas(self, pointers, *rest, **kwargs):
        record(pointers, None, write=False)
        record(pointers, None, write=True)
        return originals["create_atomic_cas"](self, pointers, *rest, **kwargs)

    def call(self, *args, **kwargs):
        outer = current[0]
        current[0] = _launch_record(self, args, kwargs)
        traffic.launches.append(current[0])
        try:
            return original_call(self, *args, **kwargs)
        finally:
            current[0] = outer

    patches = {"create_masked_load": masked_load, "create_masked_store": masked_store,
               "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas}
    for name, patch in patches.items():
        setattr(builder, name, patch)
    executor.__call__ = call
    try:
        yield traffic
    finally:
        for name, original in originals.items():
            setattr(builder, name, original)
        executor.__call__ = original_call


# ------------------------------------------------------------------------------------- python -m bench --io
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def minimum_bytes(op, inputs: dict, outs: dict, douts: Optional[dict], mode: str) -> int:
    """Bytes one call must move at least: every tensor it takes read once, every tensor it gives written once.
    fwd takes the inputs and gives the outputs; bwd takes the inputs and the output gradients and gives the
    input gradients; fwd+bwd does both."""
    grads = [inputs[name] for name in op.differentiable]
    taken = [*inputs.values(), *((douts or {}).values() if mode != "fwd" else ())]
    given = [*(outs.values() if mode != "bwd" else ()), *(grads if mode != "fwd" else ())]
    return tensor_bytes(taken) + tensor_bytes(given)


def run_traffic(ops, sweep, args, progress_enabled) -> list:
    """Each op's cases of the CPU ``sweep`` under the Triton interpreter: every provider that launches Triton
    kernels (default ``flashops-triton``) is checked against the reference as in the timing sweep, then each
    mode is run once with its loads and stores counted. One Result per (op, case, provider, mode), suite
    ``traffic``; the note lists each kernel's traffic per tensor argument."""
    from .measure import named_outputs
    from .progress import Progress
    from .results import OK, SKIP
    from .run import check_case, plan_cases, recorder

    device = torch.device("cpu")
    plan = plan_cases(ops, sweep, device, args, default_providers=["flashops-triton"])
    progress = Progress(sum(len(providers) for _, _, providers, _ in plan), "traffic", enabled=progress_enabled)
    results = []
    for op, c, providers, modes in plan:
        found = []
        record = recorder(op, c, found)
        checked = check_case(op, c, providers, modes, device, args.seed, progress, record)
        for (_, mode), (provider, call, metrics) in checked.calls.items():
            with torch.no_grad():
                outs = named_outputs(op, provider.run(checked.inputs, c))
            with count_traffic() as traffic:
                call()
            if not traffic.launches:
                record(provider, mode, SKIP, "launched no Triton kernel")
                continue
            least = minimum_bytes(op, checked.inputs, outs, checked.douts, mode)
            bound = op.traffic_bound(c, mode) if op.traffic_bound is not None else None
            per_kernel = {}
            for kernel, (_, read, written) in traffic.by_kernel().items():
                per_kernel[f"bytes_read:{kernel}"], per_kernel[f"bytes_written:{kernel}"] = read, written
            checked_error = {k: v for k, v in metrics.items() if k != "extra"}
            record(provider, mode, OK, traffic.summary(), suite="traffic", bytes_read=traffic.read,
                   bytes_written=traffic.written, bytes_min=least,
                   bytes_bound=None if bound is None else max(bound, least),
                   extra={**metrics["extra"], **per_kernel}, **checked_error)
        for r in found:
            r.suite = "traffic"
        results += found
    progress.close()
    return results


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.4g}"


def traffic_table(results: list) -> str:
    """Counted traffic per op, case and mode next to the minimum and, where the op states one, the lower bound
    for an H100/H200 SM's SRAM; then each kernel's traffic per tensor argument."""
    from .results import OK, _render

    counted = [r for r in results if r.status == OK]
    header = ["op", "mode", "shape", "dtype", "provider", "read MB", "written MB", "min MB", "x min", "bound MB",
              "x bound"]
    lines = []
    for r in counted:
        total = r.bytes_read + r.bytes_written
        lines.append([r.op, r.mode, r.case.shape, r.case.dtype_name, r.provider, _mb(r.bytes_read),
                      _mb(r.bytes_written), _mb(r.bytes_min), f"{total / r.bytes_min:.2f}",
                      _mb(r.bytes_bound), "-" if r.bytes_bound is None else f"{total / r.bytes_bound:.2f}"])
    text = [_render(header, lines) if lines else "(no traffic counted)"]
    if any(r.bytes_bound is not None for r in counted):
        text.append("bound: max(min, Saha-Ye lower bound for 132 SMs of 228 KiB SRAM, an H100/H200); "
                    "see docs/benchmarks.md#io-accounting")
    text += [f"{r.op} {r.mode} {r.case.shape}: {r.note.replace('; ', chr(10) + '    ')}" for r in counted]
    text += [f"{r.status} {r.op} {r.mode} {r.case.shape} {r.provider}: {r.note}" for r in results if r.status != OK]
    return "\n".join(text)
