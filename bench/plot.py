"""``python -m bench.plot FILE... [--out DIR]``: PNG charts from results files (CSV or JSON).

Speed: TFLOP/s (GFLOP/s when no rate reaches 1 TFLOP/s) and time vs the swept size (T) per (op, mode, dtype), one
panel per fixed-parameter set (e.g. causal, head dim), one line per provider, the time's interquartile range as an
error bar at each point; only correct (OK) results have points. Memory: peak memory of
forward + backward vs T per op, one line per provider, log-log. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from .results import read_rows

MISSING = ("plotting needs matplotlib, which is not installed: `pip install matplotlib` (or "
           "`pip install flashops[bench]`), then `python -m bench.plot <results.csv>`")
SPEED_METRICS = {"tflops": "TFLOP/s", "gb_per_s": "GB/s", "time_ms": "time (ms)"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _x(row) -> float:
    return float(row[row["x_name"]])


def _figure(plt, n_panels: int):
    cols = min(n_panels, 4)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 8.0), 3.4 * rows), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _size(value, _=None) -> str:
    return f"{value / 1024:g}k" if value >= 1024 else f"{value:g}"


def _draw(plt, groups: dict, title: str, ylabel: str, path: Path, log_y: bool, colors: dict,
          spreads: dict = None) -> Path:
    """groups: panel -> provider -> [(x, y, x_name)]; spreads: (panel, provider, x) -> (low, high), drawn as an
    error bar at each point (the interquartile range of a timing)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = sorted(groups)
    fig, axes = _figure(plt, len(panels))
    handles = {}
    for ax, panel in zip(axes, panels):
        xs = set()
        for provider in sorted(groups[panel]):
            points = sorted(groups[panel][provider])
            xs.update(p[0] for p in points)
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider,
                              color=colors[provider])
            bars = [(x, y, *(spreads or {})[(panel, provider, x)]) for x, y, _ in points
                    if (panel, provider, x) in (spreads or {})]
            if bars:
                ax.errorbar([b[0] for b in bars], [b[1] for b in bars], fmt="none", ecolor=colors[provider], capsize=3,
                            yerr=[[max(0.0, b[1] - b[2]) for b in bars], [max(0.0, b[3] - b[1]) for b in bars]])
            handles.setdefault(provider, line)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs))
        ax.xaxis.set_major_formatter(FuncFormatter(_size))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_title(panel or "", fontsize=9)
        ax.set_xlabel(next(iter(groups[panel].values()))[0][2] if groups[panel] else "")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) // 5), 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rows(rows: list, out_dir: Path) -> list:
    """Draw every chart the rows allow into ``out_dir``; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(MISSING, file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    several_devices = len({r["device"] for r in rows}) > 1
    written = []

    providers = sorted({r["provider"] for r in rows})
    palette = plt.get_cmap("tab10").colors
    colors = {p: palette[i % len(palette)] for i, p in enumerate(providers)}
    speed = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    memory = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    quartiles = defaultdict(dict)  # (op, mode, dtype, device) -> (panel, provider, x) -> {q1, q3}
    for r in rows:
        if r["status"] != "OK" or r["metric"] in ("status", "graph_status"):
            continue
        point = (_x(r), r["value"], r["x_name"])
        if r["suite"] == "speed" and r["metric"] in SPEED_METRICS:
            speed[(r["op"], r["mode"], r["dtype"], r["device"], r["metric"])][r["panel"]][r["provider"]].append(point)
        elif r["suite"] == "speed" and r["metric"] in ("time_q1_ms", "time_q3_ms"):
            quartiles[(r["op"], r["mode"], r["dtype"], r["device"])].setdefault(
                (r["panel"], r["provider"], _x(r)), {})[r["metric"]] = r["value"]
        elif r["suite"] == "memory" and r["metric"] == "mem_scaling_mib":
            memory[(r["op"], r["dtype"], r["device"])][r["panel"]][r["provider"]].append(point)

    for (op, mode, dtype, device, metric), groups in sorted(speed.items()):
        name = f"{op}_{mode}_{dtype}_{metric}" + (f"_{_slug(device)}" if several_devices else "")
        label, spreads = SPEED_METRICS[metric], None
        if metric == "tflops" and max(p[1] for g in groups.values() for ps in g.values() for p in ps) < 1.0:
            label = "GFLOP/s"  # a CPU's rates, in a unit that reads
            groups = {panel: {provider: [(x, y * 1e3, n) for x, y, n in points] for provider, points in g.items()}
                      for panel, g in groups.items()}
        if metric == "time_ms":
            spreads = {key: (q["time_q1_ms"], q["time_q3_ms"])
                       for key, q in quartiles[(op, mode, dtype, device)].items() if len(q) == 2}
        written.append(_draw(plt, groups, f"{op} {mode} {dtype}: {label} ({device})", label,
                             out_dir / f"{_slug(name)}.png", log_y=metric == "time_ms", colors=colors, spreads=spreads))
    for (op, dtype, device), groups in sorted(memory.items()):
        name = f"memory_{op}_{dtype}" + (f"_{_slug(device)}" if several_devices else "")
        written.append(_draw(plt, groups, f"{op} {dtype}: peak memory of forward + backward ({device})",
                             "peak memory (MiB)", out_dir / f"{_slug(name)}.png", log_y=True, colors=colors))
    return written


def plot_files(paths, out_dir=None) -> list:
    rows = [row for path in paths for row in read_rows(Path(path))]
    out_dir = Path(out_dir) if out_dir else Path(paths[0]).parent
    written = plot_rows(rows, out_dir)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    p.add_argument("files", nargs="+", help="results files (CSV or JSON) written by python -m bench")
    p.add_argument("--out", help="folder for the PNGs (default: the first file's folder)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MISSING, file=sys.stderr)
        return 2
    plot_files(args.files, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
