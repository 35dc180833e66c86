"""Hypothesis settings profiles for the property tests (the stateful protocol test, the fuzzers).

``default`` keeps ``make test`` quick; ``HYPOTHESIS_PROFILE=thorough`` runs many more examples
(and longer rule sequences) when hunting for a bug. Imported by each property-test module."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}

# derandomize: `make test` (and CI) run the same examples every time, so a red run is reproducible
# and never a coin toss; `thorough` explores fresh random examples.
settings.register_profile("default", max_examples=15, stateful_step_count=25, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=400, stateful_step_count=60, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def examples(default: int, thorough: int) -> int:
    """A test's own example count (fuzzers run thousands), scaled by the active profile."""
    return thorough if settings().max_examples >= 400 else default
