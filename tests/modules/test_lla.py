"""LocalLinearAttention module: forward against the functional reference, the learnable ridge's gradient,
generation with a KV cache (prefill in pieces, step) against the full forward."""

import pytest
import torch
from torch.nn import functional as F

from flashops.nn import LocalLinearAttention
from flashops.ops.lla import reference as ref
from flashops.testing import assert_close

from ..helpers import BACKENDS, require


def _layer(backend, device, **kw):
    for op in ("local_linear_attention", "local_linear_attention_decode"):
        require(op, backend, device=device, head_dim=16)
    kw.setdefault("ridge_lambda", 0.7)
    return LocalLinearAttention(64, 4, num_kv_heads=2, backend=backend, device=device, **kw)


def _reference_forward(layer, x):
    """The layer's math with the fp64 reference op (projections in fp64 too)."""
    b, t, _ = x.shape
    x = x.double()
    q = F.linear(x, layer.q_proj.weight.double()).view(b, t, layer.num_heads, layer.head_dim)
    kv = F.linear(x, layer.kv_proj.weight.double()).view(b, t, 2, layer.num_kv_heads, layer.head_dim)
    ridge = F.softplus(layer.ridge_raw.double())
    out = ref.local_linear_attention(q, kv[:, :, 0], kv[:, :, 1], ridge_lambda=ridge)
    return F.linear(out.reshape(b, t, -1), layer.out_proj.weight.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_ridge_gradient_match_the_reference(backend, device):
    layer = _layer(backend, device)
    x = torch.randn(1, 21, 64, device=device)
    y = layer(x)
    want = _reference_forward(layer, x)
    assert_close("y", y, want)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (layer.ridge_raw, layer.q_proj.weight), g)
    expected = torch.autograd.grad(want, (layer.ridge_raw, layer.q_proj.weight), g.double())
    assert float(got[0].abs().min()) > 0  # every head's ridge learns
    assert_close("d ridge_raw", got[0], expected[0])
    assert_close("d q_proj.weight", got[1], expected[1])


def test_fixed_ridge_is_a_buffer(device):
    layer = LocalLinearAttention(32, 2, ridge_lambda=3.0, learnable_ridge=False, device=device)
    assert "ridge_raw" not in dict(layer.named_parameters())
    torch.testing.assert_close(layer.ridge_lambda, torch.full((2,), 3.0, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_with_cache_matches_the_full_forward(backend, device):
    layer = _layer(backend, device)
    x = torch.randn(2, 12, 64, device=device)
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2, 16)
        first = layer(x[:, :4], cache=cache)      # prefill in two pieces ...
        second = layer(x[:, 4:7], cache)
        steps = [layer.step(x[:, t], cache) for t in range(7, 12)]  # ... then one token at a time
    assert cache.length == 12 and cache.seqlens.tolist() == [12, 12]
    assert_close("prefill", first, full[:, :4])
    assert_close("prefill continued", second, full[:, 4:7])
    for i, y in enumerate(steps):
        assert y.shape == (2, 64)
        assert_close(f"step {7 + i}", y, full[:, 7 + i])


def test_bad_usage_raises(device):
    layer = LocalLinearAttention(32, 2, backend="torch", device=device)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, C\] with C = embed_dim = 32"):
        layer(torch.randn(2, 5, 16, device=device))
    cache = layer.init_cache(1, 4)
    with torch.no_grad():
        layer(torch.randn(1, 3, 32, device=device), cache)
        with pytest.raises(ValueError, match="step takes one token"):
            layer.step(torch.randn(1, 2, 32, device=device), cache)
        layer.step(torch.randn(1, 32, device=device), cache)
        with pytest.raises(ValueError, match="the cache holds 4 positions"):
            layer.step(torch.randn(1, 32, device=device), cache)
    cache.reset()
    assert cache.length == 0 and cache.seqlens.tolist() == [0]
    with torch.no_grad():
        layer(torch.randn(1, 4, 32, device=device), cache)  # the whole capacity again after reset
    with pytest.raises(ValueError, match="the cache holds 1 sequences but x has 2"):
        layer(torch.randn(2, 1, 32, device=device), cache)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer.step(torch.randn(1, 32, device=device), layer.init_cache(1, 4))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LocalLinearAttention(32, 3, num_kv_heads=2)
    with pytest.raises(ValueError, match="ridge_lambda must be finite and > 0"):
        LocalLinearAttention(32, 2, ridge_lambda=0.0)
