"""Adobe Workfront end to end: keys rotated by `keyrotor worker` subprocesses on Redis and
PostgreSQL, with the OpenBao server of the session, against the Workfront stand-in over HTTP.

Workfront is declared ONLY by the inventory entry shipped in config/keyrotor.example.yaml (its
base_url pointed at the stand-in and its Vault references at the test's mount): no code knows it.
The user's password and the API certificate live in Vault; keyrotor logs in with them (form body),
generates the key with the session (the old key stops working: cutover), and records the key's
expiry from the declared lifetime, since Workfront's answer carries none.

Cases: three consecutive rotations each leave the right expiry; an expired key is replaced; a
lost generateApiKey answer is recovered by generating again; a missing certificate fails the run
at once with Workfront's message (one login, no retries); a 429 reaches each run at most once;
admin keys show as admin in status and plan; nothing issued, no password, no certificate and no
session id appear in worker logs, Redis or the database.
"""

from __future__ import annotations

import copy
import time
from datetime import timedelta
from typing import Any, Iterator

import pytest
import yaml

from tests.e2e.conftest import REPO, World, render_inventory
from worker.clock import as_utc
from worker.db.models import ManagedKey
from worker.db.session import session_scope
from keyrotor_sandbox.workfront import UNTRUSTED, WorkfrontHandle, start_workfront_in_thread
from worker.secret import Secret

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "docs-sync@example.com", "Wf-pass-7d1c9e55b2"
ADMIN, ADMIN_PASSWORD = "admin-sync@example.com", "Wf-admin-0f4a8c3e91"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBwfstandin5f0c2a\n-----END CERTIFICATE-----"
KEY, ADMIN_KEY = "workfront/integration-user", "workfront/admin-sync"
LIFETIME = timedelta(days=30)


def example_workfront(base_url: str, mount: str) -> dict[str, Any]:
    """The shipped example's Workfront entry; only addresses (and test-sized timeouts) changed."""
    example = yaml.safe_load((REPO / "config" / "keyrotor.example.yaml").read_text())
    spec = copy.deepcopy(example["providers"]["workfront"])
    spec["base_url"] = base_url
    spec["activation"] = {"poll_interval": "1s", "timeout": "20s"}
    spec["calls"]["issue"]["timeout"] = "2s"  # so that a lost answer is noticed within the test
    text = yaml.safe_dump(spec).replace('vault: secret/', f"vault: {mount}/")
    return yaml.safe_load(text)  # type: ignore[no-any-return]


def _json_lines(text: str) -> list[dict[str, Any]]:
    import json

    found = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


class Workfront:
    def __init__(self, world: World, wf: WorkfrontHandle) -> None:
        self.world, self.wf = world, wf

    def path(self, key: str) -> str:
        return f"apps/{key.replace('/', '-')}"

    def vault_key(self, key: str = KEY) -> str:
        stored = self.world.store.read_current(self.world.mount, self.path(key), "api_key")
        assert stored is not None
        return stored.secret.reveal()

    def rotate(self, key: str = KEY, states: tuple[str, ...] = ("completed",), timeout: float = 60) -> str:
        run_id = self.world.request(key)
        self.world.wait_state(run_id, states, timeout=timeout)
        return run_id

    def managed(self, key: str = KEY) -> ManagedKey:
        with session_scope(self.world.engine) as session:
            from sqlmodel import select

            row = session.exec(select(ManagedKey).where(ManagedKey.name == key)).one()
            session.expunge(row)
            return row

    def never_written(self) -> list[str]:
        secrets_ = [*self.wf.state.issued, PASSWORD, ADMIN_PASSWORD, CERT, *self.wf.state.sessions]
        return self.world.leaks(secrets_)


@pytest.fixture
def workfront(make_world: Any) -> Iterator[Workfront]:
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory

    world = make_world(with_consumer=False, with_copy=False)
    wf = start_workfront_in_thread()
    world.stack.callback(wf.stop)
    wf.add_user(USER, PASSWORD)
    wf.add_user(ADMIN, ADMIN_PASSWORD, admin=True)
    wf.require_certificate(CERT)
    mount = world.mount
    world.store.write(mount, "keyrotor/providers/workfront", {"api_certificate": CERT})
    for user, password in ((USER, PASSWORD), (ADMIN, ADMIN_PASSWORD)):
        world.store.write(mount, f"keyrotor/workfront/users/{user}", {"password": password})
    # The keys in use today (made by hand at Workfront, stored in Vault).
    for key, user in ((KEY, USER), (ADMIN_KEY, ADMIN)):
        current = wf.state.generate_key(wf.user(user))
        world.store.promote(mount, f"apps/{key.replace('/', '-')}", "api_key", Secret(current), provider_key_id=None,
                            expected_version=None)
    document = render_inventory({"provider_url": world.provider.url, "consumer_url": "", "mount": mount},
                                grace_s=1, activation_timeout_s=20, with_consumer=False, with_copy=False)
    document["policies"]["standard"] = {"expiry_lead_time": "7d", "max_age": "90d", "grace_period": "1s"}
    document["providers"]["workfront"] = example_workfront(wf.url, mount)
    for key, user, ctype in ((KEY, USER, "user_api_key"), (ADMIN_KEY, ADMIN, "admin_api_key")):
        document["keys"][key] = {"provider": "workfront", "credential_type": ctype, "owner": "wf-admins@example.com",
                                 "vault": {"mount": mount, "path": f"apps/{key.replace('/', '-')}", "field": "api_key"},
                                 "policy": "standard", "labels": {"workfront_user": user}}
    path = world.tmp_path / "inventory-workfront.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    with session_scope(world.engine) as session:
        apply_inventory(session, load_inventory(path), actor="test:e2e")
    world.start_worker(threads=2)
    yield Workfront(world, wf)


