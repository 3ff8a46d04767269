"""One point of the CPU memory-scaling sweep, in its own process (see bench/memory.py).

    python -m bench.memprobe '{"op": ..., "provider": ..., "params": {...}, "dtype": "float32", "modes": [...]}'

Prints one JSON line: ``{"status": "OK", "peak_kib": ...}`` (peak resident memory of one forward + backward
above the resident memory just before it) or a status with a note.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from .measure import prepare_inputs
from .memory import find_provider, fwd_bwd
from .registry import Case, Unsupported, load_ops


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident size (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(spec_text: str) -> dict:
    torch.set_num_threads(1)
    spec = json.loads(spec_text)
    op = load_ops().op(spec["op"])
    provider = find_provider(op, spec["provider"])
    case = Case(op.name, tuple(spec["params"].items()), getattr(torch, spec["dtype"]), tuple(spec["modes"]))
    device = torch.device("cpu")
    inputs = prepare_inputs(op, op.make_inputs(case, device, torch.Generator(device=device).manual_seed(0)))
    try:
        fwd_bwd(op, provider, case, inputs)  # warmup: lazy initialisation must not count
        gc.collect()
        _reset_peak()
        before = _status_kib("VmRSS")
        result = fwd_bwd(op, provider, case, inputs)
        peak = _status_kib("VmHWM") - before
        del result
    except Unsupported as error:
        return {"status": "SKIP", "note": str(error)}
    except MemoryError as error:
        return {"status": "OOM", "note": str(error)[:200]}
    except Exception as error:  # a peer that rejects the input is a skip, a flashops failure an error
        status = "SKIP" if provider.errors_are_skips else "ERROR"
        return {"status": status, "note": f"{type(error).__name__}: {error}"[:300]}
    return {"status": "OK", "peak_kib": peak}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
