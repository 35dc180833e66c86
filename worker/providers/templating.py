"""Rendering of call templates: ``{base_url}/api/api-key/{key_id}``, ``{labels[user]}``, ``{secret}``.

Secrets enter a template only here, at send time, and the rendered strings go straight to httpx;
nothing rendered is logged. Unknown placeholders are a configuration error (named, with the
variables that exist). Values substituted into URL paths are percent-encoded.
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable, Mapping
from urllib.parse import quote

from worker.errors import ConfigError
from worker.secret import Secret

#: Placeholders substituted verbatim in URLs (they are URL prefixes, not path segments).
_URL_VERBATIM = {"base_url"}
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([^\]]+)\])?$")


def _lookup(variables: Mapping[str, Any], field: str, template: str) -> tuple[str, str]:
    """(root name, value as text) of one ``{field}`` (``name`` or ``name[index]``)."""
    match = _FIELD.match(field)
    if not match:
        raise ConfigError(f"template {template!r}: unsupported placeholder {{{field}}} (use {{name}} or {{labels[name]}})")
    name, index = match.groups()
    if name not in variables:
        raise ConfigError(f"template {template!r}: unknown placeholder {{{name}}}; available: {', '.join(sorted(variables))}")
    value = variables[name]
    if index is not None:
        if not isinstance(value, Mapping) or index not in value:
            raise ConfigError(f"template {template!r}: {{{name}[{index}]}} is not set (add it to the key's labels)")
        value = value[index]
    if value is None:
        raise ConfigError(f"template {template!r}: {{{name}}} has no value for this call")
    if isinstance(value, Secret):
        return name, value.reveal()
    return name, str(value)


def _render(template: str, variables: Mapping[str, Any], encode: Callable[[str, str], str]) -> str:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"template {template!r}: {exc} (write a literal brace doubled)") from None
    out: list[str] = []
    for literal, field, _spec, _conv in parsed:
        out.append(literal)
        if field is not None:
            name, value = _lookup(variables, field, template)
            out.append(encode(name, value))
    return "".join(out)


def render(template: str, variables: Mapping[str, Any]) -> str:
    return _render(template, variables, lambda _name, value: value)


def render_url(template: str, variables: Mapping[str, Any]) -> str:
    return _render(template, variables, lambda name, value: value if name in _URL_VERBATIM else quote(value, safe=""))


def render_json(template: Any, variables: Mapping[str, Any]) -> Any:
    """Render every string inside a JSON-shaped template (dicts, lists, scalars)."""
    if isinstance(template, str):
        return render(template, variables)
    if isinstance(template, Mapping):
        return {render(str(k), variables): render_json(v, variables) for k, v in template.items()}
    if isinstance(template, list):
        return [render_json(v, variables) for v in template]
    return template
