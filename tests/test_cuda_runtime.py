"""The host side of the CUDA kernels (flashops/_cuda.py), all of it testable without a GPU: kernel signatures read
from the sources (checked against what the C++ compiler sees), argument packing, launch limits, the disk cache,
NVRTC compiles and resource reports, the reasons the backend declines, and the forced-only dispatch. The kernels
themselves run in the op tests (backend "cuda") and in tests/ops/test_cuda_kernels.py."""

import ctypes
import importlib
import json
import os
import struct
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import flashops
from flashops import _cuda, _dispatch
from flashops.info import report

from .tools import cuda_emulator

CUDA_OPS = ("linear_scan", "selective_scan", "selective_state_update", "vandermonde_kernel", "cauchy_kernel",
            "lightning_attention_step", "gated_linear_attention_step")


def _all_programs() -> list:
    """Import every cuda launcher module (they declare their programs) and return the programs."""
    for op in CUDA_OPS:
        importlib.import_module(_dispatch.get(op, "cuda").module)
    return _cuda.programs()


def _need_toolchain():
    if _cuda.toolchain() is None:
        pytest.skip(f"NVRTC is not available: {_cuda.compile_reason()}")


@pytest.fixture
def fresh_registry(monkeypatch, tmp_path):
    """A private program registry, sources in tmp_path (with the real common.cuh), cache in tmp_path/cache."""
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "common.cuh").write_text((_cuda.source_directory() / "common.cuh").read_text())
    monkeypatch.setattr(_cuda, "_PROGRAMS", {})
    monkeypatch.setattr(_cuda, "SOURCE_DIRECTORIES", (sources,))
    monkeypatch.setenv("FLASHOPS_CUDA_CACHE", str(tmp_path / "cache"))
    _cuda._forget()
    yield sources
    _cuda._forget()


# ---------------------------------------------------------------------------------------------- signatures
SOURCE = """
#include "common.cuh"
namespace flashops {
// a comment with a fake kernel: template <typename T> __global__ void nope(int x)
template <int kThreads, typename T, typename W>
__global__ void __launch_bounds__(kThreads) toy_kernel(
    const T* __restrict__ x, W* out,  /* pointers */
    const float* __restrict__ scale_by, int64 stride_x, int n, float alpha) {}
}
"""


def test_signatures_are_read_from_the_source_with_template_types_substituted():
    kernels = _cuda.parse_kernels(SOURCE)
    assert list(kernels) == ["toy_kernel"]
    params = _cuda.signature(kernels, "flashops::toy_kernel<128, __nv_bfloat16, float>")
    assert [(p.name, p.kind, p.dtype) for p in params] == [
        ("x", "ptr", torch.bfloat16), ("out", "ptr", torch.float32), ("scale_by", "ptr", torch.float32),
        ("stride_x", "i64", None), ("n", "i32", None), ("alpha", "f32", None)]
    with pytest.raises(ValueError, match="takes 3 template arguments, got 2"):
        _cuda.signature(kernels, "flashops::toy_kernel<128, float>")
    with pytest.raises(ValueError, match="no __global__ template 'other'"):
        _cuda.signature(kernels, "flashops::other<1>")
    bad = _cuda.parse_kernels("template <typename T> __global__ void k(T* x, double y) {}")
    with pytest.raises(ValueError, match="parameter 'y' has type 'double'"):
        _cuda.signature(bad, "k<float>")


def test_every_kernel_source_is_declared_and_every_template_is_instantiated():
    programs = {p.path: p for p in _all_programs()}
    root = _cuda.source_directory()
    sources = sorted(str(p.relative_to(root)) for p in root.rglob("*.cu"))
    assert sorted(programs) == sources
    for program in programs.values():
        names = {_cuda._template_arguments(e)[0] for e in program.expressions}
        assert names == set(program.kernels()), program.path


