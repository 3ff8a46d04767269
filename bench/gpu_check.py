"""``make gpu-check`` (``python -m bench.gpu_check``): one GPU run that fits in 10 minutes, from a bare checkout on
a machine without internet, with only the torch, triton and cuda-python already installed (peers such as fla,
lightning-attn and flash-attn are used when importable; ``--wheels DIR`` installs carried wheels first).

Steps, each with its own time budget (shares of ``--budget``, default 600 s):
  1. environment: versions, the GPU, which peers import;
  2. tests: the kernel tests on the GPU (every family's fp32/fp16/bf16 Triton paths compiled and run for real);
  3. bench: the quick GPU sweep of every family against every peer present, each call also replayed from a
     CUDA graph where it can be captured (host overhead shows as the difference); results, plots and this
     run's log and summary under bench/results/<device>/, named gpu-check-<date>;
  4. summary: one screen, per op and mode: status, TFLOP/s or GB/s, ratio to the best peer, graph time.

``--dry-run`` runs the same steps on the CPU on tiny selections (the plumbing, in seconds); CI tests it.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("fla", "lightning_attn", "flash_attn")
# Shares of the budget; what is left (about 10%) covers start-up, plots and the summary.
TEST_SHARE, BENCH_SHARE = 0.42, 0.42
# Kept out of the 10-minute run: the PyTorch paths (minutes per call at the GPU sweep's long sequences, and
# covered by the tests) and FlexAttention (about a minute of compilation per shape and grad mode).
EXCLUDED_PROVIDERS = ("flashops-torch", "sdpa-math", "flex")
# Crossover cases (an op beside exact attention as T grows) time exact attention over and over: `make bench`
# runs them, the 10-minute check does not (--all-providers keeps them). Nor does it run the GQA and reverse
# variants of the linear ops (the same kernels as the plain cases, which it times; `make bench` has them).
EXCLUDED_OPS = ("linear_vs_exact", "hyper_vs_exact", "lla_vs_exact", "lightning_attention_gqa",
                "gated_linear_attention_gqa", "lightning_attention_reverse", "gated_linear_attention_reverse")
GPU_TESTS = ["tests/ops", "tests/modules", "tests/test_integrations.py", "tests/test_dispatch.py"]
DRY_RUN_TESTS = ["tests/test_dispatch.py"]
# One small op with a Triton kernel (interpreted) and a peer; the C++ extension would compile on first use.
DRY_RUN_BENCH = ["--op", "vandermonde_kernel", "--mode", "fwd", "--threads", "1"]
DRY_RUN_EXCLUDED = ("flashops-cpp",)
DRY_RUN_TIMING = (0.0, 1.0)
# Rough device rates for the time estimate (H100/H200 class): dense half-precision FLOP/s reached by the
# fast providers, fp32 ones, and copy bandwidth.
HALF_RATE, FULL_RATE, BANDWIDTH = 300e12, 40e12, 2.5e12
COMPILE_S = 6.0  # first call of a Triton provider in one mode (compiled in the test step, so partly cached)


@dataclass
class Step:
    name: str
    budget_s: float
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, on tiny selections")
    p.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run (default 600)")
    p.add_argument("--wheels", help="a folder of .whl files (peers) to install first, offline, into a temporary "
                                    "folder put on PYTHONPATH")
    p.add_argument("--out", help="results folder (default bench/results/<device>/; dry run: bench/results/tmp/)")
    p.add_argument("--all-providers", action="store_true",
                   help=f"keep {', '.join(EXCLUDED_PROVIDERS + EXCLUDED_OPS)} in the benchmark (they do not fit "
                        "10 minutes)")
    p.add_argument("--autotune", action="store_true",
                   help="autotune the Triton kernels (each kernel's first config otherwise; tuning does not fit)")
    p.add_argument("--skip-tests", action="store_true", help="benchmark only")
    p.add_argument("--tests", nargs="+", help="pytest paths for the test step (default: the kernel tests)")
    p.add_argument("--bench-args", default="", help="extra arguments for python -m bench, e.g. \"--op attention\"")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- environment
def install_wheels(folder: str) -> str:
    """pip install --no-index every wheel of ``folder`` into a fresh temporary folder; returns that folder."""
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"--wheels {folder}: no .whl files there")
    target = tempfile.mkdtemp(prefix="gpu-check-site-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", target, *wheels], check=True)
    return target


def environment_report(device_type: str) -> str:
    import torch

    import flashops

    lines = [f"python {sys.version.split()[0]} | torch {torch.__version__} | flashops {flashops.__version__}"]
    for name in ("triton", "cuda.bindings", "pytest", "xdist", "matplotlib"):
        lines.append(f"  {name}: {_import_version(name)}")
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"  GPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
                     f"CUDA {torch.version.cuda}")
    lines.append("  peers: " + ", ".join(f"{name} {_import_version(name)}" for name in PEERS))
    return "\n".join(lines)


def _import_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - absent, or built for another torch/CUDA: the reason is shown
        return f"absent ({type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''})"
    return getattr(module, "__version__", "present")


# ------------------------------------------------------------------------------------------------- tests
_SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
_PROGRESS = re.compile(r"^[.FEsxX]+\s*(\[\s*\d+%\])?$")


def test_counts(output: str) -> dict:
    """Outcome counts from ``pytest -q`` output: its final summary line ("3 passed, 1 skipped in 2.0s"), or for
    a run stopped midway the progress marks printed so far."""
    for line in reversed(output.splitlines()):
        if " in " in line and _SUMMARY.search(line):
            return {("error" if kind.startswith("error") else kind): int(n) for n, kind in _SUMMARY.findall(line)}
    marks = "".join(line.split("[")[0].strip() for line in output.splitlines() if _PROGRESS.match(line.strip()))
    return {kind: marks.count(mark) for kind, mark in (("passed", "."), ("failed", "F"), ("error", "E"),
                                                       ("skipped", "s")) if marks.count(mark)}


def run_tests(step: Step, paths: list, log: Path, env: dict, parallel: bool = True) -> None:
    import pytest  # noqa: F401 - the step needs it; the ImportError says so

    workers = []
    if parallel:
        try:
            import xdist  # noqa: F401

            workers = ["-n", str(min(8, os.cpu_count() or 1))]
        except ImportError:
            pass
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *paths]
    output, timed_out = _run(cmd, step.budget_s, log, env)
    counts = test_counts(output)
    step.detail = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no tests ran"
    step.status = "TIMEOUT" if timed_out else ("OK" if counts.get("passed") and not (
        counts.get("failed") or counts.get("error")) else "FAILED")


def _run(cmd: list, timeout_s: float, log: Path, env: dict) -> tuple:
    """Run ``cmd`` in the checkout with its output into ``log``; stop it after ``timeout_s``. Returns
    (output, timed out)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            timed_out = True
    return log.read_text(), timed_out


