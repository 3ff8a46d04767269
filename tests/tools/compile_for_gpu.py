"""Compile every recorded Triton launch for a GPU target, without a GPU.

    python -m tests.tools.compile_for_gpu DIR [--arch 90] [--jobs 2]

Reads the launch specs that tests/tools/triton_launches.py wrote under DIR (the test suite records them
when FLASHOPS_RECORD_LAUNCHES=DIR), compiles each distinct one with Triton's CUDA backend for sm_<arch>
(PTX and cubin, through the ptxas that ships with Triton), and fails if any kernel does not compile or
needs more shared memory than the GPU has.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

# The interpreter's launch options (often one warp, one stage) say nothing about a GPU: compile with the
# usual ones. Tile sizes are the recorded ones.
GPU_OPTIONS = {"num_warps": 4, "num_stages": 2}
# Shared memory per block on sm_80 / sm_90 (the opt-in maximum).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _compile(spec_json: str, arch: int):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a GPU build uses today, stated explicitly
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = json.loads(spec_json)
    label = f"{spec['module']}.{spec['name']} {spec['constexprs']}"
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["name"])
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn  # an Autotuner (or heuristics) wraps the JITFunction
        source = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=GPU_OPTIONS)
    except Exception as exc:  # report every failure, keep going
        return label, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
    shared = kernel.metadata.shared
    if shared > SHARED_LIMIT.get(arch, 232448):
        return label, f"needs {shared} bytes of shared memory (sm_{arch} has {SHARED_LIMIT.get(arch)})"
    return label, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    specs = set()
    for path in glob.glob(os.path.join(args.directory, "launches-*.jsonl")):
        with open(path) as f:
            specs.update(line.strip() for line in f if line.strip())
    if not specs:
        print(f"no recorded launches under {args.directory}", file=sys.stderr)
        return 1
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_compile, sorted(specs), [args.arch] * len(specs)))
    failures = [(label, error) for label, error in results if error]
    kernels = {json.loads(s)["name"] for s in specs}
    print(f"compiled {len(specs) - len(failures)}/{len(specs)} launch variants of {len(kernels)} kernels for sm_{args.arch}")
    for label, error in failures:
        print(f"FAILED {label}\n    {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
