"""The rows a step writes with its transition (``runs.transition``'s ``writes``): each made only
if the run moves, and on PostgreSQL inside the transition's own statement, so that a step's
durable point is one round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sqlalchemy import ColumnElement, Table, exists, insert, literal, true, update
from sqlalchemy import select as core_select
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session

from worker.pipeline.runs import ConditionalWrite


@dataclass(frozen=True)
class RowChange:
    """New values for columns of a row the step's snapshot holds (one of the run's versions, its
    key), by primary key. ``write`` is its UPDATE, made only if the run moves; ``applied`` sets the
    values on the snapshot's object once the transaction committed, so the chain's next step sees
    them without a query (set as loaded: the object stays clean, as ``merge(load=False)`` needs)."""

    row: Any
    values: Mapping[str, Any]

    def write(self, if_moved: ColumnElement[bool]) -> Any:
        table: Table = type(self.row).__table__
        return update(table).where(table.c.id == self.row.id, if_moved).values(dict(self.values))

    def applied(self) -> None:
        for name, value in self.values.items():
            set_committed_value(self.row, name, value)


def insert_row(table: Table, values: Mapping[str, Any], *, unless: tuple[str, ...] = ()) -> ConditionalWrite:
    """One row's INSERT as ``INSERT … SELECT <values> WHERE <the run moved>`` (a VALUES list takes
    no condition). ``unless``: columns whose values, matched by a row that exists already, skip it."""

    def write(if_moved: ColumnElement[bool]) -> Any:
        names = list(values)
        row = core_select(*(literal(values[name], table.c[name].type) for name in names)).where(if_moved)
        if unless:
            row = row.where(~exists().where(*(table.c[name] == values[name] for name in unless)))
        return insert(table).from_select(names, row)

    return write


def execute_now(session: Session, writes: Sequence[ConditionalWrite]) -> None:
    """Make ``writes`` in ``session``'s transaction now, without a transition."""
    connection = session.connection()
    for write in writes:
        connection.execute(write(true()))