# ------------------------------------------------------------------------------------------------- bench
def bench_args(dry_run: bool, all_providers: bool, budget_s: float, tag: str, out: Path, extra: list,
               timing: tuple) -> list:
    warmup_ms, rep_ms = timing
    args = ["--quick", "--no-memory", "--graphs", "--no-progress", "--plot", "--tag", tag, "--out", str(out),
            "--time-budget", f"{budget_s:.0f}", "--warmup-ms", f"{warmup_ms:g}", "--rep-ms", f"{rep_ms:g}"]
    args += ["--device", "cpu", *DRY_RUN_BENCH] if dry_run else ["--device", "cuda"]
    if not all_providers:
        excluded = EXCLUDED_PROVIDERS + (DRY_RUN_EXCLUDED if dry_run else ())
        args += ["--provider", ",".join(f"!{name}" for name in excluded)]
        if not dry_run and "--op" not in extra:
            from .registry import load_ops
            from .run import select_ops

            args += ["--op", ",".join(op.name for op in select_ops(load_ops().ops, None)
                                       if op.name not in EXCLUDED_OPS)]
    return args + extra


def estimate_bench_seconds(plan: list, timing: tuple, graphs: bool = True) -> dict:
    """Seconds per family that the sweep ``plan`` (from ``bench.run.plan_cases``) should take, from its shapes:
    each (case, provider, mode) costs its warmup and timed runs (each at least the call's own time, a call
    estimated from its FLOPs or bytes at HALF_RATE / FULL_RATE / BANDWIDTH), twice with CUDA graphs, plus a
    check of four calls and the fp32 reference; each Triton provider and mode pays COMPILE_S once."""
    import torch

    warmup_ms, rep_ms = timing
    seconds, compiled = defaultdict(float), set()
    for op, case, providers, modes in plan:
        half = case.dtype in (torch.float16, torch.bfloat16)
        for mode in modes:
            flops = op.flops(case, mode)
            moved = op.bytes_moved(case, mode) if op.bytes_moved is not None else 0.0
            call = max(flops / (HALF_RATE if half else FULL_RATE), moved / BANDWIDTH, 20e-6)
            reference = op.flops(case, mode) / FULL_RATE
            for provider in providers:
                if _declines(provider, case, mode):
                    continue
                measured = max(warmup_ms * 1e-3, 2 * call) + max(rep_ms * 1e-3, 5 * call)
                seconds[op.family] += measured * (2 if graphs else 1) + 4 * call + reference
                if provider.name.endswith("triton") and (op.name, provider.name, mode) not in compiled:
                    compiled.add((op.name, provider.name, mode))
                    seconds[op.family] += COMPILE_S
    return dict(seconds)


