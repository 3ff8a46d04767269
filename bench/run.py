"""``python -m bench`` (or ``python bench/run.py``): every op on the device at hand, checked against its
reference, timed against its peers; a table on stdout, long-format CSV/JSON under bench/results/<device>/.

    python -m bench --quick                  # CPU default: a tiny sweep, a few minutes on 2 cores
    python -m bench                          # on a GPU: the full sweep
    python -m bench --op flash_attention --provider 'flashops-*,sdpa-flash' --mode fwd --set D=128 --plot
    python -m bench --io                     # bytes each Triton kernel moves (Triton interpreter, CPU)
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import torch  # noqa: E402

from flashops._triton_utils import interpreter_enabled  # noqa: E402

from . import distributed, measure  # noqa: E402
from .memory import run_memory  # noqa: E402
from .progress import Progress  # noqa: E402
from .registry import MODES, Case, Op, Unsupported, load_ops, name_matches  # noqa: E402
from .results import (  # noqa: E402
    BUDGET_SPENT,
    ERROR,
    OK,
    OOM,
    SKIP,
    WRONG,
    Result,
    device_slug,
    environment,
    memory_table,
    table,
    to_rows,
    write_results,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", help="the quick sweep (default on a CPU)")
    sweep.add_argument("--full", action="store_true", help="the full sweep (default on a GPU)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--op", help="comma-separated op or family names (default: all)")
    p.add_argument("--provider", help="comma-separated provider names or patterns, e.g. 'flashops-*,sdpa-math'; "
                   "a pattern after '!' excludes, e.g. '!sdpa-math'")
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
    p.add_argument("--graphs", action="store_true",
                   help="also time each call replayed from a CUDA graph (GPU), so host overhead shows")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop starting new cases after this long; the rest are reported as SKIP")
    p.add_argument("--io", action="store_true",
                   help="count the global-memory bytes of every Triton kernel (Triton interpreter, on the CPU) "
                        "instead of timing: traffic vs the minimum and, for exact attention, a lower bound")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: time each call by the process's CPU time, not the wall clock (a shared machine's "
                        "other processes then cost only their cache and bandwidth contention; with --threads 1 "
                        "it is the compute time, with more the threads' times added up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- filters
def _names(text):
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


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


def select_ops(ops: list, names, world: int = 1) -> list:
    """The ops --op names (all by default). Collective ops (context parallelism) run under torchrun, where they
    are the only ones that run (``world`` > 1); in one process they run only when named."""
    if world > 1:
        ops = [op for op in ops if op.collective]
    elif names is None:
        ops = [op for op in ops if not op.collective]
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


@dataclass
class CheckedCase:
    """One case after the check: its inputs, output gradients, and the calls that passed, by (provider, mode)."""

    inputs: dict
    douts: Optional[dict]
    calls: dict = field(default_factory=dict)  # (provider name, mode) -> (provider, call, metrics from the check)


def recorder(op: Op, case: Case, results: list) -> Callable:
    """``record(provider, mode, status, note="", **metrics)``: append one Result of ``op`` on ``case``."""

    def record(provider, mode, status, note="", **metrics):
        results.append(Result(op.name, op.family, provider.name, provider.peer, case, mode, status, note,
                              x_name=op.x, panels=op.panels, **metrics))

    return record


def check_case(op: Op, case: Case, providers: list, modes: list, device, seed: int, progress, record) -> CheckedCase:
    """Check every provider on one case against the reference; record SKIP, WRONG and failures, and return the
    calls (one per provider and mode it got right) for the caller to measure."""
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = measure.prepare_inputs(op, op.make_inputs(case, device, generator))
    slicer, _ = op.check_slice(case, device)
    checked = CheckedCase(inputs, None)
    reference = None
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
        wrong = []
        try:
            if want_grads and checked.douts is None:
                outs = measure.named_outputs(op, provider.run(inputs, case))
                checked.douts = measure.make_douts(outs, generator)
            if reference is None or (want_grads and reference.grads is None):
                reference = _reference(op, case, inputs, checked.douts, slicer, want_grads)
            check = measure.check_provider(op, provider, case, inputs, checked.douts, reference, slicer, want_grads)
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
                    wrong.append(m)
                    continue
                call = measure.mode_fn(op, provider, case, inputs, checked.douts, m)
                metrics = dict(extra=extra, **errors)
                if op.measured_work is not None:
                    work = dict(op.measured_work(call, case, m))
                    metrics.update(flops=work.pop("flops", None), extra={**extra, **work})
                checked.calls[(provider.name, m)] = (provider, call, metrics)
        except ReferenceFailed:
            raise
        except Exception as error:  # a peer that rejects an input is a skip; a flashops failure is an error
            for m in runnable:
                checked.calls.pop((provider.name, m), None)
            record_failure(record, provider, [m for m in runnable if m not in wrong], error)
            _free(device)
    return checked


def run_case(op: Op, case: Case, providers: list, modes: list, device, timing, seed: int, progress,
             graphs: bool = False) -> list:
    """Every provider on one case: check each against the reference, then time the modes it got right, the
    repetitions of all providers and modes interleaved (and, with ``graphs``, also replayed from CUDA graphs)."""
    results = []
    record = recorder(op, case, results)
    checked = check_case(op, case, providers, modes, device, seed, progress, record)
    _time_checked(op, case, checked.calls, device, timing, graphs, op.check_slice(case, device)[1], record)
    return results


def _time_checked(op: Op, case: Case, timed: dict, device, timing, graphs: bool, note: str, record) -> None:
    """Time every checked call of one case together (see ``measure.time_interleaved``) and record the results."""
    calls = {key: fn for key, (_, fn, _) in timed.items()}
    graph_notes = {}
    if graphs and not op.collective:  # no collectives inside a captured graph
        for key, fn in list(calls.items()):
            replay, graph_notes[key] = measure.capture_graph(fn, device)
            if replay is not None:
                calls[(*key, "graph")] = replay
    timer = distributed.time_collective if op.collective else measure.time_interleaved
    samples, failures = timer(calls, device, timing)
    for key, (provider, fn, metrics) in timed.items():
        mode = key[1]
        if key in failures:
            record_failure(record, provider, [mode], failures[key])
            continue
        if (*key, "graph") in failures:
            graph_notes[key] = f"graph replay failed: {_error_text(failures[(*key, 'graph')])}"
        ms = samples[key].median
        metrics = dict(metrics)
        flops = metrics.pop("flops") if "flops" in metrics else op.flops(case, mode)
        moved = op.bytes_moved(case, mode) if op.bytes_moved is not None else None
        record(provider, mode, OK, note, samples=samples[key], graph_samples=samples.get((*key, "graph")),
               graph_note=graph_notes.get(key) or "", mem_mib=measure.peak_memory_mib(fn, device),
               tflops=flops / (ms * 1e-3) / 1e12 if flops else None,
               gbps=moved / (ms * 1e-3) / 1e9 if moved else None, **metrics)
    del calls, samples
    timed.clear()
    _free(device)


def _failure(provider, error: BaseException) -> tuple:
    """(status, note) of a provider that raised."""
    if isinstance(error, Unsupported):
        return SKIP, str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return OOM, _error_text(error)
    return (SKIP if provider.errors_are_skips else ERROR), _error_text(error)


class ReferenceFailed(RuntimeError):
    pass


def _reference(op, case, inputs, douts, slicer, want_grads):
    try:
        return measure.compute_reference(op, case, inputs, douts, slicer, want_grads)
    except Exception as error:
        raise ReferenceFailed(f"the reference failed on {case.shape}: {_error_text(error)}") from error


def record_failure(record, provider, modes, error: BaseException) -> None:
    """Record the modes of a provider that raised: SKIP (Unsupported, or a peer's error), OOM, or ERROR."""
    for m in modes:
        record(provider, m, *_failure(provider, error))


def add_speedups(results: list) -> None:
    """speedup = (time of the fastest correct peer) / (time of this provider), per op, case and mode, on the
    medians; its range and the tie flag compare the two interquartile ranges."""
    best = {}
    for r in results:
        if r.suite == "speed" and r.status == OK and r.peer and r.samples is not None:
            key = (r.op, r.case, r.mode)
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    for r in results:
        key = (r.op, r.case, r.mode)
        if r.status == OK and r.samples is not None and key in best:
            peer = best[key].samples
            r.speedup = peer.median / r.ms
            r.speedup_low, r.speedup_high = peer.q1 / r.samples.q3, peer.q3 / r.samples.q1
            r.tie = None if r is best[key] else peer.overlaps(r.samples)


def plan_cases(ops, sweep, device, args, default_providers=None) -> list:
    """(op, case, providers, modes) for every case of ``ops`` that the --provider, --mode and --set filters keep
    (providers: ``default_providers`` patterns when --provider is not given)."""
    patterns = _names(args.provider) or default_providers
    modes_wanted = _names(args.mode) or list(MODES)
    filters = _param_filters(args.set)
    plan = []
    for op in ops:
        providers = [p for p in op.providers if name_matches(p.name, patterns)]
        for case in op.cases(sweep, device):
            modes = [m for m in case.modes if m in modes_wanted]
            if providers and modes and _keep(case, filters):
                plan.append((op, case, providers, modes))
    return plan


def run_speed(ops, sweep, device, args, timing, progress_enabled, deadline=None) -> list:
    plan = plan_cases(ops, sweep, device, args)
    progress = Progress(sum(len(p) for _, _, p, _ in plan), "speed", enabled=progress_enabled)
    results = []
    for op, case, providers, modes in plan:
        if _expired(deadline):
            results += [Result(op.name, op.family, p.name, p.peer, case, m, SKIP, BUDGET_SPENT, x_name=op.x,
                               panels=op.panels) for p in providers for m in modes]
            continue
        try:
            results += run_case(op, case, providers, modes, device, timing, args.seed, progress, args.graphs)
        except ReferenceFailed as error:
            results += [Result(op.name, op.family, p.name, p.peer, case, m, ERROR, str(error), x_name=op.x,
                               panels=op.panels) for p in providers for m in modes]
        _free(device)
    progress.close()
    add_speedups(results)
    return results


def _expired(deadline) -> bool:
    return deadline is not None and time.monotonic() > deadline


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.io and not interpreter_enabled():
        # Kernels choose the interpreter when triton defines them: run again in a process that has it.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "bench", *argv], env=env,
                              cwd=Path(__file__).resolve().parent.parent).returncode
    launched = distributed.launch()  # under torchrun: join the group, take this rank's GPU
    device = torch.device("cpu" if args.io else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    sweep = "quick" if args.quick else "full" if args.full else ("full" if device.type == "cuda" else "quick")
    gpu = device.type == "cuda"
    timing = measure.Timing(warmup_ms=args.warmup_ms if args.warmup_ms is not None else (25.0 if gpu else 10.0),
                            rep_ms=args.rep_ms if args.rep_ms is not None else 100.0,
                            cpu_time=args.cpu_time and not gpu)
    progress_enabled = not args.no_progress
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, device, sweep, timing, progress_enabled and launched.rank == 0, launched)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def check_param_filters(ops: list, sweep: str, device, filters: dict) -> None:
    """An unknown --set key is an error that names the valid ones (it would silently match no case)."""
    keys = {k for op in ops for c in [*op.cases(sweep, device), *(op.memory_cases or (lambda s, d: []))(sweep, device)]
            for k, _ in c.params}
    unknown = sorted(set(filters) - keys)
    if unknown:
        raise SystemExit(f"--set: no selected op has a parameter {', '.join(map(repr, unknown))}; "
                         f"the parameters of the selected ops' {sweep} cases are: {', '.join(sorted(keys))}")


