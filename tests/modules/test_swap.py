"""swap_attention: torch encoder and decoder stacks and a transformers model run flashops attention, in train and
eval mode (where torch's fused encoder path would otherwise skip the attention module), with unchanged results."""

import copy
import importlib.util

import pytest
import torch

import flashops
from flashops.modules import attention as attention_module
from flashops.testing import assert_close

from ..conftest import DEVICE


@pytest.fixture(autouse=True)
def _pytorch_backends(monkeypatch):
    """The PyTorch path of the ops (the Triton interpreter is slow; the ops' tests cover every backend)."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("FLASHOPS_BACKEND", "torch")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of flashops.nn.MultiheadAttention.forward."""
    counter = {"n": 0}
    forward = attention_module.MultiheadAttention.forward

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(attention_module.MultiheadAttention, "forward", counting)
    return counter


def _swapped(model):
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    swapped = flashops.nn.swap_attention(model)
    assert swapped is model
    assert [id(p) for p in swapped.parameters()] == [id(p) for p in params]  # an existing optimizer still works
    assert swapped.state_dict().keys() == reference.state_dict().keys()
    return swapped, reference


def _check_train_and_eval(model, reference, run, calls, expected_calls, rows=None):
    for training in (True, False):
        model.train(training)
        reference.train(training)
        calls["n"] = 0
        out, want = run(model), run(reference)
        assert calls["n"] == expected_calls, f"training={training}: flashops attention ran {calls['n']} times"
        if rows is not None:  # torch's nested-tensor path zeroes padded rows; compare the others
            out, want = out[rows], want[rows]
        assert_close(f"output (training={training})", out, want)
        if training:
            grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
            want_grads = torch.autograd.grad(want.square().sum(), list(reference.parameters()))
            for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
                assert_close(f"d{name}", g, w)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_runs_flashops_attention_in_train_and_eval(norm_first, calls):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    model, reference = _swapped(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first).to(DEVICE))
    assert all(type(m.self_attn) is flashops.nn.MultiheadAttention for m in model.layers)
    x = torch.randn(3, 10, 32, device=DEVICE)
    padding = torch.zeros(3, 10, dtype=torch.bool, device=DEVICE)
    padding[0, 6:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10, device=DEVICE)
    _check_train_and_eval(model, reference, lambda m: m(x, src_key_padding_mask=padding), calls, 2, rows=~padding)
    _check_train_and_eval(model, reference, lambda m: m(x, mask=causal, is_causal=True), calls, 2)


def test_decoder_and_full_transformer(calls):
    torch.manual_seed(0)
    model, reference = _swapped(torch.nn.Transformer(32, 4, num_encoder_layers=1, num_decoder_layers=2,
                                                     dim_feedforward=64, dropout=0.0).to(DEVICE))
    src, tgt = torch.randn(9, 2, 32, device=DEVICE), torch.randn(7, 2, 32, device=DEVICE)
    memory_padding = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    memory_padding[1, 5:] = True
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)

    def run(m):
        return m(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=memory_padding,
                 src_key_padding_mask=memory_padding)

    # 1 encoder self-attention + 2 decoder layers x (self-attention, cross-attention)
    _check_train_and_eval(model, reference, run, calls, 5)


def test_a_bare_multihead_attention_and_bad_input():
    mha = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True, kdim=8, vdim=12).to(DEVICE)
    swapped = flashops.nn.swap_attention(mha)
    assert type(swapped) is flashops.nn.MultiheadAttention and swapped.bias_k is mha.bias_k
    q, k, v = torch.randn(5, 2, 16), torch.randn(6, 2, 8), torch.randn(6, 2, 12)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    assert_close("out", swapped(q, k, v)[0], mha(q, k, v)[0])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        flashops.nn.swap_attention("model")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_a_transformers_model_in_train_and_eval(monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flashops.integrations import transformers as hf

    calls = {"n": 0}
    forward = hf.flashops_attention_forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(hf, "flashops_attention_forward", counting)  # what register() installs
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(DEVICE)
    model = flashops.nn.swap_attention(copy.deepcopy(reference))
    assert model.config._attn_implementation == hf.NAME
    ids = torch.randint(0, 97, (2, 11), device=DEVICE)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    for training in (True, False):
        model.train(training)
        reference.train(training)
        calls["n"] = 0
        got = model(ids, attention_mask=padding, labels=ids)
        want = reference(ids, attention_mask=padding, labels=ids)
        assert calls["n"] == 2, calls
        assert_close(f"logits (training={training})", got.logits[1], want.logits[1])
        assert_close(f"logits of the padded row (training={training})", got.logits[0, 3:], want.logits[0, 3:])
        if training:
            grads = torch.autograd.grad(got.loss, list(model.parameters()))
            want_grads = torch.autograd.grad(want.loss, list(reference.parameters()))
            for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
                assert_close(f"d{name}", g, w)
