"""The Hugging Face attention function and its registration: tiny random Llama (GQA), Mistral (sliding window)
and Gemma-2 (logit soft-capping, alternating sliding/full layers) models give the logits and greedy tokens of
transformers' own "eager" and "sdpa" implementations, with left and right padding and with a KV cache."""

import importlib.util

import pytest
import torch

from flashops.integrations.transformers import flashops_attention_forward
from flashops.testing import assert_close

from .conftest import DEVICE, ON_GPU

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


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


def test_masked_call_keeps_softcap():
    """A mask does not switch soft-capping off (it used to: masked calls went through plain SDPA)."""
    query, key, value = (torch.randn(1, 2, 7, 8, device=DEVICE) * 4 for _ in range(3))
    mask = torch.ones(1, 1, 7, 7, dtype=torch.bool, device=DEVICE).tril()
    mask[..., :2] = False
    mask[..., :2, 0] = True
    logits = torch.tanh(query @ key.transpose(-1, -2) * 0.35 / 2.0) * 2.0
    expected = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ value
    out, _ = flashops_attention_forward(_Module(), query, key, value, mask, scaling=0.35, softcap=2.0)
    assert_close("softcapped", out, expected.transpose(1, 2))


# ------------------------------------------------------------------------------------------- tiny models
@pytest.fixture
def fast_backend(monkeypatch):
    """Whole models under the Triton interpreter take minutes: on CPU they run the torch backend (the
    kernels' own tests and tests/invariants cover every backend)."""
    if not ON_GPU:
        monkeypatch.setenv("FLASHOPS_BACKEND", "attention=torch")


def _config(kind):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=4)
    return Gemma2Config(**common, head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
                        final_logit_softcapping=None, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"])


def _models(kind, implementations):
    from transformers import AutoModelForCausalLM

    from flashops.integrations.transformers import register

    torch.manual_seed(0)
    models = {}
    for name in implementations:
        impl = register() if name == "fops" else name
        # a config per model: from_config records the implementation in the config it is given
        model = AutoModelForCausalLM.from_config(_config(kind), attn_implementation=impl).to(DEVICE).eval()
        assert model.config._attn_implementation == impl
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[name] = model
    return models


def _padded_batch(side):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 11), generator=gen).to(DEVICE)
    padding = torch.ones_like(ids)
    lengths = (11, 7, 4)
    for row, n in enumerate(lengths):
        if side == "left":
            padding[row, : 11 - n] = 0
        else:
            padding[row, n:] = 0
    return ids.masked_fill(padding == 0, 0), padding


# Gemma-2's "sdpa" drops the logit soft-capping (transformers' SDPA has none), so it is compared with "eager".
REFERENCES = {"llama": ("eager", "sdpa"), "mistral": ("eager", "sdpa"), "gemma2": ("eager",)}


@needs_transformers
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_padded_batch_logits_match_transformers(kind, side, fast_backend):
    models = _models(kind, ("fops",) + REFERENCES[kind])
    ours = models.pop("fops")
    ids, padding = _padded_batch(side)
    real = padding.bool()
    with torch.no_grad():
        padded, unpadded = ours(ids, attention_mask=padding).logits, ours(ids).logits
        for name, model in models.items():
            reference = model(ids, attention_mask=padding).logits
            assert_close(f"{kind} {side}-padded logits vs {name}", padded[real], reference[real])
            assert_close(f"{kind} unpadded logits vs {name}", unpadded, model(ids).logits)


@needs_transformers
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_batched_generate_with_cache_matches_transformers(kind, fast_backend):
    models = _models(kind, ("fops",) + REFERENCES[kind])
    ids, padding = _padded_batch("left")
    kwargs = dict(attention_mask=padding, max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = models.pop("fops").generate(ids, **kwargs)
        for name, model in models.items():
            assert torch.equal(ours, model.generate(ids, **kwargs)), f"greedy tokens differ from {name}"


@needs_transformers
def test_registration_adds_a_mask_builder():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from flashops.integrations.transformers import register

    name = register()
    assert AttentionInterface()[name] is flashops_attention_forward
    assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
