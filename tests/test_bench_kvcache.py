"""The KV-cache decoding bench case: its CPU quick sweep runs and passes its checks, GB/s follow the stated byte
formula, the check on the last sequence is an exact sub-problem and catches an error there."""

import csv

import torch

from bench import measure, run
from bench.cases import kvcache as kvcache_cases
from bench.progress import Progress
from bench.registry import Provider, case, load_ops
from bench.results import OK, WRONG

CPU = torch.device("cpu")
OP = kvcache_cases.OP


def test_quick_sweep_checks_and_times_every_case(tmp_path):
    code = run.main(["--quick", "--device", "cpu", "--op", OP, "--provider", "flashops-torch,sdpa", "--no-progress",
                     "--warmup-ms", "0", "--rep-ms", "1", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "quick.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    status = {(r["provider"], r["shape"]): r for r in rows if r["metric"] == "status"}
    shapes = {shape for _, shape in status}
    assert len(shapes) == 4 and {s.split("page=")[1] for s in shapes} == {"0", "16"}
    for shape in shapes:
        assert status[("flashops-torch", shape)]["value"] == OK
        sdpa = status[("sdpa", shape)]
        assert sdpa["value"] == (OK if shape.endswith("page=0") else "SKIP"), sdpa["note"]
    for r in (r for r in rows if r["metric"] == "gb_per_s"):
        b, t, h, h_kv, d = (int(p.split("=")[1]) for p in r["shape"].split()[:5])
        ms = next(float(x["value"]) for x in rows if x["metric"] == "time_ms" and
                  (x["provider"], x["shape"]) == (r["provider"], r["shape"]))
        moved = (2 * b * t * h_kv + 2 * b * h) * d * 4
        assert abs(float(r["value"]) - moved / (ms * 1e-3) / 1e9) < 1e-6 * float(r["value"])


def test_check_of_the_last_sequence_is_exact_and_catches_errors():
    c = case(OP, torch.float32, ("fwd",), B=3, T=64, H=4, Hkv=2, D=16, page=16)
    op = load_ops().op(OP)
    inputs = measure.prepare_inputs(op, op.make_inputs(c, CPU, torch.Generator().manual_seed(0)))
    narrow, note = op.check_slice(c, CPU)
    full = op.reference(inputs, c, True)
    part = op.reference({n: narrow(n, x) for n, x in inputs.items()}, c, True)
    torch.testing.assert_close(part, full[-1:], rtol=0, atol=0)
    base = op.provider("flashops-torch")

    def perturbed(inputs, c):
        out = base.run(inputs, c).clone()
        out[-1, 0, -1, 0] += 0.01
        return out

    results = run.run_case(op, c, [base, Provider("perturbed", perturbed)], ["fwd"], CPU, measure.Timing(0, 1, 1, 1),
                           0, Progress(0, "", enabled=False))
    verdict = {r.provider: r.status for r in results}
    assert verdict == {"flashops-torch": OK, "perturbed": WRONG}
    assert next(r for r in results if r.provider == "flashops-torch").note == note
