"""Hypothesis profiles. "ci" (the default) is derandomized, so CI draws the same examples on every run, and
small enough for CI time; "dev" explores more (HYPOTHESIS_PROFILE=dev python -m pytest tests/properties)."""

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