def test_parsed_signatures_match_the_compilers_parameter_sizes():
    """The emulator's C++ build reports sizeof of every parameter of every instance: the parser must agree, or
    cuLaunchKernel would read the packed arguments at the wrong offsets."""
    reason = cuda_emulator.unavailable_reason()
    if reason:
        pytest.skip(reason)
    emulator = cuda_emulator.shared()
    for program in _all_programs():
        for expression in program.expressions:
            kernel = program.kernel(expression)
            assert emulator.parameter_sizes(kernel) == [_cuda._SIZES[p.kind] for p in kernel.params], expression


# ----------------------------------------------------------------------------------------------- arguments
def _toy_params():
    return _cuda.signature(_cuda.parse_kernels(SOURCE), "toy_kernel<128, float, float>")


def test_arguments_are_packed_at_their_c_types():
    x, out = torch.randn(4), torch.empty(4)
    packed = _cuda.pack_arguments("toy", _toy_params(), dict(x=x, out=out, scale_by=None, stride_x=-(2 ** 40), n=7,
                                                            alpha=0.5))
    assert packed.device == torch.device("cpu")
    base = ctypes.addressof(packed.storage)
    assert list(packed.pointers) == [base + 8 * i for i in range(6)]
    assert packed.address == ctypes.addressof(packed.pointers)
    slots = bytes(packed.storage)
    assert struct.unpack_from("<QQQq", slots) == (x.data_ptr(), out.data_ptr(), 0, -(2 ** 40))
    assert struct.unpack_from("<i", slots, 32) == (7,) and struct.unpack_from("<f", slots, 40) == (0.5,)


@pytest.mark.parametrize("change, error, match", [
    (dict(alpha=None), TypeError, "alpha must be a float"),
    (dict(n=2 ** 31), ValueError, "n=2147483648 does not fit"),
    (dict(n=1.5), TypeError, "n must be an int"),
    (dict(x=torch.randn(4, dtype=torch.float16)), TypeError, "x must have dtype torch.float32"),
    (dict(x=np.zeros(4)), TypeError, "x must be a tensor or None"),
    (dict(out=torch.empty(4, device="meta")), ValueError, "out is on meta but other arguments are on cpu"),
    (dict(x=None, out=None), ValueError, "no tensor among the arguments"),
])
def test_bad_arguments_are_named(change, error, match):
    good = dict(x=torch.randn(4), out=torch.empty(4), scale_by=None, stride_x=1, n=4, alpha=1.0)
    with pytest.raises(error, match=match):
        _cuda.pack_arguments("toy", _toy_params(), {**good, **change})


def test_missing_and_unknown_arguments():
    with pytest.raises(TypeError, match=r"missing arguments \['n', 'alpha'\], unknown arguments \['beta'\]"):
        _cuda.pack_arguments("toy", _toy_params(), dict(x=None, out=None, scale_by=None, stride_x=1, beta=2))


def test_launch_dimensions():
    assert _cuda.launch_dimensions(5, 128) == ((5, 1, 1), (128, 1, 1))
    assert _cuda.launch_dimensions((5, 3), (32, 4)) == ((5, 3, 1), (32, 4, 1))
    for grid, block, match in (((0,), 32, "grid must be"), ((2 ** 31,), 32, "grid.x=2147483648 exceeds"),
                               ((1, 70000), 32, "grid.y=70000 exceeds"), (1, (64, 32), "more than 1024 threads"),
                               (1, 2048, "block.x=2048 exceeds"), (1.5, 32, "grid must be")):
        with pytest.raises(ValueError, match=match):
            _cuda.launch_dimensions(grid, block)


def test_cpu_tensors_are_refused_by_the_real_launcher():
    from flashops.ops.ssm import cuda_scan

    a = torch.rand(1, 2, 5)
    with pytest.raises(RuntimeError, match="the CUDA kernels take CUDA tensors, got tensors on cpu"):
        cuda_scan.linear_scan_fwd(a, a, None, False)


