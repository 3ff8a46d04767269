"""HyperAttention module: FlashSelfAttention's projections and state dict, exact below min_seq_len, the op above."""

import pytest
import torch

import flashops
from flashops.nn import FlashSelfAttention, HyperAttention
from flashops.testing import max_abs_error

from ..conftest import DEVICE


@pytest.mark.parametrize("causal", [False, True])
def test_exact_below_min_seq_len_with_a_flash_self_attention_state_dict(causal):
    flash = FlashSelfAttention(32, 4, 2, causal=causal).to(DEVICE)
    hyper = HyperAttention(32, 4, 2, causal=causal, min_seq_len=40, block_size=8, sample_size=8).to(DEVICE)
    hyper.load_state_dict(flash.state_dict())
    x = torch.randn(2, 40, 32, device=DEVICE)
    assert max_abs_error(hyper(x), flash(x)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_use_the_op_and_train(causal):
    torch.manual_seed(0)
    layer = HyperAttention(32, 2, causal=causal, lsh_num_projs=3, block_size=8, sample_size=8, min_seq_len=16)
    layer = layer.to(DEVICE)
    x = torch.randn(1, 50, 32, device=DEVICE, requires_grad=True)
    out = layer(x, generator=torch.Generator(device=DEVICE).manual_seed(5))
    q, k, v = layer.qkv_proj(x).split(32, dim=-1)
    want = flashops.hyper_attention(q.unflatten(-1, (2, 16)), k.unflatten(-1, (2, 16)), v.unflatten(-1, (2, 16)),
                                    causal=causal, lsh_num_projs=3, block_size=8, sample_size=8, min_seq_len=16,
                                    generator=torch.Generator(device=DEVICE).manual_seed(5))
    want = layer.out_proj(want.reshape(1, 50, 32))
    assert torch.equal(out, want)
    # The approximation differs from exact attention, and gradients reach the input and every parameter.
    flash = FlashSelfAttention(32, 2, causal=causal).to(DEVICE)
    flash.load_state_dict(layer.state_dict())
    assert max_abs_error(out, flash(x)) > 1e-4
    out.square().sum().backward()
    for name, p in [("x", x), *layer.named_parameters()]:
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        HyperAttention(32, 4, 3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        HyperAttention(30, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\]"):
        HyperAttention(32, 4)(torch.randn(5, 32))
    with pytest.raises(ValueError, match="block_size"):
        HyperAttention(32, 4, block_size=0, min_seq_len=4)(torch.randn(1, 8, 32))
