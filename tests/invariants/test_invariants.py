"""The invariants every public op keeps on every backend (one registry: ``registry.CASES``).

1. Containment: NaN/Inf placed at masked-out entries (a site without ``changes``) leaves every output AND
   every gradient bitwise unchanged, and the poisoned entries get a gradient of exactly 0. NaN/Inf placed at
   future entries (a site with ``changes``) leaves every output outside ``changes`` bitwise unchanged, and
   with finite inputs a loss on the unchanged outputs gives those entries a gradient of exactly 0. (The
   backward of a poisoned future entry is not contained: reverse-mode AD multiplies the zero cotangent of
   an output by its NaN local derivative, in PyTorch's own autograd as here.) A poisoned independent problem
   (a sequence of a varlen batch) leaves every other gradient bitwise unchanged as well.
2. Empty inputs: batch 0 and length 0 run on every backend and give finite outputs (empty ones, or e.g. a
   final state) and finite gradients of the inputs' shapes.
3. float64: ``torch.autograd.gradcheck`` passes on every backend that computes float64 in float64.
4. Determinism: two identical calls give bitwise identical outputs and gradients (every backend promises
   it: no atomics).
5. Non-contiguous inputs (a row stride larger than the row; stride(-1) == 1) give the contiguous results
   (by the tolerance rule of flashops.testing). 4 and 5 share one test: the Triton interpreter is slow.

Poison: NaN, +inf and -inf in turn over a site's inputs. Inputs are fp32 (the interpreter has no bf16).

To cover a new op, add a ``Case`` to ``registry.py`` (its docstring says how); nothing here changes.
"""

import pytest
import torch

from flashops._dispatch import BackendError
from flashops.testing import assert_close

from ..conftest import DEVICE
from .registry import CASES, Case

POISON = (float("nan"), float("inf"), float("-inf"))


def _params(backends_of):
    return [pytest.param(c, b, id=f"{c.name}-{b}") for c in CASES for b in backends_of(c)]


ALL = _params(lambda c: c.backends)
FP64 = _params(lambda c: c.fp64_backends)


def _differentiable(case: Case, x: dict) -> list:
    return [n for n, t in x.items() if isinstance(t, torch.Tensor) and n not in case.constants
            and (t.is_floating_point() or t.is_complex())]


def _call(case: Case, x: dict, backend: str) -> tuple:
    try:
        out = case.call(x, backend)
    except BackendError as e:
        pytest.skip(str(e).splitlines()[0])
    return tuple(o for o in (out if isinstance(out, tuple) else (out,)) if o is not None)


def _run(case: Case, x: dict, backend: str, douts=None, more=()):
    """(outputs, gradients of the differentiable inputs) for output gradients ``douts`` (default: a fixed
    random draw); with ``more`` (functions of the outputs giving output gradients), also the gradients for each
    through the same forward. Inference-only ops get no gradients."""
    names = _differentiable(case, x) if case.grad else []
    leaves = {n: (t.detach().clone().requires_grad_() if n in names else t) for n, t in x.items()}
    with torch.set_grad_enabled(bool(names)):
        outs = _call(case, leaves, backend)
    grads = []
    if names:
        for d in [_random_like(outs) if douts is None else douts, *(f(outs) for f in more)]:
            g = torch.autograd.grad(outs, [leaves[n] for n in names], d, allow_unused=True, retain_graph=True)
            grads.append(dict(zip(names, g)))
    outs = tuple(o.detach() for o in outs)
    return (outs, *grads) if grads else (outs, {})


def _random_like(outs):
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
                 if not o.is_complex() else torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)
                 for o in outs)


def _mask(shape, index, device) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    m[index] = True
    return m


def _poisoned(x: dict, site) -> dict:
    y = dict(x)
    for i, (name, index) in enumerate(site.inputs.items()):
        y[name] = x[name].clone()
        y[name][index] = POISON[i % len(POISON)]
    return y


def _inputs(case: Case, dtype=torch.float32, batch=None, length=None):
    return case.make(case.batch if batch is None else batch, case.length if length is None else length, dtype,
                     DEVICE)


