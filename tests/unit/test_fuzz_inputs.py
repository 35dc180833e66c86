"""Fuzzing the two places keyrotor reads input it does not control: the inventory loader (arbitrary
YAML-ish text, and structured mutations of config/keyrotor.example.yaml) and the queue-message
parser (arbitrary bytes, text and JSON, and mutations of a valid request).

The property for both: a clear error — ``FILE:LINE`` problems from the loader, ``MalformedMessage``
with a reason code from the parser — never a crash or another exception, and never an echo of a
secret-looking value planted in the input. ``HYPOTHESIS_PROFILE=thorough`` multiplies the cases.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hypothesis_profiles import examples
from worker.inventory.literals import looks_like_credential
from worker.inventory.loader import Problem, check_text
from worker.pipeline.messages import MalformedMessage, RotationRequestV1, parse_request

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")
EXAMPLE_DATA = yaml.safe_load(EXAMPLE_TEXT)

#: Values a fuzzer plants; none of them may come back in an error message.
#: Only values the service's own rule calls credential-shaped (``looks_like_credential``: a known
#: token format, or a long random-looking run); a low-entropy run such as ``00A000…`` is not one.
SECRETS = st.builds(lambda prefix, body: prefix + body,
                    st.sampled_from(["sk_live_", "ghp_", "xoxb-", "glpat-", "sk-", "Bearer ", ""]),
                    st.text(alphabet=string.ascii_letters + string.digits, min_size=24, max_size=40)
                    .filter(lambda s: any(c.isdigit() for c in s) and any(c.isalpha() for c in s))
                    ).filter(looks_like_credential)

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
                    st.sampled_from(["http://10.0.0.1/x", "https://h", "{base_url}/x", "{nope}", "$.a", "1h", "-5s",
                                     "2026-13-45T99:00:00", "{vault: x}", "GET", "overlap", "webhook"]))
VALUES = st.recursive(SCALARS, lambda children: st.one_of(st.lists(children, max_size=3),
                                                          st.dictionaries(st.text(max_size=12), children, max_size=3)),
                      max_leaves=8)


# --------------------------------------------------------------------------- inventory loader
def _assert_clear(problems: list[Problem], secret: str | None = None) -> None:
    for problem in problems:
        line = problem.format()
        assert line.strip() and "\n" not in line, line
        assert problem.line >= 0
        assert "Traceback" not in line
        if secret is not None:
            assert secret not in line, f"the problem echoes the planted value: {line}"


def _check(text: str, secret: str | None = None) -> None:
    inventory, problems = check_text(text, "inventory.yaml")
    assert (inventory is None) == bool(problems), "either an inventory or its problems"
    _assert_clear(problems, secret)


@settings(max_examples=examples(1500, 15000))
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_loader_reports_arbitrary_text_as_problems(text: str) -> None:
    _check(text)


YAMLISH = st.lists(st.sampled_from(["version: 1", "providers:", "  alloy:", "    kind: http", "keys:", "  - ",
                                    "    base_url: http://x", "- [", "{", "}", "]", ": :", "  &a x", "*a", "!!python/object:os.system",
                                    "? complex", "%YAML 1.1", "---", "...", "\t", "'", '"', "|", ">", "#", "version: 2",
                                    "policies: {a: {grace_period: 1h}}", "  - {name: x, provider: y}", "<<: *a",
                                    "integrations: []", "notifications: {a: {kind: slack, url: 'http://x'}}"]),
                   max_size=25)


@settings(max_examples=examples(1000, 10000))
@given(YAMLISH, st.lists(st.integers(min_value=0, max_value=8), max_size=25))
def test_loader_reports_yaml_shaped_garbage_as_problems(lines: list[str], indents: list[int]) -> None:
    text = "\n".join(" " * (indents[i] if i < len(indents) else 0) + line for i, line in enumerate(lines))
    _check(text)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.extend(_paths(value, (*prefix, index)))
    return out


EXAMPLE_PATHS = [p for p in _paths(EXAMPLE_DATA) if p]


def _mutate(data: Any, path: tuple[Any, ...], how: str, value: Any) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = value
    elif how == "add_field" and isinstance(parent[last], dict):
        parent[last]["unexpected_field"] = value
    elif how == "wrap":
        parent[last] = [parent[last]]
    return data


@settings(max_examples=examples(150, 5000))
@given(st.sampled_from(EXAMPLE_PATHS), st.sampled_from(["delete", "replace", "add_field", "wrap"]), VALUES)
def test_loader_reports_mutations_of_the_example_inventory(path: tuple[Any, ...], how: str, value: Any) -> None:
    text = yaml.safe_dump(_mutate(EXAMPLE_DATA, path, how, value), sort_keys=False, allow_unicode=True)
    _check(text)


@settings(max_examples=examples(150, 5000))
@given(st.sampled_from([p for p in EXAMPLE_PATHS if not isinstance(p[-1], int)]), SECRETS)
def test_loader_never_echoes_a_secret_planted_in_the_example_inventory(path: tuple[Any, ...], secret: str) -> None:
    text = yaml.safe_dump(_mutate(EXAMPLE_DATA, path, "replace", secret), sort_keys=False)
    _check(text, secret)


@pytest.mark.parametrize("field", ["provider", "credential_type"])
@pytest.mark.parametrize("how, value", [("replace", {"a": 1}), ("wrap", None)])
def test_a_mapping_or_list_as_the_name_of_an_expiring_keys_provider_is_a_problem(field: str, how: str, value: Any) -> None:
    """A key with ``expires_at`` whose provider or type name is not a string (the expiry rule once
    looked it up and crashed: unhashable)."""
    expiring = next(name for name, key in EXAMPLE_DATA["keys"].items() if key.get("expires_at"))
    data = _mutate(EXAMPLE_DATA, ("keys", expiring, field), how, value)
    inventory, problems = check_text(yaml.safe_dump(data, sort_keys=False), "inventory.yaml")
    assert inventory is None
    assert any(p.path == f"keys.{expiring}.{field}" for p in problems), problems
    _assert_clear(problems)


def test_the_example_inventory_itself_loads() -> None:
    """The mutations start from a valid file (else every case would fail for the same reason)."""
    inventory, problems = check_text(EXAMPLE_TEXT, str(EXAMPLE))
    assert inventory is not None and not problems


# --------------------------------------------------------------------------- queue messages
VALID = {"version": 1, "key": "acme/reporting", "reason": "manual", "requested_by": "ci:deploy",
         "idempotency_key": "deploy-1", "not_before": None, "emergency": False}
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
                    lambda children: st.one_of(st.lists(children, max_size=4),
                                               st.dictionaries(st.text(max_size=10), children, max_size=4)),
                    max_leaves=12)


def _parse(raw: Any, secret: str | None = None) -> None:
    try:
        request = parse_request(raw)
    except MalformedMessage as exc:
        assert exc.code in {"too_large", "not_json", "not_object", "bad_version", "invalid"}, exc.code
        assert exc.reason.strip()
        if secret is not None:
            assert secret not in exc.reason and secret not in str(exc), f"the rejection echoes the planted value: {exc}"
        return
    assert isinstance(request, RotationRequestV1)


@settings(max_examples=examples(1500, 15000))
@given(st.binary(max_size=400))
def test_parser_rejects_arbitrary_bytes_with_a_reason(raw: bytes) -> None:
    _parse(raw)


@settings(max_examples=examples(1000, 10000))
@given(JSON)
def test_parser_rejects_arbitrary_json_with_a_reason(value: Any) -> None:
    _parse(value)
    _parse(json.dumps(value))


@settings(max_examples=examples(1000, 10000))
@given(st.sampled_from([*VALID, "provider", "all", "target_credential_type", "colour"]),
       st.sampled_from(["value", "key", "delete"]), SECRETS, JSON)
def test_parser_never_echoes_a_secret_planted_in_a_request(field: str, where: str, secret: str, other: Any) -> None:
    message = dict(VALID)
    if where == "value":
        message[field] = secret
    elif where == "key":
        message[secret] = other
    else:
        message.pop(field, None)
        message[field + "_"] = secret
    _parse(message, secret)
    _parse(json.dumps(message).encode(), secret)


# --------------------------------------------------------------------------- what the fuzzers found
def test_a_control_character_is_one_problem_line_with_its_line_number() -> None:
    _, problems = check_text("version: 1\nproviders: {}\n\x1f\n", "inv.yaml")
    assert [p.format() for p in problems] == [
        "inv.yaml:3: YAML error: unacceptable character #x001f (special characters are not allowed); remove it"]


def test_a_credential_shaped_version_or_field_name_is_not_echoed() -> None:
    token = "sk_live_a9Fq2LmX7vR4kT8zW1pN6yB3"
    for message in ({**VALID, "version": token}, {**VALID, token: 1}):
        try:
            parse_request(message)
        except MalformedMessage as exc:
            assert token not in exc.reason
        else:
            raise AssertionError("accepted")


def test_a_credential_shaped_policy_name_is_not_echoed() -> None:
    token = "Bearer a9Fq2LmX7vR4kT8zW1pN6yB3"
    _, problems = check_text(EXAMPLE_TEXT.replace("policy: short-lived", f'policy: "{token}"'), "inv.yaml")
    assert problems and all(token not in p.format() for p in problems)


def test_a_credential_shaped_value_after_another_quoted_name_is_not_echoed() -> None:
    token = "sk_live_00000000000000000000000A"
    text = EXAMPLE_TEXT.replace("credential_type: api_key               # deprecated", f"credential_type: {token}  #")
    _, problems = check_text(text, "inv.yaml")
    assert problems and all(token not in p.format() for p in problems)
