"""Field types of the inventory models, and the checks behind them (no model of a section here).

The strict base model every section uses; durations (one parser for the whole service); templates
over :data:`URL_PLACEHOLDERS`; fields that carry a secret and refuse a literal one; absolute HTTP(S)
URLs; and :func:`raise_problems`, which reports several located problems as one validation error.
The provider kinds (``worker.inventory.provider_parts``, ``worker.inventory.oauth_schema``) and the
document (``worker.inventory.schema``) are built from these.
"""

from __future__ import annotations

import re
import string
from datetime import timedelta
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, PlainSerializer, Tag, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from worker.inventory.literals import header_problem, url_problem
from worker.secret_refs import SecretRef

#: The template that stands for "the credential being checked" in a call's auth.
SECRET_TEMPLATE = "{secret}"

#: Placeholders a URL, header, body or Vault path template may use.
URL_PLACEHOLDERS = frozenset(
    {"base_url", "key_name", "key_id", "secret", "run_id", "credential_type", "labels", "key_slug", "captured"}
)

LITERAL_SECRET_MESSAGE = 'a literal secret is not allowed here; use {vault: "MOUNT/PATH#FIELD"} or {env: NAME}'


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- durations
_DURATION_PART = re.compile(r"(\d+)\s*([smhdw])")
_DURATION_FULL = re.compile(r"^\s*(?:\d+\s*[smhdw]\s*)+$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> timedelta:
    """``90`` (seconds), ``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"``, ``"1h30m"`` → timedelta."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise PydanticCustomError("duration", "expected a duration such as 90s, 15m, 12h, 7d, 2w or a number of seconds")
    elif isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value.strip())
    elif isinstance(value, str) and _DURATION_FULL.match(value):
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
    else:
        raise PydanticCustomError(
            "duration",
            "expected a duration such as 90s, 15m, 12h, 7d, 2w or a number of seconds, got {value}",
            {"value": repr(value)},
        )
    if seconds < 0:
        raise PydanticCustomError("duration", "a duration cannot be negative")
    return timedelta(seconds=seconds)


#: A duration; read from ints (seconds) or "90s/15m/12h/7d/2w", written to JSON as whole seconds.
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda td: int(td.total_seconds()), return_type=int, when_used="json"),
]


def positive_duration(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise PydanticCustomError("duration", "must be longer than zero")
    return value


# --------------------------------------------------------------------------- templates
def template_placeholders(template: str) -> list[str]:
    """Root names of the ``{placeholders}`` in a template (``{labels[x]}`` → ``labels``)."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise PydanticCustomError("template", "not a valid template ({reason}); a literal brace is written doubled", {"reason": str(exc)}) from None
    for _literal, field, _spec, _conv in parsed:
        if field is None:
            continue
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        names.append(root)
    return names


def _check_template(template: str) -> str:
    for name in template_placeholders(template):
        if name not in URL_PLACEHOLDERS:
            raise PydanticCustomError(
                "template",
                "unknown placeholder {name}; known: {known}",
                {"name": "{" + name + "}", "known": ", ".join("{" + p + ("[...]" if p == "labels" else "") + "}" for p in sorted(URL_PLACEHOLDERS))},
            )
    return template


def check_body_templates(value: Any) -> Any:
    """Every string inside a JSON body template must use known placeholders only; a mapping that
    is a secret reference (``{vault: …}`` / ``{env: …}``) must be a valid one."""
    if isinstance(value, str):
        _check_template(value)
    elif isinstance(value, Mapping):
        if is_ref_shaped(value):
            SecretRef.model_validate(value)
            return value
        for item in value.values():
            check_body_templates(item)
    elif isinstance(value, list):
        for item in value:
            check_body_templates(item)
    return value


def stringify_scalar(value: Any) -> Any:
    """YAML turns ``true``/``434`` into bool/int; header values are strings on the wire."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


TemplateStr = Annotated[str, BeforeValidator(stringify_scalar), BeforeValidator(lambda v: _check_template(v) if isinstance(v, str) else v)]
HeaderValue = Annotated[str, BeforeValidator(lambda v: _check_template(stringify_scalar(v)) if isinstance(stringify_scalar(v), str) else v)]


def _template_or_ref_tag(value: Any) -> str:
    return "ref" if isinstance(value, (Mapping, SecretRef)) else "template"


#: A header, query or form value: a template, or a secret reference resolved when the call is sent.
TemplateOrRef = Annotated[
    Union[Annotated[HeaderValue, Tag("template")], Annotated[SecretRef, Tag("ref")]],
    Discriminator(_template_or_ref_tag),
]


def is_ref_shaped(value: Any) -> bool:
    """A mapping whose only entry is ``vault`` or ``env`` (the convention of ``worker.secret_refs``)."""
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in ("vault", "env")


# --------------------------------------------------------------------------- secret fields
def _refuse_literal(value: Any) -> Any:
    if isinstance(value, str) and value != SECRET_TEMPLATE:
        raise PydanticCustomError("literal_secret", LITERAL_SECRET_MESSAGE)
    if value is not None and not isinstance(value, (str, Mapping, SecretRef)):
        raise PydanticCustomError("literal_secret", LITERAL_SECRET_MESSAGE)
    return value


def _refuse_any_string(value: Any) -> Any:
    if value is not None and not isinstance(value, (Mapping, SecretRef)):
        raise PydanticCustomError("literal_secret", LITERAL_SECRET_MESSAGE)
    return value


def _secret_tag(value: Any) -> str:
    return "template" if isinstance(value, str) else "ref"


#: A secret: a reference, or "{secret}" (the credential being checked). Never a literal.
CredentialValue = Annotated[
    Union[Annotated[SecretRef, Tag("ref")], Annotated[Literal["{secret}"], Tag("template")]],
    Discriminator(_secret_tag),
    BeforeValidator(_refuse_literal),
]
#: A secret that must come from a reference (management credentials, signing secrets).
SecretRefOnly = Annotated[SecretRef, BeforeValidator(_refuse_any_string)]


def refuse_literal_in_url(value: str) -> str:
    problem = url_problem(value)
    if problem is not None:
        raise PydanticCustomError("literal_secret", problem)
    return value


def literal_header_problems(headers: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """One problem per header that would carry a literal credential, located at that header."""
    found = ((name, header_problem(name, value)) for name, value in headers.items() if isinstance(value, str))
    return [((name,), problem) for name, problem in found if problem is not None]


# Defined before the first model that uses it: pydantic < 2.7 evaluates string annotations in a
# snapshot of the module namespace, so a validator named later is missing there.
def _http_url(value: str) -> str:
    refuse_literal_in_url(value)  # webhook URLs (Slack's, say) and tokens in a query are credentials
    if not re.match(r"^https?://[^/\s]+", value):
        # The value is not echoed: a webhook URL (Slack's, say) is itself a credential.
        raise PydanticCustomError("url", "expected an absolute http(s) URL such as https://host/path")
    return value


HttpUrl = Annotated[str, BeforeValidator(lambda v: _http_url(v) if isinstance(v, str) else v)]


def raise_problems(problems: list[tuple[tuple[str | int, ...], str]], value: Any) -> None:
    if problems:
        raise ValidationError.from_exception_data(
            type(value).__name__,
            [InitErrorDetails(type=PydanticCustomError("reference", msg), loc=loc, input=None) for loc, msg in problems],
        )


def _upper_case(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


#: An HTTP method of a declared call, accepted in any case (``post`` reads as ``POST``).
HttpMethod = Annotated[Literal["GET", "POST", "PUT", "PATCH", "DELETE"], BeforeValidator(_upper_case)]
