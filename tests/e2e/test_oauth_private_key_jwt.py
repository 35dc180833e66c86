"""OAuth 2.0 client credentials end to end: keyrotor workers as subprocesses on real Redis,
PostgreSQL and OpenBao rotate a private-key JWT key pair (and a client secret) of a client of the
authorization server stand-in, declared only in inventory YAML.

Observed from the outside: which JWKs and secrets the authorization server holds, what Vault
serves, whether the key Vault serves gets a token and passes the scoped API, the audit trail, and
every byte the service wrote to its logs, to Redis and to the database (no private key PEM, client
secret or admin token anywhere).
"""

from __future__ import annotations

import secrets
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from tests.e2e.conftest import PROVIDER_TOKEN_ENV, World
from worker.db.session import make_engine, session_scope
from worker.providers.oauth_keys import generate_key_pair
from worker.secret import Secret

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENT = "reporting-client"
SCOPE = "read:reports"        # what the scoped API call needs
OTHER_SCOPE = "write:reports"
PROVIDER = "partner-oauth"
JWT_KEY = "partner/reports"
JWT_PATH = "apps/partner/oauth"
JWT_FIELD = "private_key"
SECRET_KEY = "partner/reports-secret"
SECRET_PATH = "apps/partner/client-secret"
SECRET_FIELD = "client_secret"


def inventory(server: Any, mount: str, *, grace_s: int) -> dict[str, Any]:
    from keyrotor_sandbox.oauth_server import standin_oauth_spec

    provider = standin_oauth_spec(server, client_id=CLIENT, scopes=[SCOPE, OTHER_SCOPE], scoped_path="/api/reports",
                                  admin_token_ref={"env": PROVIDER_TOKEN_ENV},
                                  credential_types=("private_key_jwt", "client_secret"),
                                  rate_limit={"requests": 50, "per": "1s"},
                                  activation={"poll_interval": "1s", "timeout": "5s"}, key_lifetime="30d")
    provider["admin"]["calls"]["add_jwk"]["timeout"] = "2s"
    provider["admin"]["calls"]["add_secret"]["timeout"] = "2s"
    provider["admin"]["calls"]["add_jwk"]["body"]["expires_at"] = "{expires_at}"
    return {
        "version": 1,
        "policies": {"e2e": {"expiry_lead_time": "7d", "max_age": "90d", "grace_period": grace_s}},
        "providers": {PROVIDER: provider},
        "keys": {
            JWT_KEY: {"provider": PROVIDER, "credential_type": "private_key_jwt", "owner": "e2e@example.com",
                      "vault": {"mount": mount, "path": JWT_PATH, "field": JWT_FIELD}, "policy": "e2e"},
            SECRET_KEY: {"provider": PROVIDER, "credential_type": "client_secret", "owner": "e2e@example.com",
                         "vault": {"mount": mount, "path": SECRET_PATH, "field": SECRET_FIELD}, "policy": "e2e"},
        },
    }


class OAuthWorld:
    """The e2e ``World`` (workers, audit, leak scan) around the authorization server stand-in."""

    def __init__(self, world: World, server: Any, seed_pem: Secret, seed_kid: str, seed_secret: Any) -> None:
        self.world, self.server = world, server
        self.seed_pem, self.seed_kid, self.seed_secret = seed_pem, seed_kid, seed_secret

    def jwks(self) -> dict[str, Any]:
        with self.server.state.lock:
            return dict(self.server.client(CLIENT).jwks)

    def client_secrets(self) -> dict[str, Any]:
        with self.server.state.lock:
            return dict(self.server.client(CLIENT).secrets)

    def served(self, path: str, field: str) -> Any:
        stored = self.world.store.read_current(self.world.mount, path, field)
        assert stored is not None
        return stored

    def vault_values(self, path: str, field: str) -> list[str]:
        """Every version of the key's field that Vault still holds (the PEMs/secrets keyrotor handled)."""
        values = []
        for info in self.world.store.list_versions(self.world.mount, path):
            try:
                values.append(self.world.store.read_version(self.world.mount, path, field, info.version).secret.reveal())
            except Exception:
                continue
        return values


