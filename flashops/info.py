"""``python -m flashops.info``: what runs where, on one screen; ``--verbose`` for every op, device and dtype.

The summary never builds the C++ extension: it says whether a build is there to load, and which backend
each op would take once it is. ``--verbose`` loads it (building it on first use) and lists every backend's
reasons for declining.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

import torch

import flashops

from . import _cuda, _dispatch, _ext
from ._triton_utils import interpreter_enabled, triton_import_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def _describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return (f"{dev}: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                f"{props.multi_processor_count} SMs")
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def extension_summary() -> str:
    """The C++ extension's state in one line, without loading or building it."""
    if _ext.disabled() or _ext._state is not None:
        return _ext.status()
    if importlib.util.find_spec(f"{flashops.__name__}._C") is not None:
        return "prebuilt flashops._C found (loaded on first use)"
    build = _ext.build_directory()
    if build.is_dir() and any(build.glob("*.so")):
        return f"built earlier, cached in {build} (loaded on first use)"
    return f"not built: built on first use (about 30 s, needs a C++ compiler and ninja) in {build}"


def _chosen(op: str, device, dtype) -> str:
    """The backend that would run ``op`` (a typical call) on device/dtype, e.g. "torch" or "torch; cpp once
    the C++ extension is loaded"; "-" when the op has no probe, "none" when nothing accepts."""
    request = _dispatch.probe(op, device, dtype)
    if request is None:
        return "-"
    pending = None
    for backend, reasons in _dispatch.explain(op, request):
        if reasons == [_ext.NOT_LOADED]:
            pending = pending or backend.name
        elif not reasons and not backend.forced_only:
            return backend.name if pending is None else f"{backend.name}; {pending} once the C++ extension is loaded"
    return "none"


def summary() -> str:
    """One screen: versions, the device used by default, the extension, the backend per op and dtype."""
    device = devices()[-1] if torch.cuda.is_available() else devices()[0]
    lines = [
        f"flashops {flashops.__version__} | torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) | "
        f"triton {_triton_version()} | python {platform.python_version()}",
        f"device   {_describe_device(device)}" + ("" if device.type == "cuda" else " (no CUDA device)"),
        f"C++ ext  {extension_summary()}",
        f"CUDA ext {_cuda.status()}",
        "",
        f"backend per op on {device}, for {', '.join(_dtype_name(d) for d in DTYPES)} unless shown "
        f"(the first backend that accepts the inputs runs):",
    ]
    width = max(len(op) for op in _dispatch.ops())
    with _ext.without_building():
        for op in _dispatch.ops():
            chosen = {dtype: _chosen(op, device, dtype) for dtype in DTYPES}
            if len(set(chosen.values())) == 1:
                text = chosen[DTYPES[0]]
            else:
                text = " | ".join(f"{_dtype_name(d)}: {name}" for d, name in chosen.items())
            lines.append(f"  {op:{width}s}  {text}")
    lines += ["", "hyper_attention runs on the attention backends; every op takes backend=... or FLASHOPS_BACKEND.",
              "python -m flashops.info --verbose: every device and dtype, and why each backend declines."]
    return "\n".join(lines)


def report() -> str:
    """Everything: versions and paths, every device, every op x device x dtype with every backend's reasons.
    Loads the C++ extension first (building it if needed) so that its backends answer for real."""
    _ext.load()
    lines = [
        f"flashops {flashops.__version__} ({flashops.__file__})",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {_triton_version()}",
        f"C++ ext  {_ext.status()}",
        f"CUDA ext {_cuda.status()}",
    ]
    lines += [f"device   {_describe_device(dev)}" for dev in devices()]
    lines.append("")
    lines.append("backends per op (first accepting backend runs; reasons for the others; 'forced only': runs "
                 "when asked for by backend= or FLASHOPS_BACKEND):")
    for op in _dispatch.ops():
        lines.append(f"  {op}")
        for dev in devices():
            for dtype in DTYPES:
                request = _dispatch.probe(op, dev, dtype)
                if request is None:
                    continue
                verdicts = _dispatch.explain(op, request)
                chosen = next((b.name for b, reasons in verdicts if not reasons and not b.forced_only), "none")
                declined = [f"{b.name}: {'; '.join(r)}" for b, r in verdicts if r]
                declined += [f"{b.name}: forced only, accepts" for b, r in verdicts if b.forced_only and not r]
                detail = f"  [{' | '.join(declined)}]" if declined else ""
                lines.append(f"    {str(dev):7s} {_dtype_name(dtype):9s} -> {chosen}{detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flashops.info", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every op, device and dtype with each backend's reasons (builds the C++ extension "
                             "if it is not built yet)")
    args = parser.parse_args(argv)
    print(report() if args.verbose else summary())


if __name__ == "__main__":
    main()
