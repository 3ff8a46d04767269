"""The benchmark: the CLI's quick mode on a tiny sweep, its files, the WRONG verdict, the case-file contract."""

import csv
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import flashops
from bench import registry, run
from bench.cases import attention as attention_cases
from bench.registry import Provider, case

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"date", "device", "op", "family", "suite", "provider", "peer", "mode", "shape", "dtype", "metric",
          "value", "status", "note", "torch", "triton", "flashops"}
# One tiny shape, and just enough timing to produce numbers (the minimum of 5 timed calls still applies). The
# CLI's plumbing is tested on the CPU, also on a machine with a GPU.
TINY = ["--quick", "--device", "cpu", "--op", "flash_attention", "--set", "T=128", "--no-progress", "--warmup-ms",
        "0", "--rep-ms", "1", "--threads", "1"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _metric(rows, provider, mode, metric):
    return [r for r in rows if r["provider"] == provider and r["mode"] == mode and r["metric"] == metric]


def _bench(args, tmp_path):
    code = run.main([*TINY, *args, "--out", str(tmp_path)])
    return code, _rows(tmp_path / "quick.csv")


@pytest.fixture
def planted(request):
    """Providers added to the attention op for one test, removed afterwards."""
    op = registry.load_ops().op("flash_attention")
    added = []

    def add(provider):
        op.providers.append(provider)
        added.append(provider)

    yield add
    for p in added:
        op.providers.remove(p)


def test_quick_cli_writes_csv_and_json_with_the_schema(tmp_path):
    cmd = [sys.executable, "-m", "bench", *TINY, "--set", "causal=1", "--provider", "flashops-torch,sdpa-math",
           "--no-memory", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "flashops-torch" in proc.stdout and "sdpa-math" in proc.stdout

    rows = _rows(tmp_path / "quick.csv")
    with open(tmp_path / "quick.json") as f:
        json_rows = json.load(f)
    assert len(rows) == len(json_rows) > 0
    assert SCHEMA | {"B", "T", "H", "D", "causal"} <= set(rows[0])
    for row in rows:
        assert row["device"] and row["torch"] == torch.__version__ and row["flashops"] == flashops.__version__
        assert row["date"] and row["triton"]
    for provider in ("flashops-torch", "sdpa-math"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert [r["value"] for r in _metric(rows, provider, mode, "status")] == ["OK"], (provider, mode)
            times, tflops = _metric(rows, provider, mode, "time_ms"), _metric(rows, provider, mode, "tflops")
            assert len(times) == len(tflops) == 1
            # TFLOP/s follows the stated convention: 4*B*H*T*T*D, halved when causal, 2.5x/3.5x for bwd.
            row = times[0]
            b, t, h, d = (int(row[k]) for k in ("B", "T", "H", "D"))
            flops = 4 * b * h * t * t * d * 0.5 * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
            ms = float(row["value"])
            assert ms > 0
            assert math.isclose(float(tflops[0]["value"]), flops / (ms * 1e-3) / 1e12, rel_tol=1e-6)
            assert row["shape"] == f"B={b} T={t} H={h} D={d} causal=1"
    err = _metric(rows, "flashops-torch", "fwd+bwd", "max_abs_err")
    bound = _metric(rows, "flashops-torch", "fwd+bwd", "err_bound")
    assert all(0 <= float(e["value"]) <= float(b["value"]) for e, b in zip(err, bound))
    # The speedup column compares with the fastest correct peer, here sdpa-math.
    for r in _metric(rows, "sdpa-math", "fwd", "speedup_vs_best_peer"):
        assert float(r["value"]) == 1.0
    for r in json_rows:
        if r["metric"] != "status":
            assert isinstance(r["value"], float)


def test_wrong_provider_is_flagged_and_not_timed(tmp_path, planted):
    def wrong_output(inputs, c):
        return flashops.flash_attention(inputs["q"], inputs["k"], inputs["v"], causal=c["causal"],
                                        backend="torch") + 1e-2

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrong_grads(inputs, c):
        return WrongGrad.apply(flashops.flash_attention(inputs["q"], inputs["k"], inputs["v"],
                                                        causal=c["causal"], backend="torch"))

    planted(Provider("planted-wrong-out", wrong_output))
    planted(Provider("planted-wrong-grad", wrong_grads))
    code, rows = _bench(["--provider", "planted-*,sdpa-math", "--set", "causal=1", "--no-memory"], tmp_path)
    assert code == 0  # only a flashops backend that is WRONG fails the command

    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert [r["value"] for r in _metric(rows, "planted-wrong-out", mode, "status")] == ["WRONG"]
        err = float(_metric(rows, "planted-wrong-out", mode, "max_abs_err")[0]["value"])
        bound = float(_metric(rows, "planted-wrong-out", mode, "err_bound")[0]["value"])
        assert err > bound and math.isclose(err, 1e-2, rel_tol=1e-3)
    timed = {r["mode"] for r in rows if r["provider"] == "planted-wrong-out" and r["metric"] in
             ("time_ms", "tflops", "peak_mem_mib", "speedup_vs_best_peer")}
    assert timed == set()

    # Right forward, wrong gradients: the forward is timed, the backward modes are WRONG and untimed.
    assert [r["value"] for r in _metric(rows, "planted-wrong-grad", "fwd", "status")] == ["OK"]
    assert len(_metric(rows, "planted-wrong-grad", "fwd", "time_ms")) == 1
    for mode in ("bwd", "fwd+bwd"):
        status = _metric(rows, "planted-wrong-grad", mode, "status")
        assert [r["value"] for r in status] == ["WRONG"] and "grad_" in status[0]["note"]
        assert _metric(rows, "planted-wrong-grad", mode, "time_ms") == []
    # The correct peer is unaffected.
    assert {r["value"] for r in rows if r["provider"] == "sdpa-math" and r["metric"] == "status"} == {"OK"}


def test_failing_flashops_backend_is_an_error_and_fails_the_command(tmp_path, planted):
    def broken(inputs, c):
        raise RuntimeError("kernel launch failed")

    planted(Provider("flashops-broken", broken, peer=False))
    code, rows = _bench(["--provider", "flashops-broken", "--set", "causal=0", "--mode", "fwd", "--no-memory"],
                        tmp_path)
    assert code == 1
    status = _metric(rows, "flashops-broken", "fwd", "status")
    assert [r["value"] for r in status] == ["ERROR"] and "kernel launch failed" in status[0]["note"]


def test_unavailable_provider_is_skipped_with_its_reason(tmp_path, planted):
    planted(Provider("peer-absent", lambda inputs, c: None, unavailable=lambda: "peer_pkg is not importable"))
    code, rows = _bench(["--provider", "peer-absent", "--set", "causal=0", "--mode", "fwd", "--no-memory"],
                        tmp_path)
    assert code == 0
    status = _metric(rows, "peer-absent", "fwd", "status")
    assert [(r["value"], r["note"]) for r in status] == [("SKIP", "peer_pkg is not importable")]


def test_memory_sweep_rows(tmp_path):
    code = run.main(["--quick", "--device", "cpu", "--op", "flash_attention", "--memory-only", "--set", "T=512",
                     "--provider", "flashops-torch,reference", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    rows = _rows(tmp_path / "quick.csv")
    for provider in ("flashops-torch", "reference"):
        mem = [r for r in rows if r["provider"] == provider and r["metric"] == "mem_scaling_mib"]
        assert len(mem) == 1 and mem[0]["suite"] == "memory" and mem[0]["status"] == "OK"
        # At least q, k, v's gradients and the output: 4 * 512 * 4 * 64 fp32 values.
        assert float(mem[0]["value"]) >= 4 * 512 * 4 * 64 * 4 / 2**20


_TOY_FAMILY = '''
import torch
from bench.registry import Op, Provider, case

def _scale(inputs, c):
    return inputs["x"] * c["alpha"]

OPS = [Op(
    name="toy_scale", family="toy",
    cases=lambda sweep, device: [case("toy_scale", torch.float32, T=t, alpha=2.0) for t in (8, 16)],
    make_inputs=lambda c, device, g: {"x": torch.randn(c["T"], 3, generator=g, device=device)},
    reference=lambda inputs, c, upcast: inputs["x"] * c["alpha"],
    flops=lambda c, mode: 3 * c["T"] * (1 if mode == "fwd" else 2),
    flop_formula="fwd = T * 3 multiplies",
    providers=[Provider("toy-mul", _scale, peer=False), Provider("toy-off", lambda i, c: _scale(i, c) + 1)],
    differentiable=("x",),
)]
'''


def test_a_new_case_file_needs_no_framework_change(tmp_path, monkeypatch):
    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    (cases_dir / "toy.py").write_text(textwrap.dedent(_TOY_FAMILY))
    (cases_dir / "unmerged.py").write_text("import flashops.ops.not_merged_yet\n")
    import bench.cases

    monkeypatch.setattr(bench.cases, "__path__", [*bench.cases.__path__, str(cases_dir)])
    monkeypatch.setattr(registry, "_REGISTRY", None)
    loaded = registry.load_ops()
    assert {"flash_attention", "toy_scale"} <= {op.name for op in loaded.ops}
    assert any("unmerged" in note for note in loaded.notes)

    code = run.main(["--quick", "--device", "cpu", "--op", "toy", "--no-progress", "--out", str(tmp_path / "out")])
    rows = _rows(tmp_path / "out" / "quick.csv")
    status = {(r["provider"], r["T"], r["mode"]): r["value"] for r in rows if r["metric"] == "status"}
    assert code == 0 and len(status) == 2 * 2 * 3
    assert {v for (p, _, _), v in status.items() if p == "toy-mul"} == {"OK"}
    assert {v for (p, _, _), v in status.items() if p == "toy-off"} == {"WRONG"}


_TOY_MEASURED = '''
import torch
from bench.registry import Op, Provider, case

CALLS = []

def _work(call, c, mode):
    call()
    CALLS.append(mode)
    return {"flops": 7.0 * c["T"] if mode == "fwd" else None, "steps": 3.0}

OPS = [Op(
    name="toy_measured", family="toy_measured",
    cases=lambda sweep, device: [case("toy_measured", torch.float32, ("fwd", "bwd"), T=16)],
    make_inputs=lambda c, device, g: {"x": torch.randn(c["T"], generator=g, device=device)},
    reference=lambda inputs, c, upcast: inputs["x"] * 2,
    flops=lambda c, mode: 1.0,
    flop_formula="measured",
    providers=[Provider("toy-mul", lambda inputs, c: inputs["x"] * 2, peer=False)],
    differentiable=("x",),
    measured_work=_work,
)]
'''


def test_measured_work_replaces_the_flop_formula(tmp_path, monkeypatch):
    """An op whose work depends on the data (measured_work) gets its rate from what one call did, and the other
    things measured as metrics; a measured "flops" of None means no rate."""
    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    (cases_dir / "toy_measured.py").write_text(textwrap.dedent(_TOY_MEASURED))
    import bench.cases

    monkeypatch.setattr(bench.cases, "__path__", [*bench.cases.__path__, str(cases_dir)])
    monkeypatch.setattr(registry, "_REGISTRY", None)
    code = run.main(["--quick", "--device", "cpu", "--op", "toy_measured", "--no-progress", "--out",
                     str(tmp_path / "out")])
    rows = _rows(tmp_path / "out" / "quick.csv")
    metric = {(r["mode"], r["metric"]): float(r["value"]) for r in rows if r["metric"] != "status"}
    assert code == 0 and sys.modules["bench.cases.toy_measured"].CALLS == ["fwd", "bwd"]
    assert math.isclose(metric[("fwd", "tflops")], 7.0 * 16 / (metric[("fwd", "time_ms")] * 1e-3) / 1e12)
    assert ("bwd", "tflops") not in metric
    assert metric[("fwd", "steps")] == metric[("bwd", "steps")] == 3.0


def test_attention_flops_and_check_slice():
    c = case("flash_attention", torch.bfloat16, B=2, T=20000, H=16, D=64, causal=True)
    fwd = 4 * 2 * 16 * 20000 * 20000 * 64 / 2
    assert attention_cases.flops(c, "fwd") == fwd
    assert attention_cases.flops(c, "bwd") == 2.5 * fwd and attention_cases.flops(c, "fwd+bwd") == 3.5 * fwd
    narrow, note = attention_cases.check_slice(c, torch.device("cpu"))
    x = torch.arange(2 * 3 * 16 * 4).reshape(2, 3, 16, 4)
    assert torch.equal(narrow("q", x), x[1:, :, 15:]) and "batch 1, heads 15..15" in note
    small = case("flash_attention", torch.float32, B=1, T=128, H=4, D=64, causal=False)
    assert attention_cases.check_slice(small, torch.device("cpu")) == (None, "")


def test_plot_draws_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plot import plot_files

    code = run.main([*TINY, "--provider", "flashops-torch,sdpa-math", "--mode", "fwd", "--no-memory",
                     "--out", str(tmp_path)])
    assert code == 0
    written = plot_files([tmp_path / "quick.csv"], tmp_path / "plots")
    assert {p.name for p in written} == {"flash-attention-fwd-float32-tflops.png",
                                         "flash-attention-fwd-float32-time-ms.png"}
    assert all(p.stat().st_size > 1000 for p in written)


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from bench import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot.main([str(tmp_path / "none.csv")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_run_py_works_as_a_script():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--quick" in proc.stdout


# ----------------------------------------------------------------------------------------- noise, files
def test_interleaved_timing_alternates_functions_and_reports_the_spread():
    from bench.measure import Samples, Timing, time_interleaved

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.02)

    def broken():
        calls.append("broken")
        raise RuntimeError("boom")

    fns = {"slow": slow, "fast": lambda: calls.append("fast"), "broken": broken}
    samples, failures = time_interleaved(fns, torch.device("cpu"), Timing(warmup_ms=5, rep_ms=40, min_reps=4,
                                                                          max_reps=40, rounds=4))
    assert set(samples) == {"slow", "fast"} and str(failures["broken"]) == "boom"
    assert calls.count("broken") == 1  # dropped after its first failure
    # As many timed calls as fit in rep_ms, within [min_reps, max_reps]: 40 of the fast call, 4 of the slow one.
    assert len(samples["fast"].times) == 40 and len(samples["slow"].times) == 4
    # Every round runs both: the slow call's timed runs are spread over the whole run, one per round.
    timed = calls[-44:]
    assert [timed[i:i + 11].count("slow") for i in range(0, 44, 11)] == [1, 1, 1, 1]
    s = samples["slow"]
    assert s.minimum <= s.q1 <= s.median <= s.q3 <= s.maximum and s.minimum >= 20.0
    assert Samples([1, 2, 5, 6]).overlaps(Samples([4, 5, 6, 7])) and not Samples([1, 2]).overlaps(Samples([5, 6]))


def test_cpu_time_clock_leaves_out_sleeping_and_is_recorded(tmp_path):
    """--cpu-time times a call by the CPU time it uses: a call that sleeps 20 ms costs (almost) nothing; every row
    says which clock timed it."""
    from bench.measure import Timing, time_interleaved

    fns = {"sleep": lambda: time.sleep(0.02), "spin": lambda: sum(range(200_000))}
    for cpu_time in (False, True):
        samples, _ = time_interleaved(fns, torch.device("cpu"), Timing(warmup_ms=0, rep_ms=1, min_reps=3,
                                                                       max_reps=3, rounds=1, cpu_time=cpu_time))
        assert (samples["sleep"].maximum < 5.0) if cpu_time else (samples["sleep"].minimum >= 20.0)
        assert samples["spin"].minimum > 0
    assert run.main([*TINY, "--provider", "flashops-torch", "--mode", "fwd", "--no-memory", "--cpu-time",
                     "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "quick.csv")
    assert {r["clock"] for r in rows} == {"cpu time"}
    assert float(next(r["value"] for r in rows if r["metric"] == "time_ms")) > 0


def _timed_result(provider, peer, times):
    from bench.measure import Samples
    from bench.results import Result

    c = case("flash_attention", torch.float32, ("fwd",), B=1, T=8, H=1, D=8, causal=False)
    return Result("flash_attention", "attention", provider, peer, c, "fwd", "OK", samples=Samples(times))


def test_speedups_flag_overlapping_spreads_as_ties():
    from bench.results import table

    peer = _timed_result("peer", True, [10, 10.5, 11, 11.5, 12])
    near = _timed_result("near", False, [9, 9.5, 10.2, 11.8, 12])  # IQRs overlap: a tie
    clear = _timed_result("clear", False, [4, 4.1, 4.2, 4.3, 4.4])
    run.add_speedups([peer, near, clear])
    assert peer.speedup == 1.0 and peer.tie is None
    assert near.tie is True and near.speedup_low < 1 < near.speedup_high
    assert clear.tie is False and clear.speedup == pytest.approx(11 / 4.2) and clear.speedup_low > 2
    text = table([peer, near, clear])
    assert "1.08x tie" in text and "2.62x  " in text and "tie: the interquartile ranges" in text
    assert "GFLOP/s" in text.splitlines()[0]  # no rate reaches 1 TFLOP/s: a readable unit


def test_cli_rows_carry_the_spread_of_every_time(tmp_path):
    code, rows = _bench(["--provider", "flashops-torch,sdpa-math", "--set", "causal=1", "--mode", "fwd",
                         "--no-memory"], tmp_path)
    assert code == 0
    for provider in ("flashops-torch", "sdpa-math"):
        spread = [float(_metric(rows, provider, "fwd", f"time{s}_ms")[0]["value"])
                  for s in ("_min", "_q1", "", "_q3", "_max")]
        assert spread == sorted(spread) and spread[0] > 0
        assert float(_metric(rows, provider, "fwd", "time_reps")[0]["value"]) >= 3
    tie = _metric(rows, "flashops-torch", "fwd", "speedup_tie")
    assert len(tie) == 1 and tie[0]["value"] in ("0.0", "1.0")


def test_unknown_set_key_is_an_error_and_an_empty_result_replaces_nothing(tmp_path):
    kept = tmp_path / "quick.csv"
    kept.write_text("earlier results\n")
    with pytest.raises(SystemExit, match="no selected op has a parameter 'L'.*B, D, H, T, causal"):
        run.main(["--quick", "--device", "cpu", "--op", "flash_attention", "--set", "L=999", "--out", str(tmp_path)])
    code = run.main(["--quick", "--device", "cpu", "--op", "flash_attention", "--set", "T=999", "--no-progress",
                     "--out", str(tmp_path)])
    assert code == 2 and kept.read_text() == "earlier results\n" and not (tmp_path / "quick.json").exists()


def test_earlier_results_are_kept_under_their_date(tmp_path):
    args = ["--provider", "sdpa-math", "--set", "causal=0", "--mode", "fwd", "--no-memory"]
    _bench(args, tmp_path)
    first = _rows(tmp_path / "quick.csv")
    _bench(args, tmp_path)
    stamp = first[0]["date"].replace("-", "").replace(":", "")[:15]
    assert _rows(tmp_path / f"quick.{stamp}.csv") == first
    assert (tmp_path / f"quick.{stamp}.json").exists() and len(_rows(tmp_path / "quick.csv")) == len(first)


def test_provider_patterns_exclude_and_the_time_budget_stops_new_cases(tmp_path):
    assert registry.name_matches("flashops-triton", ["flashops-*", "!flashops-torch"])
    assert not registry.name_matches("flashops-torch", ["flashops-*", "!flashops-torch"])
    assert registry.name_matches("sdpa-math", ["!flashops-*"]) and registry.name_matches("x", None)
    code, rows = _bench(["--provider", "sdpa-math", "--mode", "fwd", "--no-memory", "--time-budget", "1e-9"],
                        tmp_path)
    status = [r for r in rows if r["metric"] == "status"]
    assert code == 0 and len(status) == 2 and {(r["value"], r["note"]) for r in status} == {
        ("SKIP", "not run: the --time-budget was spent")}
