"""The CUDA kernels of ``csrc/cuda/``: compiled at run time by NVRTC, cached on disk, launched on torch's stream.

Nothing is compiled at install time. How a ``.cu`` file becomes a launched kernel:

1. A launcher module (``flashops/ops/<family>/cuda_*.py``) declares a :class:`Program`: one ``.cu`` file and the
   template instances it launches, as C++ name expressions (``flashops::linear_scan_kernel<128, 16, float, 1>``).
2. The first launch on a device compiles the whole file for that device's architecture (``sm_90a`` on Hopper,
   ``sm_XY`` otherwise) with NVRTC from cuda-python (``cuda.bindings.nvrtc``), every instance at once; the CUDA
   headers (``cuda_fp16.h``, ``cuda_bf16.h``) are found with ``cuda.pathfinder``. The cubin and the instances'
   mangled names are cached on disk (:func:`cache_directory`), keyed by a hash of the source, its local headers,
   the options, the NVRTC version, the architecture, the CUDA headers and the flashops version; the file is
   written under a temporary name and renamed, so processes that compile at the same time cannot see half a file.
3. The cubin is loaded into the device's primary context (the one torch uses) with ``cuModuleLoadData``.
4. A launch (:meth:`Kernel.__call__`) takes keyword arguments named as in the kernel's parameter list, which is
   read from the source itself: tensors become device pointers (their dtype checked against the instance's
   element type), ints and floats are packed at the parameter's C type, and ``cuLaunchKernel`` runs the kernel on
   torch's current stream. Dynamic shared memory above 48 KB is enabled per kernel first.

Without cuda-python, the NVRTC library, the CUDA headers, a CUDA build of torch or a driver that can run what
this NVRTC produces, :func:`unavailable_reasons` says which (``python -m flashops.info`` shows it) and the
``cuda`` backends decline with that reason. ``pip install "flashops[cuda]"`` brings the packages.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
# A clone or an editable install reads csrc/cuda; a wheel carries a copy inside the package (setup.py).
SOURCE_DIRECTORIES = (ROOT / "csrc" / "cuda", Path(__file__).resolve().parent / "_cuda_sources")
# Above this much dynamic shared memory a kernel must opt in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
DEFAULT_SHARED_LIMIT = 48 * 1024
MIN_CAPABILITY = (8, 0)
# The C types of kernel parameters and pointer elements, and what they take from Python.
ELEMENT_DTYPES = {"float": torch.float32, "__half": torch.float16, "__nv_bfloat16": torch.bfloat16,
                  "int": torch.int32, "int64": torch.int64, "long long": torch.int64}
C_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
SCALAR_KINDS = {"int": "i32", "int64": "i64", "long long": "i64", "float": "f32"}
_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


class CudaError(RuntimeError):
    """A CUDA driver or NVRTC call failed; the message names the call and the error."""


class CompileError(CudaError):
    """NVRTC rejected a program; the message carries the compiler's log."""


def source_directory() -> Optional[Path]:
    for directory in SOURCE_DIRECTORIES:
        if (directory / "common.cuh").is_file():
            return directory
    return None


