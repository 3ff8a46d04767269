"""The C++ extension's loader (flashops/_ext.py): status line, FLASHOPS_NO_EXT, why it is unavailable, the
build lock. The extension's kernels are tested with their ops (tests/ops/test_ssm_scans.py, backend "cpp")."""

import os
import shutil
import threading
import time
import types

import pytest
import torch

import flashops
from flashops import _dispatch, _ext
from flashops.info import report
from flashops.ops.ssm import reference as ref
from flashops.testing import assert_close

CPU = torch.device("cpu")
SCAN_OPS = ("linear_scan", "selective_scan")
KERNELS = ("linear_scan_fwd", "linear_scan_bwd", "selective_scan_fwd", "selective_scan_bwd")


@pytest.fixture
def reload_ext():
    """Forget the loaded extension before and after the test, so that environment changes take effect."""
    _ext._forget()
    yield
    _ext._forget()


def test_status_line_matches_what_load_returns():
    module = _ext.load()
    line = _ext.status()
    assert "\n" not in line
    if _ext.disabled():
        assert line == "disabled (FLASHOPS_NO_EXT=1)"
    elif module is None:
        assert line.startswith("unavailable: ") and _ext.reason()
    else:
        assert line.startswith("loaded: ") and ("prebuilt flashops._C" in line or "JIT build" in line)
        assert _ext.reason() == ""
        assert all(callable(getattr(module, name)) for name in KERNELS)
    assert f"C++ ext  {line}" in report()


def test_cpp_backend_order_and_reasons():
    for op in SCAN_OPS:
        names = [b.name for b in _dispatch.backends(op)]
        assert names.index("triton") < names.index("cpp") < names.index("torch")
        cpp = _dispatch.get(op, "cpp")
        assert cpp.supports(_dispatch.Request(torch.device("cuda"), torch.float32, {})) == [
            "CPU tensors only, got cuda"]
        # float64 on the CPU: Triton declines, so the C++ backend runs when the extension is there
        chosen = _dispatch.select(op, _dispatch.Request(CPU, torch.float64, {}))
        assert chosen.name == ("cpp" if _ext.load() is not None else "torch")


def test_no_ext_makes_the_backend_decline(monkeypatch, reload_ext):
    monkeypatch.setenv("FLASHOPS_NO_EXT", "1")
    assert _ext.load() is None
    assert _ext.status() == "disabled (FLASHOPS_NO_EXT=1)"
    assert _ext.reason() == "disabled by FLASHOPS_NO_EXT=1"
    for op in SCAN_OPS:
        reasons = _dispatch.get(op, "cpp").supports(_dispatch.Request(CPU, torch.float32, {}))
        assert reasons == ["C++ extension unavailable: disabled by FLASHOPS_NO_EXT=1"]
    a, b = torch.rand(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64)
    with pytest.raises(_dispatch.BackendError, match=r"backend='cpp' cannot run .*FLASHOPS_NO_EXT=1"):
        flashops.linear_scan(a, b, backend="cpp")
    assert_close("h", flashops.linear_scan(a, b), ref.linear_scan(a, b))  # another backend takes over
    text = report()
    assert "C++ ext  disabled (FLASHOPS_NO_EXT=1)" in text
    assert "cpp: C++ extension unavailable: disabled by FLASHOPS_NO_EXT=1" in text


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-for-flashops")
    assert "no C++ compiler ('no-such-compiler-for-flashops' is not on PATH" in _ext._missing_tools()
    module, detail = _ext._jit()
    assert module is None and detail.startswith("no prebuilt flashops._C and no C++ compiler")
    from torch.utils import cpp_extension

    monkeypatch.setenv("CXX", shutil.which("python3") or shutil.which("sh"))  # any program on PATH
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert _ext._missing_tools().startswith("ninja is not installed")


def test_build_error_text_is_kept(monkeypatch, tmp_path):
    if _ext._missing_tools():
        pytest.skip(_ext._missing_tools())
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "broken.cpp").write_text('#error "flashops test: a deliberately broken source"\n')
    monkeypatch.setattr(_ext, "ROOT", tmp_path)
    monkeypatch.setattr(_ext, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(_ext, "SOURCES", ("csrc/broken.cpp",))
    monkeypatch.setattr(_ext, "JIT_NAME", "flashops_broken_build_test")  # its own entry in torch's versioner
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module, detail = _ext._jit()
    assert module is None
    first, *rest = detail.splitlines()
    assert first.startswith(f"JIT build in {tmp_path / 'cache'}") and "failed (RuntimeError)" in first
    assert "a deliberately broken source" in "\n".join(rest)


def test_build_lock_serializes_builders_and_clears_a_dead_builders_marker(tmp_path):
    pytest.importorskip("fcntl")
    (tmp_path / "lock").write_text("")  # the marker torch's builder leaves when it is killed mid-build
    events = []
    first_inside = threading.Event()

    def first():
        with _ext._exclusive(tmp_path):
            events.append("first in")
            first_inside.set()
            time.sleep(0.3)
            events.append("first out")

    def second():
        first_inside.wait()
        with _ext._exclusive(tmp_path):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert events == ["first in", "first out", "second in"]
    assert not (tmp_path / "lock").exists()


def test_stale_prebuilt_module_is_detected(tmp_path):
    if not _ext.CSRC.is_dir():
        pytest.skip("no csrc/ next to the package")
    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    module = types.SimpleNamespace(__file__=str(library))
    os.utime(library, (0, 0))  # built long before the sources were last changed
    assert "is newer than the build; rebuild it or remove it" in _ext._stale(module)
    now = time.time() + 60
    os.utime(library, (now, now))
    assert _ext._stale(module) == ""
