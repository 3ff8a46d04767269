"""Record every Triton kernel launch the test suite makes under the interpreter, so that
``compile_for_gpu.py`` can compile the same kernels, with the same constexpr switches, for a real GPU
target on a machine that has none. The interpreter accepts code that the compiler rejects (Python globals,
int methods on loop variables, unsupported dot shapes); this closes that gap in CPU-only CI."""

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


def launch_spec(fn, args, kwargs) -> dict:
    """{module, name, signature, constexprs, options} of one launch of the python kernel function ``fn``."""
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
            "options": options}


def install_recorder(directory: str) -> None:
    """Patch the interpreter's launch entry point to append each new launch spec to a per-process file."""
    from triton.runtime.interpreter import InterpretedFunction

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"launches-{os.getpid()}.jsonl")
    seen = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            spec = json.dumps(launch_spec(self.fn, args, kwargs), sort_keys=True)
        except TypeError:
            spec = None  # an argument type the compile check cannot express; the launch still runs
        if spec is not None and spec not in seen:
            seen.add(spec)
            with open(path, "a") as f:
                f.write(spec + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
