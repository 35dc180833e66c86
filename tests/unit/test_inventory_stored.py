"""Both registries read a spec from a record or a bare spec through worker.inventory.stored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker.errors import ConfigError
from worker.integrations.registry import build_integration
from worker.providers.ratelimit import InMemoryRateLimiter
from worker.providers.registry import build_provider


def _no_resolve(_ref):  # type: ignore[no-untyped-def]
    raise AssertionError("not resolved")


@pytest.mark.parametrize("build, kind", [
    (lambda r, **kw: build_provider(r, resolve=_no_resolve, limiter=InMemoryRateLimiter(), **kw), "provider"),
    (lambda r, **kw: build_integration(r, vault=None, resolve=_no_resolve, **kw), "integration"),
])
def test_records_and_bad_inputs(build, kind) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"^build_\w+: expected .*, got int$"):
        build(42)
    with pytest.raises(ConfigError, match=rf"^{kind} 'x': stored spec is invalid \(\d+ errors; re-run `keyrotor config apply`\)$"):
        build(SimpleNamespace(name="x", spec={"kind": "http" if kind == "provider" else "webhook", "bogus": 1}))
