"""``python -m bench`` (or ``python bench/run.py``): every op on the device at hand, checked against its
reference, timed against its peers; a table on stdout, long-format CSV/JSON under bench/results/<device>/.

    python -m bench --quick                  # CPU default: a tiny sweep, a few minutes on 2 cores
    python -m bench                          # on a GPU: the full sweep
    python -m bench --op flash_attention --provider 'flashops-*,sdpa-flash' --mode fwd --set D=128 --plot
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import torch  # noqa: E402

from . import distributed, measure  # noqa: E402
from .memory import run_memory  # noqa: E402
from .progress import Progress  # noqa: E402
from .registry import MODES, Case, Op, Unsupported, load_ops  # noqa: E402
from .results import (ERROR, OK, OOM, SKIP, WRONG, Result, device_slug, environment,  # noqa: E402
                      memory_table, table, to_rows, write_csv, write_json)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", help="the quick sweep (default on a CPU)")
    sweep.add_argument("--full", action="store_true", help="the full sweep (default on a GPU)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--op", help="comma-separated op or family names (default: all)")
    p.add_argument("--provider", help="comma-separated provider names or patterns, e.g. 'flashops-*,sdpa-math'")
    p.add_argument("--mode", help=f"comma-separated modes out of {', '.join(MODES)} (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="keep only cases whose param KEY is one of the values, e.g. --set T=1024 --set causal=1")
    p.add_argument("--csv", nargs="?", const="", metavar="PATH", help="write CSV (default path if none given)")
    p.add_argument("--json", nargs="?", const="", metavar="PATH", help="write JSON (default path if none given)")
    p.add_argument("--out", help="results folder (default: bench/results/<device>/)")
    p.add_argument("--tag", help="suffix of the results files' names: <sweep>-<tag>.csv (e.g. for a split sweep)")
    p.add_argument("--plot", action="store_true", help="draw PNG charts into the results folder (matplotlib)")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--no-memory", action="store_true", help="skip the memory-scaling sweep")
    memory.add_argument("--memory-only", action="store_true", help="run only the memory-scaling sweep")
    p.add_argument("--warmup-ms", type=float, help="warmup per measurement (default: 25 GPU, 10 CPU)")
    p.add_argument("--rep-ms", type=float, help="timed run per measurement (default: 100 GPU, 100 CPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- filters
def _names(text):
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _matches(name: str, patterns) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _param_filters(items) -> dict:
    filters = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--set needs KEY=V1,V2,..., got {item!r}")
        filters[key.strip()] = [v.strip() for v in values.split(",")]
    return filters


def _keep(case: Case, filters: dict) -> bool:
    for key, values in filters.items():
        value = case.get(key)
        shown = str(int(value)) if isinstance(value, bool) else str(value)
        if value is None or shown not in values:
            return False
    return True


def select_ops(ops: list, names) -> list:
    if names is None:
        return list(ops)
    chosen = [op for op in ops if op.name in names or op.family in names]
    unknown = set(names) - {op.name for op in ops} - {op.family for op in ops}
    if unknown:
        raise SystemExit(f"--op: unknown {sorted(unknown)}; ops: {[o.name for o in ops]}, "
                         f"families: {sorted({o.family for o in ops})}")
    return chosen


# ------------------------------------------------------------------------------------------ speed sweep
def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def run_case(op: Op, case: Case, providers: list, modes: list, device, timing, seed: int, progress) -> list:
    """Every provider on one case: check against the reference, then time the modes it got right."""
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = measure.prepare_inputs(op, op.make_inputs(case, device, generator))
    slicer, check_note = op.check_slice(case, device)
    douts, reference = None, None
    results = []

    def record(provider, mode, status, note="", **metrics):
        results.append(Result(op.name, op.family, provider.name, provider.peer, case, mode, status, note,
                              x_name=op.x, panels=op.panels, **metrics))

    for provider in providers:
        progress.step(f"{op.name} {case.shape} {provider.name}")
        reasons = {m: provider.unavailable() or provider.supports(case, m, device) for m in modes}
        runnable = [m for m in modes if not reasons[m]]
        for m in modes:
            if reasons[m]:
                record(provider, m, SKIP, reasons[m])
        if not runnable:
            continue
        want_grads = bool(op.differentiable) and any(m != "fwd" for m in runnable)
        try:
            if want_grads and douts is None:
                douts = measure.make_douts(measure.named_outputs(op, provider.run(inputs, case)), generator)
            if reference is None or (want_grads and reference.grads is None):
                reference = _reference(op, case, inputs, douts, slicer, want_grads)
            check = measure.check_provider(op, provider, case, inputs, douts, reference, slicer, want_grads)
            check = distributed.agree(op, check)
            extra = {}
            if op.extra_metrics is not None and any(check.ok(m) for m in runnable):
                with torch.no_grad():
                    extra = op.extra_metrics(measure.named_outputs(op, provider.run(inputs, case)), inputs, case)
            for m in runnable:
                worst = check.error(m)
                errors = dict(max_err=worst.error, err_bound=worst.bound) if worst else {}
                if not check.ok(m):
                    record(provider, m, WRONG, check.reason(m), **errors)
                    continue
                fn = measure.mode_fn(op, provider, case, inputs, douts, m)
                ms = distributed.timer(op)(fn, device, timing)
                mem = measure.peak_memory_mib(fn, device)
                del fn
                flops = op.flops(case, m)
                moved = op.bytes_moved(case, m) if op.bytes_moved is not None else None
                record(provider, m, OK, check_note, ms=ms, tflops=flops / (ms * 1e-3) / 1e12 if flops else None,
                       gbps=moved / (ms * 1e-3) / 1e9 if moved else None, mem_mib=mem, extra=extra, **errors)
        except ReferenceFailed:
            raise
        except Unsupported as error:
            _fail(record, provider, runnable, results, SKIP, str(error))
        except torch.cuda.OutOfMemoryError as error:
            _fail(record, provider, runnable, results, OOM, _error_text(error))
        except Exception as error:  # a peer that rejects an input is a skip; a flashops failure is an error
            _fail(record, provider, runnable, results, SKIP if provider.errors_are_skips else ERROR,
                  _error_text(error))
        _free(device)
    return results


class ReferenceFailed(RuntimeError):
    pass


def _reference(op, case, inputs, douts, slicer, want_grads):
    try:
        return measure.compute_reference(op, case, inputs, douts, slicer, want_grads)
    except Exception as error:
        raise ReferenceFailed(f"the reference failed on {case.shape}: {_error_text(error)}") from error


def _fail(record, provider, modes, results, status, note):
    done = {r.mode for r in results if r.provider == provider.name}
    for m in modes:
        if m not in done:
            record(provider, m, status, note)


def add_speedups(results: list) -> None:
    """speedup = (time of the fastest correct peer) / (time of this provider), per op, case and mode."""
    best = {}
    for r in results:
        if r.suite == "speed" and r.status == OK and r.peer and r.ms is not None:
            key = (r.op, r.case, r.mode)
            best[key] = min(best.get(key, float("inf")), r.ms)
    for r in results:
        key = (r.op, r.case, r.mode)
        if r.status == OK and r.ms and key in best:
            r.speedup = best[key] / r.ms


def run_speed(ops, sweep, device, args, timing, progress_enabled) -> list:
    providers_wanted, modes_wanted = _names(args.provider), _names(args.mode) or list(MODES)
    filters = _param_filters(args.set)
    plan = []
    for op in ops:
        providers = [p for p in op.providers if _matches(p.name, providers_wanted)]
        for case in op.cases(sweep, device):
            modes = [m for m in case.modes if m in modes_wanted]
            if providers and modes and _keep(case, filters):
                plan.append((op, case, providers, modes))
    progress = Progress(sum(len(p) for _, _, p, _ in plan), "speed", enabled=progress_enabled)
    results = []
    for op, case, providers, modes in plan:
        try:
            results += run_case(op, case, providers, modes, device, timing, args.seed, progress)
        except ReferenceFailed as error:
            results += [Result(op.name, op.family, p.name, p.peer, case, m, ERROR, str(error), x_name=op.x,
                               panels=op.panels) for p in providers for m in modes]
        _free(device)
    progress.close()
    add_speedups(results)
    return results


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    launched = distributed.launch()  # under torchrun: join the group, take this rank's GPU
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    sweep = "quick" if args.quick else "full" if args.full else ("full" if device.type == "cuda" else "quick")
    gpu = device.type == "cuda"
    timing = measure.Timing(warmup_ms=args.warmup_ms if args.warmup_ms is not None else (25.0 if gpu else 10.0),
                            rep_ms=args.rep_ms if args.rep_ms is not None else 100.0)
    progress_enabled = not args.no_progress
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, device, sweep, timing, progress_enabled and launched.rank == 0, launched)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def _main(args, device, sweep, timing, progress_enabled, launched) -> int:
    registry = load_ops()
    for note in registry.notes:
        print(f"note: {note}", file=sys.stderr)
    ops = select_ops(registry.ops, _names(args.op))
    if launched.world > 1:  # under torchrun only the ops that use the ranks together
        ops = [op for op in ops if op.collective]
    elif args.op is None:  # and those only there or when asked for by name
        ops = [op for op in ops if not op.collective]
    env = environment(device, sweep)
    print(f"flashops {env['flashops']} | torch {env['torch']} | triton {env['triton']} | {env['device']} | "
          f"{sweep} sweep", file=sys.stderr)

    results = []
    if not args.memory_only:
        results += run_speed(ops, sweep, device, args, timing, progress_enabled)
    if not args.no_memory:
        results += run_memory(ops, sweep, device, _names(args.provider), _param_filters(args.set), _keep,
                              progress_enabled)

    if launched.rank == 0:
        print(table(results))
        if any(r.suite == "memory" for r in results):
            print()
            print(memory_table(results))

    out_dir = Path(args.out) if args.out else RESULTS_DIR / device_slug(device)
    rows = to_rows(results, env)
    both = args.csv is None and args.json is None
    stem = (f"{sweep}-{args.tag}" if args.tag else sweep) + launched.suffix
    written = []
    if both or args.csv is not None:
        written.append(Path(args.csv) if args.csv else out_dir / f"{stem}.csv")
        write_csv(rows, written[-1])
    if both or args.json is not None:
        written.append(Path(args.json) if args.json else out_dir / f"{stem}.json")
        write_json(rows, written[-1])
    print("\nwrote " + ", ".join(str(p) for p in written))
    if args.plot:
        from .plot import plot_files

        plot_files([written[0]], out_dir)

    bad = [r for r in results if not r.peer and r.status in (WRONG, ERROR)]
    if bad:
        print(f"\n{len(bad)} flashops result(s) WRONG or ERROR", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