def _declines(provider, case, mode) -> bool:
    """Whether the provider says up front that it will not run (absent peer, backend for another device...)."""
    import torch

    try:
        return bool(provider.unavailable() or provider.supports(case, mode, torch.device("cuda")))
    except Exception:  # noqa: BLE001 - asking needs a GPU (e.g. its compute capability): count it as running
        return False


def fit_timing(plan: list, budget_s: float) -> tuple:
    """(warmup_ms, rep_ms): the bench's defaults (25, 100), shrunk (to no less than 5, 20) until the estimate
    fits ``budget_s``."""
    timing = (25.0, 100.0)
    while sum(estimate_bench_seconds(plan, timing).values()) > budget_s and timing[1] > 20.0:
        timing = (max(5.0, timing[0] / 2), max(20.0, timing[1] / 2))
    return timing


# ----------------------------------------------------------------------------------------------- summary
def summary(rows: list) -> str:
    """One line per op and mode: the flashops status over every case; at the largest case a flashops provider
    got right, its rate (TFLOP/s or GB/s), its ratio to the best peer (``tie`` within the noise), and its
    median time eager / replayed from a CUDA graph."""
    by_key = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["suite"] == "speed":
            by_key[(row["op"], row["mode"])][(row["shape"], row["provider"], row["peer"])][row["metric"]] = row
    unit, scale = ("TFLOP/s", 1.0) if any(float(m["tflops"]["value"]) >= 1.0 for metrics in by_key.values()
                                         for m in metrics.values() if "tflops" in m) else ("GFLOP/s", 1e3)
    lines = [f"{'op':<30} {'mode':<8} {'status':<10} {'largest case, best flashops provider':<46} {'rate':>16} "
             f"{'vs best peer':>13} {'ms eager / graph':>17}"]
    for (op, mode), results in by_key.items():
        ours = {key: metrics for key, metrics in results.items() if key[2] in (False, "False")}
        statuses = [m["status"]["value"] for m in ours.values() if m["status"]["value"] != "SKIP"]
        bad = [s for s in statuses if s in ("WRONG", "ERROR", "OOM")]
        ok = [key for key, m in ours.items() if m["status"]["value"] == "OK"]
        status = bad[0] if bad else (f"OK {len(ok)}/{len(statuses)}" if ok else "SKIP")
        if not ok:
            reason = next((m["status"]["note"] for m in ours.values() if m["status"]["note"]), "")
            lines.append(f"{op:<30} {mode:<8} {status:<10} {reason[:100]}")
            continue
        largest = max({key[0] for key in ok}, key=_size)
        best = min((key for key in ok if key[0] == largest), key=lambda key: float(ours[key]["time_ms"]["value"]))
        m = ours[best]
        rate = (f"{float(m['tflops']['value']) * scale:.4g} {unit}" if "tflops" in m else
                f"{float(m['gb_per_s']['value']):.4g} GB/s" if "gb_per_s" in m else "-")
        vs = "-" if "speedup_vs_best_peer" not in m else f"{float(m['speedup_vs_best_peer']['value']):.2f}x" + (
            " tie" if m.get("speedup_tie", {}).get("value") in (1.0, "1.0") else "")
        graph = f"{float(m['graph_time_ms']['value']):.4g}" if "graph_time_ms" in m else "-"
        times = f"{float(m['time_ms']['value']):.4g} / {graph}"
        lines.append(f"{op:<30} {mode:<8} {status:<10} {(best[1] + ' ' + largest)[:46]:<46} {rate:>16} {vs:>13} "
                     f"{times:>17}")
    return "\n".join(lines)


