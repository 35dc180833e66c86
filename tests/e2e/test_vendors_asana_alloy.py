"""Asana and Alloy end to end, each declared only in inventory YAML (as in
config/keyrotor.example.yaml), rotated by `keyrotor worker` subprocesses on Redis + PostgreSQL with
the session's OpenBao, against the vendor stand-ins over HTTP. The scheduler's jobs (liveness,
detection, deposits) are run from the test as the leader would run them.

Asana: a legacy API key past its cutoff answers 434 → the liveness job starts the migration to a
personal access token (assisted: the owner creates it in the UI and deposits it in Vault) →
rolled out, the old key retired as rejected; an owner who never deposits → needs_attention; the
documented per-user limit declared, many rotations at once by two workers → no 429.
Alloy: an old key past the January 2023 cutoff → the scheduler migrates it to a new on-demand
key; a key that expired at the provider → the liveness job rotates it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.e2e.conftest import PROVIDER_TOKEN_ENV, World
from tests.e2e.test_assisted_rotation import ContactInbox, _scheduler_context
from worker.db.models import ManagedKey
from worker.db.session import session_scope
from worker.text import key_slug
from worker.secret import Secret

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ASANA_INVENTORY = """\
version: 1
policies:
  manual: {{expiry_lead_time: 14d, max_age: 180d, grace_period: 1s}}
providers:
  asana:
    kind: http
    mode: assisted
    base_url: "{url}"
    rate_limit: {{requests: {plan_limit}, per: {window}}}    # per user: 150/min free, 1,500/min paid
    concurrency: 50                                          # GET requests in flight
    endpoint_groups:
      search: {{paths: ["/api/1.0/workspaces/*/tasks/search"], rate_limit: {{requests: 60, per: 60s}}}}
      writes: {{methods: [POST, PUT, PATCH, DELETE], concurrency: 15}}
    activation: {{poll_interval: 1s, timeout: 10s}}
    status_codes: {{invalid: [401], deprecated: [434]}}
    credential_types:
      api_key:
        replacement: personal_access_token
        deprecation:
          - {{phase: no_new_credentials, from: "2016-01-01T00:00:00Z"}}
          - {{phase: amnesty, from: "2017-01-01T00:00:00Z", headers: {{Asana-Amnesty-Api-Key: "true"}}}}
          - {{phase: rejected, from: "2017-02-01T00:00:00Z"}}
      personal_access_token:
        create_url: https://app.asana.com/0/my-apps
    calls:
      verify:
        method: GET
        url: "{{base_url}}/api/1.0/users/me"
        auth: {{type: bearer, token: "{{secret}}"}}
keys:
{keys}"""

ASANA_KEY = """\
  {name}:
    provider: asana
    credential_type: {ctype}
    owner: ops-automation
    contact: {{webhook: {{url: "{inbox}"}}}}
    assisted: {{remind_every: 1h, deposit_deadline: 4h, revoke_deadline: 1h, revoke_check_every: 1s}}
    vault: {{mount: {mount}, path: {path}, field: token}}
    policy: manual
"""

ALLOY_INVENTORY = """\
version: 1
policies:
  standard: {{expiry_lead_time: 7d, max_age: 90d, grace_period: 1s}}
providers:
  alloy:
    kind: http
    mode: overlap
    base_url: "{url}"
    rate_limit: {{requests: 100, per: 1s}}
    auth: {{type: bearer, token: {{env: {token_env}}}}}
    activation: {{poll_interval: 1s, timeout: 10s}}
    credential_types:
      legacy_api_key:                        # the automatic per-user keys from before 13 January 2022
        replacement: api_key
        deprecation:
          - {{phase: no_new_credentials, from: "2022-01-13T00:00:00Z"}}
          - {{phase: rejected, from: "2023-01-26T00:00:00Z"}}
      api_key: {{}}                            # created on demand, sent as an OAuth 2.0 Bearer token
    calls:
      issue:
        method: POST
        url: "{{base_url}}/api/api-key"
        body: {{name: "{{key_name}}", credentialType: "{{credential_type}}"}}
        response: {{secret: "$.apiKey", key_id: "$.id", expires_at: "$.expiresAt"}}
      verify:
        method: GET
        url: "{{base_url}}/api/user/me"
        auth: {{type: bearer, token: "{{secret}}"}}
      revoke:
        method: DELETE
        url: "{{base_url}}/api/api-key/{{key_id}}"
      list:
        method: GET
        url: "{{base_url}}/api/api-key"
        response: {{items: "$.keys", key_id: "$.id", name: "$.name", created_at: "$.createdAt", revoked: "$.revoked"}}
