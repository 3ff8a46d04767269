"""The conventions every module follows (docs/api.md): constructor names and their peer aliases, a tensor from
``forward``, ``.to(dtype)`` for fp32/fp16/bf16 with fp32 internals kept, a printed configuration, and the
decoding API ``init_cache`` / ``forward(x, cache)`` / ``step(x_t, cache)``."""

import pytest
import torch

from flashops import nn as fnn

from ..conftest import DEVICE

C = 32


MODULES = {  # name -> a small instance
    "MultiheadAttention": lambda: fnn.MultiheadAttention(C, 4, batch_first=True),
    "FlashSelfAttention": lambda: fnn.FlashSelfAttention(C, 4, 2, causal=True, alibi=True),
    "HyperAttention": lambda: fnn.HyperAttention(C, 4, causal=True, block_size=4, sample_size=4, min_seq_len=8),
    "LightningAttention": lambda: fnn.LightningAttention(C, 2),
    "GatedLinearAttention": lambda: fnn.GatedLinearAttention(C, 2),
    "LocalLinearAttention": lambda: fnn.LocalLinearAttention(C, 4, 2),
    "S4D": lambda: fnn.S4D(C, d_state=8),
    "LSSL": lambda: fnn.LSSL(C, d_state=6),
}
# What each module keeps in fp32 whatever the module's dtype.
FP32_INTERNALS = {"FlashSelfAttention": {"alibi_slopes"}, "LightningAttention": {"slopes"},
                  "LocalLinearAttention": {"ridge_raw"}, "S4D": {"dt_param", "D", "log_A_real", "A_imag", "C"},
                  "LSSL": {"dt_param", "D", "A", "B", "C"}}


@pytest.fixture(autouse=True)
def _pytorch_backends(monkeypatch):
    """The PyTorch path of every op: the Triton interpreter is too slow for this matrix (the ops' own tests
    cover every backend)."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("FLASHOPS_BACKEND", "torch")


def _make(name, seed=0):
    torch.manual_seed(seed)
    return MODULES[name]().to(DEVICE)


def _forward(layer, x):
    if isinstance(layer, fnn.MultiheadAttention):  # torch's signature and (out, weights) result
        return layer(x, x, x, need_weights=False)[0]
    if isinstance(layer, fnn.HyperAttention):  # its samples are random: the same draw for every dtype
        return layer(x, generator=torch.Generator(DEVICE).manual_seed(0))
    return layer(x)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_to_dtype_runs_forward_and_backward_and_keeps_fp32_internals(name, dtype):
    reference = _make(name)
    layer = _make(name).to(dtype)
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    for tensor_name, t in tensors.items():
        want = torch.float32 if tensor_name in FP32_INTERNALS.get(name, ()) else dtype
        assert t.dtype == want, f"{tensor_name}: {t.dtype}"
        ref_t = dict(reference.named_parameters()).get(tensor_name, dict(reference.named_buffers()).get(tensor_name))
        if want == torch.float32:  # kept at full precision, not rounded through the low-precision type
            assert torch.equal(t, ref_t), tensor_name
    x = torch.randn(2, 12, C, device=DEVICE)
    y = _forward(layer, x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    want = _forward(reference, x).detach()
    error = float((y.detach().float() - want).abs().max() / want.abs().max())
    assert error < {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-5}[dtype], error
    y.float().square().mean().backward()
    for tensor_name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), tensor_name


@pytest.mark.parametrize("name", [name for name in MODULES if name != "MultiheadAttention"])
def test_extra_repr_shows_the_configuration(name):
    text = repr(_make(name))
    assert f"embed_dim={C}" in text.splitlines()[1]
    if "Attention" in name:
        assert "num_heads=" in text and ("head_dim=" in text or "head_k_dim=" in text)
    if name in ("S4D", "LSSL"):
        assert "d_state=" in text and "discretization=" in text


def test_multihead_attention_repr():
    text = repr(fnn.MultiheadAttention(C, 4, batch_first=True, kdim=8))
    assert "embed_dim=32, num_heads=4, dropout=0.0, bias=True, batch_first=True, kdim=8, vdim=32" in text


@pytest.mark.parametrize("cls,alias,value", [
    (fnn.LightningAttention, "hidden_size", C), (fnn.GatedLinearAttention, "hidden_size", C),
    (fnn.LocalLinearAttention, "hidden_size", C), (fnn.FlashSelfAttention, "hidden_size", C),
    (fnn.HyperAttention, "hidden_size", C), (fnn.S4D, "d_model", C), (fnn.LSSL, "d_model", C),
])
def test_peer_spellings_of_the_width(cls, alias, value):
    heads = {} if cls in (fnn.S4D, fnn.LSSL) else {"num_heads": 2}
    assert cls(**{alias: value}, **heads).embed_dim == value
    with pytest.raises(TypeError, match=f"got both embed_dim= and its alias {alias}="):
        cls(**{alias: value, "embed_dim": value}, **heads)


def test_flash_attn_spelling_of_kv_heads():
    assert fnn.FlashSelfAttention(C, 4, num_heads_kv=1).num_kv_heads == 1
    assert fnn.HyperAttention(C, 4, num_heads_kv=2).num_kv_heads == 2


@pytest.mark.parametrize("name", [name for name in MODULES if name != "MultiheadAttention"])  # torch's forward
def test_one_decoding_loop_for_every_module(name):
    """The same generation code runs every layer: prefill a prompt in two pieces, then step token by token;
    the outputs are those of one forward pass over the whole sequence."""
    layer = _make(name).eval()
    if name == "HyperAttention":  # exact below min_seq_len, as its decoding is: the two must agree here
        layer.min_seq_len = 16
    x = torch.randn(2, 11, C, device=DEVICE)
    with torch.no_grad():
        want = _forward(layer, x)
        cache = layer.init_cache(2, 11, device=DEVICE, dtype=x.dtype)
        pieces = [layer(x[:, :4], cache), layer(x[:, 4:7], cache=cache)]
        pieces += [layer.step(x[:, t], cache)[:, None] for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), want, rtol=1e-4, atol=1e-4)
    assert cache.seqlens.tolist() == [11, 11] and cache.batch_size == 2
