"""YAML → :class:`Inventory`, with every problem located at ``FILE:LINE: field.path: message``.

PyYAML's composed node tree keeps each key's position (``start_mark``), so a pydantic error
location (a path of field names and indices) can be walked down the tree to the line that holds
the offending field. Timestamps are left as strings (pydantic parses them and insists on a time
zone), and duplicate mapping keys — which YAML would otherwise silently overwrite — are reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from worker.errors import ConfigError
from worker.inventory.literals import looks_like_credential
from worker.inventory.schema import Inventory, reference_problems

Loc = tuple[Any, ...]


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with an inventory file."""

    line: int           # 1-based; 0 when unknown
    path: str           # dotted field path, "" for syntax errors
    message: str
    file: str = ""

    def format(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        head = f"{where}: " if where else ""
        return f"{head}{self.path}: {self.message}" if self.path else f"{head}{self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class InventoryError(ConfigError):
    """The inventory file has problems; ``problems`` lists each with its location."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(p.format() for p in self.problems))


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings (pydantic validates them, time zone required)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory file; raise :class:`InventoryError` listing every problem."""
    inventory, problems = check_file(path)
    if problems or inventory is None:
        raise InventoryError(problems)
    return inventory


def check_file(path: str | Path) -> tuple[Inventory | None, list[Problem]]:
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [Problem(0, "", "no such file", name)]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(0, "", f"cannot read the file: {exc}", name)]
    return check_text(text, name)


def check_text(text: str, filename: str = "<inventory>") -> tuple[Inventory | None, list[Problem]]:
    """Validate inventory YAML text; returns the inventory (None if invalid) and the problems."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        detail = " ".join(part for part in (exc.context, exc.problem) if part)
        if exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            detail += f" (the construct starts on line {exc.context_mark.line + 1})"
        return None, [Problem(line, "", f"YAML syntax error: {detail or exc}", filename)]
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (a control character, say)
        line = text[:max(exc.position, 0)].count("\n") + 1
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return None, [Problem(line, "", f"YAML error: unacceptable character {what} ({exc.reason}); remove it", filename)]
    except yaml.YAMLError as exc:
        return None, [Problem(0, "", "YAML error: " + " ".join(str(exc).split()), filename)]

    if root is None:
        return None, [Problem(1, "", "the file is empty; expected a mapping with version, providers, keys, ...", filename)]
    if not isinstance(data, dict):
        return None, [Problem(root.start_mark.line + 1, "", "the inventory must be a mapping with version, providers, keys, ...", filename)]

    problems = _duplicate_keys(root, (), filename)
    inventory: Inventory | None = None
    try:
        inventory = Inventory.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            line, path = locate(root, error["loc"])
            problems.append(Problem(line, path, _message(error, path), filename))
        # Field errors stop the model before its cross-reference check: run it on the raw data.
        for loc, message in reference_problems(data):
            line, path = locate(root, loc)
            problems.append(Problem(line, path, message, filename))
    problems = [Problem(p.line, p.path, _scrub_quoted(p.message), p.file) for p in problems]
    problems = sorted(set(problems), key=lambda p: (p.line, p.path, p.message))
    return (inventory if not problems else None), problems


def _duplicate_keys(node: yaml.Node, loc: Loc, filename: str) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                problems.append(Problem(key_node.start_mark.line + 1, _format_path((*loc, key)),
                                        f"duplicate key (first defined on line {seen[key]}); YAML would keep only the last", filename))
            elif key is not None:
                seen[key] = key_node.start_mark.line + 1
            problems.extend(_duplicate_keys(value_node, (*loc, key), filename))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems.extend(_duplicate_keys(item, (*loc, index), filename))
    return problems


def locate(root: yaml.Node, loc: Loc) -> tuple[int, str]:
    """The line and the display path of a pydantic error location within the YAML tree.

    Location parts that are not in the document (union tags such as ``bearer``, ``ref``) are
    dropped from the path; a final part that is absent (a missing field) is kept and reported
    at its parent's line.
    """
    node: yaml.Node | None = root
    line = root.start_mark.line + 1
    path: list[Any] = []
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if part == "[key]":
            continue
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
            if match is not None:
                key_node, node = match
                line = key_node.start_mark.line + 1
                path.append(part)
                continue
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
            path.append(part)
            continue
        if last:
            path.append(part)
        # otherwise: a union tag or a model-level location; not part of the document
    return line, _format_path(path)


def format_path(parts: Sequence[Any]) -> str:
    """A location as the loader prints it: ``keys.alloy/billing.integrations[0]``."""
    return _format_path(parts)


def locate_in_file(path: str | Path, locs: Sequence[Loc]) -> list[tuple[int, str]]:
    """``(line, display path)`` of each location in an inventory file (line 0 if it is unreadable)."""
    try:
        loader = _Loader(Path(path).read_text(encoding="utf-8"))
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        root = None
    if root is None:
        return [(0, _format_path(loc)) for loc in locs]
    return [locate(root, loc) for loc in locs]


def _format_path(parts: Sequence[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_MESSAGES = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "union_tag_not_found": "missing the field that says which kind this is",
}


def _message(error: ErrorDetails, path: str) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown field {path.rsplit('.', 1)[-1]!r} (check its spelling and indentation)"
    if kind == "union_tag_not_found":
        tag = (error.get("ctx") or {}).get("discriminator", "").strip("'")
        return f"missing {tag!r}, which says which kind this is" if tag else _MESSAGES[kind]
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    for value in (error.get("input"), *(error.get("ctx") or {}).values()):
        message = _without_secret_value(message, value)
    return message


_QUOTED = re.compile(r"'([^'\n]{0,300})'")


def _scrub_quoted(message: str) -> str:
    """Cross-reference messages quote names ("unknown policy '…'"): not a credential-shaped one."""
    return _QUOTED.sub(lambda m: "(a credential-shaped value, not shown)" if looks_like_credential(m[1]) else m[0], message)


def _without_secret_value(message: str, value: Any) -> str:
    """Messages that quote the offending value ("got '…'", "Input tag '…'") must not quote a
    credential-shaped one."""
    if not isinstance(value, str) or not value.strip() or not looks_like_credential(value):
        return message
    for shown in (repr(value), value):
        message = message.replace(shown, "(a credential-shaped value, not shown)")
    return message


def problems_json(problems: Sequence[Problem]) -> str:
    return json.dumps([p.as_dict() for p in problems], indent=2)
