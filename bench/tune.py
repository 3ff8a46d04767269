"""``python -m bench.tune``: time every Triton kernel's candidate configs on the GPU at hand and write the table that
the launch helper reads first (``flashops/configs/<device>.json``, e.g. ``nvidia-h200.json``).

    python -m bench.tune                                   # every op's full sweep, the table of this GPU
    python -m bench.tune --op flash_attention --set D=128  # some cases; the table's other entries are kept
    python -m bench.tune --out /tmp/t.json --max-configs 2 # a smoke run (on a CPU: under the Triton interpreter)

Every case of the sweep runs its op's Triton provider forward and, where the op has gradients, backward once inside
a tuning session (``flashops._triton_utils.tuning``): the first launch of a kernel for a shape class (its autotune
key and input dtype) times each candidate config (``triton.testing.do_bench``) and keeps the fastest. Entries of
an existing table that this run measured are replaced, the others kept. The table is reviewed like code: commit
the diff with the numbers (``ms``) it shows.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton runs on a CPU only under its interpreter

from flashops import _triton_utils  # noqa: E402
from flashops._triton_utils import CONFIGS_DIR, TunedTable, device_slug, tuning  # noqa: E402

from . import measure  # noqa: E402
from .registry import Case, Op, load_ops, name_matches  # noqa: E402
from .run import _keep, _names, _param_filters  # noqa: E402

PROVIDER = "flashops-triton"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", help="comma-separated op or family names (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2", help="keep only these cases")
    p.add_argument("--sweep", choices=("quick", "full"), help="default: full on a GPU, quick on a CPU")
    p.add_argument("--out", help="table to write (default: flashops/configs/<device>.json)")
    p.add_argument("--max-configs", type=int, help="time only the first N candidates of each kernel")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _run_case(op: Op, case: Case, device: torch.device, seed: int) -> None:
    """The Triton provider forward, then backward where the op has gradients (every kernel a training step runs)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    backward = bool(op.differentiable) and any("bwd" in mode for mode in case.modes)
    inputs = measure.prepare_inputs(op, op.make_inputs(case, device, generator), requires_grad=backward)
    outs = measure.named_outputs(op, op.provider(PROVIDER).run(inputs, case))
    if backward and measure.differentiable_outputs(outs):
        measure.grads(op, inputs, outs, measure.make_douts(outs, generator))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sweep = args.sweep or ("full" if device.type == "cuda" else "quick")
    slug = device_slug(device if device.type == "cuda" else None)
    path = Path(args.out) if args.out else CONFIGS_DIR / f"{slug}.json"
    import triton

    measured = TunedTable(slug, torch_version=torch.__version__, triton_version=triton.__version__)
    patterns, filters = _names(args.op), _param_filters(args.set)
    ops = [op for op in load_ops().ops if name_matches(op.name, patterns) or name_matches(op.family, patterns)]
    ran = 0
    with tuning(measured, max_configs=args.max_configs) as session:
        for op in ops:
            if PROVIDER not in [p.name for p in op.providers]:
                continue
            for case in op.cases(sweep, device):
                if not _keep(case, filters):
                    continue
                reason = op.provider(PROVIDER).supports(case, "fwd", device)
                if reason:
                    print(f"skip {op.name} {case.shape} {case.dtype_name}: {reason}")
                    continue
                print(f"tuning {op.name} {case.shape} {case.dtype_name}", flush=True)
                _run_case(op, case, device, args.seed)
                ran += 1
    if not measured.kernels:
        print("nothing tuned: no case ran a Triton kernel", file=sys.stderr)
        return 1
    table = TunedTable.read(path) if path.is_file() else TunedTable(slug)
    for kernel, entries in measured.kernels.items():
        for entry in entries.values():
            table.add(kernel, entry["key"], entry["config"], entry["ms"])
    table.device, table.torch_version, table.triton_version = slug, measured.torch_version, measured.triton_version
    table.write(path)
    _triton_utils._TABLES.clear()  # a later launch in this process reads the new table
    count = sum(len(entries) for entries in measured.kernels.values())
    print(f"{ran} cases, {count} shape classes of {len(measured.kernels)} kernels tuned -> {path}")
    for failure in session.failures:
        print(f"  config skipped: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
