"""``python -m bench.tune``: a tuning run (under the interpreter on a CPU, on tiny shapes) writes a reviewable table
that the launch helper then uses, and the op stays correct with it."""

import json

import torch

import flashops
from bench import tune
from flashops._triton_utils import TunedTable
from flashops.ops.ssm import reference

from .conftest import DEVICE
from .helpers import require


def test_tune_writes_a_table_that_the_kernels_then_use(tmp_path, monkeypatch):
    require("vandermonde_kernel", "triton")
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "old", "kernels": {"other_kernel": [
        {"config": {"num_stages": 1, "num_warps": 1}, "key": {"X": 1}, "ms": 1.0}]}}))
    assert tune.main(["--op", "vandermonde_kernel", "--out", str(path), "--max-configs", "1"]) == 0
    table = TunedTable.read(path)
    assert set(table.kernels) == {"other_kernel", "conv_vandermonde_fwd_kernel", "conv_vandermonde_bwd_kernel"}
    entry = next(iter(table.kernels["conv_vandermonde_fwd_kernel"].values()))
    assert entry["config"] == {"num_stages": 1, "num_warps": 4} and entry["ms"] > 0
    assert entry["key"]["dtype"] == "float32" and {"BLOCK_C", "BLOCK_N", "BLOCK_L"} <= set(entry["key"])

    monkeypatch.setenv("FLASHOPS_TUNED_CONFIGS", str(path))
    log_z = torch.complex(-torch.rand(8, 8), torch.randn(8, 8)).to(DEVICE)
    w = torch.randn(8, 8, dtype=torch.complex64, device=DEVICE)
    k = flashops.vandermonde_kernel(log_z, w, 128, backend="triton")
    expected = reference.vandermonde(log_z, w[None], 128)[0]
    torch.testing.assert_close(k, expected, rtol=1e-4, atol=1e-4)