@pytest.mark.parametrize("case, backend", ALL)
def test_nonfinite_reaches_only_what_depends_on_it(case, backend):
    x = _inputs(case)
    sites = case.sites(x)
    if not sites:
        pytest.skip(f"{case.name} has no masked-out or future entries (every output depends on every input)")
    future = [site for site in sites if site.changes]
    clean = _run(case, x, backend, more=[_douts_outside(site) for site in future])
    clean_outs, clean_grads = clean[:2]
    future_grads = dict(zip((site.name for site in future), clean[2:] if case.grad else [{}] * len(future)))
    for site in sites:
        poisoned, poisoned_grads = _run(case, _poisoned(x, site), backend)
        for i, (a, b) in enumerate(zip(clean_outs, poisoned)):
            keep = ~_mask(a.shape, site.changes[i], a.device) if i in site.changes else slice(None)
            assert torch.equal(a[keep], b[keep]), f"{site.name}: output {i} changed outside the entries that may"
        if site.changes:
            assert any(not torch.isfinite(b[site.changes[i]]).all() for i, b in enumerate(poisoned)
                       if i in site.changes), f"{site.name}: the poison reached no output (the site is vacuous)"
            # With finite inputs, a loss on the outputs the site cannot change gives its entries a zero gradient.
            for name, index in site.inputs.items():
                g = future_grads[site.name].get(name)
                assert g is None or not g[index].any(), f"{site.name}: {name} got a gradient from outputs " \
                                                        f"that do not depend on it"
            for name, g in clean_grads.items() if site.independent else ():
                keep = ~_mask(g.shape, site.inputs[name], g.device) if name in site.inputs else slice(None)
                assert torch.equal(g[keep], poisoned_grads[name][keep]), \
                    f"{site.name}: gradient of {name} changed outside the poisoned problem"
            continue
        for name, g in clean_grads.items():
            assert torch.equal(g, poisoned_grads[name]), f"{site.name}: gradient of {name} changed"
            if name in site.inputs:
                assert not poisoned_grads[name][site.inputs[name]].any(), \
                    f"{site.name}: masked-out entries of {name} got a non-zero gradient"


def _douts_outside(site):
    """Output gradients for a loss on the outputs the site cannot change: random, 0 on the entries it may."""
    def douts(outs):
        return tuple(d.masked_fill(_mask(d.shape, site.changes[i], d.device), 0) if i in site.changes else d
                     for i, d in enumerate(_random_like(outs)))
    return douts


def _strided(t):
    """The same values in a non-contiguous layout: rows twice as far apart, stride(-1) still 1."""
    if (not isinstance(t, torch.Tensor) or t.dim() < 2 or t.numel() == 0
            or not (t.is_floating_point() or t.is_complex())):
        return t
    return torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]]


@pytest.mark.parametrize("case, backend", ALL)
def test_deterministic_and_layout_independent(case, backend):
    """Two identical calls agree bitwise; non-contiguous inputs give the contiguous results."""
    x = _inputs(case)
    outs, grads = _run(case, x, backend)
    again, again_grads = _run(case, x, backend)
    assert all(torch.equal(a, b) for a, b in zip(outs, again)), "outputs differ between two identical calls"
    for name, g in grads.items():
        assert torch.equal(g, again_grads[name]), f"gradient of {name} differs between two identical calls"
    strided = {n: _strided(t) for n, t in x.items()}
    assert any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in strided.values())
    outs_s, grads_s = _run(case, strided, backend)
    for i, (a, b) in enumerate(zip(outs, outs_s)):
        assert_close(f"output {i} (strided inputs)", _as_real(b), _as_real(a))
    for name, g in grads.items():
        if g is not None:
            assert_close(f"grad {name} (strided inputs)", _as_real(grads_s[name]), _as_real(g))


def _as_real(t):
    return torch.view_as_real(t) if t.is_complex() else t


@pytest.mark.parametrize("dim", ["batch", "length"])
@pytest.mark.parametrize("case, backend", ALL)
def test_empty_inputs(case, backend, dim):
    if dim not in case.empty:
        pytest.skip(f"{case.name} has no {dim} dimension that can be 0")
    x = _inputs(case, **{dim: 0})
    outs, grads = _run(case, x, backend, douts=None)
    for i, o in enumerate(outs):  # empty, or e.g. a final state (the initial one) or an output with no key: 0
        assert torch.isfinite(o).all(), f"output {i} is not finite for an empty {dim}"
    for name, g in grads.items():
        assert g is None or (g.shape == x[name].shape and torch.isfinite(g).all()), f"gradient of {name}"


@pytest.mark.parametrize("case, backend", FP64)
def test_float64_gradcheck(case, backend):
    if not case.grad:
        pytest.skip(f"{case.name} is inference-only")
    x = _inputs(case, torch.float64, batch=min(case.batch, 2))
    names = _differentiable(case, x)

    def fn(*tensors):
        return _call(case, {**x, **dict(zip(names, tensors))}, backend)

    inputs = tuple(x[n].detach().clone().requires_grad_() for n in names)
    outs = fn(*inputs)
    assert all(o.dtype in (torch.float64, torch.complex128) for o in outs if o.is_floating_point() or o.is_complex())
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-6, rtol=1e-4)