keys:
  alloy/reporting:
    provider: alloy
    credential_type: {ctype}
    owner: data-platform@example.com
    vault: {{mount: {mount}, path: apps/reporting/alloy, field: api_key}}
    policy: standard
"""


def _apply(world: World, text: str, tmp_path: Path, name: str) -> None:
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    yaml.safe_load(text)  # the test's own YAML is well-formed
    with session_scope(world.engine) as session:
        apply_inventory(session, load_inventory(path), actor="test:e2e")


def _key(world: World, name: str) -> ManagedKey:
    with session_scope(world.engine) as session:
        key = session.exec(__import__("sqlmodel").select(ManagedKey).where(ManagedKey.name == name)).one()
        session.expunge(key)
        return key


@pytest.fixture
def inbox() -> Iterator[ContactInbox]:
    box = ContactInbox()
    yield box
    box.server.stop()


@pytest.fixture
def asana() -> Iterator[Any]:
    from keyrotor_sandbox.asana import start_asana_in_thread

    handle = start_asana_in_thread(plan="free")
    yield handle
    handle.stop()


def _asana_world(make_world: Any, tmp_path: Path, inbox: ContactInbox, asana: Any, keys: dict[str, str],
                 plan_limit: int = 150, window: str = "60s") -> World:
    world = make_world(with_consumer=False, with_copy=False, grace_s=1)
    text = ASANA_INVENTORY.format(url=asana.url, plan_limit=plan_limit, window=window, keys="".join(
        ASANA_KEY.format(name=name, ctype=ctype, inbox=inbox.url, mount=world.mount, path=f"apps/{key_slug(name)}")
        for name, ctype in keys.items()))
    _apply(world, text, tmp_path, "asana.yaml")
    return world


def _deposit(world: World, name: str, token: str) -> None:
    world.store.write(world.mount, f"keyrotor/deposits/{key_slug(name)}", {"credential": token, "deposited_by": "alice"})


def test_asana_legacy_key_434_found_by_liveness_then_migrated_to_a_personal_access_token(
        make_world: Any, tmp_path: Path, inbox: ContactInbox, asana: Any) -> None:
    from worker.service.deposits import collect_deposits
    from worker.service.liveness import MemoryCursor, check_liveness

    name = "asana/automation"
    world = _asana_world(make_world, tmp_path, inbox, asana, {name: "api_key"})
    legacy = asana.state.generate_api_key("automation", before_deprecation=True)   # made back in 2015
    world.store.promote(world.mount, f"apps/{key_slug(name)}", "token", Secret(legacy.token),
                        provider_key_id=legacy.gid, expected_version=None)
    world.start_worker()
    ctx = _scheduler_context(world)

    # The liveness job (the scheduler's, at its modest pace) checks the key: 434 → migration.
    result = check_liveness(ctx, cursor=MemoryCursor(), per_pass=10)
    run_id = result.rotations[name]
    assert asana.state.answered(434, "me") >= 1
    run = world.run(run_id)
    assert run.trigger == "deprecation" and run.target_credential_type == "personal_access_token"
    world.wait_state(run_id, ["awaiting_deposit"])
    asked = inbox.last("deposit_requested")["detail"]
    assert asked["credential_type"] == "personal_access_token" and asked["create_at"] == "https://app.asana.com/0/my-apps"
    # A second pass joins the same run rather than starting another.
    assert check_liveness(ctx, cursor=MemoryCursor(), per_pass=10).rotations.get(name) in (None, run_id)

    # Only a person creates a PAT (in the UI); the owner deposits it in Vault.
    pat = asana.state.create_pat("automation", "keyrotor: asana/automation")
    _deposit(world, name, pat.token)
    assert collect_deposits(ctx).accepted == [run_id]
    world.wait_state(run_id, ["completed"], timeout=60)

    key = _key(world, name)
    assert key.credential_type == "personal_access_token"
    assert world.store.read_current(world.mount, f"apps/{key_slug(name)}", "token").secret.reveal() == pat.token
    retired = [e for e in world.audit(run_id) if e.event == "state_changed" and e.to_state == "retired"][0]
    assert "deprecated" in retired.detail["revocation"]       # the old key can no longer authenticate
    assert asana.is_live(pat.token) and asana.state.answered(429) == 0
    # The new PAT works, so the liveness job now leaves the key alone.
    again = check_liveness(ctx, cursor=MemoryCursor(), per_pass=10)
    assert name in again.valid and name not in again.rotations
    assert world.leaks([legacy.token, pat.token], extra={"notices": b"\n".join(inbox.raw)}) == []


def test_asana_revoked_pat_found_by_liveness_and_a_deposit_never_made_needs_attention(
        make_world: Any, tmp_path: Path, inbox: ContactInbox, asana: Any) -> None:
    from worker.service.deposits import collect_deposits, waiting_since
    from worker.service.liveness import MemoryCursor, check_liveness
    from worker.db.models import RotationRun

    name = "asana/reports"
    world = _asana_world(make_world, tmp_path, inbox, asana, {name: "personal_access_token"})
    pat = asana.state.create_pat("reports", "reports")
    world.store.promote(world.mount, f"apps/{key_slug(name)}", "token", Secret(pat.token),
                        provider_key_id=pat.gid, expected_version=None)
    world.start_worker()
    ctx = _scheduler_context(world)
    asana.state.revoke(pat.gid)          # someone revokes it in the UI, outside keyrotor

    run_id = check_liveness(ctx, cursor=MemoryCursor(), per_pass=10).rotations[name]
    run = world.run(run_id)
    assert (run.trigger, run.reason) == ("liveness", "revoked_externally")
    world.wait_state(run_id, ["awaiting_deposit"])
    with session_scope(world.engine) as session:
        since = waiting_since(session, session.get(RotationRun, run_id))
    for minutes in (60, 120, 180):
        collect_deposits(ctx, now=since + timedelta(minutes=minutes))
    assert world.state(run_id) == "awaiting_deposit"
    assert collect_deposits(ctx, now=since + timedelta(hours=4)).expired == [run_id]
    assert world.state(run_id) == "needs_attention"
    assert inbox.events().count("deposit_reminder") == 3 and inbox.events()[-1] == "needs_attention"
    # The key keeps its run open (a person must look): the liveness job does not pile up more.
    assert name not in check_liveness(ctx, cursor=MemoryCursor(), per_pass=10).checked


def test_asana_rate_limit_declared_many_rotations_at_once_no_429(
        make_world: Any, tmp_path: Path, inbox: ContactInbox) -> None:
    """The stand-in's per-user limit scaled down (8 requests per 2 s, the same shape as 150/min),
    declared in the inventory; two workers and the deposits job rotate five keys of one user at
    once: the shared limit paces them and the provider never answers 429."""
    from worker.service.deposits import collect_deposits
    from keyrotor_sandbox.asana import start_asana_in_thread

    asana = start_asana_in_thread(plan="free", window_s=2.0)
    asana.state.plan_limits["free"] = 8
    try:
        names = [f"asana/k{i}" for i in range(5)]
        world = _asana_world(make_world, tmp_path, inbox, asana, {n: "personal_access_token" for n in names},
                             plan_limit=8, window="2s")
        for n in names:
            made = asana.state.create_pat("robot", n)
            world.store.promote(world.mount, f"apps/{key_slug(n)}", "token", Secret(made.token),
                                provider_key_id=made.gid, expected_version=None)
        world.start_worker()
        world.start_worker()
        ctx = _scheduler_context(world)
        runs = {n: world.request(n) for n in names}
        for n, run_id in runs.items():
            world.wait_state(run_id, ["awaiting_deposit"])
            _deposit(world, n, asana.state.create_pat("robot", f"{n} new").token)
        accepted: list[str] = []
        for _ in range(20):                       # the deposits job may defer checks to its next pass
            accepted += collect_deposits(ctx).accepted
            if len(accepted) == len(names):
                break
        assert sorted(accepted) == sorted(runs.values())
        for run_id in runs.values():
            world.wait_state(run_id, ["verified", "completed"], timeout=90)
        assert asana.state.answered(429) == 0
        # More requests than one window allows were needed, and no window held more than 8.
        assert asana.state.answered(200) > 8 and asana.state.busiest_window() <= 8
    finally:
        asana.stop()


# --------------------------------------------------------------------------- Alloy
def _alloy_world(make_world: Any, tmp_path: Path, ctype: str, **seed: Any) -> tuple[World, Any]:
    world = make_world(with_consumer=False, with_copy=False, grace_s=1)
    text = ALLOY_INVENTORY.format(url=world.provider.url, token_env=PROVIDER_TOKEN_ENV, ctype=ctype, mount=world.mount)
    _apply(world, text, tmp_path, "alloy.yaml")
    old = world.provider.seed_key("old-reporting", credential_type=ctype, **seed)
    # An old automatic key has no id in the new key API: Vault records none for it.
    world.store.promote(world.mount, "apps/reporting/alloy", "api_key", Secret(old.secret),
                        provider_key_id=None if ctype == "legacy_api_key" else old.id, expected_version=None)
    return world, old


def test_alloy_old_key_past_the_january_2023_cutoff_is_migrated_by_the_scheduler(make_world: Any, tmp_path: Path) -> None:
    from worker.service.detection import detect_due

    world, old = _alloy_world(make_world, tmp_path, "legacy_api_key")
    world.provider.configure(rejected_status=401)              # old keys are simply no longer valid
    world.provider.set_deprecation("legacy_api_key", "rejected")
    key = _key(world, "alloy/reporting")
    assert key.due_reason == "deprecation"                     # due since the cutoff
    world.start_worker()
    world.broker  # noqa: B018 - detection enqueues on the test namespace
    result = detect_due(world.engine)
    [run_id] = result.requested
    assert world.run(run_id).target_credential_type == "api_key"
    world.wait_state(run_id, ["completed"], timeout=60)
    key = _key(world, "alloy/reporting")
    assert key.credential_type == "api_key" and key.due_reason != "deprecation"
    retired = [e for e in world.audit(run_id) if e.event == "state_changed" and e.to_state == "retired"][0]
    assert retired.detail["revocation"].startswith("nothing to revoke") and retired.detail["old_check"] == "invalid"
    assert "revoke" not in world.provider.stats()["routes"]     # no DELETE without an id
    [new] = [k for k in world.keys_of_run(run_id)]
    assert new.credential_type == "api_key" and world.provider.is_live(new.secret)
    assert world.store.read_current(world.mount, "apps/reporting/alloy", "api_key").secret.reveal() == new.secret
    assert world.leaks([old.secret, new.secret]) == []


def test_alloy_key_expired_at_the_provider_is_rotated_by_the_liveness_job(make_world: Any, tmp_path: Path) -> None:
    from worker.service.liveness import MemoryCursor, check_liveness

    world, old = _alloy_world(make_world, tmp_path, "api_key")
    with world.provider.state.lock:                              # it expired a minute ago
        world.provider.state.keys[old.id].expires_at = world.provider.state.clock() - 60
    world.start_worker()
    ctx = _scheduler_context(world)
    result = check_liveness(ctx, cursor=MemoryCursor(), per_pass=10)
    run_id = result.rotations["alloy/reporting"]
    assert world.run(run_id).reason == "revoked_externally"
    world.wait_state(run_id, ["completed"], timeout=60)
    [new] = world.keys_of_run(run_id)
    assert world.store.read_current(world.mount, "apps/reporting/alloy", "api_key").secret.reveal() == new.secret
    assert world.provider.is_live(new.secret)
