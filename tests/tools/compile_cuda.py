"""Compile every CUDA kernel of csrc/cuda/ with NVRTC for the GPU targets, without a GPU (part of `make test`).

    python -m tests.tools.compile_cuda [--arch sm_80] [--arch sm_90a] [--jobs 2]

Each .cu file is one NVRTC program holding every template instance its launcher declares (every dtype and
shape it launches), compiled once per architecture with the strict options of flashops/_cuda.py: warnings are
errors in the front end and in ptxas, spills included. Prints registers, spills, stack frame and static shared
memory per kernel instance, and fails on any error. Compiled programs land in the usual cache, so the first
launch on such a GPU finds them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor

CUDA_BACKEND = "cuda"


def _programs() -> dict:
    """{path: Program} of every cuda backend registered with the dispatcher (their modules declare them)."""
    import flashops  # noqa: F401  (registers every op)
    from flashops import _cuda, _dispatch

    for op in _dispatch.ops():
        for backend in _dispatch.backends(op):
            if backend.name == CUDA_BACKEND:
                importlib.import_module(backend.module)
    return {p.path: p for p in _cuda.programs()}


def _compile(path: str, arch: str):
    from flashops import _cuda

    program = _programs()[path]
    try:
        compiled = program.compile(arch, strict=True)
    except _cuda.CudaError as error:
        return path, arch, None, str(error)
    return path, arch, compiled.resources(), ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="targets (default: sm_80 and sm_90a)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    arches = args.arch or ["sm_80", "sm_90a"]

    from flashops import _cuda

    if _cuda.toolchain() is None:
        print(f"compile_cuda: cannot compile: {_cuda.compile_reason()}", file=sys.stderr)
        return 1
    programs = _programs()
    # the largest files first, so that the pool ends together
    jobs = sorted(((path, arch) for path in programs for arch in arches),
                  key=lambda job: -len(programs[job[0]].expressions))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, *zip(*jobs)))
    failures = 0
    print(f"{'kernel instance':78s} {'arch':7s} {'regs':>4s} {'spill st/ld':>11s} {'stack':>5s} {'smem':>6s}")
    for path, arch, resources, error in sorted(results, key=lambda result: result[:2]):
        if error:
            failures += 1
            print(f"FAILED {path} for {arch}:\n{error}")
            continue
        for expression, r in resources.items():
            print(f"{expression:78s} {arch:7s} {r['registers']:4d} {r['spill_stores']:5d}/{r['spill_loads']:<5d} "
                  f"{r['stack']:5d} {r['shared']:6d}")
    kernels = sum(len(p.expressions) for p in programs.values())
    print(f"compile_cuda: {len(programs)} programs, {kernels} kernel instances x {len(arches)} targets "
          f"({', '.join(arches)}), NVRTC {'.'.join(map(str, _cuda.toolchain().nvrtc_version))}: "
          f"{failures} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
