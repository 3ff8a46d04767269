"""The backend registry: priority order, forcing by argument and environment, one error with all reasons."""

import pytest
import torch

from flashops import _dispatch


@pytest.fixture
def toy_op():
    op = "toy_op_for_tests"
    _dispatch._REGISTRY.pop(op, None)
    _dispatch.register(op, _dispatch.Backend(
        "slow", 30, lambda r: [], "flashops._dispatch"))
    _dispatch.register(op, _dispatch.Backend(
        "fast", 10, lambda r: [] if r.get("size", 0) < 100 else ["size >= 100"], "flashops._dispatch"))
    yield op
    _dispatch._REGISTRY.pop(op)


def req(**features):
    return _dispatch.Request(torch.device("cpu"), torch.float32, features)


def test_priority_and_fallback(toy_op):
    assert _dispatch.select(toy_op, req(size=1)).name == "fast"
    assert _dispatch.select(toy_op, req(size=500)).name == "slow"
    assert [b.name for b in _dispatch.backends(toy_op)] == ["fast", "slow"]


def test_forcing_by_argument_and_environment(toy_op, monkeypatch):
    assert _dispatch.select(toy_op, req(size=1), backend="slow").name == "slow"
    monkeypatch.setenv("FLASHOPS_BACKEND", "slow")
    assert _dispatch.select(toy_op, req(size=1)).name == "slow"
    monkeypatch.setenv("FLASHOPS_BACKEND", f"other_op=slow,{toy_op}=fast")
    assert _dispatch.select(toy_op, req(size=1)).name == "fast"
    # The argument wins over the environment.
    assert _dispatch.select(toy_op, req(size=1), backend="slow").name == "slow"
    monkeypatch.setenv("FLASHOPS_BACKEND", f"{toy_op}=fast")
    with pytest.raises(_dispatch.BackendError, match="FLASHOPS_BACKEND='fast' cannot run these inputs: size >= 100"):
        _dispatch.select(toy_op, req(size=500))


def test_forced_backend_that_declines_raises_instead_of_falling_back(toy_op):
    with pytest.raises(_dispatch.BackendError, match="backend='fast' cannot run these inputs: size >= 100"):
        _dispatch.select(toy_op, req(size=500), backend="fast")


def test_no_backend_lists_every_reason(toy_op):
    _dispatch._REGISTRY[toy_op] = [b for b in _dispatch.backends(toy_op) if b.name == "fast"]
    with pytest.raises(_dispatch.BackendError, match=r"no backend supports these inputs.*\n  fast: size >= 100"):
        _dispatch.select(toy_op, req(size=500))


def test_unknown_names(toy_op):
    with pytest.raises(ValueError, match="choose one of \\['fast', 'slow'\\]"):
        _dispatch.select(toy_op, req(), backend="cuda")
    with pytest.raises(KeyError, match="unknown op"):
        _dispatch.backends("no_such_op")
    with pytest.raises(ValueError, match="already registered"):
        _dispatch.register(toy_op, _dispatch.Backend("fast", 0, lambda r: [], "x"))