def test_parameter_layout_check_against_the_driver():
    kernel = _cuda.Kernel(None, "toy_kernel<128, float, float>", _toy_params())
    sizes = [8, 8, 8, 8, 4, 4]
    driver = types.SimpleNamespace(cuFuncGetParamInfo=lambda function, i: (0, 0, sizes[i]))
    _cuda._check_parameter_layout(driver, object(), kernel)
    sizes[3] = 4
    with pytest.raises(_cuda.CudaError, match="parameter 3 \\(stride_x\\) is 4 bytes in the cubin"):
        _cuda._check_parameter_layout(driver, object(), kernel)


# ---------------------------------------------------------------------------------------------------- cache
def test_arch_of_a_device():
    assert _cuda.arch_of((9, 0)) == "sm_90a"
    assert _cuda.arch_of((8, 0)) == "sm_80"
    assert _cuda.arch_of((8, 9)) == "sm_89"
    assert _cuda.arch_of((10, 0)) == "sm_100"


def test_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHOPS_CUDA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cuda.cache_directory() == tmp_path / "flashops" / "cuda"
    monkeypatch.setenv("FLASHOPS_CUDA_CACHE", str(tmp_path / "x"))
    assert _cuda.cache_directory() == tmp_path / "x"


def test_cache_files_are_written_atomically_and_bad_ones_are_ignored(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "prog-sm_80-abc.json"
    compiled = _cuda.Compiled("sm_80", b"\x7fELF\x00\x01", {"k<1>": "_Z1kILi1EEvv"}, "log")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    _cuda._write_cache(path, compiled)
    assert len(replaced) == 1 and replaced[0][1] == path and Path(replaced[0][0]).parent == path.parent
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left behind
    assert _cuda._read_cache(path) == compiled
    path.write_text(json.dumps({"arch": "sm_80"}))  # e.g. written by another version
    assert _cuda._read_cache(path) is None
    path.write_text("{not json")
    assert _cuda._read_cache(path) is None
    assert _cuda._read_cache(tmp_path / "absent.json") is None


def test_cache_key_covers_sources_headers_options_arch_and_versions(fresh_registry, monkeypatch):
    _need_toolchain()
    (fresh_registry / "toy.cu").write_text(SOURCE)
    program = _cuda.Program("toy.cu", ["flashops::toy_kernel<128, float, float>"])
    options = program.options("sm_80")
    key = program.cache_key("sm_80", options)
    assert key == program.cache_key("sm_80", options)
    assert key != program.cache_key("sm_90a", options)
    assert key != program.cache_key("sm_80", options + ["-DX"])
    (fresh_registry / "common.cuh").write_text((fresh_registry / "common.cuh").read_text() + "\n// changed\n")
    assert key != program.cache_key("sm_80", options)
    tools = _cuda.toolchain()
    monkeypatch.setattr(_cuda, "_toolchain_state", (_cuda.Toolchain(tools.nvrtc, (99, 0), tools.include_directory),
                                                    ""))
    assert key != program.cache_key("sm_80", options)
    monkeypatch.setattr(flashops, "__version__", "9.9.9")
    assert program.cache_key("sm_80", options) != key


def test_programs_are_declared_once(fresh_registry):
    (fresh_registry / "toy.cu").write_text(SOURCE)
    _cuda.Program("toy.cu", ["flashops::toy_kernel<128, float, float>"])
    with pytest.raises(ValueError, match="already declared"):
        _cuda.Program("toy.cu", ["flashops::toy_kernel<128, float, float>"])
    with pytest.raises(ValueError, match="is not an instance of toy.cu"):
        _cuda.programs()[0].kernel("flashops::toy_kernel<64, float, float>")


# -------------------------------------------------------------------------------------------------- NVRTC
def test_compile_reports_resources_and_caches_the_cubin(fresh_registry, tmp_path):
    _need_toolchain()
    (fresh_registry / "toy.cu").write_text("""
#include "common.cuh"
namespace flashops {
template <int kThreads, typename T>
__global__ void __launch_bounds__(kThreads) toy_kernel(const T* x, float* out, int n) {
  __shared__ Affine totals[kThreads / 32];
  const Affine mine{to_float(x[threadIdx.x]), 1.f};
  Affine all;
  const Affine before = block_exclusive_scan<kThreads>(mine, false, totals, all);
  if (static_cast<int>(threadIdx.x) < n) out[threadIdx.x] = before.apply(0.f) + all.b;
}
}
""")
    expressions = ["flashops::toy_kernel<64, float>", "flashops::toy_kernel<128, __nv_bfloat16>"]
    program = _cuda.Program("toy.cu", expressions)
    compiled = program.compile("sm_80", strict=True)
    assert compiled.cubin[:4] == b"\x7fELF" and set(compiled.lowered) == set(expressions)
    resources = compiled.resources()
    for expression in expressions:
        assert 0 < resources[expression]["registers"] <= 255
        assert resources[expression]["spill_stores"] == 0 and resources[expression]["shared"] > 0
    cached = list((tmp_path / "cache").glob("toy-sm_80-*.json"))
    assert len(cached) == 1
    # a new process (here: a new program object) reads the cache instead of compiling
    _cuda._PROGRAMS.clear()
    again = _cuda.Program("toy.cu", expressions)
    cached[0].write_text(cached[0].read_text().replace('"log": "', '"log": "from the cache '))
    assert again.compile("sm_80", strict=True).log.startswith("from the cache")


def test_warnings_are_errors_in_the_strict_compile(fresh_registry):
    _need_toolchain()
    (fresh_registry / "warn.cu").write_text("""
#include "common.cuh"
namespace flashops {
template <typename T>
__global__ void warn_kernel(T* out) { int unused; out[0] = T(); }
}
""")
    program = _cuda.Program("warn.cu", ["flashops::warn_kernel<float>"])
    assert program.compile("sm_80").cubin  # the run-time compile tolerates the warning
    with pytest.raises(_cuda.CompileError, match="(?s)could not compile warn.cu for sm_90a.*unused"):
        program.compile("sm_90a", strict=True)


def test_resource_report_parser():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16 bytes cumulative stack size, 1024 bytes smem, 372 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 372 bytes cmem[0]
"""
    assert _cuda.parse_resources(log) == {
        "_Z3fooPf": {"registers": 40, "spill_stores": 8, "spill_loads": 4, "stack": 16, "shared": 1024},
        "_Z3barv": {"registers": 12, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 0}}


# ---------------------------------------------------------------------------------------------- availability
def test_driver_version_check_names_both_versions():
    assert _cuda.version_reasons((13, 0), 13000) == []
    assert _cuda.version_reasons((12, 8), 13000) == []
    (reason,) = _cuda.version_reasons((13, 5), 12080)
    assert "NVRTC 13.5" in reason and "CUDA 12.8 at most" in reason and "12.x" in reason


def test_missing_cuda_python_is_a_reason(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cuda.bindings", None)
    _cuda._forget()
    try:
        assert _cuda.toolchain() is None
        assert "cuda-python is not installed" in _cuda.compile_reason()
        assert 'pip install "flashops[cuda]"' in _cuda.unavailable_reasons()[0]
        assert _cuda.status().startswith("unavailable: cuda-python is not installed")
    finally:
        _cuda._forget()


def test_the_cuda_backend_declines_with_reasons_and_info_shows_it():
    request = _dispatch.Request(torch.device("cpu"), torch.float32, {})
    for op in CUDA_OPS:
        backend = _dispatch.get(op, "cuda")
        assert backend.forced_only and backend.priority == _dispatch.PRIORITY_CUDA_EXT
        assert backend.supports(request) == ["CUDA tensors only, got cpu"]
        assert _dispatch.select(op, request).name != "cuda"
    text = report()
    assert f"CUDA ext {_cuda.status()}" in text
    assert "cuda: CUDA tensors only, got cpu" in text
    if torch.cuda.is_available():
        fp64 = _dispatch.Request(torch.device("cuda"), torch.float64, {})
        assert "float64" in _dispatch.get("linear_scan", "cuda").supports(fp64)[-1]


def test_selective_scan_cuda_declines_in_deterministic_mode(monkeypatch):
    monkeypatch.setattr(_cuda, "device_reasons", lambda device: [])
    request = _dispatch.Request(torch.device("cuda"), torch.float32, {})
    assert _dispatch.get("selective_scan", "cuda").supports(request) == []
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "atomics" in _dispatch.get("selective_scan", "cuda").supports(request)[0]
    assert _dispatch.get("linear_scan", "cuda").supports(request) == []


def test_forced_only_backends_run_only_when_forced(monkeypatch):
    op = "toy_forced_only_op"
    _dispatch._REGISTRY.pop(op, None)
    try:
        _dispatch.register(op, _dispatch.Backend("new", 0, lambda r: [], "flashops._dispatch", forced_only=True))
        _dispatch.register(op, _dispatch.Backend("old", 10, lambda r: [], "flashops._dispatch"))
        request = _dispatch.Request(torch.device("cpu"), torch.float32, {})
        assert _dispatch.select(op, request).name == "old"
        assert _dispatch.select(op, request, backend="new").name == "new"
        monkeypatch.setenv("FLASHOPS_BACKEND", f"{op}=new")
        assert _dispatch.select(op, request).name == "new"
        monkeypatch.delenv("FLASHOPS_BACKEND")
        _dispatch._REGISTRY[op] = [b for b in _dispatch._REGISTRY[op] if b.name == "new"]
        with pytest.raises(_dispatch.BackendError, match="new: runs only when forced"):
            _dispatch.select(op, request)
    finally:
        _dispatch._REGISTRY.pop(op, None)


# ------------------------------------------------------------------------------------------------ emulator
def test_the_emulator_reports_deadlocks_and_divergent_shuffles(fresh_registry):
    """Tests that pass on the emulator mean something only if it refuses what a GPU would hang or garble on."""
    reason = cuda_emulator.unavailable_reason()
    if reason:
        pytest.skip(reason)
    (fresh_registry / "bad.cu").write_text("""
#include "common.cuh"
namespace flashops {
template <int kCase>
__global__ void bad_kernel(float* out) {
  float v = out[threadIdx.x];
  if (kCase == 0) {
    if (threadIdx.x == 0) return;  // the others wait at the barrier forever
    __syncthreads();
  } else if (kCase == 1) {
    v = threadIdx.x < 16 ? __shfl_xor_sync(kFullMask, v, 1) : __shfl_up_sync(kFullMask, v, 1);
  } else {
    v = warp_sum(v);  // correct: every lane gets the warp's sum
  }
  out[threadIdx.x] = v;
}
}
""")
    program = _cuda.Program("bad.cu", [f"flashops::bad_kernel<{case}>" for case in range(3)])
    emulator = cuda_emulator.Emulator()

    def run(case):
        out = torch.arange(64, dtype=torch.float32)
        kernel = program.kernel(f"flashops::bad_kernel<{case}>")
        emulator.launch(kernel, (1, 1, 1), (64, 1, 1), 0, _cuda.pack_arguments("bad", kernel.params, {"out": out}))
        return out

    with pytest.raises(cuda_emulator.EmulationError, match="deadlock"):
        run(0)
    with pytest.raises(cuda_emulator.EmulationError, match="different shuffles"):
        run(1)
    assert run(2).tolist() == [float(sum(range(32)))] * 32 + [float(sum(range(32, 64)))] * 32