@pytest.fixture
def oauth_world(pg_url: str, redis_url: str, redis_namespace: str, vault: Any, vault_mount: str, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., OAuthWorld]]:
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory
    from keyrotor_sandbox.oauth_server import start_auth_server_in_thread
    from worker.settings import get_settings, load_settings
    from worker.vault.store import VaultStore

    stack = ExitStack()
    built: list[World] = []

    def build(*, grace_s: int = 1, seed_jwk_expired: bool = False,
              server_rate_limit: tuple[int, float] | None = None) -> OAuthWorld:
        server = start_auth_server_in_thread(resource_scopes={"/api/reports": SCOPE}, rate_limit=server_rate_limit)
        stack.callback(server.stop)
        server.add_client(CLIENT, {SCOPE, OTHER_SCOPE})
        monkeypatch.setenv(PROVIDER_TOKEN_ENV, server.admin_token)
        get_settings.cache_clear()
        store = VaultStore.from_settings(load_settings(VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token,
                                                       vault_mount=vault_mount, vault_timeout_s=5.0))
        # The client's current key pair: its JWK registered, its PEM in Vault with the kid (as if adopted).
        seed = generate_key_pair("RS256")
        server.register_jwk(CLIENT, seed.public_jwk, name="seed",
                            expires_at=time.time() - 60 if seed_jwk_expired else None)
        store.promote(vault_mount, JWT_PATH, JWT_FIELD, seed.private_pem, provider_key_id=seed.kid, expected_version=None)
        seed_secret = server.add_secret(CLIENT, name="seed")
        store.promote(vault_mount, SECRET_PATH, SECRET_FIELD, Secret(seed_secret.value), provider_key_id=seed_secret.id,
                      expected_version=None)
        engine = make_engine(pg_url)
        stack.callback(engine.dispose)
        path = tmp_path / f"inventory-{len(built)}.yaml"
        path.write_text(yaml.safe_dump(inventory(server, vault_mount, grace_s=grace_s), sort_keys=False), encoding="utf-8")
        with session_scope(engine) as session:
            apply_inventory(session, load_inventory(path), actor="test:e2e")
        world = World(tmp_path=tmp_path, db_url=pg_url, redis_url=redis_url, namespace=redis_namespace,
                      vault_addr=vault.addr, vault_token=vault.token, mount=vault_mount, provider=server,
                      run_key_faults=None, consumer=None,  # type: ignore[arg-type]
                      webhook_secret=secrets.token_urlsafe(16), engine=engine, store=store,
                      seed_secret=seed.private_pem.reveal(), seed_key_id=seed.kid, stack=ExitStack())
        built.append(world)
        return OAuthWorld(world, server, seed.private_pem, seed.kid, seed_secret)

    yield build
    for world in built:
        for worker in world.workers:
            worker.stop()
        world.stack.close()
    stack.close()
    get_settings.cache_clear()


def _check_leaks(o: OAuthWorld, sampler: Any, extra_secrets: list[str]) -> None:
    handled = o.vault_values(JWT_PATH, JWT_FIELD) + o.vault_values(SECRET_PATH, SECRET_FIELD)
    assert len(handled) >= 2
    with o.server.state.lock:
        access_tokens = list(o.server.state.tokens)  # every token the checks obtained
    needles = handled + extra_secrets + [o.server.admin_token] + access_tokens
    assert not o.world.leaks(needles, extra=sampler.blobs()), \
        "a private key, client secret, access token or admin token leaked"