def _size(shape: str) -> int:
    """The product of a case's sizes, from its shape string (flags such as causal=0 count as 1)."""
    return math.prod(max(1, int(v)) for v in re.findall(r"=(\d+)", shape))


# -------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    if not args.autotune:
        env["FLASHOPS_AUTOTUNE"] = "0"
    if args.wheels:
        site = install_wheels(args.wheels)
        sys.path.insert(0, site)
        env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    import torch

    from .registry import load_ops
    from .results import device_slug, read_rows
    from .run import _names, plan_cases, select_ops
    from .run import parse_args as bench_parse_args

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: `python -m bench.gpu_check --dry-run` runs the steps on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "tmp/gpu-check-dry-run" if args.dry_run else device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-check-{date}"
    tests = Step("tests", args.budget * TEST_SHARE)
    bench = Step("bench", args.budget * BENCH_SHARE)
    report = [f"{name}: budget {args.budget:.0f} s ({tests.name} {tests.budget_s:.0f} s, {bench.name} "
              f"{bench.budget_s:.0f} s)", environment_report(device.type)]
    print("\n".join(report), flush=True)

    if args.skip_tests:
        tests.status = "skipped"
    else:
        began = time.monotonic()
        try:
            run_tests(tests, args.tests or (DRY_RUN_TESTS if args.dry_run else GPU_TESTS), out / f"{name}-tests.log",
                      env, parallel=not args.dry_run)
        except ImportError as error:
            tests.status, tests.detail = "SKIPPED", f"pytest is not installed here ({error})"
        tests.seconds = time.monotonic() - began
        print(f"tests: {tests.status} in {tests.seconds:.0f} s: {tests.detail}", flush=True)

    # What is left of the bench's share after the tests (they may have finished early) goes to the bench.
    bench.budget_s = max(30.0, args.budget * (TEST_SHARE + BENCH_SHARE) - (time.monotonic() - start))
    extra = shlex.split(args.bench_args)
    probe = bench_parse_args(bench_args(args.dry_run, args.all_providers, bench.budget_s, name, out, extra,
                                        (25.0, 100.0)))
    plan = plan_cases(select_ops(load_ops().ops, _names(probe.op)), "quick", device, probe)
    timing = DRY_RUN_TIMING if args.dry_run else fit_timing(plan, 0.85 * bench.budget_s)
    estimate = estimate_bench_seconds(plan, timing)
    print(f"bench: {len(plan)} cases, warmup {timing[0]:g} ms, rep {timing[1]:g} ms; estimated from the shapes: "
          + ", ".join(f"{family} {s:.0f} s" for family, s in estimate.items()), flush=True)
    cmd = [sys.executable, "-m", "bench", *bench_args(args.dry_run, args.all_providers, 0.85 * bench.budget_s,
                                                      name, out, extra, timing)]
    began = time.monotonic()
    # The bench stops starting cases at 85% of its share; it is only killed (losing its files) when a case runs
    # on past what is left of the whole budget, less a little for the summary.
    hard_stop = max(bench.budget_s, args.budget - (began - start) - 15.0)
    _, timed_out = _run(cmd, hard_stop, out / f"{name}-bench.log", env)
    bench.seconds = time.monotonic() - began
    results_file = out / f"quick-{name}.csv"
    rows = read_rows(results_file) if results_file.exists() else []
    bench.status = "TIMEOUT" if timed_out else ("OK" if rows else "FAILED")
    bench.detail = (f"{len({(r['op'], r['shape']) for r in rows})} cases, estimate {sum(estimate.values()):.0f} s; "
                    f"{results_file.name}" if rows else f"no results: see {name}-bench.log")

    text = [*report, "", *(f"{s.name}: {s.status} in {s.seconds:.0f} s of {s.budget_s:.0f} s: {s.detail}"
                           for s in (tests, bench)), f"total {time.monotonic() - start:.0f} s", ""]
    if rows:
        text.append(summary(rows))
    (out / f"{name}-summary.txt").write_text("\n".join(text) + "\n")
    print("\n".join(text[len(report):]))
    print(f"\nfiles: {out}/{name}-*, quick-{name}.csv/json and the plots")
    return 0 if tests.status in ("OK", "skipped") and bench.status == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
