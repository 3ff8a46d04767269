"""Decoding with a KVCache: a prefill and a loop of steps over FlashSelfAttention, MultiheadAttention and
HyperAttention equal one full forward; paged caches, left-padded batches, reset, and the errors."""

import pytest
import torch

import flashops
from flashops.nn import KVCache
from flashops.testing import assert_close

from ..conftest import DEVICE


@pytest.fixture
def torch_decode(monkeypatch):
    """Decode on the torch backend: the op's tests cover both backends, these the modules' use of the cache
    (every step under the Triton interpreter would cost seconds). The full forward keeps its default backend."""
    monkeypatch.setenv("FLASHOPS_BACKEND", "attention_kvcache=torch")


def decode(layer, x, cache, prefill: int):
    """Outputs of ``layer`` for x [B, T, C]: the first ``prefill`` tokens in one call, the rest one step at a time."""
    with torch.no_grad():
        outs = [layer(x[:, :prefill], cache)]  # the cache is forward's second positional argument
        outs += [layer.step(x[:, t], cache)[:, None] for t in range(prefill, x.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend,page_size", [("triton", 16), ("torch", None), ("torch", 16)])
def test_flash_self_attention_decoding_equals_full_forward(backend, page_size, monkeypatch):
    monkeypatch.setenv("FLASHOPS_BACKEND", f"attention_kvcache={backend}")
    layer = flashops.nn.FlashSelfAttention(32, 4, 2, causal=True, window_size=(9, 0), softcap=20.0,
                                           alibi=True).to(DEVICE)
    x = torch.randn(2, 14, 32, device=DEVICE)
    cache = layer.init_cache(2, 24, page_size=page_size)
    assert isinstance(cache, KVCache) and cache.capacity == (24 if page_size is None else 32)
    with torch.no_grad():
        full = layer(x)
    assert_close("decoded", decode(layer, x, cache, prefill=10), full)
    assert cache.seqlens.tolist() == [14, 14]
    cache.reset()
    assert_close("after reset", decode(layer, x[:, :5], cache, prefill=1), full[:, :5])


def test_multihead_attention_decoding_equals_causal_forward(torch_decode):
    t = 9
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=DEVICE), diagonal=1)
    for batch_first in (True, False):
        mha = flashops.nn.MultiheadAttention(32, 4, batch_first=batch_first).to(DEVICE).eval()
        x = torch.randn(3, t, 32, device=DEVICE)
        x_in = x if batch_first else x.transpose(0, 1)
        with torch.no_grad():
            full, _ = mha(x_in, x_in, x_in, attn_mask=causal, need_weights=False)
            cache = mha.init_cache(3, t)
            prompt = x_in[:, :4] if batch_first else x_in[:4]
            first, weights = mha(prompt, prompt, prompt, cache=cache)
            steps = [mha.step(x[:, i], cache) for i in range(4, t)]
        assert weights is None
        full = full if batch_first else full.transpose(0, 1)
        first = first if batch_first else first.transpose(0, 1)
        assert_close("prompt", first, full[:, :4])
        assert_close("steps", torch.stack(steps, dim=1), full[:, 4:])
    # Unbatched input: one sequence.
    prompt = x[0, :4]
    with torch.no_grad():
        single, _ = mha(prompt, prompt, prompt, cache=mha.init_cache(1, 4))
        want, _ = mha(prompt, prompt, prompt, attn_mask=causal[:4, :4], need_weights=False)
    assert_close("unbatched", single, want)


def test_hyper_attention_decodes_exactly(torch_decode):
    layer = flashops.nn.HyperAttention(32, 4, causal=True, min_seq_len=64).to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE)
    with torch.no_grad():
        full = layer(x)  # T <= min_seq_len: exact attention
    assert_close("decoded", decode(layer, x, layer.init_cache(2, 16), prefill=6), full)


def test_left_padded_batch_matches_each_sequence_alone(torch_decode):
    layer = flashops.nn.FlashSelfAttention(32, 4, 1, causal=True).to(DEVICE)
    lengths = [7, 3]
    xs = [torch.randn(1, n + 4, 32, device=DEVICE) for n in lengths]  # prompt + 4 decoded tokens each
    prompt = torch.zeros(2, max(lengths), 32, device=DEVICE)
    for i, n in enumerate(lengths):
        prompt[i, max(lengths) - n:] = xs[i][0, :n]
    cache = layer.init_cache(2, 16)
    cache.leftpad = torch.tensor([max(lengths) - n for n in lengths], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        out = layer(prompt, cache=cache)
        steps = [layer.step(torch.stack([x[0, n + s] for x, n in zip(xs, lengths)]), cache) for s in range(4)]
        for i, (x, n) in enumerate(zip(xs, lengths)):
            alone = layer(x)
            assert_close(f"prompt {i}", out[i, max(lengths) - n:], alone[0, :n])
            assert_close(f"steps {i}", torch.stack([s[i] for s in steps]), alone[0, n:])


def test_decoding_errors_are_clear():
    layer = flashops.nn.FlashSelfAttention(32, 4).to(DEVICE)
    cache = layer.init_cache(1, 8)
    x = torch.randn(1, 3, 32, device=DEVICE)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x, cache=cache)
    with torch.no_grad(), pytest.raises(ValueError, match="cache_seqlens \\+ Tnew"):
        layer(torch.randn(1, 9, 32, device=DEVICE), cache=cache)
    mha = flashops.nn.MultiheadAttention(32, 4, batch_first=True).to(DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match="same tensor as query, key and value"):
        mha(x, x.clone(), x, cache=mha.init_cache(1, 8))
    with pytest.raises(ValueError, match="plain self-attention"):
        flashops.nn.MultiheadAttention(32, 4, kdim=16, vdim=16).init_cache(1, 8)
