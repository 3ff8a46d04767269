"""The Hugging Face attention function: same results as transformers' SDPA implementation."""

import importlib.util

import pytest
import torch

from flashops.integrations.transformers import flashops_attention_forward
from flashops.testing import assert_close

from .conftest import DEVICE


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _sdpa_like_hf(query, key, value, mask, causal, scaling=None):
    key = key.repeat_interleave(2, dim=1)
    value = value.repeat_interleave(2, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           is_causal=causal and mask is None)
    return out.transpose(1, 2)


def test_function_matches_sdpa_semantics():
    query = torch.randn(2, 4, 10, 16, device=DEVICE)
    key, value = (torch.randn(2, 2, 10, 16, device=DEVICE) for _ in range(2))
    out, weights = flashops_attention_forward(_Module(), query, key, value, None, scaling=0.3)
    assert weights is None and out.shape == (2, 10, 4, 16)
    assert_close("causal", out, _sdpa_like_hf(query, key, value, None, True, 0.3))
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool, device=DEVICE).tril()
    mask[0, :, :, :3] = False  # left padding of the first sequence
    mask[0, :, :3, 0] = True  # keep padded rows finite for torch's reference
    out, _ = flashops_attention_forward(_Module(), query, key, value, mask)
    assert_close("masked", out, _sdpa_like_hf(query, key, value, mask, True))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_registered_implementation_runs_a_model_like_sdpa():
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig

    from flashops.integrations.transformers import register

    name = register()
    assert AttentionInterface()[name] is flashops_attention_forward
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(DEVICE).eval()
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=name).to(DEVICE).eval()
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 97, (2, 12), device=DEVICE)
    padding = torch.ones_like(ids)
    padding[0, :4] = 0
    with torch.no_grad():
        assert_close("logits", ours(ids).logits, reference(ids).logits)
        got = ours(ids, attention_mask=padding).logits[1]
        assert_close("padded logits", got, reference(ids, attention_mask=padding).logits[1])
