"""Triton in flashops: whether it can run here, and the one way every Triton kernel is launched.

Every kernel is a ``@triton.jit`` function wrapped by :func:`launcher`, which holds its candidate configs, its
autotune key and everything else needed to pick a config for a call; launchers call ``kernel.launch(grid,
**arguments)`` with keyword arguments only. A complete example (docs/contributing.md walks through it)::

    import triton
    import triton.language as tl

    from flashops._triton_utils import config, launcher, strides

    @launcher(
        configs=[config(4, 2, BLOCK_T=128), config(8, 2, BLOCK_T=256)],  # GPU candidates, the default first
        interpreted=config(1, 1, BLOCK_T=16),  # under TRITON_INTERPRET=1: small, so tests cross tiles
        key=["DIM"],  # the shape class that a tuned config is valid for (never a sequence length)
    )
    @triton.jit
    def scale_rows_fwd_kernel(
        # pointers
        X, Y,
        # strides
        stride_xb, stride_xt, stride_yb, stride_yt,
        # sizes
        seqlen, scale,
        # meta-parameters
        DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        b = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, DIM)
        ok = (rows < seqlen)[:, None]
        x = tl.load(X + b * stride_xb + rows[:, None].to(tl.int64) * stride_xt + cols[None, :], mask=ok)
        tl.store(Y + b * stride_yb + rows[:, None].to(tl.int64) * stride_yt + cols[None, :], x * scale, mask=ok)

    def scale_rows(x, scale):  # x [B, T, DIM]
        y = torch.empty_like(x)
        scale_rows_fwd_kernel.launch(
            lambda meta: (triton.cdiv(x.shape[1], meta["BLOCK_T"]), x.shape[0]),
            X=x, Y=y, **strides("x", x, "bt"), **strides("y", y, "bt"), seqlen=x.shape[1], scale=scale,
            DIM=x.shape[2])
        return y

How a config is chosen for a call (``Launcher.launch``):

1. under the Triton interpreter, the ``interpreted`` config (CPU tests; small tiles cross tile boundaries);
2. a tuned config from ``flashops/configs/<device>.json`` (written by ``python -m bench.tune``) when that
   table has the running device, this kernel and the call's shape class (the ``key`` arguments and the
   input dtype), and the config is one of the call's candidates;
3. autotuning over the candidates (``triton.autotune``, once per shape class), when ``FLASHOPS_AUTOTUNE`` is
   not 0 and the call's ``work`` reaches the kernel's ``tune_min_work`` (below it launch overhead hides the
   differences between configs and the tuner would pick one at random);
4. otherwise the first candidate that fits the GPU's resources (``OutOfResources`` moves to the next one;
   the one that fitted is remembered per shape class).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch


# -------------------------------------------------------------------------------------------- availability
def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once at import (without importing triton) so that backend selection stays cheap and
# traceable by torch.compile.
_TRITON_MISSING = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def triton_import_error() -> str | None:
    return _TRITON_MISSING


def triton_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Reasons a Triton kernel cannot run on ``device`` with ``dtype`` (empty: it can)."""
    error = triton_import_error()
    if error:
        return [error]
    device = torch.device(device)
    reasons = []
    if dtype == torch.float64:
        reasons.append("float64 runs on the torch backend (the Triton kernels compute in fp16, bf16 or fp32)")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            reasons.append("bfloat16 needs a GPU of compute capability >= 8.0")
    elif device.type == "cpu":
        if not interpreter_enabled():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
        elif dtype == torch.bfloat16:
            # The interpreter stores bfloat16 as uint16 in numpy and computes garbage with it.
            reasons.append("the Triton interpreter cannot compute in bfloat16")
    else:
        reasons.append(f"device type {device.type!r} is not supported by Triton here")
    return reasons


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs get 3xTF32 (about fp32 accuracy), half types use tensor cores."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def programs_to_fill(device: torch.device) -> int:
    """How many programs a kernel that splits a reduction into partial sums should aim for: four per SM of the
    GPU, two under the interpreter (whose programs run one after another)."""
    if device.type != "cuda":
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def autotune_enabled() -> bool:
    """FLASHOPS_AUTOTUNE=0 runs each kernel's default config (quick compiles, e.g. for test suites)."""
    return os.environ.get("FLASHOPS_AUTOTUNE", "1") not in ("0", "false", "False")


