"""The invariant checks of test_invariants.py on the registry's distributed cases (``world > 1``), inside a
process group of gloo CPU processes (tests/distributed/launcher.py: one launch for all of them, so that every
process pays for importing torch once).

Each scenario is one check of one case on one backend, run on every rank on the same full inputs; the case's
``call`` shards them, runs the op and gathers its outputs, so a NaN placed on one rank is looked for in every
rank's outputs and gradients. Agreement with the single-device op is checked at the case's length and on the
shortest shards (``2 * world`` rows: one row per zigzag piece).
"""

from __future__ import annotations

import pytest
import torch

from ..distributed import launcher
from . import test_invariants as checks
from .registry import CASES

DISTRIBUTED = [(i, case) for i, case in enumerate(CASES) if case.world > 1]


def _checks_of(case, backend: str) -> dict:
    """Scenario kind -> function(case, backend) for the checks that apply to ``case`` on ``backend``. The ranks'
    tensors live on the CPU, where Triton runs in its slow interpreter: there the Triton backend gets the
    containment check only (tests/distributed checks its agreement with the single-device op)."""
    kinds = {"containment": checks.test_nonfinite_reaches_only_what_depends_on_it}
    if backend == "triton":
        return kinds
    kinds.update({"deterministic": checks.test_deterministic_and_layout_independent,
                  **{f"empty_{dim}": lambda c, b, dim=dim: checks.test_empty_inputs(c, b, dim) for dim in case.empty}})
    if case.reference is not None:
        kinds["reference"] = checks.test_agrees_with_reference
        kinds["reference_short_shards"] = lambda c, b: checks.test_agrees_with_reference(c, b, length=2 * c.world)
    if backend in case.fp64_backends:
        kinds["fp64"] = checks.test_float64_gradcheck
    return kinds


def _scenario(check, case, backend):
    def run(rank, world):
        assert world == case.world, f"{case.name} runs on {case.world} ranks, not {world}"
        checks.DEVICE = torch.device("cpu")  # gloo: CPU tensors (also where a GPU exists)
        check(case, backend)
    return run


SCENARIOS = {}  # name -> (description, world)
for _index, _case in DISTRIBUTED:
    for _backend in _case.backends:
        for _kind, _check in _checks_of(_case, _backend).items():
            _name = f"check_{_kind}__{_index}__{_backend}"
            globals()[_name] = _scenario(_check, _case, _backend)  # the launcher finds scenarios by name
            SCENARIOS[_name] = (f"{_kind}: {_case.name} on {_backend}", _case.world)


@pytest.mark.parametrize("world", sorted({world for _, world in SCENARIOS.values()}))
def test_distributed_cases_on_gloo(world):
    names = [name for name, (_, w) in SCENARIOS.items() if w == world]
    outcome = launcher.run(__name__, names, world, backend="gloo")
    failed = [f"{SCENARIOS[name][0]}:\n{error}" for name, error in outcome.items() if error is not None]
    assert not failed, f"{len(failed)} of {len(names)} checks failed:\n\n" + "\n\n".join(failed)
