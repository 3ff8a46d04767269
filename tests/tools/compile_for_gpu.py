"""Compile every recorded Triton launch for a GPU target, without a GPU, and report each kernel's resources.

    python -m tests.tools.compile_for_gpu DIR [--arch 90] [--jobs N] [--update-baseline]

Reads the launch specs that tests/tools/triton_launches.py wrote under DIR (the test suite records them when
FLASHOPS_RECORD_LAUNCHES=DIR) and compiles each distinct one with Triton's CUDA backend for sm_<arch> (PTX and
cubin, through the ptxas that ships with Triton). Interpreter launches are compiled with the usual GPU launch
options (their tile sizes as recorded); GPU-default specs (the config a GPU runs for the same call) with their own.

Each variant has a hash of everything that decides its compiled code: the kernel's source with the jit functions
and constexpr globals it uses (Triton's ``cache_key``, without line numbers), the specialization, the options,
triton's version and the arch. ``kernel_resources.json`` beside this file (the reviewed baseline) and a local
cache keep, per hash, the registers, spill bytes and shared memory ptxas reported: a variant whose hash is known
was proved by an identical source and is not compiled again. Fails if a variant does not compile, needs more
shared memory than the GPU has (for a GPU default: if no candidate fits, as the launcher falls back to the next
one), or if the GPU-default config of a hot kernel spills more than the baseline says (a new spill).
"""

from __future__ import annotations

import os

# Compile for real. Set (not removed) before anything imports triton: tests/conftest.py sets it only if unset.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASELINE = Path(__file__).resolve().parent / "kernel_resources.json"
LOCAL_CACHE = ROOT / ".kernel-cache" / "resources.json"
# The interpreter's launch options (one warp, one stage) say nothing about a GPU: its launches are compiled with
# the usual ones. Tile sizes are the recorded ones.
GPU_OPTIONS = {"num_warps": 4, "num_stages": 2}
# Shared memory per block on sm_80 / sm_90 (the opt-in maximum).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Kernels on the training path of an op: a new register spill in their GPU-default config fails the check.
HOT = ("attention_", "lightning_", "gla_", "linear_state_", "lla_output_", "lla_dq_", "lla_dkdv_", "scan_")
_VERSION = 1  # of the hash recipe


def _jit_function(spec: dict):
    import triton

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # a Launcher, Autotuner or Heuristics wraps the JITFunction
    return fn


def _options(spec: dict) -> dict:
    if not spec.get("gpu_default"):
        return dict(GPU_OPTIONS)
    return {k: spec["options"][k] for k in ("num_warps", "num_stages") if k in spec["options"]}


def _what(spec: dict) -> dict:
    what = {k: spec[k] for k in ("module", "name", "signature", "constexprs")}
    what["options"] = _options(spec)
    return what


def variant_id(spec: dict) -> str:
    """A short stable name of a launch variant: kernel name and a digest of its specialization (with, for a GPU
    default, the candidates that follow it)."""
    what = [_what(spec), [_what(f) for f in spec.get("fallbacks", ())]]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec['name']}:{digest}"


def ignore_line_numbers() -> None:
    """Make Triton's source hashes (``JITFunction.cache_key``) independent of where a function starts in its file,
    so that an edit elsewhere in a file does not invalidate the proof of its kernels (line numbers only go into
    debug info, not into whether and how a kernel compiles)."""
    import triton

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("flashops", "tests")):
            continue
        for value in list(vars(module).values()):
            while value is not None and not isinstance(value, triton.runtime.jit.JITFunction):
                value = getattr(value, "fn", None)
            if value is not None and hasattr(value, "starting_line_number"):
                value.starting_line_number = 0
                value.hash = None


def source_hash(spec: dict, arch: int) -> str:
    import triton

    what = [_VERSION, _jit_function(spec).cache_key, variant_id(spec), triton.__version__, arch]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------- compiling
