"""The package tree keeps its architecture: layers import only downward, and no import cycles.

The layer contracts live in pyproject.toml ([tool.importlinter]); `make lint` runs them too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "jobs", "keyrotor_sandbox")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle_among_the_projects_modules() -> None:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a two-module loop is reported."""

    class Loop:
        modules = {"a", "b", "c"}

        @staticmethod
        def find_modules_directly_imported_by(module: str) -> set[str]:
            return {"a": {"b"}, "b": {"a"}, "c": {"a"}}[module]

    assert _cycles(Loop()) == [["a", "b"]]  # type: ignore[arg-type]


def test_layer_contracts_hold() -> None:
    # In a child process: lint-imports configures logging with dictConfig, which would disable
    # every logger this test process created so far.
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={os.fspath(ROOT / 'pyproject.toml')!r}, no_cache=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _unexplained_function_level_imports(source: str) -> list[int]:
    """Lines of imports of keyrotor's own modules made inside a function with no reason given: a
    comment on the line or the one above, or a module-wide note about start-up cost (the CLI)."""
    if "start-up cost" in source:
        return []
    lines = source.splitlines()
    found: list[int] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [child.module or ""] if isinstance(child, ast.ImportFrom) else [a.name for a in child.names]
                own = getattr(child, "level", 0) or any(n.split(".")[0] in PACKAGES for n in names)
                text = lines[child.lineno - 1] + (lines[child.lineno - 2] if child.lineno > 1 else "")
                if own and "#" not in text:
                    found.append(child.lineno)
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def test_no_unexplained_function_level_import_of_our_own_modules() -> None:
    offenders = {
        str(path.relative_to(ROOT)): lines
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts
        and (lines := _unexplained_function_level_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_function_level_import_check_can_fail() -> None:
    assert _unexplained_function_level_imports("def f():\n    from worker.clock import utcnow\n") == [2]
    assert _unexplained_function_level_imports("def f():\n    # optional dependency\n    import worker.x\n") == []
