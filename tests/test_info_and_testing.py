"""python -m flashops.info and the tolerance rule of flashops.testing."""

import subprocess
import sys

import pytest
import torch

from flashops import testing
from flashops.info import report, summary


def test_info_reports_versions_and_backends():
    text = report()
    assert f"torch    {torch.__version__}" in text
    assert "attention" in text and "-> " in text


def test_info_summary_fits_a_screen_and_builds_nothing(monkeypatch):
    from flashops import _dispatch, _ext

    monkeypatch.setattr(_ext, "_state", None)  # as in a fresh process: nothing loaded yet
    text = summary()
    assert _ext._state is None or _ext.disabled(), "the summary loaded or built the C++ extension"
    lines = text.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 130
    assert lines[1].startswith("device   ") and lines[2].startswith("C++ ext  ")
    for op in _dispatch.ops():
        row = next(line for line in lines if line.strip().startswith(op + " "))
        assert "none" not in row.split()
    if not torch.cuda.is_available() and not _ext.disabled():  # on a CPU the scans await the C++ extension
        assert "linear_scan" in text and "cpp once the C++ extension is loaded" in text


def test_info_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "flashops.info"], capture_output=True, text=True, check=True).stdout
    assert "backend per op on" in out and "--verbose" in out


def test_rule_accepts_error_within_factor_of_baseline():
    ref = torch.randn(1000, dtype=torch.float64)
    baseline = ref.half().double()  # the same computation in low precision
    good = ref + 1.5 * (baseline - ref)
    bad = ref + 10 * (baseline - ref).abs().max()
    assert testing.compare("x", good.half(), ref, baseline.half(), factor=2.0).ok
    assert not testing.compare("x", bad.half(), ref, baseline.half(), factor=2.0).ok


def test_rule_rejects_nan_and_wrong_infinities():
    ref = torch.tensor([1.0, float("-inf"), 2.0])
    assert testing.compare("x", ref.clone(), ref).ok
    assert not testing.compare("x", torch.tensor([1.0, float("-inf"), float("nan")]), ref).ok
    assert not testing.compare("x", torch.tensor([1.0, 0.0, 2.0]), ref).ok
    with pytest.raises(AssertionError, match="error inf"):
        testing.assert_close("x", torch.tensor([1.0, float("inf"), 2.0]), ref)


def test_fp32_bound_is_tight():
    ref = torch.randn(100)
    assert testing.compare("x", ref + 1e-6, ref).ok
    assert not testing.compare("x", ref + 1e-2, ref).ok