def test_a_private_key_jwt_rotation_registers_verifies_promotes_and_retires_after_grace(oauth_world: Any) -> None:
    o: OAuthWorld = oauth_world(grace_s=2)
    sampler = o.world.redis_sampler()
    o.world.start_worker(threads=2)
    started = datetime.now(timezone.utc)
    run_id = o.world.request(JWT_KEY)
    o.world.wait_state(run_id, ["completed"], timeout=60)
    sampler.stop()

    assert o.world.transitions(run_id) == ["requested", "issued", "prechecked", "promoted", "propagated",
                                           "verified", "retired", "completed"], o.world.trail(run_id)
    # Vault serves the new private key with its kid; the authorization server holds only its JWK.
    served = o.served(JWT_PATH, JWT_FIELD)
    assert served.secret.reveal().startswith("-----BEGIN PRIVATE KEY-----") and served.secret != o.seed_pem
    jwks = o.jwks()
    assert list(jwks) == [served.provider_key_id], "the old JWK is removed, the new one registered once"
    assert jwks[served.provider_key_id].name == f"keyrotor-{run_id}" and "d" not in jwks[served.provider_key_id].jwk
    # The key lifetime reached the server and keyrotor's due time alike.
    expires = jwks[served.provider_key_id].expires_at
    assert expires is not None and abs(expires - (started + timedelta(days=30)).timestamp()) < 120
    from sqlmodel import select

    from worker.clock import as_utc
    from worker.db.models import ManagedKey

    with session_scope(o.world.engine) as session:
        key = session.exec(select(ManagedKey).where(ManagedKey.name == JWT_KEY)).one()
        key_expiry, due = as_utc(key.expires_at), as_utc(key.next_due_at)
    assert key_expiry is not None and abs(key_expiry.timestamp() - expires) < 2
    assert due is not None and abs((key_expiry - due) - timedelta(days=7)) < timedelta(seconds=2)  # the lead time
    # The old JWK was removed only after verification and the grace period.
    at = {e.to_state: e.at for e in o.world.audit(run_id) if e.event == "state_changed"}
    assert (at["retired"] - at["verified"]).total_seconds() >= 2
    # Verification really used the key: tokens were issued against it, and the old key is now refused.
    assert o.server.stats()["token"].get("200", 0) >= 2 and o.server.stats()["resource"].get("200", 0) >= 2
    _check_leaks(o, sampler, [o.seed_pem.reveal()])


def test_a_missing_scope_fails_before_promotion_naming_it_keeping_the_old_key_and_removing_the_new_jwk(
        oauth_world: Any) -> None:
    o: OAuthWorld = oauth_world()
    # The client lost read:reports at the server: tokens carry write:reports only, the API answers 403.
    o.server.set_scopes(CLIENT, {OTHER_SCOPE})
    sampler = o.world.redis_sampler()
    o.world.start_worker(threads=2)
    run_id = o.world.request(JWT_KEY)
    o.world.wait_state(run_id, ["failed"], timeout=60)
    sampler.stop()

    assert o.world.transitions(run_id) == ["requested", "issued", "compensating", "failed"], o.world.trail(run_id)
    run = o.world.run(run_id)
    assert "lacks the scope 'read:reports'" in (run.last_error or ""), run.last_error
    assert o.server.stats()["resource"] == {"403": 1}
    assert not [e for e in o.world.audit(run_id) if e.event == "step_retry"], "a missing scope is not retried"
    assert list(o.jwks()) == [o.seed_kid], "the new JWK is removed, the old one kept"
    served = o.served(JWT_PATH, JWT_FIELD)
    assert served.secret == o.seed_pem and served.provider_key_id == o.seed_kid and served.version == 1
    _check_leaks(o, sampler, [])


def _provider(o: OAuthWorld) -> Any:
    from worker.db.models import ProviderRecord
    from worker.providers.ratelimit import InMemoryRateLimiter
    from worker.providers.registry import build_provider
    from worker.secret_refs import make_resolver

    with session_scope(o.world.engine) as session:
        record = session.get(ProviderRecord, PROVIDER)
        return build_provider(record, resolve=make_resolver(o.world.store), limiter=InMemoryRateLimiter())


