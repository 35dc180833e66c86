"""Hypothesis settings profiles for the property tests (the stateful protocol test, the fuzzers).

``default`` keeps ``make test`` quick; ``HYPOTHESIS_PROFILE=thorough`` runs many more examples
(and longer rule sequences) when hunting for a bug. Imported by each property-test module."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

settings.register_profile("default", max_examples=15, stateful_step_count=25, **_COMMON)
settings.register_profile("thorough", max_examples=400, stateful_step_count=60, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def examples(default: int, thorough: int) -> int:
    """A test's own example count (fuzzers run thousands), scaled by the active profile."""
    return thorough if settings().max_examples >= 400 else default