def _worker_setup(cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # empty: ptxas runs (and logs) for every variant
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a GPU build uses today, stated explicitly


def _compile_one(spec: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    source = ASTSource(fn=_jit_function(spec), signature=spec["signature"], constexprs=spec["constexprs"])
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=_options(spec))
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    return {"regs": int(regs.group(1)) if regs else None, "spills": int(spills.group(1)) if spills else None,
            "shared": kernel.metadata.shared}


def _compile(spec_json: str, arch: int):
    """(error or None, {regs, spills, shared[, candidate]}) of one variant. A GPU default that needs more shared
    memory than the GPU has is followed, as the launcher does, by the next candidate until one fits."""
    spec = json.loads(spec_json)
    chain = [spec, *spec.get("fallbacks", ())]
    for index, candidate in enumerate(chain):
        try:
            resources = _compile_one(candidate, arch)
        except Exception as exc:  # report every failure, keep going
            text = str(exc).strip()
            return f"{type(exc).__name__}: {text.splitlines()[-1] if text else exc}", {}
        if spec.get("gpu_default"):
            resources["candidate"] = index
        if resources["shared"] <= SHARED_LIMIT.get(arch, 232448):
            break
    return None, resources


# ------------------------------------------------------------------------------------------------ records
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_baseline(path: Path, arch: int, entries: dict) -> None:
    """Sorted, one variant per line (reviewed like code)."""
    import triton

    lines = [f'{json.dumps(v)}: {json.dumps(entries[v], sort_keys=True)}' for v in sorted(entries)]
    body = ",\n    ".join(lines)
    path.write_text(f'{{\n  "arch": {arch},\n  "triton": {json.dumps(triton.__version__)},\n'
                    f'  "variants": {{\n    {body}\n  }}\n}}\n')


def load_specs(directory: str) -> list[dict]:
    specs = {}
    for path in glob.glob(os.path.join(directory, "launches-*.jsonl")):
        with open(path) as f:
            for line in f:
                spec = json.loads(line) if line.strip() else {}
                if spec.get("module") not in (None, "__main__"):  # importable kernels only
                    specs.setdefault(variant_id(spec), spec)  # same code, whatever the interpreter's options
    return [specs[v] for v in sorted(specs)]


def check(specs: list[dict], results: dict, baseline: dict, arch: int) -> list[str]:
    """Failures: compile errors, shared memory over the limit, new spills in hot kernels' GPU-default configs."""
    failures = []
    limit = SHARED_LIMIT.get(arch, 232448)
    for spec in specs:
        vid = variant_id(spec)
        error, res = results[vid]
        if error:
            failures.append(f"FAILED {vid} {spec['constexprs']}\n    {error}")
            continue
        if res["shared"] > limit:
            failures.append(f"FAILED {vid}: needs {res['shared']} bytes of shared memory (sm_{arch} has {limit})")
        if spec.get("gpu_default") and spec["name"].startswith(HOT) and res.get("spills"):
            allowed = baseline.get(vid, {}).get("spills") or 0
            if res["spills"] > allowed:
                failures.append(f"FAILED {vid}: its GPU-default config (candidate {res.get('candidate', 0)}) spills "
                                f"{res['spills']} bytes (baseline {allowed}): a new register spill in a hot kernel")
    return failures


def report(specs: list[dict], results: dict, compiled: set) -> str:
    """One line per kernel: variants (compiled now / proved before), and the largest registers, spill bytes and
    shared memory of its GPU-default configs (of all variants where it has none)."""
    rows = {}
    for spec in specs:
        vid = variant_id(spec)
        row = rows.setdefault(spec["name"], {"variants": 0, "compiled": 0, "gpu": [], "all": []})
        row["variants"] += 1
        row["compiled"] += vid in compiled
        res = results[vid][1]
        if res:
            row["all"].append(res)
            if spec.get("gpu_default"):
                row["gpu"].append(res)
    header = f"{'kernel':34} {'variants':>8} {'compiled':>8} {'regs':>5} {'spills':>7} {'shared':>7}"
    lines = [header, "-" * len(header)]
    for name in sorted(rows):
        row = rows[name]
        res = row["gpu"] or row["all"]

        def most(field):
            values = [r[field] for r in res if r.get(field) is not None]
            return str(max(values)) if values else "?"

        lines.append(f"{name:34} {row['variants']:>8} {row['compiled']:>8} {most('regs'):>5} {most('spills'):>7} "
                     f"{most('shared'):>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--cache", type=Path, default=LOCAL_CACHE, help="local record of proved variants")
    parser.add_argument("--update-baseline", action="store_true", help="write the baseline from this run")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    specs = load_specs(args.directory)
    for module in {s["module"] for s in specs}:
        importlib.import_module(module)  # every kernel's module, before the source hashes
    if not specs:
        print(f"no recorded launches under {args.directory}", file=sys.stderr)
        return 1
    ignore_line_numbers()
    baseline = _read_json(args.baseline)
    baseline_variants = baseline.get("variants", {}) if baseline.get("arch", args.arch) == args.arch else {}
    cache = _read_json(args.cache)
    known = {entry["hash"]: entry for entry in (*baseline_variants.values(), *cache.values()) if "hash" in entry}
    hashes = {variant_id(s): source_hash(s, args.arch) for s in specs}
    results, todo = {}, []
    for spec in specs:
        vid = variant_id(spec)
        entry = known.get(hashes[vid])
        if entry is not None:
            results[vid] = (None, {k: v for k, v in entry.items() if k != "hash"})
        else:
            todo.append(spec)
    args.cache.parent.mkdir(parents=True, exist_ok=True)

    def proved():
        return {vid: {"hash": hashes[vid], **res} for vid, (error, res) in results.items() if not error}

    if todo:
        with tempfile.TemporaryDirectory() as cache_dir, ProcessPoolExecutor(
                args.jobs, initializer=_worker_setup, initargs=(cache_dir,)) as pool:
            outcomes = pool.map(_compile, [json.dumps(s) for s in todo], [args.arch] * len(todo))
            for done, (spec, outcome) in enumerate(zip(todo, outcomes), 1):
                results[variant_id(spec)] = outcome
                if done % 50 == 0:  # a long run that is stopped keeps what it proved
                    args.cache.write_text(json.dumps({**cache, **proved()}, sort_keys=True))
    compiled = {variant_id(s) for s in todo}
    entries = proved()
    args.cache.write_text(json.dumps({**cache, **entries}, sort_keys=True))
    if args.update_baseline:
        write_baseline(args.baseline, args.arch, entries)
    failures = check(specs, results, baseline_variants, args.arch)
    print(report(specs, results, compiled))
    kernels = {s["name"] for s in specs}
    print(f"{len(specs) - len(failures)}/{len(specs)} launch variants of {len(kernels)} kernels compile for "
          f"sm_{args.arch}: {len(todo)} compiled now, {len(specs) - len(todo)} proved by an identical source "
          f"({time.perf_counter() - start:.0f} s, {args.jobs} jobs)")
    stale = len(todo) - sum(1 for s in todo if variant_id(s) in baseline_variants)
    if todo and not args.update_baseline:
        print(f"{len(todo)} variants are not in {args.baseline.name} ({stale} new): "
              f"`make kernel-baseline` records them (review the diff)")
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
