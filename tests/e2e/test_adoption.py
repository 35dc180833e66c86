"""Adopting a key made by hand, then rotating it: the old key is revoked at the provider.

Before `keyrotor adopt`, such a key (written to Vault as {"api_key": …}, no provider key id) let a
rotation issue, promote and propagate, then stop in needs_attention in front of a revocation it
could never make. Now the rotation refuses up front, adopt finds the id, and the rotation ends
with the old key revoked. Real OpenBao, PostgreSQL, Redis, the provider stand-in over HTTP and
`keyrotor` subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.conftest import KEY_FIELD, KEY_NAME, KEY_PATH, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def keyrotor(world: Any, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli.main", *args], cwd=REPO, env=world.worker_env("WARNING"),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def hand_made_key(world: Any) -> Any:
    """A key created at the provider by a person and written to Vault without its id."""
    key = world.provider.seed_key("made-by-hand")
    world.store.write(world.mount, KEY_PATH, {KEY_FIELD: key.secret})
    return key


def test_adopted_key_is_rotated_and_its_old_key_revoked(make_world) -> None:  # type: ignore[no-untyped-def]
    world = make_world(grace_s=1, with_consumer=False, with_copy=False)
    old = hand_made_key(world)

    refused = keyrotor(world, "rotate", KEY_NAME)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and f"keyrotor adopt {KEY_NAME}" in refused.stderr
    assert "Traceback" not in refused.stderr

    adopted = keyrotor(world, "adopt", KEY_NAME, "--json")
    assert adopted.returncode == 0, adopted.stderr
    doc = json.loads(adopted.stdout)
    assert doc["provider_key_id"] == old.id and doc["found_by"] == "verify"
    assert world.store.read_current(world.mount, KEY_PATH, KEY_FIELD).provider_key_id == old.id
    assert old.secret not in adopted.stdout + adopted.stderr

    world.start_worker()
    rotated = keyrotor(world, "rotate", KEY_NAME, "--wait", "--timeout", "90", "--json")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr + world.worker_logs()[-3000:]
    assert world.provider.key(old.id).revoked, "the adopted (old) key must be revoked at the provider"
    assert not world.provider.is_live(old.secret)
    assert world.provider.is_live(world.current_secret())


def test_adopt_from_stdin_writes_the_key_to_an_empty_vault_path(make_world) -> None:  # type: ignore[no-untyped-def]
    world = make_world(grace_s=1, with_consumer=False, with_copy=False)
    # Adopting with nothing in Vault and no stdin: one line saying how (and that a first rotation is the other way).
    import hvac

    client = hvac.Client(url=world.vault_addr, token=world.vault_token)
    client.secrets.kv.v2.delete_metadata_and_all_versions(path=KEY_PATH, mount_point=world.mount)
    empty = keyrotor(world, "adopt", KEY_NAME)
    assert empty.returncode == 2 and "--from-stdin" in empty.stderr and f"keyrotor rotate {KEY_NAME}" in empty.stderr
    key = world.provider.seed_key("pasted")
    piped = keyrotor(world, "adopt", KEY_NAME, "--from-stdin", stdin=key.secret + "\n")
    assert piped.returncode == 0, piped.stderr
    stored = world.store.read_current(world.mount, KEY_PATH, KEY_FIELD)
    assert stored.secret.reveal() == key.secret and stored.provider_key_id == key.id
    assert key.secret not in piped.stdout + piped.stderr


def test_adopt_refuses_a_key_the_provider_rejects(make_world) -> None:  # type: ignore[no-untyped-def]
    world = make_world(grace_s=1, with_consumer=False, with_copy=False)
    world.store.write(world.mount, KEY_PATH, {KEY_FIELD: "sbx_not-a-key-the-provider-knows"})
    answer = keyrotor(world, "adopt", KEY_NAME)
    assert answer.returncode == 1 and "answers invalid" in answer.stderr and answer.stderr.count("\n") == 1


def test_a_queued_rotation_of_a_key_that_could_never_be_revoked_fails_before_issuing(make_world) -> None:  # type: ignore[no-untyped-def]
    """Producers other than the CLI (scheduler, request stream) are refused by the issue step: the
    run fails at once, names `keyrotor adopt`, and nothing was minted at the provider."""
    world = make_world(grace_s=1, with_consumer=False, with_copy=False)
    old = hand_made_key(world)
    world.start_worker()
    run_id = world.request()
    world.wait_state(run_id, ("failed",), timeout=60)
    run = world.run(run_id)
    assert f"keyrotor adopt {KEY_NAME}" in (run.last_error or ""), world.trail(run_id)
    assert world.keys_of_run(run_id) == []
    assert world.provider.is_live(old.secret) and world.current_secret() == old.secret
