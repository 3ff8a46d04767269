"""Results: one record per (op, case, provider, mode), written as long-format rows (CSV, JSON) and a table."""

from __future__ import annotations

import csv
import json
import math
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from .registry import Case

OK, WRONG, SKIP, OOM, ERROR = "OK", "WRONG", "SKIP", "OOM", "ERROR"

# metric name -> (Result attribute, table header, format)
METRICS = {
    "time_ms": ("ms", "ms", "{:.4g}"),
    "tflops": ("tflops", "TFLOP/s", "{:.3g}"),
    "gb_per_s": ("gbps", "GB/s", "{:.4g}"),
    "peak_mem_mib": ("mem_mib", "peak MiB", "{:.1f}"),
    "speedup_vs_best_peer": ("speedup", "vs best peer", "{:.2f}x"),
    "max_abs_err": ("max_err", "max err", "{:.2g}"),
    "err_bound": ("err_bound", "err bound", "{:.2g}"),
    "mem_scaling_mib": ("mem_mib", "peak MiB", "{:.1f}"),
}
COLUMNS = ("date", "device", "op", "family", "suite", "provider", "peer", "mode", "shape")
TRAILING = ("dtype", "metric", "value", "status", "note", "x_name", "panel", "sweep", "torch", "triton",
            "flashops")


@dataclass
class Result:
    op: str
    family: str
    provider: str
    peer: bool
    case: Case
    mode: str
    status: str
    note: str = ""
    suite: str = "speed"  # "speed" (the timing sweep) or "memory" (the memory-scaling sweep)
    x_name: str = "T"
    panels: tuple = ()
    ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None  # for ops that declare the bytes they must move (Op.bytes_moved)
    mem_mib: Optional[float] = None
    speedup: Optional[float] = None
    max_err: Optional[float] = None
    err_bound: Optional[float] = None
    extra: dict = field(default_factory=dict)  # the op's extra metrics (Op.extra_metrics), name -> value

    @property
    def panel(self) -> str:
        return " ".join(f"{k}={_plain(self.case.get(k))}" for k in self.panels)


def _plain(value):
    return int(value) if isinstance(value, bool) else value


# ----------------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A folder name for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-7b13``."""
    name = re.sub(r"\(\d+ threads\)", "", device_name(device))
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device, sweep: str) -> dict:
    import flashops

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "sweep": sweep,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flashops": flashops.__version__,
    }


# ------------------------------------------------------------------------------------------------ rows
def to_rows(results: list, env: dict) -> list:
    """Long format: one row per metric, plus one ``status`` row per result (its value is the status)."""
    rows = []
    for r in results:
        base = {
            "date": env["date"], "device": env["device"], "op": r.op, "family": r.family, "suite": r.suite,
            "provider": r.provider, "peer": r.peer, "mode": r.mode, "shape": r.case.shape,
            **{k: _plain(v) for k, v in r.case.params},
            "dtype": r.case.dtype_name, "status": r.status, "note": r.note, "x_name": r.x_name,
            "panel": r.panel, "sweep": env["sweep"], "torch": env["torch"], "triton": env["triton"],
            "flashops": env["flashops"],
        }
        rows.append({**base, "metric": "status", "value": r.status})
        for metric, (attr, _, _) in METRICS.items():
            if r.suite == "memory" and metric == "peak_mem_mib":
                continue
            if r.suite == "speed" and metric == "mem_scaling_mib":
                continue
            value = getattr(r, attr)
            if value is not None:
                rows.append({**base, "metric": metric, "value": float(value)})
        for metric, value in r.extra.items():
            rows.append({**base, "metric": metric, "value": float(value)})
    return rows


def _columns(rows: list) -> list:
    params = []
    for row in rows:
        for key in row:
            if key not in COLUMNS and key not in TRAILING and key not in params:
                params.append(key)
    return [*COLUMNS, *params, *TRAILING]


def write_csv(rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)


def write_json(rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
             for row in rows]
    with open(path, "w") as f:
        json.dump(clean, f, indent=1)


def read_rows(path: Path) -> list:
    """Rows of a CSV or JSON results file; numeric metric values as floats."""
    path = Path(path)
    if path.suffix == ".json":
        with open(path) as f:
            rows = json.load(f)
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    for row in rows:
        if row["metric"] != "status" and row["value"] not in (None, ""):
            row["value"] = float(row["value"])
    return rows


# ----------------------------------------------------------------------------------------------- table
def _cell(value, fmt) -> str:
    return "-" if value is None else fmt.format(value)


def _render(header: list, lines: list) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def table(results: list) -> str:
    """The speed sweep's correctness + timing table. A provider skipped in every case for the same reason is
    listed once under the table instead of on every line."""
    speed = [r for r in results if r.suite == "speed"]
    reasons = {}
    for r in speed:
        reasons.setdefault((r.op, r.provider), set()).add((r.status, r.note) if r.status == SKIP else None)
    skipped_everywhere = {key: next(iter(v))[1] for key, v in reasons.items() if len(v) == 1 and None not in v}

    header = ["op", "mode", "shape", "dtype", "provider", "ms", "TFLOP/s", "peak MiB", "vs best peer",
              "max err", "status"]
    bandwidth = any(r.gbps is not None for r in speed)
    if bandwidth:
        header.insert(7, "GB/s")
    extras = any(r.extra for r in speed)
    if extras:
        header.insert(-1, "extra")
    lines = []
    for r in speed:
        if (r.op, r.provider) in skipped_everywhere:
            continue
        status = r.status if r.status == OK or not r.note else f"{r.status}: {r.note}"
        line = [r.op, r.mode, r.case.shape, r.case.dtype_name, r.provider, _cell(r.ms, "{:.4g}"),
                _cell(r.tflops, "{:.3g}"), _cell(r.mem_mib, "{:.1f}"), _cell(r.speedup, "{:.2f}x"),
                _cell(r.max_err, "{:.2g}"), status]
        if bandwidth:
            line.insert(7, _cell(r.gbps, "{:.4g}"))
        if extras:
            line.insert(-1, " ".join(f"{k}={v:.3g}" for k, v in r.extra.items()) or "-")
        lines.append(line)
    text = [_render(header, lines)] if lines else ["(no speed results)"]
    notes = sorted({r.note for r in speed if r.status == OK and r.note})
    if notes:
        text.append("checks: " + "; ".join(notes))
    for (op, provider), reason in sorted(skipped_everywhere.items()):
        text.append(f"skipped {provider} ({op}): {reason}")
    return "\n".join(text)


def memory_table(results: list) -> str:
    memory = [r for r in results if r.suite == "memory"]
    if not memory:
        return ""
    header = ["op", "mode", "shape", "dtype", "provider", "peak MiB", "status"]
    lines = [[r.op, r.mode, r.case.shape, r.case.dtype_name, r.provider, _cell(r.mem_mib, "{:.1f}"),
              r.status if r.status == OK else f"{r.status}: {r.note}"] for r in memory]
    methods = sorted({r.note for r in memory if r.status == OK and r.note})
    return "\n".join(["memory scaling (peak memory of one forward + backward):", _render(header, lines),
                      *[f"measured as: {m}" for m in methods]])
