"""keyrotor's generic HTTP provider, declared as in the example inventory, against the Asana
stand-in through the dated timeline: it sends the amnesty header itself in the amnesty phase and
reads 434 as "deprecated" once amnesty is over; a revoked PAT is "invalid"."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterator

import pytest

from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import CheckOutcome
from worker.providers.http import HttpProvider
from worker.providers.ratelimit import InMemoryRateLimiter
from keyrotor_sandbox.asana import AsanaHandle, asana_provider_spec, start_asana_in_thread
from worker.secret import Secret

pytestmark = pytest.mark.integration


@pytest.fixture
def asana() -> Iterator[AsanaHandle]:
    handle = start_asana_in_thread(plan="free", today=datetime(2015, 9, 1, tzinfo=timezone.utc))
    yield handle
    handle.stop()


@pytest.mark.parametrize("today, expected, amnesty_sent", [
    ("2016-06-01", CheckOutcome.valid, False),       # no new keys, but existing ones work
    ("2017-01-15", CheckOutcome.valid, True),        # keyrotor adds Asana-Amnesty-Api-Key: true
    ("2017-02-02", CheckOutcome.deprecated, False),  # 434 whatever the headers
])
def test_the_api_key_timeline_as_keyrotor_sees_it(asana: AsanaHandle, today: str, expected: CheckOutcome,
                                                  amnesty_sent: bool) -> None:
    key = asana.state.generate_api_key("alice")
    when = datetime.fromisoformat(today).replace(tzinfo=timezone.utc)
    asana.set_today(when)
    provider = HttpProvider("asana", HttpProviderSpec.model_validate(asana_provider_spec(asana.url)),
                            resolve=lambda ref: Secret("unused"), limiter=InMemoryRateLimiter(), clock=lambda: when)
    assert provider.check(Secret(key.token), credential_type="api_key") is expected
    if amnesty_sent:  # without the header the same key is refused in that phase
        bare = HttpProvider("asana", HttpProviderSpec.model_validate(asana_provider_spec(asana.url)),
                            resolve=lambda ref: Secret("unused"), limiter=InMemoryRateLimiter(),
                            clock=lambda: datetime(2015, 9, 1, tzinfo=timezone.utc))
        assert bare.check(Secret(key.token), credential_type="api_key") is CheckOutcome.deprecated


def test_a_revoked_personal_access_token_is_invalid(asana: AsanaHandle) -> None:
    pat = asana.state.create_pat("alice", "ci")
    provider = HttpProvider("asana", HttpProviderSpec.model_validate(asana_provider_spec(asana.url)),
                            resolve=lambda ref: Secret("unused"), limiter=InMemoryRateLimiter())
    assert provider.check(Secret(pat.token), credential_type="personal_access_token") is CheckOutcome.valid
    asana.state.revoke(pat.gid)
    assert provider.check(Secret(pat.token), credential_type="personal_access_token") is CheckOutcome.invalid
