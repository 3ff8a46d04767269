"""Record every Triton kernel launch the test suite makes under the interpreter, so that ``compile_for_gpu.py``
can compile the same kernels, with the same constexpr switches, for a real GPU target on a machine that has
none. The interpreter accepts code that the compiler rejects (Python globals, int methods on loop variables,
unsupported dot shapes); this closes that gap in CPU-only CI.

Two specs per launch of a ``flashops._triton_utils.Launcher``: the launch as the interpreter ran it (its small
tiles), and the same call with the config a GPU would run by default (the first candidate that fits the GPU's
resources, with its warps and stages; the others follow in ``fallbacks``): that one is what the resource report
and the spill check look at."""

from __future__ import annotations

import inspect
import json
import os

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_POINTER_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
    torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
    torch.bool: "*i1",
}


def _scalar_type(value):
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


def launch_spec(fn, args, kwargs, gpu_default: bool = False) -> dict:
    """{module, name, signature, constexprs, options, gpu_default} of one launch of the python kernel ``fn``."""
    params = inspect.signature(fn).parameters
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for name, value in bound.arguments.items():
        annotation = params[name].annotation
        is_constexpr = "constexpr" in str(annotation)
        if is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
        else:
            signature[name] = _scalar_type(value)
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options, "gpu_default": gpu_default}


def install_recorder(directory: str) -> None:
    """Patch the interpreter's launch entry point (every launch) and ``Launcher.run`` (to add the GPU default
    config of each call) to append each new spec to a per-process file."""
    from triton.runtime.interpreter import InterpretedFunction

    from flashops._triton_utils import Launcher

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"launches-{os.getpid()}.jsonl")
    seen = set()

    def record(fn, args, kwargs, gpu_default=False, fallbacks=()):
        if fn.__module__ in (None, "__main__"):
            return  # a kernel defined by exec (e.g. a docstring example): the compile check cannot import it
        try:
            spec = launch_spec(fn, args, kwargs, gpu_default)
            if gpu_default:
                spec["fallbacks"] = [launch_spec(fn, args, options, True) for options in fallbacks]
            spec = json.dumps(spec, sort_keys=True)
        except TypeError:
            return  # an argument type the compile check cannot express; the launch still runs
        if spec not in seen:
            seen.add(spec)
            with open(path, "a") as f:
                f.write(spec + "\n")

    interpreted_run = InterpretedFunction.run

    def run_interpreted(self, *args, grid, warmup, **kwargs):
        record(self.fn, args, kwargs)
        return interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    launcher_run = Launcher.run

    def run_launcher(self, cfg, grid, args):
        # A GPU runs the first candidate that fits its resources: record them all, the compile step stops at the
        # first that fits.
        chain = [{**self.kernel_arguments(c, args), "num_warps": c.num_warps, "num_stages": c.num_stages}
                 for c in self.candidates(args)]
        record(self.fn.fn, (), chain[0], gpu_default=True, fallbacks=chain[1:])
        return launcher_run(self, cfg, grid, args)

    InterpretedFunction.run = run_interpreted
    Launcher.run = run_launcher
