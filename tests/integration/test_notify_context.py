"""Notifications follow the database the caller works on, never the process's default settings.

A ``PipelineContext`` built with ``context_from_settings(custom)`` used to notify through
``worker.notify.notify``, which opened ``get_settings().database_url`` (creating a keyrotor.db
in the working directory) and announced to *that* inventory's sinks. Same for the scheduler's
reconciler and reminder jobs given only an engine.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from worker.db.migrate import upgrade
from worker.db.models import InventorySnapshot
from worker.db.session import make_engine, session_scope

pytestmark = pytest.mark.integration


class _Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    handle = _Receiver()
    yield handle
    handle.close()


@pytest.fixture
def default_db_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The process default settings point at a database that must never be opened."""
    from worker.settings import get_settings

    default = tmp_path / "default" / "keyrotor.db"
    default.parent.mkdir()
    monkeypatch.setenv("KEYROTOR_DATABASE_URL", f"sqlite:///{default}")
    get_settings.cache_clear()
    yield default
    get_settings.cache_clear()


def _database_with_sink(tmp_path: Path, url: str) -> Any:
    db_url = f"sqlite:///{tmp_path / 'custom.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        session.add(InventorySnapshot(applied_at=datetime.now(timezone.utc), applied_by="test", digest="0" * 64,
                                      source="test", document={"notifications": [{"kind": "webhook", "url": url}]}))
    return db_url, engine


def test_the_pipeline_context_notifies_its_own_databases_sinks(tmp_path: Path, receiver: _Receiver, vault: Any,
                                                                vault_mount: str, default_db_elsewhere: Path) -> None:
    from worker.pipeline.context import context_from_settings
    from worker.settings import load_settings

    db_url, engine = _database_with_sink(tmp_path, receiver.url)
    custom = load_settings(database_url=db_url, vault_addr=vault.addr, vault_token=vault.token, vault_mount=vault_mount)
    ctx = context_from_settings(custom)
    assert ctx.notify is not None
    ctx.notify("failed", key_name="acme/reporting", run_id="r-1", detail={"reason": "test"})
    assert [(b["event"], b["key"], b["run_id"]) for b in receiver.bodies] == [("failed", "acme/reporting", "r-1")]
    assert not default_db_elsewhere.exists(), "notify opened the process default database"
    engine.dispose()


def test_scheduler_jobs_notify_the_engines_sinks(tmp_path: Path, receiver: _Receiver, default_db_elsewhere: Path) -> None:
    from worker.service import reconcile, reminders

    _, engine = _database_with_sink(tmp_path, receiver.url)
    reconcile._default_notify(engine)("needs_attention", key_name="k", run_id="r-2", detail={})
    reminders._default_notify(engine)("reminder", key_name="k", run_id=None, detail={})
    assert [b["event"] for b in receiver.bodies] == ["needs_attention", "reminder"]
    assert not default_db_elsewhere.exists()
    engine.dispose()
