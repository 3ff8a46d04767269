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

from .measure import Samples
from .registry import Case

OK, WRONG, SKIP, OOM, ERROR = "OK", "WRONG", "SKIP", "OOM", "ERROR"
BUDGET_SPENT = "not run: the --time-budget was spent"

# metric name -> Result attribute, for the scalar metrics (the timings' spreads are written by _timing_rows)
METRICS = {
    "tflops": "tflops",
    "gb_per_s": "gbps",
    "peak_mem_mib": "mem_mib",
    "speedup_vs_best_peer": "speedup",
    "speedup_low": "speedup_low",
    "speedup_high": "speedup_high",
    "max_abs_err": "max_err",
    "err_bound": "err_bound",
    "mem_scaling_mib": "mem_mib",
    "bytes_read": "bytes_read",
    "bytes_written": "bytes_written",
    "bytes_min": "bytes_min",
    "bytes_bound": "bytes_bound",
}
# The spread of a timing: metric suffix -> Samples attribute (time_ms is the median)
SPREAD = {"": "median", "_min": "minimum", "_q1": "q1", "_q3": "q3", "_max": "maximum"}
COLUMNS = ("date", "device", "op", "family", "suite", "provider", "peer", "mode", "shape")
TRAILING = ("dtype", "metric", "value", "status", "note", "x_name", "panel", "sweep", "clock", "torch", "triton",
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
    samples: Optional[Samples] = None  # the timed calls (ms); the table and the CSV report their spread
    graph_samples: Optional[Samples] = None  # the same call replayed from a CUDA graph (host overhead removed)
    graph_note: str = ""  # why there is no CUDA-graph timing, when one was asked for
    tflops: Optional[float] = None
    gbps: Optional[float] = None  # for ops that declare the bytes they must move (Op.bytes_moved)
    mem_mib: Optional[float] = None
    # time of the fastest correct peer / this time (medians), and the same ratio at the far ends of the two
    # interquartile ranges; tie: the ranges overlap, so the comparison is within the noise
    speedup: Optional[float] = None
    speedup_low: Optional[float] = None
    speedup_high: Optional[float] = None
    tie: Optional[bool] = None
    max_err: Optional[float] = None
    err_bound: Optional[float] = None
    # global-memory traffic counted under the Triton interpreter (suite "traffic"), the minimum (every input
    # read once, every output written once) and, where an op states one, a lower bound for any algorithm
    bytes_read: Optional[int] = None
    bytes_written: Optional[int] = None
    bytes_min: Optional[float] = None
    bytes_bound: Optional[float] = None
    extra: dict = field(default_factory=dict)  # the op's extra metrics (Op.extra_metrics), name -> value

    @property
    def ms(self) -> Optional[float]:
        return None if self.samples is None else self.samples.median

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


def environment(device: torch.device, sweep: str, clock: str = "") -> dict:
    import flashops

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "sweep": sweep,
        "clock": clock,
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
            "panel": r.panel, "sweep": env["sweep"], "clock": env.get("clock", ""), "torch": env["torch"],
            "triton": env["triton"],
            "flashops": env["flashops"],
        }
        rows.append({**base, "metric": "status", "value": r.status})
        rows += _timing_rows(base, "time", r.samples)
        rows += _timing_rows(base, "graph_time", r.graph_samples)
        if r.graph_note:
            rows.append({**base, "metric": "graph_status", "value": SKIP, "note": r.graph_note})
        for metric, attr in METRICS.items():
            if attr == "mem_mib" and metric != ("mem_scaling_mib" if r.suite == "memory" else "peak_mem_mib"):
                continue  # one attribute, two metrics: peak memory of a timed call, or of the memory sweep
            value = getattr(r, attr)
            if value is not None:
                rows.append({**base, "metric": metric, "value": float(value)})
        if r.tie is not None:
            rows.append({**base, "metric": "speedup_tie", "value": float(r.tie)})
        for metric, value in r.extra.items():
            rows.append({**base, "metric": metric, "value": float(value)})
    return rows


def _timing_rows(base: dict, name: str, samples: Optional[Samples]) -> list:
    if samples is None:
        return []
    rows = [{**base, "metric": f"{name}{suffix}_ms", "value": float(getattr(samples, attr))}
            for suffix, attr in SPREAD.items()]
    return rows + [{**base, "metric": f"{name}_reps", "value": float(len(samples.times))}]


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