def test_three_rotations_each_record_the_right_expiry_and_leak_nothing(workfront: Workfront) -> None:
    wf = workfront.wf
    for round_ in range(3):
        before = workfront.vault_key()
        run_id = workfront.rotate()
        new = workfront.vault_key()
        assert new != before and wf.is_live(new) and not wf.is_live(before), f"round {round_}"
        version = next(v for v in workfront.world.versions(run_id) if v.fingerprint == Secret(new).fingerprint)
        issued, expires = as_utc(version.issued_at), as_utc(version.expires_at)
        assert issued is not None and expires is not None, f"round {round_}: expiry lost"
        assert expires - issued == LIFETIME
        key = workfront.managed()
        assert as_utc(key.expires_at) == expires, f"round {round_}: key expiry {key.expires_at} != {expires}"
        # ...and it is Workfront's: the stand-in's own expiry of that key, within the call's duration.
        actual = wf.state.key_expires_at(wf.user(USER))
        assert actual is not None and abs(expires.timestamp() - actual) < 5
        # Next due: 7 days before that expiry, not max_age (90 days) after the rotation.
        assert as_utc(key.next_due_at) == expires - timedelta(days=7) and key.due_reason == "expiry"
    assert wf.stats()["login"] == {"200": 3} and wf.stats()["generate"] == {"200": 3}
    assert workfront.never_written() == []


def test_an_expired_key_is_replaced(workfront: Workfront) -> None:
    wf = workfront.wf
    user = wf.user(USER)
    user.key_created_at = time.time() - 31 * 86400  # made over a month ago: expired at Workfront
    old = workfront.vault_key()
    assert not wf.is_live(old)
    workfront.rotate()
    assert wf.is_live(workfront.vault_key())
    assert workfront.never_written() == []


def test_missing_certificate_fails_at_once_with_workfronts_message(workfront: Workfront) -> None:
    wf = workfront.wf
    wf.require_certificate("-----BEGIN CERTIFICATE-----\nMIIBrenewedcertificate\n-----END CERTIFICATE-----")
    old = workfront.vault_key()
    run_id = workfront.rotate(states=("failed",), timeout=60)
    run = workfront.world.run(run_id)
    assert UNTRUSTED in (run.last_error or "")
    assert "api_certificate" in (run.last_error or "")  # the inventory's hint: where the certificate goes
    time.sleep(2)  # nothing retries it behind our back
    assert wf.stats().get("login") == {"500": 1}, wf.stats()
    assert "generate" not in wf.stats()
    assert workfront.vault_key() == old and wf.is_live(old)  # nothing changed
    assert workfront.world.state(run_id) == "failed"
    assert workfront.never_written() == []


def test_a_429_reaches_each_run_at_most_once_then_every_worker_waits(workfront: Workfront) -> None:
    """Two rotations at once on two worker processes; Workfront throttles for 5 s. A request that
    meets it gets the 429 and its Retry-After; the shared limiter then holds every worker's
    requests until it has passed: no run meets a 429 twice."""
    wf, world = workfront.wf, workfront.world
    world.start_worker(threads=2)
    wf.throttle(5.0)  # long enough that the first requests meet it even on a busy machine
    runs = [world.request(KEY), world.request(ADMIN_KEY)]
    for run_id in runs:
        world.wait_state(run_id, ("completed",), timeout=90)
    refused = sum(counts.get("429", 0) for counts in wf.stats().values())
    # Requests already in flight when the first 429 comes back meet it too (at most one per
    # rotation here); after that, nothing is sent until Retry-After has passed.
    assert 1 <= refused <= len(runs), wf.stats()
    met = [line.get("run_id") for line in _json_lines(world.worker_logs())
           if line.get("event") == "provider_request" and line.get("status") == 429]
    assert len(met) == refused and all(met.count(run_id) <= 1 for run_id in runs), met
    assert wf.is_live(workfront.vault_key()) and wf.is_live(workfront.vault_key(ADMIN_KEY))
    assert workfront.never_written() == []


def test_a_lost_generate_answer_is_recovered_by_generating_again(workfront: Workfront) -> None:
    """Workfront generated the key (the old one is dead) but the answer never arrived: the run
    retries, generates another (which resets the lost one) and completes; one live key."""
    wf = workfront.wf
    old = workfront.vault_key()
    wf.slow_answer("generate", 4.0)  # beyond the issue call's 2 s timeout
    workfront.rotate(timeout=90)
    new = workfront.vault_key()
    assert wf.is_live(new) and not wf.is_live(old)
    assert len(wf.state.issued) == 4  # the two seeded keys, the lost one, the one in use
    assert not wf.is_live(wf.state.issued[2])
    assert wf.stats()["generate"] == {"200": 2}
    assert workfront.never_written() == []


def test_admin_keys_show_as_admin_in_status_and_plan(workfront: Workfront) -> None:
    from worker.service.plan import build_plan
    from worker.cli.views import key_status

    workfront.rotate(ADMIN_KEY)
    with session_scope(workfront.world.engine) as session:
        rows = {r["key"]: r for r in key_status(session)}
        plan = {item.key: item for item in build_plan(session, days=40)}
    assert rows[ADMIN_KEY]["admin"] is True and rows[KEY]["admin"] is False
    assert plan[ADMIN_KEY].admin is True
    # The admin key carries admin rights at Workfront.
    import httpx

    me = httpx.get(f"{workfront.wf.url}/attask/api/v15.0/session", headers={"apiKey": workfront.vault_key(ADMIN_KEY)})
    assert me.json()["data"]["isAdmin"] is True
