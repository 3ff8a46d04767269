"""The public API's conventions across families (docs/api.md): what a plain import reaches, the peers'
spellings of op arguments, cu_seqlens of either integer type, the argument order of the step ops."""

import sys

import pytest
import torch

import flashops

from .conftest import DEVICE


def test_integrations_are_reachable_from_a_plain_import(monkeypatch):
    """As in a fresh process after ``import flashops``: the subpackage is not imported yet, and
    ``flashops.integrations.transformers.register`` loads it on first access."""
    for name in ("flashops.integrations", "flashops.integrations.transformers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(flashops, "integrations", raising=False)
    register = flashops.integrations.transformers.register
    assert register.__module__ == "flashops.integrations.transformers" and callable(register)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        getattr(flashops.integrations, "nothing")  # noqa: B009  (the attribute access is what is tested)


@pytest.fixture
def _pytorch_backends(monkeypatch):
    """Spelling, not kernels, is under test here: the PyTorch path of every op."""
    monkeypatch.setenv("FLASHOPS_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _pytorch_backends(monkeypatch):
    """Spelling, not kernels, is under test here: the PyTorch path of every op."""
    monkeypatch.setenv("FLASHOPS_BACKEND", "torch")


def _qkv(t=9, h=2, d=16, b=1):
    return [torch.randn(b, t, h, d, device=DEVICE) for _ in range(3)]


def test_flash_attn_positional_order(_pytorch_backends):
    q, k, v = _qkv()
    want = flashops.flash_attention(q, k, v, causal=True, softmax_scale=0.3)
    assert torch.equal(flashops.flash_attention(q, k, v, 0.0, 0.3, True), want)  # flash_attn_func's order
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    want = flashops.flash_attention_varlen(q[0], k[0], v[0], cu, cu, 5, 5, causal=True, softmax_scale=0.3)
    assert torch.equal(flashops.flash_attention_varlen(q[0], k[0], v[0], cu, cu, 5, 5, 0.0, 0.3, True), want)


def test_scale_is_an_alias_of_softmax_scale_in_every_softmax_op(_pytorch_backends):
    q, k, v = _qkv()
    cu = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    ops = {
        "flash_attention": lambda **s: flashops.flash_attention(q, k, v, causal=True, **s),
        "flash_attention_varlen": lambda **s: flashops.flash_attention_varlen(q, k, v, cu, cu, **s),
        "block_sparse_attention": lambda **s: flashops.block_sparse_attention(
            q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE), **s),
        "hyper_attention": lambda **s: flashops.hyper_attention(q, k, v, min_seq_len=4, block_size=4,
                                                                generator=torch.Generator(DEVICE).manual_seed(0), **s),
        "local_linear_attention": lambda **s: flashops.local_linear_attention(q, k, v, ridge_lambda=1.0, **s),
        "local_linear_attention_decode": lambda **s: flashops.local_linear_attention_decode(
            q[:, :1], k, v, ridge_lambda=1.0, **s),
    }
    for name, op in ops.items():
        want = op(softmax_scale=0.3)
        assert not torch.equal(want, op()), name  # the scale matters at all
        assert torch.equal(op(scale=0.3), want), name
        with pytest.raises(TypeError, match="pass softmax_scale= or its alias scale=, not both"):
            op(scale=0.3, softmax_scale=0.3)


@pytest.mark.parametrize("op", ["flash_attention_varlen", "lightning_attention", "gated_linear_attention",
                                "linear_attention"])
def test_cu_seqlens_int32_or_int64(op, _pytorch_backends):
    q, k, v = _qkv(t=11)
    cu = torch.tensor([0, 3, 3, 11], device=DEVICE)  # int64, as torch.cumsum and fla users make them
    assert cu.dtype == torch.int64
    if op == "flash_attention_varlen":
        run = lambda cu: flashops.flash_attention_varlen(q, k, v, cu, cu, causal=True)  # noqa: E731
    elif op == "gated_linear_attention":
        g = torch.nn.functional.logsigmoid(torch.randn_like(q))
        run = lambda cu: flashops.gated_linear_attention(q, k, v, g, cu_seqlens=cu)[0]  # noqa: E731
    elif op == "linear_attention":
        run = lambda cu: flashops.linear_attention(q, k, v, causal=False, cu_seqlens=cu)[0]  # noqa: E731
    else:
        run = lambda cu: flashops.lightning_attention(q, k, v, cu_seqlens=cu)[0]  # noqa: E731
    assert torch.equal(run(cu), run(cu.int()))


@pytest.mark.parametrize("gated", [True, False])
def test_step_ops_take_the_decay_before_the_state(gated, _pytorch_backends):
    q, k, v = (x[:, 0] for x in _qkv(t=1, b=3))
    state = torch.randn(3, 2, 16, 16, device=DEVICE)
    if gated:
        op, decay = flashops.gated_linear_attention_step, torch.nn.functional.logsigmoid(torch.randn_like(q))
    else:
        op, decay = flashops.lightning_attention_step, torch.rand(2, device=DEVICE)
    o, new = op(q, k, v, decay, state)
    by_keyword = op(q, k, v, state=state, **{"g_t" if gated else "slopes": decay})
    assert torch.equal(by_keyword[0], o) and torch.equal(by_keyword[1], new)
    with pytest.warns(DeprecationWarning, match="old argument order"):
        old = op(q, k, v, state, decay)  # the order before 0.1.0 keeps working
    assert torch.equal(old[0], o) and torch.equal(old[1], new)
    with pytest.warns(DeprecationWarning, match="old argument order"):
        old = op(q, k, v, None, decay)  # an empty state, old order
    assert torch.equal(old[0], op(q, k, v, decay)[0])


def test_selective_scan_takes_mamba_ssm_positional_arguments(_pytorch_backends):
    u, delta = torch.randn(2, 4, 7, device=DEVICE), torch.rand(2, 4, 7, device=DEVICE)
    A, D, bias = -torch.rand(4, 3, device=DEVICE), torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    B, C, z = torch.randn(2, 3, 7, device=DEVICE), torch.randn(2, 3, 7, device=DEVICE), torch.randn_like(u)
    # selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last = flashops.selective_scan(u, delta, A, B, C, D, z, bias, True, True)
    want = flashops.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                   return_last_state=True)
    assert torch.equal(out, want[0]) and torch.equal(last, want[1])
