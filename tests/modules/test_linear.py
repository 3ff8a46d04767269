"""LightningAttention and GatedLinearAttention layers: wiring against the reference ops, state hand-over,
token-by-token generation, varlen packing, gradients and bad input; with and without GQA (num_kv_heads)."""

import pytest
import torch
import torch.nn.functional as F

from flashops.nn import GatedLinearAttention, LightningAttention
from flashops.ops import linear as L
from flashops.ops.linear import reference as ref
from flashops.testing import assert_close

from ..helpers import BACKENDS, require


def _layer(kind, backend, device, num_kv_heads=None):
    torch.manual_seed(0)
    if kind == "lightning":
        return LightningAttention(32, 2, num_kv_heads=num_kv_heads, layer_idx=1, num_layers=4, backend=backend,
                                  device=device)
    return GatedLinearAttention(64, 2, num_kv_heads=num_kv_heads, backend=backend, device=device)


def _reference_forward(layer, x):
    """The layer's math written out with the reference ops (k, v and the gates with num_kv_heads heads)."""
    if isinstance(layer, LightningAttention):
        inner, kv_inner = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
        q, k, v, u = layer.qkvu_proj(x).split([inner, kv_inner, kv_inner, inner], dim=-1)
        heads, kv_heads = (*x.shape[:-1], layer.num_heads, -1), (*x.shape[:-1], layer.num_kv_heads, -1)
        o, _ = ref.lightning_attention(F.silu(q).view(heads), F.silu(k).view(kv_heads), v.view(kv_heads),
                                       layer.slopes, scale=1.0)
        return layer.out_proj(layer.norm(o.flatten(-2)) * u)
    heads, kv_heads = (*x.shape[:-1], layer.num_heads, -1), (*x.shape[:-1], layer.num_kv_heads, -1)
    q = layer.q_proj(x).view(heads)
    k = layer.k_proj(x).view(kv_heads)
    v = layer.v_proj(x).view(kv_heads)
    g = F.logsigmoid(layer.gk_proj(x)).view(kv_heads) / 16
    o, _ = ref.gated_linear_attention(q, k, v, g, scale=layer.head_k_dim ** -0.5)
    o = layer.g_norm(o) * F.silu(layer.g_proj(x)).view(o.shape)
    return layer.o_proj(o.flatten(-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lightning", "gla"])
@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_layer_matches_reference_composition(backend, kind, num_kv_heads, device):
    require(L.GLA, backend, device=device)
    layer = _layer(kind, backend, device, num_kv_heads)
    x = torch.randn(2, 70, layer.embed_dim, device=device, requires_grad=True)
    y = layer(x)
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
def test_cache_prefill_in_pieces_and_generation(backend, kind, device):
    """With GQA (num_kv_heads=1 of 2): GLA's cached state has one head, Lightning's one per slope (2)."""
    require(L.GLA, backend, device=device)
    layer = _layer(kind, backend, device, num_kv_heads=1)
    assert layer.init_cache(2).state.shape[1] == (2 if kind == "lightning" else 1)
    x = torch.randn(2, 21, layer.embed_dim, device=device)
    with torch.no_grad():
        y = layer(x)
        whole = layer.init_cache(2, 21)
        layer(x, whole)
        # Prefill the first 13 tokens in two pieces, then one token at a time.
        cache = layer.init_cache(2, 21)
        pieces = [layer(x[:, :6], cache), layer(x[:, 6:13], cache)]
        pieces += [layer.step(x[:, t], cache)[:, None] for t in range(13, 21)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.state, whole.state, rtol=1e-4, atol=1e-4)
    assert cache.seqlens.tolist() == [21, 21] and cache.state.dtype == torch.float32
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0] and not cache.state.any()


@pytest.mark.parametrize("kind", ["lightning", "gla"])
def test_gradients_flow_through_the_cached_state(kind, device):
    """Chunked training with a cache (truncated BPTT) gives the gradients of the whole sequence."""
    layer = _layer(kind, "torch", device)
    x = torch.randn(1, 12, layer.embed_dim, device=device, requires_grad=True)
    gy = torch.randn(1, 12, layer.embed_dim, device=device)
    want = torch.autograd.grad(layer(x), x, gy)[0]
    cache = layer.init_cache(1)
    y = torch.cat([layer(x[:, :5], cache), layer(x[:, 5:], cache)], dim=1)
    assert_close("dx", torch.autograd.grad(y, x, gy)[0], want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lightning", "gla"])
def test_packed_sequences(backend, kind, device):
    require(L.GLA, backend, device=device)
    layer = _layer(kind, backend, device)
    lengths = [9, 0, 30]
    seqs = [torch.randn(1, n, layer.embed_dim, device=device) for n in lengths]
    cu = torch.tensor([0, 9, 9, 39], dtype=torch.int32, device=device)
    with torch.no_grad():
        cache = layer.init_cache(3)
        y = layer(torch.cat(seqs, dim=1), cache, cu_seqlens=cu)
        flat = layer(torch.cat(seqs, dim=1)[0], cu_seqlens=cu.long())  # [total, C] and int64 offsets work too
        torch.testing.assert_close(flat, y[0])
        assert cache.seqlens.tolist() == lengths
        for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone = layer.init_cache(1)
            torch.testing.assert_close(y[:, s:e], layer(seqs[n], alone), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cache.state[n : n + 1], alone.state, rtol=1e-4, atol=1e-4)


def test_bad_input(device):
    layer = GatedLinearAttention(64, 2, backend="torch", device=device)
    with pytest.raises(ValueError, match=r"\[B, T, C\] with C = embed_dim = 64"):
        layer(torch.randn(2, 5, 32, device=device))
    with pytest.raises(ValueError, match=r"\[B, C\] \(one token per sequence\)"):
        layer.step(torch.randn(2, 1, 64, device=device), layer.init_cache(2))
    with pytest.raises(ValueError, match="the cache holds 3 sequences but x has 2"):
        layer(torch.randn(2, 5, 64, device=device), layer.init_cache(3))
    with pytest.raises(TypeError, match="cache must come from GatedLinearAttention.init_cache"):
        layer.step(torch.randn(2, 64, device=device), torch.zeros(2, 2, 16, 32))
    with pytest.raises(ValueError, match="multiples of num_heads"):
        GatedLinearAttention(64, 3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LightningAttention(30, 4)
    with pytest.raises(ValueError, match="layer_idx"):
        LightningAttention(32, 2, layer_idx=4, num_layers=4)
    with pytest.raises(ValueError, match=r"num_heads \(2\) must be a positive multiple of num_kv_heads \(3\)"):
        GatedLinearAttention(64, 2, num_kv_heads=3)
