"""The compiled extension (``csrc/``): loaded on first use, or the reason it is not there.

``load()`` returns one Python module whose functions are the C++ kernels (``csrc/registration.cpp`` lists
them), trying in order:

1. ``flashops._C``, built ahead of time (``FLASHOPS_BUILD_EXT=1 pip install -e .``, see setup.py);
2. a just-in-time build of the same sources with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and
   ninja; the first build takes about a minute, later processes reuse it). The build directory is a per-user
   cache, ``~/.cache/flashops/`` (``$XDG_CACHE_HOME`` if set), one folder per torch / Python version and
   source checkout;
3. nothing: ``load()`` returns None and ``reason()`` says why (no compiler, no ninja, the build's error text).

``FLASHOPS_NO_EXT=1`` switches the extension off. Processes that build at the same time (pytest-xdist
workers) take turns on a file lock: one compiles, the others wait and load its result.

``status()`` is one line for ``python -m flashops.info``. ``ExtensionBackend`` is a ``_dispatch`` backend
whose implementation is the extension module.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import _dispatch

# The extension's sources, relative to the repository root; setup.py reads this list (without importing).
SOURCES = (
    "csrc/registration.cpp",
    "csrc/ssm/scan_cpu.cpp",
)
ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
JIT_NAME = "flashops_C"
# Portable flags: no -march, so a build runs on any CPU of its architecture. -fno-trapping-math lets the
# compiler vectorize branch-free selects (the kernels never read floating-point exception flags).
CFLAGS = ["-O3", "-fno-trapping-math"]
_ERROR_LINES = 30  # of a failed build's output, kept in the reason
_log = logging.getLogger(__name__)


@dataclass
class _State:
    module: Any
    detail: str  # where it came from, or why it is not there


_lock = threading.Lock()
_state: Optional[_State] = None


def disabled() -> bool:
    return os.environ.get("FLASHOPS_NO_EXT", "").strip() not in ("", "0")


def load():
    """The extension module, or None (then ``reason()`` says why). Builds it on the first call if needed."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
        return _state.module


def reason() -> str:
    """Why ``load()`` returned None ("" when it did not)."""
    return "" if _state is None or _state.module is not None else _state.detail


NOT_LOADED = "C++ extension not loaded yet (it is loaded, or built, on first use)"
_building_allowed = True


@contextlib.contextmanager
def without_building():
    """Inside this block, an extension that is not loaded yet declines with ``NOT_LOADED`` instead of being
    loaded or built (``python -m flashops.info`` asks every backend without spending a minute compiling)."""
    global _building_allowed
    _building_allowed = False
    try:
        yield
    finally:
        _building_allowed = True


# Dynamo (torch.compile) runs this once while tracing a dispatch and keeps the answer, instead of tracing the lock.
@torch.compiler.assume_constant_result
def unavailable_reasons() -> list:
    """[] when the extension is loaded (loading or building it now if needed), else [why not] in one line."""
    if _state is None and not _building_allowed and not disabled():
        return [NOT_LOADED]
    if load() is None:
        return [f"C++ extension unavailable: {_one_line(reason())}"]
    return []


def _one_line(text: str) -> str:
    lines = text.splitlines()
    return lines[0] if len(lines) <= 1 else f"{lines[0]} [... flashops._ext.reason() has the full build output]"


def status() -> str:
    """One line: loaded from where, unavailable and why, or not loaded yet (without building anything)."""
    if disabled():
        return "disabled (FLASHOPS_NO_EXT=1)"
    if _state is None:
        return f"not loaded yet (built on first use in {build_directory()})"
    if _state.module is None:
        return f"unavailable: {_one_line(_state.detail)}"
    return f"loaded: {_state.detail}"


def _forget() -> None:
    """Drop the cached result, so that the next ``load()`` looks again (tests use it)."""
    global _state
    with _lock:
        _state = None


class ExtensionBackend(_dispatch.Backend):
    """A backend implemented by the extension's functions; ``supports`` should include
    ``unavailable_reasons()`` so that it declines when the extension cannot be had."""

    def load(self):
        module = load()
        if module is None:
            raise RuntimeError(f"backend {self.name!r}: C++ extension unavailable: {reason()}")
        return module


