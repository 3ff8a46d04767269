"""python -m flashops.info and the tolerance rule of flashops.testing."""

import subprocess
import sys

import pytest
import torch

from flashops import testing
from flashops.info import report


def test_info_reports_versions_and_backends():
    text = report()
    assert f"torch    {torch.__version__}" in text
    assert "attention" in text and "-> " in text


def test_info_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "flashops.info"], capture_output=True, text=True, check=True).stdout
    assert "backends per op" in out


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
