"""LSSL and S4D layers: recurrent mode equals convolution mode, chunked equals full, every parameter learns."""

import pytest
import torch

from flashops.nn import LSSL, S4D

LAYERS = [
    (S4D, dict(d_state=8, channels=2)),
    (S4D, dict(d_state=6, init="legs", discretization="bilinear", dt_transform="softplus")),
    (S4D, dict(d_state=5, init="real")),
    (LSSL, dict(d_state=6, channels=3)),
    (LSSL, dict(d_state=4, measure="legt", trainable_A=True, discretization="zoh", activation="silu")),
]


def _layer(cls, kw, dtype=torch.float64):
    torch.manual_seed(0)
    return cls(4, **kw).to(dtype)


@pytest.mark.parametrize("cls,kw", LAYERS)
def test_step_matches_forward(cls, kw):
    m = _layer(cls, kw)
    u = torch.randn(2, 23, 4, dtype=torch.float64)
    y = m(u)
    assert y.shape == u.shape
    cache = m.init_cache(2)
    ys = [m.step(u[:, t], cache) for t in range(23)]
    assert torch.allclose(torch.stack(ys, 1), y, atol=1e-10)
    whole = m.init_cache(2)
    m(u, whole)
    assert torch.allclose(whole.state, cache.state, atol=1e-10)
    assert cache.seqlens.tolist() == [23, 23]


@pytest.mark.parametrize("cls,kw", LAYERS)
def test_chunked_forward_equals_full(cls, kw):
    m = _layer(cls, kw)
    u = torch.randn(2, 30, 4, dtype=torch.float64)
    y = m(u)
    cache = m.init_cache(2)
    outs = [m(u[:, lo:hi], cache) for lo, hi in ((0, 7), (7, 8), (8, 30))]
    assert torch.allclose(torch.cat(outs, 1), y, atol=1e-10)
    cache.reset()
    assert torch.allclose(m(u[:, :7], cache), y[:, :7], atol=1e-10)  # a reset cache starts afresh


@pytest.mark.parametrize("cls,kw", LAYERS)
def test_every_parameter_gets_a_gradient(cls, kw):
    m = _layer(cls, kw, torch.float32)
    m(torch.randn(2, 16, 4)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    if cls is LSSL and not kw.get("trainable_A"):
        assert "A" in dict(m.named_buffers()) and "A" not in dict(m.named_parameters())


def test_s4d_backends_agree(device):
    from ..helpers import require
    require("vandermonde_kernel", "triton", device=device)
    torch.manual_seed(0)
    m = S4D(4, d_state=8, channels=2).to(device)
    u = torch.randn(2, 40, 4, device=device)
    m.backend = "triton"
    a = m(u)
    m.backend = "torch"
    b = m(u)
    assert torch.allclose(a, b, atol=1e-4)


def test_layer_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(d_model\) must be a positive int"):
        S4D(0)
    with pytest.raises(ValueError, match="dt_transform must be"):
        S4D(4, dt_transform="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        LSSL(4, activation="tanh")
    with pytest.raises(ValueError, match="must be even"):
        S4D(4, d_state=5, init="lin")
    m = S4D(4, d_state=4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, C\] with C = embed_dim = 4"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"x must have shape \[B, C\] \(one token per sequence\)"):
        m.step(torch.randn(2, 3), m.init_cache(2))
    with pytest.raises(ValueError, match="the cache holds 3 sequences but x has 2"):
        m.step(torch.randn(2, 4), m.init_cache(3))
    with pytest.raises(TypeError, match="cache must come from S4D.init_cache"):
        m(torch.randn(2, 5, 4), LSSL(4, d_state=4).init_cache(2).state)