# ------------------------------------------------------------------------------------------------ loading
def _load() -> _State:
    if disabled():
        return _State(None, "disabled by FLASHOPS_NO_EXT=1")
    prebuilt_note = ""
    try:
        _C = importlib.import_module(f"{__package__}._C")
        stale = _stale(_C)
        if not stale:
            return _State(_C, f"prebuilt flashops._C ({_C.__file__})")
        prebuilt_note = f"flashops._C is stale ({stale}); "
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._C":
            prebuilt_note = f"flashops._C failed to import ({e}); "
    except ImportError as e:  # built for another torch or Python
        prebuilt_note = f"flashops._C failed to import ({e}); "
    module, detail = _jit()
    return _State(module, prebuilt_note + detail)


def _stale(module) -> str:
    """Why a prebuilt module does not match the sources next to it ("" when it does, or there are none)."""
    sources = [p for p in CSRC.rglob("*") if p.is_file()] if CSRC.is_dir() else []
    if not sources:
        return ""
    newest = max(sources, key=lambda p: p.stat().st_mtime)
    if newest.stat().st_mtime > Path(module.__file__).stat().st_mtime:
        return f"{newest.relative_to(ROOT)} is newer than the build; rebuild it or remove it"
    return ""


def build_directory() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    checkout = hashlib.sha256(str(CSRC).encode()).hexdigest()[:8]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache / "flashops" / f"torch-{torch.__version__}-{python}-{checkout}"


def _openmp_flags() -> list:
    """at::parallel_for runs threads only in code compiled with OpenMP when torch's backend is OpenMP."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["/openmp"] if sys.platform == "win32" else (["-fopenmp"] if sys.platform.startswith("linux") else [])


def _missing_tools() -> str:
    from torch.utils import cpp_extension

    if sys.platform == "win32":
        compiler = os.environ.get("CXX", "cl")
    else:
        compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX or install one, e.g. g++)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja), which the JIT build needs"
    return ""


@contextlib.contextmanager
def _exclusive(directory: Path):
    """Hold an exclusive lock on the build directory. The kernel releases it if the holder dies, unlike the
    marker file torch's builder uses, which a killed build leaves behind (and every later build waits on)."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's own marker file is the only lock
        yield
        return
    with open(directory / "flashops.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale_marker = directory / "lock"
            if stale_marker.exists():  # we hold the lock, so no build is running: a killed build left it
                stale_marker.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jit():
    """(module, detail): build (or reuse) the extension in the cache directory and import it."""
    if not CSRC.is_dir():
        return None, (f"no prebuilt flashops._C and no sources to build from ({CSRC} is missing: install from a "
                      f"clone, or build ahead of time with FLASHOPS_BUILD_EXT=1)")
    missing = _missing_tools()
    if missing:
        return None, f"no prebuilt flashops._C and {missing}"
    from torch.utils import cpp_extension

    directory = build_directory()
    openmp = _openmp_flags()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        library = directory / f"{JIT_NAME}{cpp_extension.LIB_EXT}"
        with _exclusive(directory):  # another process may have built it meanwhile: then ninja has nothing to do
            before = library.stat().st_mtime if library.exists() else None
            if before is None:  # the first build stalls the first scan call for about half a minute: say why
                _log.warning("flashops: compiling the C++ extension on first use (cached in %s)", directory)
            start = time.perf_counter()
            module = cpp_extension.load(
                name=JIT_NAME,
                sources=[str(ROOT / s) for s in SOURCES],
                extra_cflags=CFLAGS + openmp,
                extra_ldflags=openmp,
                build_directory=str(directory),
                verbose=False,
            )
            seconds = time.perf_counter() - start
            loaded = Path(module.__file__)
            built = loaded != library or loaded.stat().st_mtime != before
    except Exception as e:  # noqa: BLE001  (any build or import failure is reported, never raised)
        text = str(e).strip().splitlines()
        shown = "\n".join(text[-_ERROR_LINES:])
        return None, f"JIT build in {directory} failed ({type(e).__name__}); the end of its output:\n{shown}"
    how = f"compiled now in {seconds:.0f} s" if built else "cached"
    return module, f"JIT build, {how} ({directory})"
