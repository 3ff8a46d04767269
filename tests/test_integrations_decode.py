"""generate() with the "fops" attention: decode steps run on flash_attention_with_kvcache and give the tokens and
logits of transformers' eager attention, with the dynamic and the static cache, left padding, GQA and sliding
windows."""

import importlib.util

import pytest
import torch

import flashops.integrations.transformers as fo_hf
from flashops.testing import assert_close

from .conftest import DEVICE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is not installed")

LAYERS, NEW_TOKENS = 2, 5


def _config(kind):
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaConfig(**common) if kind == "llama" else MistralConfig(sliding_window=6, **common)


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the calls the integration makes to flash_attention_with_kvcache."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return flashops_op(*args, **kwargs)

    flashops_op = fo_hf.flash_attention_with_kvcache
    monkeypatch.setattr(fo_hf, "flash_attention_with_kvcache", counting)
    monkeypatch.setenv("FLASHOPS_BACKEND", "attention_kvcache=torch")  # the op's own tests cover Triton
    return calls


def _register_with_mask(monkeypatch):
    """Register "fops" with a mask function: without one transformers hands it no mask at all (no padding, the
    whole static buffer). If register() has not installed SDPA's bool masks, do it for the test's duration."""
    from transformers import AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    name = fo_hf.register()
    if name not in AttentionMaskInterface._global_mapping:
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, sdpa_mask)
    return name


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generate_matches_eager(kind, cache_implementation, decode_calls, monkeypatch):
    from transformers import AutoModelForCausalLM

    name = _register_with_mask(monkeypatch)
    eager = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager").to(DEVICE).eval()
    ours = AutoModelForCausalLM.from_config(_config(kind), attn_implementation=name).to(DEVICE).eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(3, 97, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding of the first prompt
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  cache_implementation=cache_implementation)
    with torch.no_grad():
        want = eager.generate(ids, attention_mask=mask, **kwargs)
        got = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert_close(f"logits of step {step}", a, b)
    # Every decode step of every layer went through the KV-cache op, one query per sequence.
    assert len(decode_calls) == LAYERS * (NEW_TOKENS - 1)
    assert all(shape[:2] == (2, 1) for shape in decode_calls)


def test_masks_the_op_cannot_express_fall_back():
    query = torch.randn(1, 4, 2, 16, device=DEVICE)
    key, value = (torch.randn(1, 2, 10, 16, device=DEVICE) for _ in range(2))
    holes = torch.ones(1, 1, 2, 10, dtype=torch.bool, device=DEVICE).tril(diagonal=8)
    holes[..., 4] = False  # a hole in the middle of the visible keys
    module = torch.nn.Module()
    assert fo_hf._decode_step(module, query, key, value, holes, 0.0, None, None, None, None) is None
    out, _ = fo_hf.flashops_attention_forward(module, query, key, value, holes)
    want = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(2, 1),
                                                            value.repeat_interleave(2, 1), attn_mask=holes)
    assert_close("fallback", out, want.transpose(1, 2))
    causal = torch.ones(1, 1, 2, 10, dtype=torch.bool, device=DEVICE).tril(diagonal=8)
    decoded = fo_hf._decode_step(module, query, key, value, causal, 0.0, None, None, None, None)
    want = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(2, 1),
                                                            value.repeat_interleave(2, 1), attn_mask=causal)
    assert_close("decoded", decoded, want.transpose(1, 2))
