"""Statements built once per thread, not once per process.

SQLAlchemy completes parts of a statement lazily, on its first compile: the column collections of
the CTEs and aliases in it, and the ORM's adaptation of an entity aliased to one of them. That
first compile is not safe in several threads at once on one statement object. Under load, a
chain's hand-off statement (``UPDATE … RETURNING`` as a CTE, read back as ``RotationRun``) compiled
with the CTE's columns missing: a cartesian product with ``rotation_run`` that handed another run's
row to the next step (tests/integration/test_transition_race.py reproduces it with a shared
statement). So a statement that threads would share is built by each thread for itself. A build
is cheap once, and SQLAlchemy's compiled cache (per engine, locked) still compiles each shape
once: a thread's statement finds the SQL another thread's statement of the same shape compiled.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class PerThread(Generic[T]):
    """One statement, built by ``build`` the first time each thread asks for it."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._local = threading.local()

    def get(self) -> T:
        try:
            return self._local.value
        except AttributeError:
            value = self._local.value = self._build()
            return value


class PerThreadCache(Generic[T]):
    """Statements by shape (any hashable key), each thread with its own."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        built: dict[Hashable, T] = self._local.__dict__.setdefault("built", {})
        statement = built.get(key)
        if statement is None:
            statement = built[key] = build()
        return statement
