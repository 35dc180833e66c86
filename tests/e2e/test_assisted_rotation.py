"""Assisted rotation end to end: a key whose provider has no issue/revoke API, rotated by its owner.

Real parts: workers as subprocesses on Redis + PostgreSQL, the OpenBao server of the session, the
provider stand-in over HTTP (verify only: the provider is declared ``assisted``), and the owner's
contact as an HTTP receiver (a ``webhook`` contact) that records every notice. The owner writes to
Vault with a token holding ONLY the shipped example owner policy. The scheduler's ``deposits`` job
(``worker/service/deposits.py``) is run from the test as the scheduler would, with explicit clocks for the
reminder/deadline case.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import hvac
import pytest
import yaml

from tests.e2e.conftest import KEY_NAME, PROVIDER, REPO, World, render_inventory
from worker.text import key_slug

CREATE_URL = "https://standin.example/settings/api-keys"


class ContactInbox:
    """The owner's contact: an HTTP receiver recording each notice (JSON body)."""

    def __init__(self) -> None:
        from keyrotor_sandbox.standin_http import Response, serve_in_thread

        self.notices: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()

        def app(request: Any) -> Any:
            with self.lock:
                self.raw.append(request.body)
                self.notices.append(json.loads(request.body))
            return Response.json(200, {"ok": True})

        self.server = serve_in_thread(app, name="owner-contact")
        self.url = self.server.url + "/owner/hook"

    def events(self) -> list[str]:
        with self.lock:
            return [n["event"] for n in self.notices]

    def last(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The newest notice of ``event``, waiting for one (the step notifies after its transition)."""
        import time

        until = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [n for n in self.notices if n["event"] == event]
            if found or time.monotonic() > until:
                assert found, f"no {event} notice (got {self.events()})"
                return found[-1]
            time.sleep(0.05)


def _assisted_world(make_world: Any, tmp_path: Path, inbox: ContactInbox, assisted: dict[str, Any]) -> World:
    from worker.db.session import session_scope
    from worker.inventory.apply import apply_inventory
    from worker.inventory.loader import load_inventory

    world = make_world(with_consumer=False, with_copy=False, grace_s=1, activation_timeout_s=2)
    document = render_inventory({"provider_url": world.provider.url, "consumer_url": "", "mount": world.mount},
                                grace_s=1, activation_timeout_s=2, with_consumer=False, with_copy=False)
    provider = document["providers"][PROVIDER]
    provider["mode"] = "assisted"
    provider["calls"] = {"verify": provider["calls"]["verify"]}   # no issue, revoke or list API
    provider["credential_types"] = {"api_key": {"create_url": CREATE_URL}}
    document["keys"][KEY_NAME].update({"owner": "team-e2e", "contact": {"webhook": {"url": inbox.url}},
                                       "assisted": assisted})
    path = tmp_path / "inventory-assisted.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    with session_scope(world.engine) as session:
        apply_inventory(session, load_inventory(path), actor="test:e2e")
    return world


def _scheduler_context(world: World) -> Any:
    """The PipelineContext the scheduler's deposits job gets (``context_from_settings``)."""
    from worker.pipeline.context import context_from_settings
    from worker.settings import load_settings

    world.broker  # noqa: B018 - an accepted deposit enqueues the next step on the test namespace
    settings = load_settings(database_url=world.db_url, redis_url=world.redis_url,
                             queue_namespace=world.namespace, VAULT_ADDR=world.vault_addr,
                             VAULT_TOKEN=world.vault_token, vault_mount=world.mount, vault_timeout_s=5.0)
    return context_from_settings(settings)


def _owner_token(world: World) -> str:
    """A token holding ONLY the shipped example owner policy, for this key's deposit path."""
    policy = (REPO / "config" / "vault-owner-deposit-policy.hcl").read_text()
    policy = policy.replace('path "secret/', f'path "{world.mount}/').replace("KEY_SLUG", key_slug(KEY_NAME))
    root = hvac.Client(url=world.vault_addr, token=world.vault_token)
    name = f"owner-{world.mount}"
    root.sys.create_or_update_policy(name=name, policy=policy)
    created = root.auth.token.create(policies=[name], no_default_policy=True, ttl="10m")
    return created["auth"]["client_token"]


def _deposit_path() -> str:
    return f"keyrotor/deposits/{key_slug(KEY_NAME)}"


@pytest.fixture
def inbox() -> Iterator[ContactInbox]:
    box = ContactInbox()
    yield box
    box.server.stop()


def _bao_kv_put(world: World, token: str, value: str, who: str) -> None:
    """The owner's documented command: `vault kv put -mount=M PATH credential=- deposited_by=NAME`
    (OpenBao's CLI: `bao`), the value on stdin."""
    from keyrotor_sandbox.openbao import find_bao

    bao = find_bao()
    if bao is None:  # the Vault named by VAULT_ADDR, no CLI here: the same write through the API
        hvac.Client(url=world.vault_addr, token=token).secrets.kv.v2.create_or_update_secret(
            path=_deposit_path(), secret={"credential": value, "deposited_by": who}, mount_point=world.mount)
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update({"BAO_ADDR": world.vault_addr, "BAO_TOKEN": token, "VAULT_ADDR": world.vault_addr, "VAULT_TOKEN": token})
    done = subprocess.run([str(bao), "kv", "put", f"-mount={world.mount}", _deposit_path(), "credential=-",
                           f"deposited_by={who}"], input=value, text=True, env=env, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_owner_deposits_through_vault_a_wrong_one_first_and_the_rotation_completes(
        make_world: Any, tmp_path: Path, inbox: ContactInbox) -> None:
    from worker.service.deposits import collect_deposits

    world = _assisted_world(make_world, tmp_path, inbox,
                            {"remind_every": "1h", "deposit_deadline": "1d", "revoke_deadline": "1h",
                             "revoke_check_every": "1s"})
    world.start_worker()
    run_id = world.request()
    world.wait_state(run_id, ["awaiting_deposit"])
    ctx = _scheduler_context(world)
    token = _owner_token(world)

    # The owner is asked, at their contact: what to create, where, how to hand it over.
    asked = inbox.last("deposit_requested")
    assert asked["key"] == KEY_NAME and asked["run_id"] == run_id
    detail = asked["detail"]
    assert detail["provider"] == PROVIDER and detail["credential_type"] == "api_key"
    assert detail["create_at"] == CREATE_URL and _deposit_path() in detail["next_step"]
    assert detail["deposit"]["command"] == (f"vault kv put -mount={world.mount} {_deposit_path()} credential=- "
                                            "deposited_by=<your name>")

    # The owner's token may write the deposit path but not read it back.
    owner = hvac.Client(url=world.vault_addr, token=token)
    wrong = "sbx-typo-" + os.urandom(8).hex()
    owner.secrets.kv.v2.create_or_update_secret(path=_deposit_path(), secret={"credential": wrong, "deposited_by": "alice"},
                                                mount_point=world.mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        owner.secrets.kv.v2.read_secret_version(path=_deposit_path(), mount_point=world.mount,
                                                raise_on_deleted_version=True)

    # A wrong credential: checked at once, the owner is told why, the deposit is destroyed.
    first = collect_deposits(ctx)
    assert first.rejected == [run_id] and not first.accepted
    rejected = inbox.last("deposit_rejected")
    assert "rejects this credential" in rejected["detail"]["reason"]
    assert world.state(run_id) == "awaiting_deposit"
    assert world.store.list_versions(world.mount, _deposit_path()) == []   # every version and the metadata gone
    assert [e.event for e in world.audit(run_id)].count("deposit_rejected") == 1

    # The right one, with the documented CLI command.
    made = world.provider.seed_key("created-in-the-ui")
    _bao_kv_put(world, token, made.secret, "alice")
    second = collect_deposits(ctx)
    assert second.accepted == [run_id]
    assert world.store.list_versions(world.mount, _deposit_path()) == []
    assert "deposit_accepted" in inbox.events()

    # The provider cannot revoke: after the grace period the owner is asked to revoke the old
    # credential; keyrotor polls until the provider rejects it, then completes.
    world.wait_state(run_id, ["verified"], timeout=60)
    revoke = inbox.last("revoke_requested", timeout=60)["detail"]
    assert revoke["credential_type"] == "api_key" and "revoke the old api_key" in revoke["next_step"]
    assert world.state(run_id) == "verified"   # waits for the owner, not for ever
    with world.provider.state.lock:
        world.provider.state.keys[world.seed_key_id].revoked = True   # the owner revokes it in the UI
    world.wait_state(run_id, ["completed"], timeout=60)

    assert world.current_secret() == made.secret
    changes = [e for e in world.audit(run_id) if e.event == "state_changed" and e.to_state == "issued"]
    assert changes[0].actor == "owner:team-e2e (alice)"
    assert changes[0].detail["source"] == "vault" and changes[0].detail["claimed_by"] == "alice"
    retired = [e for e in world.audit(run_id) if e.event == "state_changed" and e.to_state == "retired"]
    assert retired[0].detail["revocation"] == "revoked by the owner (the provider rejects it)"
    old = [v for v in world.versions() if v.provider_key_id == world.seed_key_id]
    assert old and str(getattr(old[0].stage, "value", old[0].stage)) == "retired"
    # Never a secret: not in what the service wrote, not in any notice.
    assert world.leaks([wrong, made.secret, world.seed_secret], extra={"notices": b"\n".join(inbox.raw)}) == []
    assert "[REDACTED]" not in b"\n".join(inbox.raw).decode()


def test_an_owner_who_never_deposits_gets_the_reminders_then_the_run_needs_attention(
        make_world: Any, tmp_path: Path, inbox: ContactInbox) -> None:
    from worker.service.deposits import collect_deposits, waiting_since
    from worker.db.models import RotationRun
    from worker.db.session import session_scope

    world = _assisted_world(make_world, tmp_path, inbox, {"remind_every": "1h", "deposit_deadline": "4h"})
    world.start_worker()
    run_id = world.request()
    world.wait_state(run_id, ["awaiting_deposit"])
    inbox.last("deposit_requested")
    ctx = _scheduler_context(world)
    with session_scope(world.engine) as session:
        since = waiting_since(session, session.get(RotationRun, run_id))

    # The scheduler's passes, at these times after the run began waiting: a reminder each hour
    # (not at +3h30: the last one was at +3h), then the deadline at +4h.
    for minutes in (30, 60, 90, 120, 180, 210):
        collect_deposits(ctx, now=since + timedelta(minutes=minutes))
    assert world.state(run_id) == "awaiting_deposit"
    last = collect_deposits(ctx, now=since + timedelta(hours=4))
    assert last.expired == [run_id]
    assert world.state(run_id) == "needs_attention"

    assert inbox.events().count("deposit_reminder") == 3   # at +1h, +2h, +3h
    assert inbox.events()[0] == "deposit_requested" and inbox.events()[-1] == "needs_attention"
    reminder = inbox.last("deposit_reminder")["detail"]
    assert reminder["credential_type"] == "api_key" and reminder["provider"] == PROVIDER
    assert _deposit_path() in reminder["next_step"]
    assert [e.event for e in world.audit(run_id)].count("deposit_reminder_sent") == 3
    final = [e for e in world.audit(run_id) if e.event == "state_changed"][-1]
    assert final.to_state == "needs_attention" and "no working credential was deposited" in final.detail["reason"]
    # A later pass leaves it alone (no more reminders).
    collect_deposits(ctx, now=since + timedelta(hours=6))
    assert inbox.events().count("deposit_reminder") == 3