# ------------------------------------------------------------------------------------------ configs, strides
def config(num_warps: int, num_stages: int, **meta: int):
    """A ``triton.Config``: the kernel's block sizes (meta-parameters) and its launch options."""
    import triton

    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def config_dict(cfg) -> dict:
    """A config as plain data: its meta-parameters plus num_warps and num_stages."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _config_id(cfg) -> tuple:
    return tuple(sorted(config_dict(cfg).items()))


def strides(name: str, t: Optional[torch.Tensor], dims: str, *, zero: str = "",
            broadcast: bool = False) -> dict[str, int]:
    """Stride keyword arguments of a kernel: ``{"stride_<name><d>": t.stride(i)}`` for the i-th letter ``d`` of
    ``dims``, e.g. ``strides("q", q, "bth")`` for a ``[B, T, H, D]`` q (the unit stride of the last dimension
    is not passed). Letters in ``zero`` get 0 (e.g. the batch stride of packed varlen inputs, whose batch index
    is the sequence index), ``broadcast`` gives 0 to every size-1 dimension, and an absent tensor all 0."""
    if t is None:
        return {f"stride_{name}{d}": 0 for d in dims}
    if len(dims) > t.dim():
        raise ValueError(f"strides({name!r}): {len(dims)} dimensions {dims!r} for a {t.dim()}-d tensor")
    return {f"stride_{name}{d}": 0 if d in zero or (broadcast and t.shape[i] == 1) else t.stride(i)
            for i, d in enumerate(dims)}


# --------------------------------------------------------------------------------------------- tuned tables
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
INTERPRETER_DEVICE = "triton-interpreter"


def slug(name: str) -> str:
    """A file-name form of a device name: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device: Optional[torch.device] = None) -> str:
    """The name of the tuned-config table of the device Triton runs on (``triton-interpreter`` on a CPU)."""
    if interpreter_enabled() or not torch.cuda.is_available():
        return INTERPRETER_DEVICE
    return slug(torch.cuda.get_device_name(device))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TunedTable:
    """Tuned configs of one device: kernel name -> shape class (autotune key values + dtype) -> config.

    The JSON file is reviewed like code: sorted keys, one entry per line::

        {"device": "nvidia-h200", "kernels": {"attention_output_fwd_kernel": [
          {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3, "num_warps": 4},
           "key": {"BLOCK_D": 128, "HAS_RIGHT": true, "IS_VARLEN": false, "dtype": "bfloat16"}, "ms": 0.41}]},
         "torch": "2.13.0", "triton": "3.9.0"}
    """

    def __init__(self, device: str, kernels: Optional[dict] = None, torch_version: str = "", triton_version: str = ""):
        self.device = device
        self.torch_version = torch_version
        self.triton_version = triton_version
        self.kernels: dict[str, dict[str, dict]] = {}
        for name, entries in (kernels or {}).items():
            for entry in entries:
                self.add(name, entry["key"], entry["config"], entry.get("ms"))

    @staticmethod
    def _key_text(key: Mapping) -> str:
        return json.dumps(dict(key), sort_keys=True)

    def add(self, kernel: str, key: Mapping, cfg: Mapping, ms: Optional[float] = None) -> None:
        self.kernels.setdefault(kernel, {})[self._key_text(key)] = {"config": dict(cfg), "key": dict(key), "ms": ms}

    def lookup(self, kernel: str, key: Mapping) -> Optional[dict]:
        """The tuned config (plain data) of ``kernel`` for the shape class ``key``, or None."""
        entry = self.kernels.get(kernel, {}).get(self._key_text(key))
        return None if entry is None else dict(entry["config"])

    @classmethod
    def read(cls, path: Union[str, Path]) -> TunedTable:
        data = json.loads(Path(path).read_text())
        return cls(data["device"], data.get("kernels", {}), data.get("torch", ""), data.get("triton", ""))

    def write(self, path: Union[str, Path]) -> None:
        lines = ["{", f'  "device": {json.dumps(self.device)},', '  "kernels": {']
        kernels = sorted(self.kernels)
        for i, name in enumerate(kernels):
            entries = [self.kernels[name][k] for k in sorted(self.kernels[name])]
            lines.append(f"    {json.dumps(name)}: [")
            lines += [f"      {json.dumps(e, sort_keys=True)}" + ("," if j < len(entries) - 1 else "")
                      for j, e in enumerate(entries)]
            lines.append("    ]" + ("," if i < len(kernels) - 1 else ""))
        lines += ["  },", f'  "torch": {json.dumps(self.torch_version)},',
                  f'  "triton": {json.dumps(self.triton_version)}', "}"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n")


_TABLES: dict[str, Optional[TunedTable]] = {}


def tuned_table(device: Optional[str] = None) -> Optional[TunedTable]:
    """The tuned-config table of ``device`` (default: the device Triton runs on), or None.

    ``FLASHOPS_TUNED_CONFIGS`` overrides where it is read from: a JSON file (used whatever its device), or 0
    to use no table. Otherwise ``flashops/configs/<device>.json``."""
    device = device or device_slug()
    override = os.environ.get("FLASHOPS_TUNED_CONFIGS", "").strip()
    cache_key = f"{device}|{override}"
    if cache_key not in _TABLES:
        if override in ("0", "off"):
            path = None
        else:
            path = Path(override) if override else CONFIGS_DIR / f"{device}.json"
        _TABLES[cache_key] = TunedTable.read(path) if path is not None and path.is_file() else None
    return _TABLES[cache_key]


# -------------------------------------------------------------------------------------------- the launcher
ConfigsSpec = Union[Sequence[Any], Callable[[dict], Sequence[Any]]]


class Launcher:
    """A Triton kernel and everything needed to launch it: see the module docstring and :func:`launcher`."""

    def __init__(self, fn, *, configs: ConfigsSpec, key: Sequence[str] = (),
                 interpreted: Union[Any, Callable[[dict], Any], None] = None,
                 heuristics: Optional[Mapping[str, Callable[[dict], Any]]] = None,
                 restore_value: Sequence[str] = (), reset_to_zero: Sequence[str] = (), tune_min_work: float = 0.0):
        import triton

        self.fn = fn  # the @triton.jit function (tools that compile kernels look it up here)
        self.name = fn.__name__
        self.__name__ = self.name
        self.__module__ = fn.__module__
        self.__doc__ = fn.__doc__
        self.key = tuple(key)
        self.restore_value = list(restore_value)
        self.reset_to_zero = list(reset_to_zero)
        self.tune_min_work = tune_min_work
        self._configs = configs
        self._interpreted = interpreted
        self._runner = triton.heuristics(dict(heuristics))(fn) if heuristics else fn
        self._decisions: dict = {}  # (candidates, dtype, worth tuning, key values) -> (candidates, how to launch)
        arg_names = list(inspect.signature(fn.fn).parameters)
        unknown = [n for n in (*self.key, *self.restore_value, *self.reset_to_zero) if n not in arg_names]
        if unknown:
            raise ValueError(f"{self.name}: {unknown} are not arguments of the kernel ({arg_names})")

    # ---------------------------------------------------------------------------------------- choosing
    def candidates(self, args: dict) -> Sequence[Any]:
        """The GPU configs this call may run, the default first."""
        found = self._configs(args) if callable(self._configs) else self._configs
        if not found:
            raise ValueError(f"{self.name}: no candidate config for this call")
        return found

    def interpreted(self, args: dict):
        """The config of this call under the Triton interpreter (default: the first candidate)."""
        if self._interpreted is None:
            return self.candidates(args)[0]
        return self._interpreted(args) if callable(self._interpreted) else self._interpreted

    def shape_class(self, args: dict) -> dict:
        """The key a tuned config is valid for: the autotune key's arguments and the first tensor's dtype."""
        key = {name: _key_value(args[name]) for name in self.key}
        dtype = next((a.dtype for a in args.values() if isinstance(a, torch.Tensor)), None)
        if dtype is not None:
            key["dtype"] = _dtype_name(dtype)
        return key

    def tuned(self, args: dict, candidates: Sequence[Any], table: Optional[TunedTable]):
        """``table``'s config for this call, if it has one and it is one of the call's candidates."""
        found = table.lookup(self.name, self.shape_class(args)) if table is not None else None
        if found is None:
            return None
        wanted = tuple(sorted(found.items()))
        return next((c for c in candidates if _config_id(c) == wanted), None)

    # --------------------------------------------------------------------------------------- launching
    def launch(self, grid, *, work: Optional[float] = None, **args):
        """Launch on ``grid`` (a tuple, or a function of the chosen meta-parameters) with keyword arguments.
        ``work`` (e.g. the call's FLOPs) gates autotuning for kernels with a ``tune_min_work``. How a shape class
        is launched (table, autotuning, first fit) is decided on its first launch and remembered."""
        if _SESSION is not None:
            return _SESSION.launch(self, grid, args)
        if interpreter_enabled():
            table = tuned_table()
            chosen = self.tuned(args, self.candidates(args), table) if table is not None else None
            return self.run(chosen or self.interpreted(args), grid, args)
        candidates = self.candidates(args)
        dtype = next((a.dtype for a in args.values() if isinstance(a, torch.Tensor)), None)
        worth_tuning = work is None or work >= self.tune_min_work
        decision_key = (id(candidates), dtype, worth_tuning, *(args[name] for name in self.key))
        entry = self._decisions.get(decision_key)
        if entry is None or entry[0] is not candidates:  # the list is kept alive, so its id is not reused
            entry = candidates, self._decide(candidates, args, worth_tuning)
            self._decisions[decision_key] = entry
        decision = entry[1]
        if isinstance(decision, tuple):
            return self._first_that_fits(decision_key, *decision, grid, args)
        return decision[grid](**args)

    def _decide(self, candidates: Sequence[Any], args: dict, worth_tuning: bool):
        """A tuned config (then the candidates as resource fallbacks), an autotuner, or the candidates in order:
        ``(chain, first index)`` or a ``triton.autotune`` wrapper."""
        tuned = self.tuned(args, candidates, tuned_table())
        if tuned is not None:
            return [tuned, *candidates], 0
        if autotune_enabled() and len(candidates) > 1 and worth_tuning:
            import triton

            return triton.autotune(configs=list(candidates), key=list(self.key), restore_value=self.restore_value,
                                   reset_to_zero=self.reset_to_zero)(self._runner)
        return list(candidates), 0

    def run(self, cfg, grid, args: dict):
        """One launch with the config ``cfg``."""
        return self._runner[grid](**args, **cfg.all_kwargs())

    def kernel_arguments(self, cfg, args: dict) -> dict:
        """Every argument the kernel gets for ``cfg``: the call's, the config's meta-parameters and the derived
        (heuristic) ones."""
        full = {**args, **cfg.kwargs}
        return {**full, **{name: derive(full) for name, derive in getattr(self._runner, "values", {}).items()}}

    def _first_that_fits(self, decision_key, chain: list, start: int, grid, args: dict):
        """Run the first config of ``chain`` from ``start`` on that fits the GPU's resources; remember it."""
        from triton.runtime.errors import OutOfResources

        for index in range(start, len(chain)):
            try:
                result = self.run(chain[index], grid, args)
            except OutOfResources:
                continue
            if index != start:
                self._decisions[decision_key] = self._decisions[decision_key][0], (chain, index)
            return result
        raise RuntimeError(f"{self.name}: none of its {len(chain)} configs fits this GPU's resources")


def _key_value(value):
    if isinstance(value, torch.Tensor):
        return _dtype_name(value.dtype)
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    return value


def launcher(*, configs: ConfigsSpec, key: Sequence[str] = (), interpreted=None, heuristics=None,
             restore_value: Sequence[str] = (), reset_to_zero: Sequence[str] = (), tune_min_work: float = 0.0):
    """Decorator turning a ``@triton.jit`` kernel into a :class:`Launcher`.

    configs: GPU candidates (:func:`config`), the default first, or a function of the call's arguments that
        returns them (e.g. to keep only tiles that fit a block mask).
    key: arguments whose values define a shape class: autotuning runs once per class, and a tuned table entry
        applies to one class (with the input dtype). Never a sequence length (it varies call to call).
    interpreted: the config under the Triton interpreter (or a function of the arguments); default: the first
        candidate.
    heuristics: derived meta-parameters, ``{name: function(arguments and config) -> value}`` (e.g. EVEN_K).
    restore_value / reset_to_zero: tensor arguments that autotuning must restore / zero between trials
        (kernels that read what they write, or accumulate into an output).
    tune_min_work: autotune only calls whose ``work=`` is at least this (see the module docstring).
    """
    def wrap(fn):
        return Launcher(fn, configs=configs, key=key, interpreted=interpreted, heuristics=heuristics,
                        restore_value=restore_value, reset_to_zero=reset_to_zero, tune_min_work=tune_min_work)
    return wrap


# ----------------------------------------------------------------------------------- tuning (bench.tune)
class TuningSession:
    """Active inside :func:`tuning`: the first launch of each (kernel, shape class) times every candidate
    config, keeps the fastest in ``table`` and launches it; later launches of that class reuse it."""

    def __init__(self, table: TunedTable, timer: Callable[[Callable[[], Any]], float], max_configs: Optional[int]):
        self.table = table
        self.timer = timer
        self.max_configs = max_configs
        self.failures: list[str] = []

    def launch(self, kernel: Launcher, grid, args: dict):
        candidates = list(kernel.candidates(args))[: self.max_configs]
        key = kernel.shape_class(args)
        chosen = kernel.tuned(args, candidates, self.table)
        if chosen is not None:
            return kernel.run(chosen, grid, args)
        timings = [(cfg, self._time(kernel, cfg, grid, args)) for cfg in candidates]
        timings = [(cfg, ms) for cfg, ms in timings if ms is not None]
        if not timings:
            raise RuntimeError(f"{kernel.name}: no candidate config ran for shape class {key}")
        best, ms = min(timings, key=lambda pair: pair[1])
        self.table.add(kernel.name, key, config_dict(best), round(ms, 6))
        return kernel.run(best, grid, args)

    def _time(self, kernel: Launcher, cfg, grid, args: dict) -> Optional[float]:
        """Milliseconds of one config (None if it does not compile or fit); outputs that a trial changes and the
        kernel also reads are restored afterwards."""
        saved = {n: args[n].clone() for n in kernel.restore_value if isinstance(args.get(n), torch.Tensor)}

        def trial():
            for n in kernel.reset_to_zero:
                if isinstance(args.get(n), torch.Tensor):
                    args[n].zero_()
            kernel.run(cfg, grid, args)

        try:
            trial()  # compiles
            return self.timer(trial)
        except Exception as exc:  # a config that does not compile or fit is skipped, and reported
            self.failures.append(f"{kernel.name} {config_dict(cfg)}: {type(exc).__name__}: {exc}"[:300])
            return None
        finally:
            for n, value in saved.items():
                args[n].copy_(value)


_SESSION: Optional[TuningSession] = None


def default_timer(fn: Callable[[], Any]) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on a GPU, the best of three runs elsewhere."""
    if not interpreter_enabled() and torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40))
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return min(runs)


@contextlib.contextmanager
def tuning(table: TunedTable, timer: Callable[[Callable[[], Any]], float] = default_timer,
           max_configs: Optional[int] = None):
    """Tune every kernel launched inside the block into ``table`` (see :class:`TuningSession`)."""
    global _SESSION
    if _SESSION is not None:
        raise RuntimeError("tuning sessions do not nest")
    _SESSION = TuningSession(table, timer, max_configs)
    try:
        yield _SESSION
    finally:
        _SESSION = None
