"""The launch helper (flashops/_triton_utils.py): strides, config choice on a GPU (first fit, resource fallback,
tuned tables, autotuning gated by work), tuned tables and tuning sessions, on a tiny kernel.

The GPU path is exercised on the CPU by standing in for the launch itself (``Launcher.run``): what is tested is
which config the helper picks, not Triton."""

import json

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from flashops import _triton_utils as tu
from flashops._triton_utils import TunedTable, config, launcher, strides, tuning

from .conftest import ON_GPU

CANDIDATES = [config(4, 2, BLOCK=64), config(8, 2, BLOCK=128), config(4, 3, BLOCK=32)]


@launcher(configs=CANDIDATES, interpreted=config(1, 1, BLOCK=16), key=["N_COLS"], restore_value=["Y"],
          tune_min_work=100.0)
@triton.jit
def toy_add_fwd_kernel(
    # pointers
    X, Y,
    # strides
    stride_xr, stride_yr,
    # sizes
    n_cols,
    # meta-parameters
    N_COLS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Y[r] += X[r] (it reads what it writes: tuning must restore Y between trials)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_xr + cols, mask=ok)
    y = tl.load(Y + row * stride_yr + cols, mask=ok)
    tl.store(Y + row * stride_yr + cols, x + y, mask=ok)


def _launch(x, y, work=None):
    toy_add_fwd_kernel.launch(lambda meta: (x.shape[0], triton.cdiv(x.shape[1], meta["BLOCK"])), work=work,
                              X=x, Y=y, **strides("x", x, "r"), **strides("y", y, "r"), n_cols=x.shape[1],
                              N_COLS=x.shape[1])


@pytest.fixture
def fresh_launcher(monkeypatch):
    """No remembered decisions and no table from the environment."""
    monkeypatch.setattr(toy_add_fwd_kernel, "_decisions", {})
    monkeypatch.setattr(tu, "_TABLES", {})
    monkeypatch.delenv("FLASHOPS_TUNED_CONFIGS", raising=False)


@pytest.fixture
def gpu_path(monkeypatch, fresh_launcher):
    """Take the GPU branch of Launcher.launch and record the configs it runs instead of running them;
    configs whose BLOCK is in ``too_big`` raise OutOfResources."""
    monkeypatch.setattr(tu, "interpreter_enabled", lambda: False)
    ran, too_big = [], set()

    def run(self, cfg, grid, args):
        ran.append(cfg.kwargs["BLOCK"])
        if cfg.kwargs["BLOCK"] in too_big:
            raise OutOfResources(1 << 20, 1 << 16, "shared memory")

    monkeypatch.setattr(tu.Launcher, "run", run)
    return ran, too_big


def _inputs(cols=40):
    return torch.randn(3, cols), torch.randn(3, cols)


def test_strides_names_zero_broadcast_and_absent():
    t = torch.empty(2, 1, 5, 7)
    assert strides("q", t, "bth") == {"stride_qb": 35, "stride_qt": 35, "stride_qh": 7}
    assert strides("q", t, "bth", zero="b") == {"stride_qb": 0, "stride_qt": 35, "stride_qh": 7}
    assert strides("mask", t, "bhmn", broadcast=True) == {"stride_maskb": 35, "stride_maskh": 0,
                                                           "stride_maskm": 7, "stride_maskn": 1}
    assert strides("h0", None, "bd") == {"stride_h0b": 0, "stride_h0d": 0}
    with pytest.raises(ValueError, match="3 dimensions"):
        strides("x", torch.empty(2, 3), "btd")


def test_interpreter_runs_the_interpreted_config_and_is_correct(fresh_launcher):
    if ON_GPU:
        pytest.skip("interpreter path")
    x, y = _inputs()
    expected = x + y
    _launch(x, y)
    torch.testing.assert_close(y, expected)


def test_gpu_default_is_the_first_candidate_then_the_next_that_fits(gpu_path, monkeypatch):
    ran, too_big = gpu_path
    monkeypatch.setenv("FLASHOPS_AUTOTUNE", "0")
    _launch(*_inputs())
    assert ran == [64]
    too_big.add(64)
    toy_add_fwd_kernel._decisions.clear()
    ran.clear()
    _launch(*_inputs())
    assert ran == [64, 128]  # 64 does not fit: the next candidate
    ran.clear()
    _launch(*_inputs())
    assert ran == [128]  # remembered per shape class
    too_big.update({128, 32})
    toy_add_fwd_kernel._decisions.clear()
    with pytest.raises(RuntimeError, match="none of its 3 configs fits"):
        _launch(*_inputs())


def test_autotuning_only_for_calls_with_enough_work(gpu_path, monkeypatch):
    ran, _ = gpu_path
    tuned = []

    class FakeAutotuner:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda **args: tuned.append(args["N_COLS"])

    monkeypatch.setattr(triton, "autotune", lambda **options: FakeAutotuner)
    monkeypatch.setenv("FLASHOPS_AUTOTUNE", "1")
    _launch(*_inputs(), work=10.0)
    assert ran == [64] and tuned == []  # below tune_min_work: the default chain
    _launch(*_inputs(), work=1000.0)
    assert tuned == [40]


