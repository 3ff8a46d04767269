"""make gpu-check (bench/gpu_check.py): its CPU dry run end to end, the pytest outcome parser, and the time
budget of the GPU run estimated from the GPU sweep's shapes."""

import csv

import torch

from bench import gpu_check
from bench.registry import load_ops
from bench.run import _names, parse_args, plan_cases, select_ops


def test_dry_run_writes_results_logs_and_a_one_screen_summary(tmp_path):
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path),
                           "--tests", "tests/test_dispatch.py::test_unknown_names"])
    assert code == 0
    (summary,) = tmp_path.glob("gpu-check-*-summary.txt")
    text = summary.read_text()
    assert "tests: OK" in text and "1 passed" in text and "bench: OK" in text
    line = next(line for line in text.splitlines() if line.startswith("vandermonde_kernel"))
    assert "OK 1/1" in line and "flashops-triton H=8 N=8 L=128" in line and "GFLOP/s" in line
    (results,) = tmp_path.glob("quick-gpu-check-*.csv")
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    status = {r["provider"]: r["value"] for r in rows if r["metric"] == "status"}
    # The CUDA backend runs only on a GPU: reported as a skip, and not counted in the summary's OK n/m.
    assert status == {"flashops-triton": "OK", "naive-materialized": "OK", "flashops-cuda": "SKIP"}
    # Each timed call was also offered to a CUDA graph; on the CPU that is reported, not hidden.
    graph = [r for r in rows if r["metric"] == "graph_status"]
    assert len(graph) == 2 and {r["note"] for r in graph} == {"CUDA graphs need a CUDA device"}
    assert list(tmp_path.glob("gpu-check-*-tests.log")) and list(tmp_path.glob("*.png"))


def test_pytest_outcomes_are_read_from_the_summary_or_the_progress_marks():
    done = "....s.F\n[...]\nFAILED tests/x.py::t - boom\n1 failed, 5 passed, 1 skipped, 2 errors in 3.2s\n"
    assert gpu_check.test_counts(done) == {"failed": 1, "passed": 5, "skipped": 1, "error": 2}
    stopped = "$ python -m pytest -q\n.....F..s. [ 10%]\n....\n"  # killed at its budget
    assert gpu_check.test_counts(stopped) == {"passed": 12, "failed": 1, "skipped": 1}


def test_gpu_sweep_is_budgeted_from_its_shapes():
    """The quick GPU sweep, planned as make gpu-check runs it, is estimated to fit the bench's share of the
    10 minutes, every family has a share, and the estimate grows with the timing asked for."""
    bench_budget = 600 * gpu_check.BENCH_SHARE
    args = parse_args(gpu_check.bench_args(False, False, bench_budget, "t", "/tmp", [], (25.0, 100.0)))
    plan = plan_cases(select_ops(load_ops().ops, _names(args.op)), "quick", torch.device("cuda"), args)
    assert {op.family for op, _, _, _ in plan} == {"attention", "linear", "lla", "hyper", "ssm", "recurrent_steps"}
    assert not any(p.name in gpu_check.EXCLUDED_PROVIDERS for _, _, providers, _ in plan for p in providers)
    timing = gpu_check.fit_timing(plan, 0.85 * bench_budget)
    estimate = gpu_check.estimate_bench_seconds(plan, timing)
    assert set(estimate) == {"attention", "linear", "lla", "hyper", "ssm", "recurrent_steps"}
    assert sum(estimate.values()) <= 0.85 * bench_budget
    assert sum(gpu_check.estimate_bench_seconds(plan, (50.0, 400.0)).values()) > sum(estimate.values())
