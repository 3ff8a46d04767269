"""Run the CUDA kernels of csrc/cuda/ on the CPU: each :class:`flashops._cuda.Program` is compiled by the host C++
compiler with ``emulator.h`` (fibers for threads, barriers for ``__syncthreads`` and the warp shuffles) into a
shared library, and a launch calls its instance with the same packed arguments that ``cuLaunchKernel`` gets.

Tests install it in place of ``flashops._cuda._launch`` (fixture ``cuda_emulator`` in tests/ops/cuda_helpers.py),
so the launchers in flashops/ops/*/cuda_*.py run unchanged on CPU tensors. This checks the kernels' logic and the
host code around them; it says nothing about speed, and the GPU suite remains the judge of the GPU itself.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from flashops import _cuda

HEADER = Path(__file__).resolve().parent / "emulator.h"
CXX = os.environ.get("CXX", "c++")
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-w"]


class EmulationError(RuntimeError):
    """The emulated kernel broke a rule (deadlock, divergent shuffle) or could not be built."""


def unavailable_reason() -> str:
    if shutil.which(CXX) is None:
        return f"no host C++ compiler ({CXX!r} is not on PATH)"
    if _cuda.source_directory() is None:
        return "the CUDA sources are missing"
    return ""


def build_directory() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "flashops" / "cuda-emulator"


def _wrapper_source(program: _cuda.Program) -> str:
    lines = ['#include "emulator.h"', f'#include "{program.path}"', ""]
    for index, expression in enumerate(program.expressions):
        lines += [
            f'extern "C" int emu_launch_{index}(const unsigned* grid, const unsigned* block, unsigned shared, '
            f"void** args, char* error, int error_size) {{",
            f"  return emu::launch_kernel(&{expression}, grid, block, shared, args, error, error_size);",
            "}",
            f'extern "C" int emu_params_{index}(int* sizes, int capacity) {{',
            f"  return emu::parameter_sizes(&{expression}, sizes, capacity);",
            "}",
        ]
    return "\n".join(lines) + "\n"


class Emulator:
    def __init__(self):
        self._libraries: dict = {}

    def library(self, program: _cuda.Program) -> ctypes.CDLL:
        """The program built for the host (cached on disk by a hash of everything that goes into it)."""
        found = self._libraries.get(program.path)
        if found is not None:
            return found
        wrapper = _wrapper_source(program)
        digest = hashlib.sha256(
            repr((program.sources(), wrapper, HEADER.read_text(), FLAGS, CXX)).encode()).hexdigest()[:20]
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        library = directory / f"{Path(program.path).stem}-{digest}.so"
        with open(directory / "build.lock", "a+") as lock:  # pytest-xdist workers build each library once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not library.exists():
                source = directory / f"{Path(program.path).stem}-{digest}.cpp"
                source.write_text(wrapper)
                partial = library.with_suffix(".so.tmp")
                command = [CXX, *FLAGS, f"-I{HEADER.parent}", f"-I{_cuda.source_directory()}", str(source), "-o",
                           str(partial)]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise EmulationError(f"building {program.path} for the host failed:\n{result.stderr[-4000:]}")
                os.replace(partial, library)
        found = self._libraries[program.path] = ctypes.CDLL(str(library))
        return found

    def _index(self, kernel: _cuda.Kernel) -> int:
        return kernel.program.expressions.index(kernel.expression)

    def parameter_sizes(self, kernel: _cuda.Kernel) -> list:
        """sizeof of each parameter of the instance, as the C++ compiler sees them."""
        function = getattr(self.library(kernel.program), f"emu_params_{self._index(kernel)}")
        sizes = (ctypes.c_int * 64)()
        count = function(sizes, 64)
        return list(sizes[:count])

    def launch(self, kernel: _cuda.Kernel, grid: tuple, block: tuple, shared: int,
               packed: _cuda.PackedArguments) -> None:
        if packed.device.type != "cpu":
            raise EmulationError(f"{kernel.name}: the emulator takes CPU tensors, got {packed.device}")
        function = getattr(self.library(kernel.program), f"emu_launch_{self._index(kernel)}")
        error = ctypes.create_string_buffer(4096)
        status = function((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), ctypes.c_uint(shared),
                          ctypes.c_void_p(packed.address), error, ctypes.c_int(len(error)))
        if status != 0:
            raise EmulationError(f"{kernel.expression} grid={grid} block={block}: {error.value.decode()}")


_SHARED: Emulator | None = None


def shared() -> Emulator:
    """One emulator per process (it keeps the built libraries loaded)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Emulator()
    return _SHARED
