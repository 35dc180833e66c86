"""Collect ``bench_*.py`` here (pytest only collects ``test_*.py`` by default); run with `make bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_collect_file(parent: Any, file_path: Path) -> Any:
    # Files named on the command line are collected by pytest itself; collecting them here too
    # would run every benchmark twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