def test_tuned_table_is_used_when_it_has_the_shape_class_among_the_candidates(gpu_path, monkeypatch, tmp_path):
    ran, too_big = gpu_path
    monkeypatch.setenv("FLASHOPS_AUTOTUNE", "1")
    table = TunedTable("nvidia-test")
    key = {"N_COLS": 40, "dtype": "float32"}
    table.add("toy_add_fwd_kernel", key, {"BLOCK": 32, "num_warps": 4, "num_stages": 3}, 0.01)
    table.add("toy_add_fwd_kernel", {"N_COLS": 99, "dtype": "float32"},
              {"BLOCK": 256, "num_warps": 4, "num_stages": 3}, 0.01)  # not a candidate: ignored
    path = tmp_path / "table.json"
    table.write(path)
    monkeypatch.setenv("FLASHOPS_TUNED_CONFIGS", str(path))
    _launch(*_inputs(40), work=1e9)
    assert ran == [32]
    too_big.add(32)
    toy_add_fwd_kernel._decisions.clear()
    ran.clear()
    _launch(*_inputs(40), work=1e9)
    assert ran == [32, 64]  # the table's config does not fit: the default chain follows
    monkeypatch.setenv("FLASHOPS_AUTOTUNE", "0")
    ran.clear()
    _launch(*_inputs(99))
    assert ran == [64]


def test_tuned_table_file_is_sorted_one_entry_per_line_and_reads_back(tmp_path):
    table = TunedTable("nvidia-h200", torch_version="2.13.0", triton_version="3.9.0")
    table.add("b_kernel", {"K": 2, "dtype": "bfloat16"}, {"num_warps": 4, "BLOCK": 64, "num_stages": 2}, 0.5)
    table.add("a_kernel", {"K": 1}, {"BLOCK": 16, "num_warps": 2, "num_stages": 1}, 0.25)
    table.add("a_kernel", {"K": 0}, {"BLOCK": 32, "num_warps": 2, "num_stages": 1}, 0.125)
    path = tmp_path / "nvidia-h200.json"
    table.write(path)
    text = path.read_text()
    data = json.loads(text)
    assert list(data) == ["device", "kernels", "torch", "triton"] and list(data["kernels"]) == ["a_kernel", "b_kernel"]
    entry_lines = [line for line in text.splitlines() if line.strip().startswith('{"config"')]
    assert len(entry_lines) == 3 and '"K": 0' in entry_lines[0]
    again = TunedTable.read(path)
    assert again.lookup("b_kernel", {"dtype": "bfloat16", "K": 2}) == {"BLOCK": 64, "num_stages": 2, "num_warps": 4}
    assert again.lookup("b_kernel", {"K": 3}) is None and again.device == "nvidia-h200"


def test_interpreter_honours_a_table_for_the_interpreter(fresh_launcher, monkeypatch, tmp_path):
    if ON_GPU:
        pytest.skip("interpreter path")
    ran = []
    original = tu.Launcher.run

    def run(self, cfg, grid, args):
        ran.append(cfg.kwargs["BLOCK"])
        return original(self, cfg, grid, args)

    monkeypatch.setattr(tu.Launcher, "run", run)
    table = TunedTable(tu.INTERPRETER_DEVICE)
    table.add("toy_add_fwd_kernel", {"N_COLS": 40, "dtype": "float32"},
              {"BLOCK": 32, "num_warps": 4, "num_stages": 3})
    table.write(tmp_path / "t.json")
    monkeypatch.setenv("FLASHOPS_TUNED_CONFIGS", str(tmp_path / "t.json"))
    x, y = _inputs()
    expected = x + y
    _launch(x, y)
    assert ran == [32]
    torch.testing.assert_close(y, expected)


def test_tuning_session_times_every_candidate_keeps_the_fastest_and_restores_outputs(fresh_launcher):
    if ON_GPU:
        pytest.skip("interpreter path")
    timings = iter([3.0, 1.0, 2.0])
    table = TunedTable(tu.INTERPRETER_DEVICE)
    x, y = _inputs()
    expected = x + y
    with tuning(table, timer=lambda fn: (fn(), next(timings))[1]):
        _launch(x, y)
        _launch(x, expected.clone())  # same shape class: no second sweep (the timer would run out)
    torch.testing.assert_close(y, expected)  # every trial restored Y; the final launch applied once
    assert table.lookup("toy_add_fwd_kernel", {"N_COLS": 40, "dtype": "float32"}) == {
        "BLOCK": 128, "num_stages": 2, "num_warps": 8}
    assert table.kernels["toy_add_fwd_kernel"][json.dumps({"N_COLS": 40, "dtype": "float32"})]["ms"] == 1.0


def test_launcher_rejects_keys_that_are_not_arguments():
    with pytest.raises(ValueError, match="not arguments of the kernel"):
        launcher(configs=CANDIDATES, key=["NOPE"])(toy_add_fwd_kernel.fn)


def test_the_module_docstring_example_runs(fresh_launcher):
    """The complete example in flashops/_triton_utils.py's docstring (docs/contributing.md points to it)."""
    if ON_GPU:
        pytest.skip("interpreter path")
    doc = tu.__doc__
    block = doc[doc.index("::\n\n") + 4:doc.index("\nHow a config")]
    source = "\n".join(line[4:] for line in block.splitlines())
    namespace = {"torch": torch}
    exec(compile(source, "_triton_utils example", "exec"), namespace)
    x = torch.randn(2, 37, 16)
    torch.testing.assert_close(namespace["scale_rows"](x, 0.5), x * 0.5)
