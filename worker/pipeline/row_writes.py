"""The rows a step writes with its transition (``runs.transition``'s ``writes``): each made only
if the run moves, and on PostgreSQL inside the transition's own statement, so that a step's
durable point is one round trip.

A write is a shape and its values: the statement is built once per shape with bind parameters
(building a data-modifying CTE per call cost more CPU, about 0.9 ms, than the round trips it
saves) and the values go as parameters."""

from __future__ import annotations

from typing import Any, Hashable, Mapping

from sqlalchemy import ColumnElement, Table, bindparam, exists, insert, update
from sqlalchemy import select as core_select
from sqlalchemy.orm.attributes import set_committed_value

from worker.pipeline.runs import ConditionalWrite


class UpdateRows(ConditionalWrite):
    """``UPDATE <table> SET <values> WHERE <match>`` (columns equal to the given values)."""

    def __init__(self, table: Table, match: Mapping[str, Any], values: Mapping[str, Any]) -> None:
        self.table, self.match, self.values = table, dict(match), dict(values)
        self.shape: Hashable = ("update", table.name, tuple(self.match), tuple(self.values))

    def statement(self, if_moved: ColumnElement[bool], prefix: str) -> Any:
        table = self.table
        return (update(table)
                .where(*(table.c[name] == bindparam(f"{prefix}m_{name}", type_=table.c[name].type) for name in self.match),
                       if_moved)
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
    """One row's INSERT, as ``INSERT … SELECT <values> WHERE <the run moved>`` (a VALUES list takes
    no condition). ``unless``: columns whose values, matched by a row that exists, skip it."""

    def __init__(self, table: Table, values: Mapping[str, Any], *, unless: tuple[str, ...] = ()) -> None:
        self.table, self.values, self.unless = table, dict(values), unless
        self.shape = ("insert", table.name, tuple(self.values), unless)

    def statement(self, if_moved: ColumnElement[bool], prefix: str) -> Any:
        table = self.table
        bound = {name: bindparam(f"{prefix}{name}", type_=table.c[name].type) for name in self.values}
        row = core_select(*bound.values()).where(if_moved)
        if self.unless:
            row = row.where(~exists().where(*(table.c[name] == bound[name] for name in self.unless)))
        return insert(table).from_select(list(bound), row)

    def params(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}{name}": value for name, value in self.values.items()}
