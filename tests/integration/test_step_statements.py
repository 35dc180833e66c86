"""What a rotation's steps ask PostgreSQL, statement by statement: each step reads its run, key,
provider record and versions once (the snapshot) and finds them again in its own transaction
without a query (``steps.common.attach``); no pooled connection is pinged while in use
(``worker/db/session.py``); run transitions are plain UPDATEs on the table."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterator

import pytest
from sqlalchemy import event

from tests.fakes_pipeline import FakeProvider, World
from worker.protocol.states import RunState

pytestmark = pytest.mark.integration


@pytest.fixture
def world(pg_url: str) -> Iterator[World]:
    from worker.pipeline.context import configure
    from worker.runtime.broker import make_stub_broker, setup_broker

    setup_broker(broker=make_stub_broker())
    built = World(url=pg_url, provider=FakeProvider()).build(grace_period_s=0)
    configure(built.ctx)
    yield built
    configure(None)


def _record(world: World) -> list[tuple[str, str]]:
    """(step, statement head) of every statement the pipeline's engine runs, pings included."""
    import structlog

    seen: list[tuple[str, str]] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        step = structlog.contextvars.get_contextvars().get("step") or "-"
        seen.append((step, re.sub(r"\s+", " ", statement)))

    event.listen(world.engine, "before_cursor_execute", before)
    real_ping = world.engine.dialect.do_ping

    def ping(dbapi_conn: Any) -> bool:
        seen.append(("-", "PING"))
        return bool(real_ping(dbapi_conn))

    world.engine.dialect.do_ping = ping  # type: ignore[method-assign]
    return seen


def _reads_of(seen: list[tuple[str, str]], step: str, table: str) -> int:
    """Statements of ``step`` that read ``table`` first: a SELECT from it, or the snapshot's claim
    joined with it (``WITH claimed AS (UPDATE …) SELECT … FROM claimed JOIN <table>``)."""
    return sum(1 for s, text in seen if s == step and (text.startswith(f"SELECT {table}.")
                                                       or f"FROM claimed JOIN {table} " in text))


def test_each_step_reads_what_it_acts_on_once(world: World) -> None:
    first = world.request()
    assert world.drive(first) == RunState.completed  # the key's first rotation adopts its version
    seen = _record(world)
    run_id = world.request()
    assert world.drive(run_id) == RunState.completed

    print("\n".join(f"{s}: {t}" for s, t in seen if s == "issue"))
    assert ("-", "PING") not in seen, "a connection in constant use was pinged"
    steps = ("issue", "precheck", "promote", "propagate", "verify", "retire", "finish")
    claims = Counter(s for s, text in seen if "UPDATE rotation_run SET lease_owner" in text)
    assert claims == Counter({step: 1 for step in steps}), claims
    for step in steps:
        # The snapshot's one query carries the key and its provider record: never read again.
        assert _reads_of(seen, step, "managed_key") == 1, (step, seen)
        assert _reads_of(seen, step, "provider") == 0, (step, seen)
    # Versions: issue looks up the key's current version once (what Vault serves); promote and
    # retire change the versions the snapshot read, without reading them again.
    assert _reads_of(seen, "issue", "key_version") == 1, seen
    assert _reads_of(seen, "promote", "key_version") == 0, seen
    assert _reads_of(seen, "retire", "key_version") == 0, seen
    # Every transition is one UPDATE of the run and one audit row, nothing read back.
    assert _reads_of(seen, "finish", "rotation_run") == 0, seen