def _main(args, device, sweep, timing, progress_enabled, launched) -> int:
    registry = load_ops()
    for note in registry.notes:
        print(f"note: {note}", file=sys.stderr)
    ops = select_ops(registry.ops, _names(args.op), launched.world)
    check_param_filters(ops, sweep, device, _param_filters(args.set))
    env = environment(device, sweep, "cuda events" if device.type == "cuda" else "cpu time" if timing.cpu_time
                      else "wall")
    print(f"flashops {env['flashops']} | torch {env['torch']} | triton {env['triton']} | {env['device']} | "
          f"{sweep} sweep | clock: {env['clock']}", file=sys.stderr)
    deadline = time.monotonic() + args.time_budget if args.time_budget else None

    results = []
    if args.io:
        from .traffic import run_traffic, traffic_table

        results += run_traffic(ops, sweep, args, progress_enabled)
        print(traffic_table(results))
    else:
        if not args.memory_only:
            results += run_speed(ops, sweep, device, args, timing, progress_enabled, deadline)
        if not args.no_memory:
            results += run_memory(ops, sweep, device, _names(args.provider), _param_filters(args.set), _keep,
                                  progress_enabled, deadline)
        if launched.rank == 0:
            print(table(results))
            if any(r.suite == "memory" for r in results):
                print()
                print(memory_table(results))
    if not results:
        print("\nno case matched the filters (--op, --provider, --mode, --set): nothing measured, no file written",
              file=sys.stderr)
        return 2

    out_dir = Path(args.out) if args.out else RESULTS_DIR / device_slug(device)
    rows = to_rows(results, env)
    both = args.csv is None and args.json is None
    stem = "-".join(filter(None, [sweep, "io" if args.io else "", args.tag])) + launched.suffix
    written = []
    if both or args.csv is not None:
        written.append(Path(args.csv) if args.csv else out_dir / f"{stem}.csv")
    if both or args.json is not None:
        written.append(Path(args.json) if args.json else out_dir / f"{stem}.json")
    print()
    for path in written:
        kept = write_results(rows, path)
        print(f"wrote {path}" + (f" (the earlier file is kept as {kept.name})" if kept else ""))
    if args.plot and not args.io:
        from .plot import plot_files

        plot_files([written[0]], out_dir)

    bad = [r for r in results if not r.peer and r.status in (WRONG, ERROR)]
    if bad:
        print(f"\n{len(bad)} flashops result(s) WRONG or ERROR", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
