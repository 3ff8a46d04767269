"""The case files of the linear, lla, hyper, ssm and recurrent-step families: their CPU quick sweeps run and pass
their checks, their references and check slices are exact sub-problems, and wrong results inside a slice are
caught."""

import csv
import math

import pytest
import torch

import flashops
from bench import measure, run
from bench.cases import attention as attention_cases
from bench.cases import hyper as hyper_cases
from bench.cases import linear as linear_cases
from bench.cases import lla as lla_cases
from bench.progress import Progress
from bench.registry import Provider, case, load_ops
from bench.results import OK, WRONG
from flashops.ops.attention import reference as attention_reference
from flashops.ops.hyper import reference as hyper_reference
from flashops.ops.linear import reference as linear_reference
from flashops.ops.lla import reference as lla_reference

CPU = torch.device("cpu")
# The CPU quick sweep of each family with just enough timing to produce numbers. Only flashops's torch backend
# and the peers (skipped here): the Triton interpreter would take minutes at these sizes.
QUICK = ["--quick", "--device", "cpu", "--provider", "flashops-torch,fla,lightning-attn", "--no-progress",
         "--warmup-ms", "0", "--rep-ms", "1", "--threads", "1"]
NEW_OPS = {
    "linear": {"lightning_attention", "gated_linear_attention", "linear_attention", "linear_vs_exact",
               "lightning_attention_gqa", "gated_linear_attention_gqa", "lightning_attention_reverse",
               "gated_linear_attention_reverse"},
    "lla": {"local_linear_attention", "lla_vs_exact", "local_linear_attention_decode"},
    "hyper": {"hyper_attention", "hyper_vs_exact"},
}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _quick(family, tmp_path, *args):
    code = run.main([*QUICK, "--op", family, "--out", str(tmp_path), *args])
    return code, _rows(tmp_path / "quick.csv")


def _metric(rows, row, metric):
    """The value of another metric of the same result as ``row``."""
    key = ("op", "shape", "mode", "provider")
    return next(float(x["value"]) for x in rows if x["metric"] == metric and all(x[k] == row[k] for k in key))


def _forward_flops(row, rows):
    """The FLOP formulas of the case files, written out again from docs/linear.md, docs/lla.md, docs/hyper.md."""
    b, t, h, d = (int(row[k]) for k in ("B", "T", "H", "D"))
    attention = 4 * b * h * t * t * d * (0.5 if row.get("causal") in ("1", None) else 1.0)
    if row["op"] == "local_linear_attention":  # its own count, with the CG iterations the call ran
        return 2 * d * b * h * t * (t + 1) / 2 * (4 + 2 * _metric(rows, row, "cg_iters_fwd"))
    causal_linear = b * t * h * (2 * 64 * 2 * d + 4 * d * d)  # h: the query heads (GQA included)
    return {
        **{f"{name}{variant}": causal_linear for name in ("lightning_attention", "gated_linear_attention")
           for variant in ("", "_gqa", "_reverse")},
        "linear_attention": 4 * b * t * h * d * d,
        "local_linear_attention_decode": b * h * t * (4 * d * d + 6 * d),
    }.get(row["op"], attention)


@pytest.mark.parametrize("family", sorted(NEW_OPS))
def test_quick_sweep_checks_and_times_every_op(family, tmp_path):
    code, rows = _quick(family, tmp_path, "--no-memory")
    assert code == 0
    assert {r["op"] for r in rows} == NEW_OPS[family]
    status = [r for r in rows if r["metric"] == "status"]
    ours = [r for r in status if r["peer"] == "False"]
    assert ours and {r["value"] for r in ours} == {OK}, [(r["op"], r["shape"], r["note"]) for r in ours if
                                                         r["value"] != OK]
    # Every case of every op was checked and timed in each of its modes (fwd only for decode).
    for r in ours:
        timed = [x for x in rows if x["metric"] == "time_ms" and (x["op"], x["shape"], x["mode"], x["provider"]) ==
                 (r["op"], r["shape"], r["mode"], r["provider"])]
        assert len(timed) == 1 and float(timed[0]["value"]) > 0
        assert r["mode"] in (("fwd",) if r["op"].endswith("decode") else ("fwd", "fwd+bwd"))
    # Peers are not installed here: skipped with the reason, never wrong.
    assert {r["value"] for r in status if r["peer"] == "True"} <= {"SKIP"}
    # TFLOP/s follow the stated forward formulas.
    for r in rows:
        if r["metric"] == "tflops" and r["mode"] == "fwd":
            ms = _metric(rows, r, "time_ms")
            assert math.isclose(float(r["value"]), _forward_flops(r, rows) / (ms * 1e-3) / 1e12, rel_tol=1e-6), r["op"]
    # LLA reports the CG iterations its timed calls ran, per solve that the mode makes.
    if family == "lla":
        for r in rows:
            if r["op"] == "local_linear_attention" and r["metric"] == "time_ms":
                stages = ("fwd",) if r["mode"] == "fwd" else ("fwd", "bwd")
                assert all(1.0 <= _metric(rows, r, f"cg_iters_{s}") <= 32 for s in stages)
    # HyperAttention reports its error against exact attention next to every timing.
    if family == "hyper":
        timed = {(r["shape"], r["mode"]) for r in rows if r["op"] == "hyper_attention" and r["metric"] == "time_ms"}
        errors = {(r["shape"], r["mode"]): float(r["value"]) for r in rows if r["metric"] == "rel_err_vs_exact"}
        assert set(errors) == timed
        assert all(0.0 < e < 10.0 for e in errors.values())
        # Concentrated attention (planted partners) is approximated better than diffuse attention.
        for shape, mode in errors:
            if "data=planted" in shape:
                assert errors[(shape, mode)] < errors[(shape.replace("planted", "random"), mode)]