def test_an_expired_key_is_replaced_and_its_jwk_removed(oauth_world: Any) -> None:
    from worker.providers.base import CheckOutcome

    o: OAuthWorld = oauth_world(seed_jwk_expired=True)
    assert _provider(o).check(o.seed_pem, credential_type="private_key_jwt") is CheckOutcome.invalid
    assert o.server.state.refusals == ["the JWK has expired"]
    o.world.start_worker(threads=2)
    run_id = o.world.request(JWT_KEY)
    o.world.wait_state(run_id, ["completed"], timeout=60)
    served = o.served(JWT_PATH, JWT_FIELD)
    assert served.secret != o.seed_pem and list(o.jwks()) == [served.provider_key_id]
    assert _provider(o).check(served.secret, credential_type="private_key_jwt") is CheckOutcome.valid
    retired = [e for e in o.world.audit(run_id) if e.event == "state_changed" and e.to_state == "retired"]
    assert retired and retired[0].detail.get("revocation") in ("revoked", "already_gone"), o.world.trail(run_id)


def test_a_rate_limited_registration_is_retried_after_retry_after_and_429_is_served_once(oauth_world: Any) -> None:
    o: OAuthWorld = oauth_world()
    o.server.add_fault("add_jwk", status=429, retry_after="1")
    o.world.start_worker(threads=2)
    run_id = o.world.request(JWT_KEY)
    o.world.wait_state(run_id, ["completed"], timeout=60)
    assert o.server.stats()["add_jwk"] == {"429": 1, "201": 1}
    retries = [e for e in o.world.audit(run_id) if e.event == "step_retry"]
    assert len(retries) == 1 and "rate limited" in str(retries[0].detail), o.world.trail(run_id)
    assert len(o.jwks()) == 1


def test_a_lost_registration_answer_is_settled_by_kid_and_strays_are_found_by_the_orphan_scan(oauth_world: Any) -> None:
    o: OAuthWorld = oauth_world()
    o.server.add_fault("add_jwk", after_effect_delay=3.0)  # lands, answers after the 2 s call timeout
    o.world.start_worker(threads=2)
    run_id = o.world.request(JWT_KEY)
    o.world.wait_state(run_id, ["completed"], timeout=60)
    served = o.served(JWT_PATH, JWT_FIELD)
    assert list(o.jwks()) == [served.provider_key_id] and o.server.stats()["add_jwk"] == {"201": 1}
    # A JWK named after the run that no version records (a registration nobody heard back from):
    stray = generate_key_pair("RS256")
    o.server.register_jwk(CLIENT, stray.public_jwk, name=f"keyrotor-{run_id}")
    _stuck, orphans = o.world.reconcile(orphan_min_age_s=0)
    assert stray.kid not in o.jwks() and served.provider_key_id in o.jwks(), orphans
    with session_scope(o.world.engine) as session:
        from sqlmodel import select

        from worker.db.models import AuditEvent

        events = [e.event for e in session.exec(select(AuditEvent).where(AuditEvent.event == "orphan_revoked")).all()]
    assert events == ["orphan_revoked"]


def test_a_client_secret_rotation_keeps_two_active_secrets_through_grace(oauth_world: Any) -> None:
    o: OAuthWorld = oauth_world(grace_s=2)
    sampler = o.world.redis_sampler()
    o.world.start_worker(threads=2)
    run_id = o.world.request(SECRET_KEY)
    o.world.wait_state(run_id, ["completed"], timeout=60)
    sampler.stop()
    served = o.served(SECRET_PATH, SECRET_FIELD)
    remaining = o.client_secrets()
    assert list(remaining) == [served.provider_key_id] and remaining[served.provider_key_id].name == f"keyrotor-{run_id}"
    assert served.secret.reveal() == remaining[served.provider_key_id].value != o.seed_secret.value
    _check_leaks(o, sampler, [o.seed_secret.value, served.secret.reveal()])


