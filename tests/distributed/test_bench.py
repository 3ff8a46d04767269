"""The context-parallel benchmark under torchrun (2 CPU ranks, gloo): every case checks and times on both ranks,
and the bytes each rank sends equal the formulas: the ring's grow with T, LASP-2's do not (the paper's claim)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPS = ("ring_attention", "ulysses_attention", "lasp2_attention", "lasp2_gla")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_torchrun_two_ranks(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bench",
               "--quick", "--device", "cpu", "--op", ",".join(OPS), "--provider", "flashops-torch", "--mode", "fwd",
               "--no-progress", "--warmup-ms", "0", "--rep-ms", "1", "--threads", "1", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        rows = _rows(tmp_path / f"quick-rank{rank}of2.csv")
        status = {(r["op"], r["T"]): r["value"] for r in rows if r["metric"] == "status"}
        assert set(op for op, _ in status) == set(OPS) and set(status.values()) == {"OK"}, status
        metric = {(r["op"], r["T"], r["metric"]): float(r["value"]) for r in rows if r["metric"] != "status"}
        lengths = sorted({int(t) for _, t in status})
        for op in OPS:
            for t in lengths:
                for way in ("fwd", "bwd"):
                    sent, formula = metric[op, str(t), f"sent_MB_{way}"], metric[op, str(t), f"formula_MB_{way}"]
                    assert sent > 0 and abs(sent - formula) <= 1e-9 * formula, (op, t, way, sent, formula)
                assert metric[op, str(t), "time_ms"] > 0
        short, long = (str(t) for t in (lengths[0], lengths[-1]))
        for op in ("lasp2_attention", "lasp2_gla"):
            assert metric[op, short, "sent_MB_fwd"] == metric[op, long, "sent_MB_fwd"]
        assert metric["ring_attention", long, "sent_MB_fwd"] == (
            metric["ring_attention", short, "sent_MB_fwd"] * int(long) / int(short))