def write_results(rows: list, path: Path) -> Optional[Path]:
    """Write ``rows`` to ``path`` (CSV or JSON by its suffix) without losing what was there: an existing file is
    first renamed after the date of its own rows (``quick.csv`` -> ``quick.20261123T101500.csv``). Returns that
    new name, or ``None`` when there was nothing to keep. Refuses to write no rows at all."""
    if not rows:
        raise ValueError(f"refusing to write an empty results file to {path}")
    path = Path(path)
    kept = None
    if path.exists():
        kept = _free_name(path, _file_date(path))
        path.rename(kept)
    (write_json if path.suffix == ".json" else write_csv)(rows, path)
    return kept


def _file_date(path: Path) -> str:
    """The date of a results file's first row as ``20261123T101500``, else its modification time."""
    try:
        date = read_rows(path)[0]["date"]
    except Exception:  # noqa: BLE001 - not a results file, or an empty one: its mtime names it
        date = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return re.sub(r"[^0-9T]", "", date)[:15]


def _free_name(path: Path, date: str) -> Path:
    candidate = path.with_name(f"{path.stem}.{date}{path.suffix}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{date}-{n}{path.suffix}")
        n += 1
    return candidate


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
        if not row["metric"].endswith("status") and row["value"] not in (None, ""):
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


def flop_unit(results: list) -> tuple:
    """(header, scale) for FLOP rates: TFLOP/s, or GFLOP/s when every rate is below 1 TFLOP/s (a CPU)."""
    rates = [r.tflops for r in results if r.tflops]
    return ("TFLOP/s", 1.0) if rates and max(rates) >= 1.0 else ("GFLOP/s", 1e3)


def _spread_cells(samples: Optional[Samples]) -> list:
    """[min-max, IQR as a share of the median] of a timing."""
    if samples is None:
        return ["-", "-"]
    iqr = 100 * (samples.q3 - samples.q1) / samples.median
    return [f"{samples.minimum:.3g}-{samples.maximum:.3g}", f"{iqr:.0f}%" if iqr >= 1 else "<1%"]


def _speedup_cell(r: Result) -> str:
    if r.speedup is None:
        return "-"
    return f"{r.speedup:.2f}x" + (" tie" if r.tie else "")


def table(results: list) -> str:
    """The speed sweep's correctness + timing table: every time as its median with its spread (min-max, and the
    interquartile range as a share of the median); a speedup whose interquartile ranges overlap the best peer's
    is marked ``tie``. A provider skipped in every case for the same reason is listed once under the table."""
    speed = [r for r in results if r.suite == "speed"]
    reasons = {}
    for r in speed:
        reasons.setdefault((r.op, r.provider), set()).add((r.status, r.note) if r.status == SKIP else None)
    skipped_everywhere = {key: next(iter(v))[1] for key, v in reasons.items() if len(v) == 1 and None not in v}

    unit, scale = flop_unit(speed)
    header = ["op", "mode", "shape", "dtype", "provider", "ms", "min-max", "IQR", unit, "peak MiB",
              "vs best peer", "max err", "status"]
    graphs = any(r.graph_samples is not None for r in speed)
    if graphs:
        header.insert(8, "graph ms")
    bandwidth = any(r.gbps is not None for r in speed)
    if bandwidth:
        header.insert(header.index(unit) + 1, "GB/s")
    extras = any(r.extra for r in speed)
    if extras:
        header.insert(-1, "extra")
    lines = []
    for r in speed:
        if (r.op, r.provider) in skipped_everywhere:
            continue
        status = r.status if r.status == OK or not r.note else f"{r.status}: {r.note}"
        line = [r.op, r.mode, r.case.shape, r.case.dtype_name, r.provider, _cell(r.ms, "{:.4g}"),
                *_spread_cells(r.samples), _cell(r.tflops and r.tflops * scale, "{:.3g}"), _cell(r.mem_mib, "{:.1f}"),
                _speedup_cell(r), _cell(r.max_err, "{:.2g}"), status]
        if graphs:
            line.insert(8, _cell(r.graph_samples and r.graph_samples.median, "{:.4g}"))
        if bandwidth:
            line.insert(header.index("GB/s"), _cell(r.gbps, "{:.4g}"))
        if extras:
            line.insert(-1, " ".join(f"{k}={v:.3g}" for k, v in r.extra.items()) or "-")
        lines.append(line)
    text = [_render(header, lines)] if lines else ["(no speed results)"]
    notes = sorted({r.note for r in speed if r.status == OK and r.note})
    if notes:
        text.append("checks: " + "; ".join(notes))
    graph_notes = sorted({r.graph_note for r in speed if r.graph_note})
    if graph_notes:
        text.append("no CUDA-graph time: " + "; ".join(graph_notes))
    if any(r.tie for r in speed):
        text.append("tie: the interquartile ranges of the two times overlap, the ratio is within the noise")
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
