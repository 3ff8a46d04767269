"""flashops._numerics: the finiteness check the PyTorch paths branch on."""

import pytest
import torch

from flashops._numerics import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_all_finite(dtype):
    x = torch.randn(3, 50, dtype=torch.float32).to(dtype)
    assert all_finite(x, None, x[:, ::2])
    assert all_finite(torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 7] = bad
        assert not all_finite(x, y)
    # Finite entries whose sum overflows: the sum alone cannot tell, the entry-wise check does.
    big = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big)