def test_two_workers_under_the_server_s_rate_limit_honour_every_retry_after(oauth_world: Any) -> None:
    """The server allows 4 requests per 2 s, fewer than the inventory declares: its 429s come with
    Retry-After, one worker's 429 blocks every worker (shared in Redis), and both rotations finish."""
    o: OAuthWorld = oauth_world(server_rate_limit=(4, 2.0))
    o.world.start_worker(threads=2)
    o.world.start_worker(threads=2)
    runs = [o.world.request(JWT_KEY), o.world.request(SECRET_KEY)]
    for run_id in runs:
        o.world.wait_state(run_id, ["completed"], timeout=120)
    log = sorted(o.server.state.log)
    limited = [(at, retry_after) for at, _route, status, retry_after in log if status == 429]
    print(f"\nserver limit 4/2s, 2 workers, 2 rotations: {len(log)} requests, {len(limited)} answered 429")
    assert limited, "the test needs the server's limit to bite"
    # Requests already in flight when a 429 went out may arrive just after it; nothing else may
    # arrive before its Retry-After has passed.
    in_flight_s, skew_s = 0.3, 0.2
    early = [(round(at - t429, 2), route) for t429, wait in limited for at, route, _status, _ra in log
             if t429 + in_flight_s < at < t429 + (wait or 0) - skew_s]
    assert not early, f"requests inside a Retry-After window: {early[:5]} (429s at {limited[:5]})"
    # So the 429s come in bursts no larger than what was in flight (2 workers x 2 threads) when the
    # first of each burst went out. How many bursts there are depends on how the rotations' steps
    # happen to line up against the server's window, which no client that is not told the limit controls.
    bursts: list[list[float]] = []
    for at, _wait in limited:
        if bursts and at - bursts[-1][0] <= in_flight_s:
            bursts[-1].append(at)
        else:
            bursts.append([at])
    assert max(len(burst) for burst in bursts) <= 4, f"429 bursts: {[len(b) for b in bursts]}"


def test_a_lost_client_secret_answer_leaves_no_stray_secret(oauth_world: Any) -> None:
    """The server made a secret but its answer came after the 2 s timeout: the value is lost, so the
    issue step's next attempt removes the secret named after the run, then asks for a new one."""
    o: OAuthWorld = oauth_world()
    o.server.add_fault("add_secret", after_effect_delay=3.0)
    o.world.start_worker(threads=2)
    run_id = o.world.request(SECRET_KEY)
    o.world.wait_state(run_id, ["completed"], timeout=90)
    served = o.served(SECRET_PATH, SECRET_FIELD)
    assert list(o.client_secrets()) == [served.provider_key_id], o.world.trail(run_id)
    assert o.server.stats()["add_secret"] == {"201": 2} and o.server.stats()["remove_secret"] == {"204": 2}
    events = [e.event for e in o.world.audit(run_id)]
    assert "issue_outcome_unknown" in events and "stray_key_found" in events, o.world.trail(run_id)


def test_a_scope_lost_after_promotion_rolls_back_to_the_old_key_and_removes_the_new_jwk(oauth_world: Any) -> None:
    """precheck passes (first scoped call), verify gets 403 insufficient_scope: the run rolls back,
    Vault serves the old key again, the old JWK stays and the new one is removed."""
    o: OAuthWorld = oauth_world()
    o.server.add_fault("resource", status=403, skip=1, count=100)
    o.world.start_worker(threads=2)
    run_id = o.world.request(JWT_KEY)
    o.world.wait_state(run_id, ["rolled_back"], timeout=60)
    states = o.world.transitions(run_id)
    assert "promoted" in states and "verified" not in states and states[-1] == "rolled_back", o.world.trail(run_id)
    failure = [e for e in o.world.audit(run_id) if e.event == "state_changed" and e.to_state == "rolling_back"]
    assert "lacks the scope 'read:reports'" in str(failure[0].detail) or \
        "lacks the scope 'read:reports'" in (o.world.run(run_id).last_error or ""), o.world.trail(run_id)
    served = o.served(JWT_PATH, JWT_FIELD)
    assert served.secret == o.seed_pem and served.provider_key_id == o.seed_kid and served.version == 3
    assert list(o.jwks()) == [o.seed_kid]
