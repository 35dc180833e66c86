"""Rows written together in one statement: a step's rows with its transition
(``runs.transition``'s ``writes``), each made only if the run moves, or several rows at once
(``execute_writes``). On PostgreSQL they are data-modifying CTEs of one statement, so a durable
point of the protocol is one round trip; elsewhere they run one after the other in the caller's
transaction.

A write is a shape and its values: the statement is built once per shape with bind parameters
(building a data-modifying CTE per call cost more CPU, about 0.9 ms, than the round trips it
saves) and the values go as parameters."""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

from sqlalchemy import ColumnElement, Table, bindparam, exists, insert, literal, true, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session

from worker.db import direct
from worker.db.statements import PerThreadCache


class ConditionalWrite:
    """A write made only if a condition holds (for a transition's writes: the run moved).
    ``statement(condition, prefix)`` is ``UPDATE … WHERE … AND <condition>`` or
    ``INSERT … SELECT … WHERE <condition>`` with bind parameters named from ``prefix``, the same
    for every write of one ``shape`` (so it is built once); ``params(prefix)`` gives their values."""

    shape: Hashable

    def statement(self, condition: ColumnElement[bool], prefix: str) -> Any:
        raise NotImplementedError

    def params(self, prefix: str) -> dict[str, Any]:
        raise NotImplementedError


class UpdateRows(ConditionalWrite):
    """``UPDATE <table> SET <values> WHERE <match>`` (columns equal to the given values)."""

    def __init__(self, table: Table, match: Mapping[str, Any], values: Mapping[str, Any]) -> None:
        self.table, self.match, self.values = table, dict(match), dict(values)
        self.shape: Hashable = ("update", table.name, tuple(self.match), tuple(self.values))

    def statement(self, condition: ColumnElement[bool], prefix: str) -> Any:
        table = self.table
        return (update(table)
                .where(*(table.c[name] == bindparam(f"{prefix}m_{name}", type_=table.c[name].type) for name in self.match),
                       condition)
                .values({name: bindparam(f"{prefix}{name}", type_=table.c[name].type) for name in self.values}))

    def params(self, prefix: str) -> dict[str, Any]:
        return {**{f"{prefix}m_{name}": value for name, value in self.match.items()},
                **{f"{prefix}{name}": value for name, value in self.values.items()}}


class RowChange(UpdateRows):
    """New values for columns of a row the step's snapshot holds (one of the run's versions, its
    key), by primary key. ``applied`` sets them on the snapshot's object once the transaction
    committed, so the chain's next step sees them without a query (set as loaded: the object
    stays clean, as ``merge(load=False)`` needs)."""

    def __init__(self, row: Any, values: Mapping[str, Any]) -> None:
        super().__init__(type(row).__table__, {"id": row.id}, values)
        self.row = row

    def applied(self) -> None:
        for name, value in self.values.items():
            set_committed_value(self.row, name, value)


class InsertRow(ConditionalWrite):
    """One row's INSERT, as ``INSERT … SELECT <values> WHERE <condition>`` (a VALUES list takes
    no condition). ``unless``: columns whose values, matched by a row that exists, skip it."""

    def __init__(self, table: Table, values: Mapping[str, Any], *, unless: tuple[str, ...] = ()) -> None:
        self.table, self.values, self.unless = table, dict(values), unless
        self.shape = ("insert", table.name, tuple(self.values), unless)

    def statement(self, condition: ColumnElement[bool], prefix: str) -> Any:
        table = self.table
        bound = {name: bindparam(f"{prefix}{name}", type_=table.c[name].type) for name in self.values}
        row = core_select(*bound.values()).where(condition)
        if self.unless:
            row = row.where(~exists().where(*(table.c[name] == bound[name] for name in self.unless)))
        return insert(table).from_select(list(bound), row)

    def params(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}{name}": value for name, value in self.values.items()}


def as_ctes(writes: Sequence[ConditionalWrite], condition: ColumnElement[bool]) -> list[Any]:
    """``writes`` as the data-modifying CTEs of one statement (``write_<n>``, parameters ``w<n>_…``)."""
    return [write.statement(condition, f"w{n}_").cte(f"write_{n}") for n, write in enumerate(writes)]


def params_of(writes: Sequence[ConditionalWrite]) -> dict[str, Any]:
    """The parameters of ``as_ctes(writes, …)``."""
    params: dict[str, Any] = {}
    for n, write in enumerate(writes):
        params.update(write.params(f"w{n}_"))
    return params


# Per thread (worker/db/statements.py): a statement's first compile must not run in two threads at once.
_TOGETHER: PerThreadCache[Any] = PerThreadCache()  # PostgreSQL: the writes' shapes → one statement
_ALONE: PerThreadCache[Any] = PerThreadCache()  # elsewhere: one write's shape → its statement


def execute_writes(bind: "Session | Connection", writes: Sequence[ConditionalWrite]) -> None:
    """Make ``writes`` now, without a transition, in ``bind``'s transaction (a session's, or a
    connection's: ``statement_scope``). On PostgreSQL they go as one statement (its CTEs all run,
    and see the rows as they were before it), elsewhere one after the other: a caller's writes
    must mean the same either way (``verification_writes``)."""
    if not writes:
        return
    connection = direct.connection_of(bind)
    if connection.dialect.name == "postgresql":
        statement = _TOGETHER.get(tuple(write.shape for write in writes),
                                  lambda: core_select(literal(1)).add_cte(*as_ctes(writes, true())))
        connection.execute(statement, params_of(writes))
        return
    for write in writes:
        statement = _ALONE.get(write.shape, lambda: write.statement(true(), "w_"))
        connection.execute(statement, write.params("w_"))
