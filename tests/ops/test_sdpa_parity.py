"""flashops.sdpa against torch's scaled_dot_product_attention, output and every gradient: every broadcastable
mask shape of 3-D to 5-D inputs, bool and float masks with and without a gradient, is_causal with L != S,
scale, enable_gqa, and a value head dim different from the query's. (Rows that see no key are avoided:
torch gives NaN there, flashops 0.)"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import flashops
from flashops.testing import GRAD_FACTOR, assert_close

from ..conftest import DEVICE

L, S, E = 5, 7, 8
LEAD = {3: (2,), 4: (2, 3), 5: (2, 2, 3)}  # batch dims (the last one of 4-D/5-D is the head dim)


def _shapes(rank: int) -> list:
    """Every shape that broadcasts to the full mask shape of a rank-``rank`` input: each dim full or 1, and
    any number of leading dims dropped."""
    full = (*LEAD[rank], L, S)
    shapes = []
    for drop in range(len(full) - 1):
        kept = full[drop:]
        shapes += [tuple(n if keep else 1 for n, keep in zip(kept, mask))
                   for mask in itertools.product((True, False), repeat=len(kept))]
    return shapes


def _mask(shape, kind, gen):
    """A bool (True = attend) or additive float mask of ``shape`` in which every query row sees key 0."""
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.4
        mask[..., 0] = True
        return mask.to(DEVICE)
    mask = torch.randn(shape, generator=gen)
    mask = mask.masked_fill(torch.rand(shape, generator=gen) > 0.7, float("-inf"))
    mask[..., 0] = 0.0
    return mask.to(DEVICE).requires_grad_(kind == "float+grad")


def _inputs(rank, gen, heads_kv=None, e_v=E, s=S):
    lead = LEAD[rank]
    kv_lead = lead if heads_kv is None else (*lead[:-1], heads_kv)
    q = torch.randn(*lead, L, E, generator=gen)
    k = torch.randn(*kv_lead, s, E, generator=gen)
    v = torch.randn(*kv_lead, s, e_v, generator=gen)
    return [x.to(DEVICE).requires_grad_() for x in (q, k, v)]


def _check(leaves, call_ours, call_torch):
    ours = call_ours(*leaves)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ours_grads = torch.autograd.grad(ours, leaves, grad)
    refs = [x.detach().clone().requires_grad_(x.requires_grad) for x in leaves]
    reference = call_torch(*refs)
    ref_grads = torch.autograd.grad(reference, refs, grad)
    assert_close("out", ours, reference)
    for i, (a, b) in enumerate(zip(ours_grads, ref_grads)):
        assert_close(f"grad {i}", a, b, factor=GRAD_FACTOR)


# Every broadcastable shape on the torch backend. The Triton kernels only ever see the flattened
# [B|1, H|1, L|1, S|1] bias (broadcast dims as stride 0): a few shapes cover them, for the masks they take
# (no mask gradient), and keep the interpreter's share of CI small.
MASK_CASES = [(rank, shape, kind, "torch") for rank in (3, 4, 5) for shape in _shapes(rank)
              if rank < 5 or len(shape) == 5 for kind in ("bool", "float", "float+grad")]
MASK_CASES += [(4, shape, kind, "triton") for shape in [(2, 3, L, S), (1, 1, L, S), (2, 1, 1, S), (3, L, 1)]
               for kind in ("bool", "float")]


@pytest.mark.parametrize("index", range(len(MASK_CASES)),
                         ids=[f"{r}d-{list(s)}-{k}-{b}" for r, s, k, b in MASK_CASES])
def test_mask_shapes(index):
    rank, shape, kind, backend = MASK_CASES[index]
    gen = torch.Generator().manual_seed(index)
    mask = _mask(shape, kind, gen)
    leaves = _inputs(rank, gen) + ([mask] if mask.requires_grad else [])
    _check(leaves,
           lambda q, k, v, *m: flashops.sdpa(q, k, v, attn_mask=m[0] if m else mask, backend=backend),
           lambda q, k, v, *m: F.scaled_dot_product_attention(q, k, v, attn_mask=m[0] if m else mask))


CAUSAL_CASES = [(rank, s, scale, "torch") for rank in (3, 4, 5) for s in (3, L, 9) for scale in (None, 0.3)]
CAUSAL_CASES += [(4, s, 0.3, "triton") for s in (3, 9)]


@pytest.mark.parametrize("rank, s, scale, backend", CAUSAL_CASES)
def test_causal_with_other_key_lengths(rank, s, scale, backend):
    """is_causal is aligned top-left as in torch (query i sees keys j <= i), also when L != S (every query
    sees key 0, so torch's NaN rows never occur)."""
    gen = torch.Generator().manual_seed(s)
    leaves = _inputs(rank, gen, s=s)
    _check(leaves, lambda q, k, v: flashops.sdpa(q, k, v, is_causal=True, scale=scale, backend=backend),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))


GQA_CASES = [(rank, e_v, gqa, "torch") for rank in (4, 5) for e_v in (3, E, 13) for gqa in (False, True)]
GQA_CASES += [(5, e_v, True, "triton") for e_v in (3, 13)]


@pytest.mark.parametrize("rank, e_v, gqa, backend", GQA_CASES)
def test_gqa_and_value_head_dim(rank, e_v, gqa, backend):
    gen = torch.Generator().manual_seed(e_v)
    leaves = _inputs(rank, gen, heads_kv=1 if gqa else None, e_v=e_v)
    mask = _mask((L, S), "bool", gen)
    _check(leaves,
           lambda q, k, v: flashops.sdpa(q, k, v, attn_mask=mask, scale=0.4, enable_gqa=gqa, backend=backend),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4, enable_gqa=gqa))


def test_mask_that_does_not_broadcast_is_rejected():
    q = torch.randn(2, 3, L, E, device=DEVICE)
    target = r"\(2, 3, 5, 5\)"
    for shape in [(4, 1, 1), (1, 2, 3, L, L), (2, 1, 3, 1)]:
        with pytest.raises(ValueError, match=rf"attn_mask of shape .* does not broadcast to {target}"):
            flashops.sdpa(q, q, q, attn_mask=torch.ones(shape, dtype=torch.bool, device=DEVICE))