def test_memory_sweep_of_lightning_attention(tmp_path):
    code, rows = _quick("lightning_attention", tmp_path, "--memory-only", "--set", "T=256", "--provider",
                        "flashops-torch,reference")
    assert code == 0
    mem = {r["provider"]: r for r in rows if r["metric"] == "mem_scaling_mib"}
    assert set(mem) == {"flashops-torch", "reference"}
    # At least q, k, v's gradients: 3 * 256 * 2 * 32 fp32 values.
    assert all(float(r["value"]) >= 3 * 256 * 2 * 32 * 4 / 2**20 for r in mem.values())


# ---------------------------------------------------------------------------------------------- helpers
def _run_case(op_name, c, providers=("flashops-torch",), extra_providers=()):
    op = load_ops().op(op_name)
    chosen = [p for p in op.providers if p.name in providers] + list(extra_providers)
    results = run.run_case(op, c, chosen, list(c.modes), CPU, measure.Timing(0, 1, 1, 1), 0,
                           Progress(0, "", enabled=False))
    return {(r.provider, r.mode): r for r in results}


def _inputs(op_name, c, seed=0):
    op = load_ops().op(op_name)
    return op, measure.prepare_inputs(op, op.make_inputs(c, CPU, torch.Generator().manual_seed(seed)))


def _perturbed(op_name, where):
    """A provider that is flashops-torch plus 1% of the output's largest entry at ``where`` (an index into
    the output): far past the fp32 bound, but only there."""
    base = load_ops().op(op_name).provider("flashops-torch")

    def run_(inputs, c):
        out = base.run(inputs, c)
        bump = torch.zeros_like(out)
        bump[where] = 1e-2 * float(out.detach().abs().max())
        return out + bump

    return Provider("perturbed", run_)


def _grads(out, leaves, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, leaves, dout)


# ----------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("op_name", ["lightning_attention", "gated_linear_attention", "lightning_attention_gqa",
                                     "gated_linear_attention_reverse"])
