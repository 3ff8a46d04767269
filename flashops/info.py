"""``python -m flashops.info``: versions, devices, and which backend would run each op where."""

from __future__ import annotations

import platform
import sys

import torch

import flashops

from . import _cuda, _dispatch, _ext
from ._triton_utils import interpreter_enabled, triton_import_error


def _triton_version() -> str:
    if triton_import_error():
        return f"unavailable ({triton_import_error()})"
    import triton

    return triton.__version__ + (" (interpreter: TRITON_INTERPRET=1)" if interpreter_enabled() else "")


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def report() -> str:
    _ext.load()  # the backend table below needs it (JIT-built on first use)
    lines = [
        f"flashops {flashops.__version__}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {_triton_version()}",
        f"C++ ext  {_ext.status()}",
        f"CUDA ext {_cuda.status()}",
    ]
    for dev in devices():
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            lines.append(f"device   {dev}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                         f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs")
        else:
            lines.append(f"device   cpu: {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads")
    lines.append("")
    lines.append("backends per op (first accepting backend runs; reasons for the others; 'forced only': runs "
                 "when asked for by backend= or FLASHOPS_BACKEND):")
    for op in _dispatch.ops():
        lines.append(f"  {op}")
        for dev in devices():
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                request = _dispatch.probe(op, dev, dtype)
                if request is None:
                    continue
                verdicts = _dispatch.explain(op, request)
                chosen = next((b.name for b, reasons in verdicts if not reasons and not b.forced_only), "none")
                declined = [f"{b.name}: {'; '.join(r)}" for b, r in verdicts if r]
                declined += [f"{b.name}: forced only, accepts" for b, r in verdicts if b.forced_only and not r]
                detail = f"  [{' | '.join(declined)}]" if declined else ""
                lines.append(f"    {str(dev):7s} {str(dtype).replace('torch.', ''):9s} -> {chosen}{detail}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
