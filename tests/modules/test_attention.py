"""Attention modules: the MultiheadAttention drop-in against torch's, and FlashSelfAttention."""

import itertools

import pytest
import torch

import flashops
from flashops.modules.attention import alibi_slopes
from flashops.ops.attention import reference
from flashops.testing import assert_close

from ..conftest import DEVICE

CONFIGS = [
    dict(batch_first=True),
    dict(batch_first=False, bias=False),
    dict(batch_first=True, kdim=12, vdim=20),
    dict(batch_first=False, add_bias_kv=True, add_zero_attn=True),
]


def _pair(**config):
    torch_mha = torch.nn.MultiheadAttention(32, 4, **config).to(DEVICE)
    ours = flashops.nn.MultiheadAttention(32, 4, **config).to(DEVICE)
    ours.load_state_dict(torch_mha.state_dict())
    return torch_mha, ours


def _inputs(config, batched=True, t_q=9, t_k=13, b=3):
    kdim, vdim = config.get("kdim", 32), config.get("vdim", 32)
    shape = (lambda t, e: (b, t, e)) if config.get("batch_first") else (lambda t, e: (t, b, e))
    if not batched:
        shape = lambda t, e: (t, e)  # noqa: E731
    return (torch.randn(shape(t_q, 32), device=DEVICE), torch.randn(shape(t_k, kdim), device=DEVICE),
            torch.randn(shape(t_k, vdim), device=DEVICE))


def _masks(kind, b=3, t_q=9, t_k=13, heads=4):
    if kind is None:
        return {}
    padding = torch.zeros(b, t_k, dtype=torch.bool, device=DEVICE)
    padding[0, -4:] = True
    if kind == "padding":
        return {"key_padding_mask": padding}
    attn = torch.rand(t_q, t_k, device=DEVICE) < 0.3
    attn[:, 0] = False  # every row keeps one key: torch gives NaN for rows with none
    if kind == "bool":
        return {"attn_mask": attn, "key_padding_mask": padding}
    if kind == "float3d":
        return {"attn_mask": torch.randn(b * heads, t_q, t_k, device=DEVICE)}
    raise ValueError(kind)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("masks", [None, "padding", "bool", "float3d"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_matches_torch(config, masks, need_weights):
    torch_mha, ours = _pair(**config)
    query, key, value = _inputs(config)
    kwargs = dict(_masks(masks), need_weights=need_weights)
    expected, expected_w = torch_mha(query, key, value, **kwargs)
    actual, actual_w = ours(query, key, value, **kwargs)
    assert_close("out", actual, expected)
    if need_weights:
        assert_close("weights", actual_w, expected_w)
    else:
        assert actual_w is None and expected_w is None
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, list(torch_mha.parameters()), grad)
    actual_grads = torch.autograd.grad(actual, list(ours.parameters()), grad)
    for (name, _), a, e in zip(ours.named_parameters(), actual_grads, expected_grads):
        assert_close(f"d{name}", a, e)


def test_multihead_attention_unbatched_causal_and_per_head_weights():
    torch_mha, ours = _pair(batch_first=True)
    x = torch.randn(11, 32, device=DEVICE)
    causal = torch.triu(torch.ones(11, 11, dtype=torch.bool, device=DEVICE), diagonal=1)
    for need_weights, average in itertools.product([False, True], [False, True]):
        expected, expected_w = torch_mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights,
                                         average_attn_weights=average)
        actual, actual_w = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights,
                                average_attn_weights=average)
        assert_close("out", actual, expected)
        if need_weights:
            assert actual_w.shape == expected_w.shape
            assert_close("weights", actual_w, expected_w)


def test_multihead_attention_is_a_torch_module_with_same_state():
    torch_mha, ours = _pair(batch_first=True, kdim=12, vdim=20)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(torch_mha.state_dict())
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        x = torch.randn(2, 5, 32, device=DEVICE)
        flashops.nn.MultiheadAttention(32, 4, batch_first=True).to(DEVICE)(x, x, x, is_causal=True)


def test_multihead_attention_dropout_in_training():
    _, ours = _pair(batch_first=True, dropout=0.5)
    x = torch.randn(2, 16, 32, device=DEVICE)
    ours.train()
    out1, _ = ours(x, x, x, need_weights=False)
    out2, _ = ours(x, x, x, need_weights=False)
    assert not torch.allclose(out1, out2)
    ours.eval()
    out3, _ = ours(x, x, x, need_weights=False)
    out4, _ = ours(x, x, x, need_weights=False)
    assert torch.equal(out3, out4)


def _self_attention_reference(module, x, **kwargs):
    h, h_kv, d = module.num_heads, module.num_kv_heads, module.head_dim
    q, k, v = module.qkv_proj(x).split([h * d, h_kv * d, h_kv * d], dim=-1)
    q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (h_kv, d)), v.unflatten(-1, (h_kv, d))
    out, _ = reference.attention(q, k, v, causal=module.causal, window_size=module.window_size,
                                 softcap=module.softcap, alibi_slopes=module.alibi_slopes, **kwargs)
    return module.out_proj(out.reshape(*x.shape[:-1], h * d))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_flash_self_attention(num_kv_heads):
    module = flashops.nn.FlashSelfAttention(48, 4, num_kv_heads, causal=True, window_size=(9, 0), softcap=20.0,
                                            alibi=True).to(DEVICE)
    x = torch.randn(2, 37, 48, device=DEVICE, requires_grad=True)
    actual = module(x)
    expected = _self_attention_reference(module, x)
    assert_close("out", actual, expected)
    grad = torch.randn_like(actual)
    params = [x, *module.parameters()]
    for a, e in zip(torch.autograd.grad(actual, params, grad), torch.autograd.grad(expected, params, grad)):
        assert_close("grad", a, e)


def test_flash_self_attention_varlen_equals_per_sequence():
    module = flashops.nn.FlashSelfAttention(32, 4, 2, causal=True).to(DEVICE)
    lengths = [7, 20, 1]
    xs = [torch.randn(n, 32, device=DEVICE) for n in lengths]
    cu = torch.tensor([0, 7, 27, 28], dtype=torch.int32, device=DEVICE)
    packed = module(torch.cat(xs), cu_seqlens=cu, max_seqlen=20)
    separate = torch.cat([module(x[None])[0] for x in xs])
    assert_close("packed", packed, separate)


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s12 = alibi_slopes(12)
    assert s12.shape == (12,) and torch.allclose(s12[:8], alibi_slopes(8))
    assert torch.allclose(s12[8:], alibi_slopes(16)[0::2][:4])


def test_flash_self_attention_bad_config():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        flashops.nn.FlashSelfAttention(32, 4, 3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        flashops.nn.FlashSelfAttention(30, 4)