def cache_directory() -> Path:
    """Where compiled cubins live: ``$FLASHOPS_CUDA_CACHE``, else ``$XDG_CACHE_HOME/flashops/cuda``, else
    ``~/.cache/flashops/cuda``. Deleting it is always safe (the next launch compiles again)."""
    explicit = os.environ.get("FLASHOPS_CUDA_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashops" / "cuda"


def arch_of(capability: tuple) -> str:
    """The compile target of a device: ``sm_90a`` for compute capability 9.0 (Hopper: wgmma, setmaxnreg need the
    ``a`` target), ``sm_<major><minor>`` otherwise."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


# ------------------------------------------------------------------------------------------- toolchain
@dataclass(frozen=True)
class Toolchain:
    nvrtc: object  # cuda.bindings.nvrtc
    nvrtc_version: tuple
    include_directory: str  # the CUDA headers NVRTC needs (cuda_fp16.h, cuda_bf16.h)


_lock = threading.RLock()
_toolchain_state: Optional[tuple] = None  # (Toolchain or None, reason)
_runtime_reasons: Optional[list] = None


def _find_toolchain() -> tuple:
    try:
        from cuda import pathfinder
        from cuda.bindings import nvrtc
    except ImportError as error:
        return None, (f"cuda-python is not installed ({error}); pip install \"flashops[cuda]\" "
                      f"(cuda-bindings, cuda-pathfinder, nvidia-cuda-nvrtc, nvidia-cuda-runtime)")
    try:
        result, major, minor = nvrtc.nvrtcVersion()
    except Exception as error:  # noqa: BLE001  (the library is loaded on the first call)
        return None, f"the NVRTC library cannot be loaded ({_first_line(error)}); pip install nvidia-cuda-nvrtc"
    if int(result) != 0:
        return None, f"nvrtcVersion failed ({result})"
    try:
        include = pathfinder.find_nvidia_header_directory("cudart")
    except Exception as error:  # noqa: BLE001
        include, detail = None, f" ({_first_line(error)})"
    else:
        detail = ""
    if not include or not (Path(include) / "cuda_fp16.h").is_file():
        return None, f"the CUDA headers (cuda_fp16.h) were not found{detail}; pip install nvidia-cuda-runtime"
    if source_directory() is None:
        return None, f"the CUDA sources are missing (looked in {', '.join(map(str, SOURCE_DIRECTORIES))})"
    return Toolchain(nvrtc, (major, minor), include), ""


def toolchain() -> Optional[Toolchain]:
    """NVRTC and the CUDA headers (compiling needs no GPU and no driver), or None: see :func:`compile_reason`."""
    global _toolchain_state
    with _lock:
        if _toolchain_state is None:
            _toolchain_state = _find_toolchain()
        return _toolchain_state[0]


def compile_reason() -> str:
    """Why :func:`toolchain` is None ("" when it is not)."""
    toolchain()
    return _toolchain_state[1]


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def version_reasons(nvrtc_version: tuple, driver_version: int) -> list:
    """Why cubins from this NVRTC cannot run on this driver (``cuDriverGetVersion``: 1000 major + 10 minor):
    NVRTC's major version must not exceed the CUDA version the driver supports."""
    driver_major, driver_minor = driver_version // 1000, (driver_version % 1000) // 10
    if nvrtc_version[0] > driver_major:
        return [f"NVRTC {nvrtc_version[0]}.{nvrtc_version[1]} builds code for CUDA {nvrtc_version[0]}, but the driver "
                f"runs CUDA {driver_major}.{driver_minor} at most: install nvidia-cuda-nvrtc (and cuda-bindings) "
                f"{driver_major}.x or a newer driver"]
    return []


def _driver_reasons(nvrtc_version: tuple) -> list:
    if torch.version.cuda is None:
        return [f"this torch build has no CUDA (torch {torch.__version__})"]
    if not torch.cuda.is_available():
        return ["torch sees no CUDA device"]
    try:
        from cuda.bindings import driver
        (result,) = driver.cuInit(0)
        _check(result, "cuInit")
        result, version = driver.cuDriverGetVersion()
        _check(result, "cuDriverGetVersion")
    except Exception as error:  # noqa: BLE001  (no libcuda, or a driver that cannot start)
        return [f"the CUDA driver cannot be used ({_first_line(error)})"]
    return version_reasons(nvrtc_version, version)


@torch.compiler.assume_constant_result
def unavailable_reasons() -> list:
    """[] when CUDA kernels can be compiled and launched here, else [why not] (checked once per process)."""
    global _runtime_reasons
    with _lock:
        if _runtime_reasons is None:
            tools = toolchain()
            _runtime_reasons = [compile_reason()] if tools is None else _driver_reasons(tools.nvrtc_version)
        return list(_runtime_reasons)


def device_reasons(device) -> list:
    """Why the CUDA kernels cannot run on ``device`` (empty: they can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return [f"CUDA tensors only, got {device}"]
    reasons = unavailable_reasons()
    if reasons:
        return reasons
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return [f"the CUDA kernels need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, "
                f"{device} has {capability[0]}.{capability[1]}"]
    return []


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(request) -> list:
    """The reasons a ``cuda`` backend declines a dispatch request (empty: it accepts)."""
    reasons = device_reasons(request.device)
    if request.dtype not in DTYPES:
        reasons = reasons + [f"the CUDA kernels take float16, bfloat16 and float32, got {request.dtype}"]
    return reasons


def status() -> str:
    """One line for ``python -m flashops.info``."""
    tools = toolchain()
    if tools is None:
        return f"unavailable: {compile_reason()}"
    nvrtc = f"NVRTC {tools.nvrtc_version[0]}.{tools.nvrtc_version[1]}"
    reasons = unavailable_reasons()
    if reasons:
        return f"{nvrtc}, compiles but cannot launch: {reasons[0]}"
    return f"ready ({nvrtc}), cache {cache_directory()}"


def _forget() -> None:
    """Look for the toolchain and the driver again on the next call (tests use it)."""
    global _toolchain_state, _runtime_reasons
    with _lock:
        _toolchain_state = None
        _runtime_reasons = None


# ------------------------------------------------------------------------------------ kernel signatures
@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``kind`` is "ptr", "i32", "i64" or "f32"; ``dtype`` the element type of a pointer
    (None when the kernel declares it as something else, e.g. ``void``)."""

    name: str
    kind: str
    dtype: Optional[torch.dtype] = None


_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_KERNEL = re.compile(r"template\s*<(?P<template>[^<>]*)>\s*__global__\s+void\s+"
                     r"(?:__launch_bounds__\s*\([^()]*\)\s*)?(?P<name>\w+)\s*\(")
_QUALIFIERS = {"const", "__restrict__", "volatile"}


def _split_top_level(text: str) -> list:
    """Split at commas that are not inside <>, (), []."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    last = "".join(current).strip()
    return parts + [last] if last else parts


def parse_kernels(source: str) -> dict:
    """``{name: (template parameter names, [(c type, is pointer, name), ...])}`` of every ``__global__`` template
    in ``source``. Kernels must be templates whose parameters are pointers, ``int``, ``int64`` or ``float``."""
    text = _COMMENTS.sub(" ", source)
    kernels = {}
    for match in _KERNEL.finditer(text):
        start = match.end()
        depth, end = 1, start
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        template = [part.split()[-1] for part in _split_top_level(match["template"])]
        params = []
        for declaration in _split_top_level(text[start:end - 1]):
            tokens = re.findall(r"[A-Za-z_]\w*|\*", declaration)
            pointer = "*" in tokens
            words = [t for t in tokens if t != "*" and t not in _QUALIFIERS]
            if len(words) < 2:
                raise ValueError(f"kernel {match['name']}: cannot read the parameter {declaration!r}")
            params.append((" ".join(words[:-1]), pointer, words[-1]))
        kernels[match["name"]] = (template, params)
    return kernels


def _template_arguments(expression: str) -> tuple:
    name, _, rest = expression.partition("<")
    if not rest.endswith(">"):
        raise ValueError(f"{expression!r} is not a template instance (name<arguments>)")
    return name.split("::")[-1].strip(), _split_top_level(rest[:-1])


def signature(kernels: dict, expression: str) -> list:
    """The :class:`Param` list of one template instance, template type parameters substituted."""
    name, arguments = _template_arguments(expression)
    if name not in kernels:
        raise ValueError(f"{expression!r}: no __global__ template {name!r} in the source")
    template, params = kernels[name]
    if len(arguments) != len(template):
        raise ValueError(f"{expression!r}: {name} takes {len(template)} template arguments, got {len(arguments)}")
    substitute = dict(zip(template, arguments))
    out = []
    for c_type, pointer, pname in params:
        resolved = substitute.get(c_type, c_type)
        if pointer:
            out.append(Param(pname, "ptr", ELEMENT_DTYPES.get(resolved)))
        elif resolved in SCALAR_KINDS:
            out.append(Param(pname, SCALAR_KINDS[resolved]))
        else:
            raise ValueError(f"{expression!r}: parameter {pname!r} has type {resolved!r}; kernels take pointers, "
                             f"int, int64 and float only")
    return out


# ------------------------------------------------------------------------------------------ arguments
@dataclass
class PackedArguments:
    """Kernel arguments as ``cuLaunchKernel`` takes them: ``pointers`` holds one address per parameter, each
    pointing into ``storage`` (an 8-byte slot per parameter, the value at its C size, little-endian)."""

    storage: ctypes.Array
    pointers: ctypes.Array
    device: torch.device

    @property
    def address(self) -> int:
        return ctypes.addressof(self.pointers)


_SLOT_FORMATS = {"ptr": "Q", "i64": "q", "i32": "i4x", "f32": "f4x"}


@dataclass(frozen=True)
class _Layout:
    """How a parameter list packs: the struct format of its slots and the ctypes array type that holds them
    (made once per kernel: creating a ctypes array type costs more than a launch)."""

    slot_format: str
    array: type

    @classmethod
    def of(cls, params: list) -> _Layout:
        return cls("<" + "".join(_SLOT_FORMATS[p.kind] for p in params), ctypes.c_uint64 * max(1, len(params)))


def pack_arguments(kernel_name: str, params: list, arguments: dict,
                   layout: Optional[_Layout] = None) -> PackedArguments:
    """Check ``arguments`` against ``params`` (every parameter given once, by name; tensor dtypes match the
    instance's element types; all tensors on one device; ints in range) and pack them."""
    if len(arguments) != len(params):
        _name_mismatch(kernel_name, params, arguments)
    values = []
    device = None
    for p in params:
        try:
            value = arguments[p.name]
        except KeyError:
            _name_mismatch(kernel_name, params, arguments)
        kind = p.kind
        if kind == "ptr":
            if value is None:
                values.append(0)  # a null pointer: the kernel treats the input as absent
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{kernel_name}: {p.name} must be a tensor or None, got {type(value).__name__}")
            if p.dtype is not None and value.dtype is not p.dtype:
                raise TypeError(f"{kernel_name}: {p.name} must have dtype {p.dtype}, got {value.dtype}")
            if device is None:
                device = value.device
            elif value.device != device:
                raise ValueError(f"{kernel_name}: {p.name} is on {value.device} but other arguments are on {device}")
            values.append(value.data_ptr())
        elif kind == "f32":
            if value.__class__ is not float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{kernel_name}: {p.name} must be a float, got {type(value).__name__}")
            values.append(value)
        else:
            if not isinstance(value, int):
                raise TypeError(f"{kernel_name}: {p.name} must be an int, got {type(value).__name__}")
            low, high = _INT32 if kind == "i32" else _INT64
            if not low <= value <= high:
                raise ValueError(f"{kernel_name}: {p.name}={value} does not fit the kernel's {kind}")
            values.append(value)
    if device is None:
        raise ValueError(f"{kernel_name}: no tensor among the arguments")
    layout = layout or _Layout.of(params)
    storage = layout.array()
    struct.pack_into(layout.slot_format, storage, 0, *values)
    base = ctypes.addressof(storage)
    pointers = layout.array(*range(base, base + 8 * len(storage), 8))
    return PackedArguments(storage, pointers, device)


def _name_mismatch(kernel_name: str, params: list, arguments: dict):
    names = [p.name for p in params]
    missing = [n for n in names if n not in arguments]
    unknown = sorted(set(arguments) - set(names))
    raise TypeError(f"{kernel_name}: missing arguments {missing}, unknown arguments {unknown}")


def launch_dimensions(grid, block) -> tuple:
    """(grid, block) as 3-tuples of positive ints within CUDA's limits."""
    def three(name, value, limits):
        dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not 1 <= len(dims) <= 3 or not all(isinstance(v, int) and v >= 1 for v in dims):
            raise ValueError(f"{name} must be 1 to 3 positive ints, got {value!r}")
        dims = dims + (1,) * (3 - len(dims))
        for v, limit, axis in zip(dims, limits, "xyz"):
            if v > limit:
                raise ValueError(f"{name}.{axis}={v} exceeds CUDA's limit {limit}")
        return dims

    grid3 = three("grid", grid, (2 ** 31 - 1, 65535, 65535))
    block3 = three("block", block, (1024, 1024, 64))
    if block3[0] * block3[1] * block3[2] > 1024:
        raise ValueError(f"block {block3} has more than 1024 threads")
    return grid3, block3


# --------------------------------------------------------------------------------------------- programs
@dataclass
class Compiled:
    """A program compiled for one architecture."""

    arch: str
    cubin: bytes
    lowered: dict  # name expression -> mangled name
    log: str  # NVRTC's log (with ptxas's resource report)

    def resources(self) -> dict:
        """{name expression: {registers, spill_stores, spill_loads, stack, shared}} from ptxas's report."""
        by_mangled = parse_resources(self.log)
        return {expr: by_mangled.get(mangled, {}) for expr, mangled in self.lowered.items()}


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_resources(log: str) -> dict:
    """{mangled name: {registers, spill_stores, spill_loads, stack, shared}} from ``--ptxas-options=-v`` output."""
    found, current = {}, None
    for line in log.splitlines():
        if (m := _PTXAS_ENTRY.search(line)):
            current = found.setdefault(m[1], {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                               "shared": 0})
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current.update(registers=int(m[1]), shared=int(m[2] or 0))
    return found


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
_PROGRAMS: dict = {}


def programs() -> list:
    """Every :class:`Program` declared so far (the launcher modules declare theirs at import)."""
    return list(_PROGRAMS.values())


class Program:
    """One ``.cu`` file under csrc/cuda/ and the template instances launched from it (C++ name expressions)."""

    def __init__(self, path: str, expressions):
        self.path = path
        self.expressions = tuple(dict.fromkeys(expressions))
        if not self.expressions:
            raise ValueError(f"{path}: a program needs at least one kernel instance")
        if path in _PROGRAMS:
            raise ValueError(f"{path} is already declared as a program")
        _PROGRAMS[path] = self
        self._compiled: dict = {}  # (arch, strict) -> Compiled
        self._modules: dict = {}  # (arch, device index) -> CUmodule
        self._kernels: dict = {}

    def _directory(self) -> Path:
        directory = source_directory()
        if directory is None:
            raise CudaError(f"the CUDA sources are missing (looked in {', '.join(map(str, SOURCE_DIRECTORIES))})")
        return directory

    def sources(self) -> list:
        """[(path relative to csrc/cuda, text)] of the file and every local header it includes, file first."""
        directory = self._directory()
        seen, order = set(), []

        def visit(relative: str):
            if relative in seen:
                return
            seen.add(relative)
            text = (directory / relative).read_text()
            order.append((relative, text))
            for name in _INCLUDE.findall(text):
                visit(name)

        visit(self.path)
        return order

    def kernels(self) -> dict:
        return parse_kernels(self.sources()[0][1])

    def kernel(self, expression: str) -> Kernel:
        """The launchable instance ``expression`` (one of the program's expressions)."""
        if expression not in self.expressions:
            raise ValueError(f"{expression!r} is not an instance of {self.path}; declare it in the Program")
        found = self._kernels.get(expression)
        if found is None:
            found = self._kernels[expression] = Kernel(self, expression, signature(self.kernels(), expression))
        return found

    def options(self, arch: str, strict: bool = False) -> list:
        tools = toolchain()
        if tools is None:
            raise CudaError(f"cannot compile {self.path}: {compile_reason()}")
        options = [f"--gpu-architecture={arch}", "-std=c++17", f"-I{tools.include_directory}",
                   f"-I{self._directory()}", "-lineinfo", "--ptxas-options=-v"]
        if strict:  # CI: warnings are errors, in the front end and in ptxas (spills included)
            options += ["--warning-as-error=all-warnings", "--ptxas-options=--warn-on-spills",
                        "--ptxas-options=--warning-as-error"]
        return options

    def cache_key(self, arch: str, options: list) -> str:
        from . import __version__

        tools = toolchain()
        headers = [(name, _file_digest(Path(tools.include_directory) / name))
                   for name in ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp")]
        blob = json.dumps({"sources": self.sources(), "expressions": self.expressions, "options": options,
                           "nvrtc": list(tools.nvrtc_version), "arch": arch, "cuda_headers": headers,
                           "flashops": __version__})
        return hashlib.sha256(blob.encode()).hexdigest()

    def compile(self, arch: str, strict: bool = False) -> Compiled:
        """The program compiled for ``arch``: from memory, from the disk cache, or by NVRTC now. ``strict``: the
        options of the CI check (warnings and spills are errors)."""
        with _lock:
            found = self._compiled.get((arch, strict))
            if found is None:
                options = self.options(arch, strict)
                key = self.cache_key(arch, options)
                path = cache_directory() / f"{Path(self.path).stem}-{arch}-{key[:24]}.json"
                found = _read_cache(path)
                if found is None:
                    found = _nvrtc_compile(self, arch, options)
                    _write_cache(path, found)
                self._compiled[(arch, strict)] = found
            return found

    def __repr__(self) -> str:
        return f"Program({self.path!r}, {len(self.expressions)} instances)"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def _read_cache(path: Path) -> Optional[Compiled]:
    try:
        data = json.loads(path.read_text())
        return Compiled(data["arch"], base64.b64decode(data["cubin"]), data["lowered"], data["log"])
    except (OSError, ValueError, KeyError):  # absent, or written by another version: compile again
        return None


def _write_cache(path: Path, compiled: Compiled) -> None:
    """Write atomically: a temporary file in the same directory, then os.replace (readers see all or nothing)."""
    data = {"arch": compiled.arch, "cubin": base64.b64encode(compiled.cubin).decode(), "lowered": compiled.lowered,
            "log": compiled.log}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:  # a read-only cache costs a compile per process, nothing else
        pass


def _nvrtc_log(nvrtc, program) -> str:
    result, size = nvrtc.nvrtcGetProgramLogSize(program)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(program, log)
    return log.rstrip(b"\x00 ").decode(errors="replace")


def _nvrtc_compile(program: Program, arch: str, options: list) -> Compiled:
    nvrtc = toolchain().nvrtc
    (relative, source), *_ = program.sources()
    result, handle = nvrtc.nvrtcCreateProgram(source.encode(), relative.encode(), 0, [], [])
    _check_nvrtc(nvrtc, result, "nvrtcCreateProgram")
    try:
        for expression in program.expressions:
            _check_nvrtc(nvrtc, nvrtc.nvrtcAddNameExpression(handle, expression.encode())[0], "nvrtcAddNameExpression")
        (result,) = nvrtc.nvrtcCompileProgram(handle, len(options), [o.encode() for o in options])
        log = _nvrtc_log(nvrtc, handle)
        if int(result) != 0:
            raise CompileError(f"NVRTC could not compile {program.path} for {arch} ({result}):\n{log}")
        lowered = {}
        for expression in program.expressions:
            result, name = nvrtc.nvrtcGetLoweredName(handle, expression.encode())
            _check_nvrtc(nvrtc, result, "nvrtcGetLoweredName")
            lowered[expression] = name.decode()
        result, size = nvrtc.nvrtcGetCUBINSize(handle)
        _check_nvrtc(nvrtc, result, "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(handle, cubin)[0], "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(handle)
    return Compiled(arch, cubin, lowered, log)


def _check_nvrtc(nvrtc, result, call: str) -> None:
    if int(result) != 0:
        raise CudaError(f"{call} failed: {nvrtc.nvrtcGetErrorString(result)[1].decode()}")


def _check(result, call: str) -> None:
    if int(result) != 0:
        from cuda.bindings import driver

        name = driver.cuGetErrorName(result)[1]
        raise CudaError(f"{call} failed: {name.decode() if isinstance(name, bytes) else result}")


# ----------------------------------------------------------------------------------------------- kernels
class Kernel:
    """One template instance of a :class:`Program`; call it to launch."""

    def __init__(self, program: Program, expression: str, params: list):
        self.program = program
        self.expression = expression
        self.params = params
        self.name = _template_arguments(expression)[0]
        self._layout = _Layout.of(params)
        self._functions: dict = {}  # device index -> [CUfunction, dynamic shared memory enabled]

    def __call__(self, grid, block, shared: int = 0, **arguments) -> None:
        """Launch on the device of the tensor arguments, on torch's current stream there."""
        grid3, block3 = launch_dimensions(grid, block)
        if not isinstance(shared, int) or shared < 0:
            raise ValueError(f"{self.name}: shared must be a byte count >= 0, got {shared!r}")
        packed = pack_arguments(self.name, self.params, arguments, self._layout)
        _launch(self, grid3, block3, shared, packed)

    def __repr__(self) -> str:
        return f"Kernel({self.expression!r})"


_contexts: dict = {}  # device index -> primary CUcontext


def _current_context(index: int):
    """Make the device's primary context (torch's) current on this thread and return it."""
    from cuda.bindings import driver

    context = _contexts.get(index)
    if context is None:
        result, device = driver.cuDeviceGet(index)
        _check(result, "cuDeviceGet")
        result, context = driver.cuDevicePrimaryCtxRetain(device)
        _check(result, "cuDevicePrimaryCtxRetain")
        _contexts[index] = context
    result, current = driver.cuCtxGetCurrent()
    _check(result, "cuCtxGetCurrent")
    if int(current) != int(context):
        _check(driver.cuCtxSetCurrent(context)[0], "cuCtxSetCurrent")
    return context


def _function(kernel: Kernel, index: int) -> list:
    """[CUfunction, dynamic shared memory enabled so far] of ``kernel`` on device ``index``: compiled (or read
    from the cache) and loaded on the first launch there."""
    from cuda.bindings import driver

    entry = kernel._functions.get(index)
    if entry is not None:
        return entry
    with _lock:
        _current_context(index)
        program = kernel.program
        arch = arch_of(torch.cuda.get_device_capability(index))
        compiled = program.compile(arch)
        module = program._modules.get((arch, index))
        if module is None:
            image = ctypes.create_string_buffer(compiled.cubin, len(compiled.cubin))
            result, module = driver.cuModuleLoadData(ctypes.addressof(image))
            _check(result, f"cuModuleLoadData({program.path}, {arch})")
            program._modules[(arch, index)] = module
        result, function = driver.cuModuleGetFunction(module, compiled.lowered[kernel.expression].encode())
        _check(result, f"cuModuleGetFunction({kernel.expression})")
        _check_parameter_layout(driver, function, kernel)
        entry = kernel._functions[index] = [function, DEFAULT_SHARED_LIMIT]
        return entry


_SIZES = {"ptr": 8, "i64": 8, "i32": 4, "f32": 4}


def _check_parameter_layout(driver, function, kernel: Kernel) -> None:
    """The parameter sizes the driver reports must be the ones read from the source (drivers >= 12.4 say)."""
    if not hasattr(driver, "cuFuncGetParamInfo"):
        return
    for index, param in enumerate(kernel.params):
        result, _offset, size = driver.cuFuncGetParamInfo(function, index)
        if int(result) != 0:
            return  # an older driver without the query
        if size != _SIZES[param.kind]:
            raise CudaError(f"{kernel.expression}: parameter {index} ({param.name}) is {size} bytes in the cubin, "
                            f"but the source parser read {param.kind}")


def _launch(kernel: Kernel, grid: tuple, block: tuple, shared: int, packed: PackedArguments) -> None:
    """Run one launch on the device of ``packed`` (tests replace this with the host emulator)."""
    from cuda.bindings import driver

    device = packed.device
    if device.type != "cuda":
        raise RuntimeError(f"{kernel.name}: the CUDA kernels take CUDA tensors, got tensors on {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    entry = _function(kernel, index)
    _current_context(index)
    function = entry[0]
    if shared > entry[1]:
        attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(driver.cuFuncSetAttribute(function, attribute, shared)[0], f"cuFuncSetAttribute({kernel.name})")
        entry[1] = shared
    stream = driver.CUstream(torch.cuda.current_stream(device).cuda_stream)
    (result,) = driver.cuLaunchKernel(function, *grid, *block, shared, stream, packed.address, 0)
    _check(result, f"cuLaunchKernel({kernel.expression}, grid={grid}, block={block}, shared={shared})")
