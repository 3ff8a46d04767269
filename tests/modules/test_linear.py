"""LightningAttention and GatedLinearAttention layers: wiring against the reference ops, state hand-over,
token-by-token generation, varlen packing, gradients and bad input."""

import pytest
import torch
import torch.nn.functional as F

from flashops.nn import GatedLinearAttention, LightningAttention
from flashops.ops import linear as L
from flashops.ops.linear import reference as ref
from flashops.testing import assert_close

from ..helpers import BACKENDS, require


def _layer(kind, backend, device):
    torch.manual_seed(0)
    if kind == "lightning":
        return LightningAttention(32, 2, layer_idx=1, num_layers=4, backend=backend, device=device)
    return GatedLinearAttention(64, 2, backend=backend, device=device)


def _reference_forward(layer, x):
    """The layer's math written out with the reference ops."""
    if isinstance(layer, LightningAttention):
        q, k, v, u = layer.qkvu_proj(x).chunk(4, dim=-1)
        shape = (*x.shape[:-1], layer.num_heads, layer.head_dim)
        o, _ = ref.lightning_attention(F.silu(q).view(shape), F.silu(k).view(shape), v.view(shape), layer.slopes,
                                       scale=1.0)
        return layer.out_proj(layer.norm(o.flatten(-2)) * u)
    heads = (*x.shape[:-1], layer.num_heads)
    q = layer.q_proj(x).view(*heads, -1)
    k = layer.k_proj(x).view(*heads, -1)
    v = layer.v_proj(x).view(*heads, -1)
    g = F.logsigmoid(layer.gk_proj(x)).view(*heads, -1) / 16
    o, _ = ref.gated_linear_attention(q, k, v, g, scale=layer.head_k_dim ** -0.5)
    o = layer.g_norm(o) * F.silu(layer.g_proj(x)).view(o.shape)
    return layer.o_proj(o.flatten(-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lightning", "gla"])
def test_layer_matches_reference_composition(backend, kind, device):
    require(L.GLA, backend, device=device)
    layer = _layer(kind, backend, device)
    x = torch.randn(2, 70, layer.hidden_size, device=device, requires_grad=True)
    y, state = layer(x)
    assert state is None
    y_ref = _reference_forward(layer, x)
    assert_close("y", y, y_ref)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], gy)
    grads_ref = torch.autograd.grad(y_ref, [x, *layer.parameters()], gy)
    for (name, _), a, r in zip([("x", None), *layer.named_parameters()], grads, grads_ref):
        assert_close(f"d{name}", a, r, factor=4.0)
        assert float(a.abs().max()) > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lightning", "gla"])
def test_state_hand_over_and_generation(backend, kind, device):
    require(L.GLA, backend, device=device)
    layer = _layer(kind, backend, device)
    x = torch.randn(2, 21, layer.hidden_size, device=device)
    with torch.no_grad():
        y, final = layer(x, output_final_state=True)
        # Prefill the first 13 tokens, then continue from the returned state.
        y_a, state = layer(x[:, :13], output_final_state=True)
        y_b, final_b = layer(x[:, 13:], initial_state=state, output_final_state=True)
        torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final_b, final, rtol=1e-4, atol=1e-4)
        # Token by token from an empty state.
        state = None
        for t in range(x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            torch.testing.assert_close(y_t, y[:, t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state, final, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lightning", "gla"])
def test_packed_sequences(backend, kind, device):
    require(L.GLA, backend, device=device)
    layer = _layer(kind, backend, device)
    lengths = [9, 0, 30]
    seqs = [torch.randn(1, n, layer.hidden_size, device=device) for n in lengths]
    cu = torch.tensor([0, 9, 9, 39], dtype=torch.int32, device=device)
    with torch.no_grad():
        y, final = layer(torch.cat(seqs, dim=1), cu_seqlens=cu, output_final_state=True)
        for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            y_n, final_n = layer(seqs[n], output_final_state=True)
            torch.testing.assert_close(y[:, s:e], y_n, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(final[n : n + 1], final_n, rtol=1e-4, atol=1e-4)


def test_bad_input(device):
    layer = GatedLinearAttention(64, 2, backend="torch", device=device)
    with pytest.raises(ValueError, match=r"\[B, T, hidden\] with hidden=64"):
        layer(torch.randn(2, 5, 32, device=device))
    with pytest.raises(ValueError, match=r"\[B, hidden\]"):
        layer.step(torch.randn(2, 1, 64, device=device))
    with pytest.raises(ValueError, match="multiples of num_heads"):
        GatedLinearAttention(64, 3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LightningAttention(30, 4)
    with pytest.raises(ValueError, match="layer_idx"):
        LightningAttention(32, 2, layer_idx=4, num_layers=4)