def test_linear_reference_in_pieces_equals_the_recurrence(op_name):
    """The bench's reference (the quadratic form on 64-position pieces chained by their states, walked backwards
    for the reverse ops) equals reference.py's per-step recurrence over the whole sequence, output and
    gradients."""
    c = case(op_name, torch.float64, B=2, T=130, H=2, HKV=1 if op_name.endswith("_gqa") else 2, D=8)
    op, inputs = _inputs(op_name, c)
    leaves = [inputs[n] for n in op.differentiable]
    got = op.reference(inputs, c, True)
    reverse = op_name.endswith("_reverse")
    if op_name.startswith("lightning_attention"):
        want, _ = linear_reference.lightning_attention(inputs["q"], inputs["k"], inputs["v"], inputs["slopes"],
                                                       scale=linear_cases.LIGHTNING_SCALE, reverse=reverse)
    else:
        want, _ = linear_reference.gated_linear_attention(inputs["q"], inputs["k"], inputs["v"], inputs["g"],
                                                          reverse=reverse)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(got, leaves), _grads(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_linear_check_slice_catches_an_error_in_the_checked_heads(monkeypatch):
    monkeypatch.setattr(linear_cases, "CHECK_HEAD_TOKENS", 64)
    c = case("lightning_attention", torch.float32, ("fwd", "fwd+bwd"), B=2, T=64, H=4, D=16)
    narrow, note = linear_cases.check_slice(c, CPU)
    assert note == "checked on batch 1, heads 3..3, all positions"
    results = _run_case("lightning_attention", c, extra_providers=[_perturbed("lightning_attention", (-1, 5, -1))])
    assert results[("flashops-torch", "fwd+bwd")].status == OK and results[("flashops-torch", "fwd")].note == note
    assert results[("perturbed", "fwd")].status == WRONG


def test_exact_baseline_checks_long_forwards_on_the_last_queries(monkeypatch):
    """Past EXACT_GRAD_MAX_T the exact baseline is forward only and checked on the last queries of the last
    head against all keys: with bottom-right causal masks that is the same rows of the full problem."""
    monkeypatch.setattr(attention_cases, "EXACT_GRAD_MAX_T", 64)
    monkeypatch.setattr(attention_cases, "EXACT_CHECK_ROWS", 16)
    long_case = case("linear_vs_exact", torch.float32, ("fwd", "fwd+bwd"), B=2, T=96, H=2, D=16)
    c = attention_cases.exact_case("linear_vs_exact", long_case)
    assert c.modes == ("fwd",) and c["causal"] is True
    op, inputs = _inputs("linear_vs_exact", c)
    narrow, note = op.check_slice(c, CPU)
    assert "last 16 queries of batch 1, head 1" in note
    full, _ = attention_reference.attention(inputs["q"], inputs["k"], inputs["v"], causal=True)
    part = op.reference({n: narrow(n, x) for n, x in inputs.items()}, c, True)
    torch.testing.assert_close(part, narrow("out", full), rtol=1e-6, atol=1e-6)
    results = _run_case("linear_vs_exact", c, extra_providers=[_perturbed("linear_vs_exact", (-1, -3, -1))])
    assert results[("flashops-torch", "fwd")].status == OK and results[("perturbed", "fwd")].status == WRONG


# -------------------------------------------------------------------------------------------------- lla
def test_lla_reference_in_query_pieces_equals_the_whole(monkeypatch):
    c = case("local_linear_attention", torch.float64, B=1, T=40, H=2, D=4)
    op, inputs = _inputs("local_linear_attention", c)
    leaves = [inputs[n] for n in op.differentiable]
    want = lla_reference.local_linear_attention(inputs["q"], inputs["k"], inputs["v"], ridge_lambda=lla_cases.RIDGE)
    monkeypatch.setattr(lla_cases, "REFERENCE_PIECE_BYTES", 1 * 1 * 40 * 4 * 4 * 12)  # pieces of 12 rows
    got = op.reference(inputs, c, True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(got, leaves), _grads(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ hyper
def _hyper_case(t, causal, modes=("fwd",), block=32, min_len=64):
    return case("hyper_attention", torch.float32, modes, B=1, T=t, H=3, D=16, causal=causal, data="planted",
                block=block, min_len=min_len)


@pytest.mark.parametrize("causal", [True, False])
def test_hyper_long_check_is_an_exact_subproblem_of_the_plan(causal, monkeypatch):
    """Past DENSE_MAX_T the check compares one head's first plan segment (causal) or last queries (not) with
    the reference under the restricted plan: equal to the same part of the full problem's reference."""
    monkeypatch.setattr(hyper_cases, "DENSE_MAX_T", 128)
    monkeypatch.setattr(hyper_cases, "CHECK_ROWS", 48)
    # Blocks of 8 keys so that every level of the checked part samples (larger blocks would make it exact).
    c = _hyper_case(500, causal, block=8, min_len=16)  # causal: 5 levels, base 16, padded 512
    op, inputs = _inputs("hyper_attention", c)
    narrow, note = op.check_slice(c, CPU)
    # T = 500 pads to 512 = 16 * 2^5: the first segment that fits is 128 positions (levels 2..4 of the plan).
    assert ("positions 0..127 of head 2" if causal else "last 48 queries of head 2") in note
    full, _ = hyper_reference.hyper_attention(inputs["q"], inputs["k"], inputs["v"], inputs["plan"])
    part = op.reference({**inputs, **{n: narrow(n, inputs[n]) for n in ("q", "k", "v")}}, c, True)
    assert part.shape == narrow("out", full).shape == ((1, 128, 1, 16) if causal else (1, 48, 1, 16))
    torch.testing.assert_close(part, narrow("out", full), rtol=1e-5, atol=1e-5)
    # The provider's full-size run agrees there; an error inside the slice is caught.
    where = (0, 100, -1) if causal else (0, -7, -1)
    results = _run_case("hyper_attention", c, extra_providers=[_perturbed("hyper_attention", where)])
    assert results[("flashops-torch", "fwd")].status == OK and results[("perturbed", "fwd")].status == WRONG


def test_hyper_error_against_exact_attention_is_reported():
    exact = _run_case("hyper_attention", _hyper_case(64, True, ("fwd", "fwd+bwd")))
    approx = _run_case("hyper_attention", _hyper_case(256, True, ("fwd", "fwd+bwd")))
    for mode in ("fwd", "fwd+bwd"):
        assert exact[("flashops-torch", mode)].status == approx[("flashops-torch", mode)].status == OK
        # T <= min_seq_len: the op is exact attention.
        assert exact[("flashops-torch", mode)].extra["rel_err_vs_exact"] < 1e-5
        assert approx[("flashops-torch", mode)].extra["rel_err_vs_exact"] > 1e-3


def test_hyper_provider_redraws_the_plan_of_the_inputs():
    """Each call draws its plan from the same seed: the output is the one of the plan the reference uses."""
    c = _hyper_case(256, False)
    _, inputs = _inputs("hyper_attention", c)
    with torch.no_grad():
        got = hyper_cases._hyper(inputs, c, "torch")
        want = flashops.hyper_attention(inputs["q"], inputs["k"], inputs["v"], causal=False, plan=inputs["plan"],
                                        backend="torch")
    assert torch.equal(got, want)


# -------------------------------------------------------------------------------------------------- ssm
def test_ssm_quick_sweep_checks_times_and_reports_bandwidth(tmp_path):
    code = run.main([*QUICK, "--provider", "flashops-torch,naive-materialized", "--op", "ssm", "--out",
                     str(tmp_path), "--no-memory"])
    rows = _rows(tmp_path / "quick.csv")
    assert code == 0
    assert {r["op"] for r in rows} == {"linear_scan", "selective_scan", "vandermonde_kernel", "cauchy_kernel",
                                       "s4d_conv"}
    status = [r for r in rows if r["metric"] == "status"]
    assert status and {r["value"] for r in status} == {OK}, [(r["op"], r["note"]) for r in status]
    # The scans are memory bound: GB/s follows the stated byte counts (fwd 3*B*D*L*4 for fp32 linear_scan).
    for r in rows:
        if r["op"] == "linear_scan" and r["metric"] == "gb_per_s" and r["mode"] == "fwd":
            ms = next(float(x["value"]) for x in rows if x["metric"] == "time_ms" and
                      (x["op"], x["shape"], x["mode"], x["provider"]) == (r["op"], r["shape"], "fwd", r["provider"]))
            n = int(r["B"]) * int(r["D"]) * int(r["L"])
            assert math.isclose(float(r["value"]), 3 * n * 4 / (ms * 1e-3) / 1e9, rel_tol=1e-6)
    assert any(r["metric"] == "gb_per_s" for r in rows)


def test_memory_sweep_of_the_vandermonde_kernel(tmp_path):
    code, rows = _quick("vandermonde_kernel", tmp_path, "--memory-only", "--set", "L=2048", "--provider",
                        "flashops-torch,naive-materialized,reference")
    assert code == 0
    mem = {r["provider"]: float(r["value"]) for r in rows if r["metric"] == "mem_scaling_mib"}
    assert set(mem) == {"flashops-torch", "naive-materialized", "reference"}
    # The materialized [H, N, L] powers alone are 8 * 32 * 2048 complex64 values (4 MiB).
    assert mem["naive-materialized"] >= 8 * 32 * 2048 * 8 / 2**20


# ------------------------------------------------------------------------------------------ recurrent steps
def test_recurrent_steps_quick_sweep_checks_and_reports_bandwidth(tmp_path):
    code, rows = _quick("recurrent_steps", tmp_path, "--no-memory")
    assert code == 0
    assert {r["op"] for r in rows} == {"lightning_attention_step", "gated_linear_attention_step",
                                       "selective_state_update"}
    status = [r for r in rows if r["metric"] == "status"]
    assert status and {r["value"] for r in status} == {OK}, [(r["op"], r["note"]) for r in status]
    for r in rows:  # GB/s follows the stated bytes: the fp32 state read and written dominate
        if r["metric"] == "gb_per_s":
            ms = next(float(x["value"]) for x in rows if x["metric"] == "time_ms" and
                      (x["op"], x["shape"], x["provider"]) == (r["op"], r["shape"], r["provider"]))
            if r["op"] == "selective_state_update":
                b, d, n = int(r["B"]), int(r["D"]), int(r["N"])
                moved = 8 * b * d * n + (4 * b * d + 2 * b * n) * 4 + 4 * (d * n + 2 * d)
            else:
                b, h, d = int(r["B"]), int(r["H"]), int(r["D"])
                moved = 8 * b * h * d * d + (5 if r["op"].startswith("gated") else 4) * b * h * d * 4
            assert math.isclose(float(r["value"]), moved / (ms * 1e-3) / 1e9, rel_tol=1e-6)
