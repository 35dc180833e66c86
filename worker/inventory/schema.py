"""pydantic models of the inventory YAML (see ``config/keyrotor.example.yaml``).

Every model forbids unknown fields, so a typo is an error rather than a silently ignored option.
A field that carries a secret accepts only a reference (``{vault: "MOUNT/PATH#FIELD"}`` or
``{env: NAME}``) or, where the credential being checked is meant, the template ``"{secret}"``;
a literal value is refused with a message that says what to write instead.

Cross-references between sections (a key's provider, credential type, policy, integrations, a
credential type's replacement) are checked by :func:`reference_problems`, which works on plain
data so that ``keyrotor config check`` can report them together with field errors.
"""

from __future__ import annotations

import re
import string
from datetime import datetime, timedelta
from typing import Annotated, Any, Iterable, Literal, Mapping, Optional, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from worker.http_security import insecure_http_problem
from worker.inventory.error_matchers import ErrorMatcherSpec
from worker.inventory.expiry_rules import lost_expiry_problems
from worker.inventory.literals import header_problem, url_problem, value_problem
from worker.secret_refs import SecretRef, iter_refs
from worker.text import count

__all__ = [
    "SECRET_TEMPLATE",
    "URL_PLACEHOLDERS",
    "AuthSpec",
    "BasicAuthSpec",
    "BearerAuthSpec",
    "CallsSpec",
    "CredentialTypeSpec",
    "DeprecationPhase",
    "Duration",
    "EndpointGroupSpec",
    "HeaderAuthSpec",
    "HttpCallSpec",
    "HttpProviderSpec",
    "IntegrationSpec",
    "Inventory",
    "KeySpec",
    "KubernetesSecretIntegrationSpec",
    "MtlsAuthSpec",
    "NotificationSpec",
    "PROVIDER_KINDS",
    "PolicySpec",
    "ProviderSpec",
    "ResolvedPolicy",
    "ResponseSpec",
    "SecretRef",
    "VaultCopyIntegrationSpec",
    "VaultLocation",
    "WebhookIntegrationSpec",
    "WorkloadRef",
    "key_slug",
    "parse_duration",
    "reference_problems",
    "template_placeholders",
]

#: The template that stands for "the credential being checked" in a call's auth.
SECRET_TEMPLATE = "{secret}"

#: Placeholders a URL, header, body or Vault path template may use.
URL_PLACEHOLDERS = frozenset(
    {"base_url", "key_name", "key_id", "secret", "run_id", "credential_type", "labels", "key_slug", "captured"}
)

LITERAL_SECRET_MESSAGE = 'a literal secret is not allowed here; use {vault: "MOUNT/PATH#FIELD"} or {env: NAME}'


NOTIFICATION_EVENTS = ("started", "succeeded", "failed", "rolled_back", "needs_attention", "reminder")


class _Model(BaseModel):
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


def _positive(value: timedelta) -> timedelta:
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


def _check_body(value: Any) -> Any:
    """Every string inside a JSON body template must use known placeholders only; a mapping that
    is a secret reference (``{vault: …}`` / ``{env: …}``) must be a valid one."""
    if isinstance(value, str):
        _check_template(value)
    elif isinstance(value, Mapping):
        if is_ref_shaped(value):
            SecretRef.model_validate(value)
            return value
        for item in value.values():
            _check_body(item)
    elif isinstance(value, list):
        for item in value:
            _check_body(item)
    return value


def _stringify_scalar(value: Any) -> Any:
    """YAML turns ``true``/``434`` into bool/int; header values are strings on the wire."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


TemplateStr = Annotated[str, BeforeValidator(_stringify_scalar), BeforeValidator(lambda v: _check_template(v) if isinstance(v, str) else v)]
HeaderValue = Annotated[str, BeforeValidator(lambda v: _check_template(_stringify_scalar(v)) if isinstance(_stringify_scalar(v), str) else v)]


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


# --------------------------------------------------------------------------- auth
class BearerAuthSpec(_Model):
    """``Authorization: Bearer <token>``."""

    type: Literal["bearer"]
    token: CredentialValue


class HeaderAuthSpec(_Model):
    """A named header carrying the credential, e.g. ``apiKey: <value>``."""

    type: Literal["header"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    value: CredentialValue


class BasicAuthSpec(_Model):
    """HTTP basic auth; the user name is not secret, the password is."""

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: CredentialValue


class MtlsAuthSpec(_Model):
    """A client certificate; the private key comes from a reference, the files are mounted."""

    type: Literal["mtls"]
    cert_file: str = Field(min_length=1)
    key: SecretRefOnly
    ca_file: Optional[str] = None


AuthSpec = Annotated[
    Union[BearerAuthSpec, HeaderAuthSpec, BasicAuthSpec, MtlsAuthSpec],
    Field(discriminator="type"),
]


def _auth_uses_secret_template(auth: Any) -> bool:
    return any(getattr(auth, f, None) == SECRET_TEMPLATE for f in ("token", "value", "password"))


# --------------------------------------------------------------------------- HTTP calls
class ResponseSpec(_Model):
    """JSON paths (``$.a.b``, ``$.items[0].id``) to the fields of an answer."""

    secret: Optional[str] = None
    key_id: Optional[str] = None
    expires_at: Optional[str] = None
    items: Optional[str] = None   # list calls: where the list is; key_id/name are then relative to one item
    name: Optional[str] = None
    created_at: Optional[str] = None  # list calls: when the provider created the key (relative to one item)
    revoked: Optional[str] = None  # list calls: a flag that is true for a revoked/inactive key (relative to one item)
    # list calls: the part of the key the provider shows, e.g. "sk_live_…4f2a" (keyrotor adopt matches it)
    secret_hint: Optional[str] = None

    @field_validator("secret", "key_id", "expires_at", "items", "name", "created_at", "revoked", "secret_hint")
    @classmethod
    def _json_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^\$(\.[A-Za-z0-9_-]+|\[\d+\])*$", value):
            raise PydanticCustomError("json_path", "expected a JSON path such as $.data.id or $.keys[0].id, got {value}", {"value": repr(value)})
        return value


class _RequestSpec(_Model):
    """One HTTP request; strings are templates over :data:`URL_PLACEHOLDERS`. Header, query and
    form values, and any value inside a JSON body, may instead be a secret reference
    (``{vault: "MOUNT/PATH#FIELD"}`` or ``{env: NAME}``; a Vault path may hold placeholders such as
    ``{labels[user]}``), read when the request is sent and never logged."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: TemplateStr
    headers: dict[str, TemplateOrRef] = Field(default_factory=dict)
    #: Query parameters, URL-encoded; the query string is never logged.
    query: dict[str, TemplateOrRef] = Field(default_factory=dict)
    #: A form-encoded body (``application/x-www-form-urlencoded``); not together with ``body``.
    form: dict[str, TemplateOrRef] = Field(default_factory=dict)
    body: Optional[Union[dict[str, Any], list[Any], str]] = None
    auth: Optional[AuthSpec] = None   # overrides the provider's management auth for this call
    #: Matchers tried before the provider's own ``errors`` (see worker/inventory/error_matchers.py).
    errors: list[ErrorMatcherSpec] = Field(default_factory=list)
    timeout: Optional[Duration] = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("body")
    @classmethod
    def _body(cls, value: Any) -> Any:
        _check_body(value)
        _raise(_value_problems(value, ()), value)
        return value

    @field_validator("url")
    @classmethod
    def _no_literal_secret_in_url(cls, value: str) -> str:
        return _refuse_literal_in_url(value)

    @field_validator("headers")
    @classmethod
    def _no_literal_credentials(cls, headers: dict[str, Any]) -> dict[str, Any]:
        # A header that carries a credential takes it from a placeholder, never spells it out.
        _raise(_header_problems(headers), headers)
        return headers

    @field_validator("query", "form")
    @classmethod
    def _no_literal_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        _raise(_value_problems(values, ()), values)
        return values

    @model_validator(mode="after")
    def _one_body(self) -> "_RequestSpec":
        if self.form and self.body is not None:
            _raise([(("form",), "give either 'form' (form-encoded) or 'body' (JSON or text), not both")], self)
        return self

    def templates(self) -> list[str]:
        """Every template string of the request (URL, headers, query, form, body)."""
        texts = [self.url, *(v for v in (*self.headers.values(), *self.query.values(), *self.form.values()) if isinstance(v, str))]
        if isinstance(self.body, str):
            texts.append(self.body)
        elif self.body is not None:
            texts.extend(_strings(self.body))
        return texts

    def captured_names(self) -> set[str]:
        """The ``{captured[NAME]}`` names the request uses."""
        names: set[str] = set()
        for text in self.templates():
            names.update(re.findall(r"\{captured\[([^\]]+)\]\}", text))
        return names


class RequestStepSpec(_RequestSpec):
    """A request made before a call (a login, a token request); ``capture`` names values of its
    answer (JSON paths) that later requests use as ``{captured[NAME]}``. Captured values are
    treated as secrets (a session id is one): never logged, rendered only when sent."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    capture: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")], str] = Field(default_factory=dict)

    @field_validator("capture")
    @classmethod
    def _paths(cls, capture: dict[str, str]) -> dict[str, str]:
        for path in capture.values():
            ResponseSpec._json_path(path)
        return capture


class HttpCallSpec(_RequestSpec):
    """One call at a provider: optional requests ``before`` it (their captures feed the later
    ones), then the request itself, whose answer ``response`` reads."""

    before: list[RequestStepSpec] = Field(default_factory=list)
    response: ResponseSpec = Field(default_factory=ResponseSpec)

    @model_validator(mode="after")
    def _captures_in_order(self) -> "HttpCallSpec":
        problems: list[tuple[tuple[str | int, ...], str]] = []
        known: set[str] = set()
        seen_steps: set[str] = set()
        for index, step in enumerate(self.before):
            if step.name in seen_steps:
                problems.append((("before", index, "name"), f"step name {step.name!r} is used twice"))
            seen_steps.add(step.name)
            for name in sorted(step.captured_names() - known):
                problems.append((("before", index), f"{{captured[{name}]}} is not captured by an earlier step "
                                 f"(captured so far: {', '.join(sorted(known)) or 'nothing'})"))
            known.update(step.capture)
        for name in sorted(self.captured_names() - known):
            problems.append(((), f"{{captured[{name}]}} is not captured by a step in 'before' "
                             f"(captured: {', '.join(sorted(known)) or 'nothing'})"))
        _raise(problems, self)
        return self

    def uses_secret(self) -> bool:
        """Whether the call carries the credential being checked (``{secret}`` anywhere)."""
        if self.auth is not None and _auth_uses_secret_template(self.auth):
            return True
        return any("secret" in template_placeholders(t) for t in self.templates())

    def requests(self) -> list[_RequestSpec]:
        """The steps, then the call itself."""
        return [*self.before, self]


def _value_problems(value: Any, loc: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str]]:
    """Literal credentials under secret-sounding names in a body, form or query (never the value)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(value, Mapping) and not is_ref_shaped(value):
        for name, item in value.items():
            if isinstance(item, str):
                problem = value_problem(str(name), item)
                if problem is not None:
                    problems.append(((*loc, name), problem))
            else:
                problems.extend(_value_problems(item, (*loc, name)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems.extend(_value_problems(item, (*loc, index)))
    return problems


def _refuse_literal_in_url(value: str) -> str:
    problem = url_problem(value)
    if problem is not None:
        raise PydanticCustomError("literal_secret", problem)
    return value


def _header_problems(headers: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """One problem per header that would carry a literal credential, located at that header."""
    found = ((name, header_problem(name, value)) for name, value in headers.items() if isinstance(value, str))
    return [((name,), problem) for name, problem in found if problem is not None]


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


class CallsSpec(_Model):
    issue: Optional[HttpCallSpec] = None
    verify: Optional[HttpCallSpec] = None
    revoke: Optional[HttpCallSpec] = None
    list: Optional[HttpCallSpec] = None


#: Calls each rotation mode cannot work without.
REQUIRED_CALLS: dict[str, tuple[str, ...]] = {
    "overlap": ("issue", "verify", "revoke"),
    "cutover": ("issue", "verify"),
    "assisted": ("verify",),
}


# --------------------------------------------------------------------------- deprecation
PhaseName = Literal["no_new_credentials", "amnesty", "rejected"]
_PHASE_ORDER = {"no_new_credentials": 0, "amnesty": 1, "rejected": 2}
#: Phases in which an existing credential of the type no longer works as before.
CUTOFF_PHASES = frozenset({"amnesty", "rejected"})


# Defined before the first model that uses it: pydantic < 2.7 evaluates string annotations in a
# snapshot of the module namespace, so a validator named later is missing there.
def _http_url(value: str) -> str:
    _refuse_literal_in_url(value)  # webhook URLs (Slack's, say) and tokens in a query are credentials
    if not re.match(r"^https?://[^/\s]+", value):
        # The value is not echoed: a webhook URL (Slack's, say) is itself a credential.
        raise PydanticCustomError("url", "expected an absolute http(s) URL such as https://host/path")
    return value


HttpUrl = Annotated[str, BeforeValidator(lambda v: _http_url(v) if isinstance(v, str) else v)]


class DeprecationPhase(_Model):
    """From ``from`` on: no new credentials can be issued / calls need ``headers`` / calls are rejected."""

    phase: PhaseName
    from_: AwareDatetime = Field(alias="from")
    headers: dict[str, HeaderValue] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _no_literal_credentials(cls, headers: dict[str, str]) -> dict[str, str]:
        _raise(_header_problems(headers), headers)
        return headers


class CredentialTypeSpec(_Model):
    """A kind of credential a provider issues; may be deprecated in dated phases."""

    replacement: Optional[str] = None
    #: assisted mode: the vendor's page where a person creates this kind of credential (told to owners)
    create_url: Optional[HttpUrl] = None
    deprecation: list[DeprecationPhase] = Field(default_factory=list)
    #: How long a new credential of this type lives when the provider's answer does not say
    #: (e.g. Workfront's keys: 30d); its expiry is then the issue time plus this.
    lifetime: Optional[Duration] = None
    #: Credentials of this type carry administrator rights (shown as such in status and plan).
    admin: bool = False
    #: Calls of this type that differ from the provider's (each replaces the provider's call).
    calls: Optional[CallsSpec] = None

    @field_validator("lifetime")
    @classmethod
    def _lifetime(cls, value: Optional[timedelta]) -> Optional[timedelta]:
        return None if value is None else _positive(value)

    @field_validator("deprecation")
    @classmethod
    def _ordered(cls, phases: list[DeprecationPhase]) -> list[DeprecationPhase]:
        seen: set[str] = set()
        for phase in phases:
            if phase.phase in seen:
                raise PydanticCustomError("deprecation", "phase {phase} is listed twice", {"phase": phase.phase})
            seen.add(phase.phase)
        for earlier, later in zip(phases, phases[1:]):
            if _PHASE_ORDER[later.phase] < _PHASE_ORDER[earlier.phase] or later.from_ <= earlier.from_:
                raise PydanticCustomError(
                    "deprecation",
                    "phases must be listed in order no_new_credentials, amnesty, rejected with increasing dates",
                )
        return phases

    def phase_at(self, now: datetime) -> DeprecationPhase | None:
        """The phase in force at ``now`` (the latest one that has started), or None."""
        current: DeprecationPhase | None = None
        for phase in self.deprecation:
            if phase.from_ <= now:
                current = phase
        return current

    def first_cutoff(self) -> datetime | None:
        """When existing credentials first stop working as before (amnesty or rejected), or None."""
        starts = [p.from_ for p in self.deprecation if p.phase in CUTOFF_PHASES]
        return min(starts) if starts else None

    def next_cutoff(self, after: datetime) -> datetime | None:
        """The start of the first amnesty/rejected phase strictly after ``after``, or None."""
        starts = [p.from_ for p in self.deprecation if p.phase in CUTOFF_PHASES and p.from_ > after]
        return min(starts) if starts else None

    def can_issue_at(self, now: datetime) -> bool:
        """False once any deprecation phase has started (no new credentials of this type)."""
        return self.phase_at(now) is None

    def headers_at(self, now: datetime) -> dict[str, str]:
        """Extra headers calls need at ``now`` (the amnesty header), else ``{}``."""
        phase = self.phase_at(now)
        return dict(phase.headers) if phase is not None and phase.phase == "amnesty" else {}


# --------------------------------------------------------------------------- providers
class RateLimitSpec(_Model):
    requests: int = Field(gt=0)
    per: Duration = timedelta(seconds=1)

    @field_validator("per")
    @classmethod
    def _per(cls, value: timedelta) -> timedelta:
        return _positive(value)


HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_PATH_GLOB = re.compile(r"^/[A-Za-z0-9._~!$&'()+,;=:@%*/{}-]*$")


class EndpointGroupSpec(_Model):
    """Requests whose path matches one of ``paths`` (``*`` one segment, ``**`` any number; none
    given: every path) and whose method is in ``methods`` (none given: every method) also count
    against this group's own ``rate_limit`` and ``concurrency`` (besides the provider's)."""

    paths: list[str] = Field(default_factory=list)
    methods: list[Literal["GET", "POST", "PUT", "PATCH", "DELETE"]] = Field(default_factory=list)
    rate_limit: Optional[RateLimitSpec] = None
    concurrency: Optional[int] = Field(None, gt=0)

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return [m.upper() if isinstance(m, str) else m for m in value] if isinstance(value, list) else value

    @field_validator("paths")
    @classmethod
    def _globs(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not _PATH_GLOB.match(path) or "?" in path:
                raise PydanticCustomError("path_glob", "expected a URL path such as /api/1.0/workspaces/*/tasks/search "
                                          "(starting with /, no query; * is one segment, ** any), got {value}",
                                          {"value": repr(path)})
        return paths

    @model_validator(mode="after")
    def _useful(self) -> "EndpointGroupSpec":
        if not self.paths and not self.methods:
            raise PydanticCustomError("endpoint_group", "give paths, methods or both: which requests belong to the group")
        if self.rate_limit is None and self.concurrency is None:
            raise PydanticCustomError("endpoint_group", "give rate_limit, concurrency or both: what limits the group")
        return self


class ActivationSpec(_Model):
    """New credentials may go live with a delay: poll ``verify`` this often, for at most ``timeout``."""

    poll_interval: Duration = timedelta(seconds=2)
    timeout: Duration = timedelta(minutes=2)

    @field_validator("poll_interval", "timeout")
    @classmethod
    def _pos(cls, value: timedelta) -> timedelta:
        return _positive(value)


class StatusCodesSpec(_Model):
    invalid: list[int] = Field(default_factory=lambda: [401, 403])
    deprecated: list[int] = Field(default_factory=list)

    @field_validator("invalid", "deprecated")
    @classmethod
    def _codes(cls, codes: list[int]) -> list[int]:
        for code in codes:
            if not 400 <= code <= 599:
                raise PydanticCustomError("status_code", "{code} is not an HTTP error status (400-599)", {"code": code})
        return codes


class DeclaresCredentialTypes:
    """What every provider kind answers from its ``credential_types``."""

    credential_types: dict[str, CredentialTypeSpec]

    def credential_type(self, name: str) -> CredentialTypeSpec | None:
        return self.credential_types.get(name)

    def rotation_target(self, credential_type: str, now: datetime) -> str:
        """The type a rotation should issue: the replacement once the type is deprecated."""
        spec = self.credential_types.get(credential_type)
        if spec is not None and spec.replacement and spec.phase_at(now) is not None:
            return spec.replacement
        return credential_type


class HttpProviderSpec(DeclaresCredentialTypes, _Model):
    """A provider driven by declared HTTP calls (issue, verify, revoke, list)."""

    kind: Literal["http"]
    mode: Literal["overlap", "cutover", "assisted"] = "overlap"
    base_url: str
    rate_limit: RateLimitSpec = Field(default_factory=lambda: RateLimitSpec(requests=10, per=timedelta(seconds=1)))
    #: At most this many requests in flight at once, every worker together (None: no limit).
    concurrency: Optional[int] = Field(None, gt=0)
    #: Limits of their own for some endpoints or methods (search: 60/min; writes: 15 at once).
    endpoint_groups: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)], EndpointGroupSpec] = Field(default_factory=dict)
    auth: Optional[AuthSpec] = None   # management calls (issue, revoke, list)
    activation: ActivationSpec = Field(default_factory=ActivationSpec)
    status_codes: StatusCodesSpec = Field(default_factory=StatusCodesSpec)
    credential_types: dict[str, CredentialTypeSpec] = Field(min_length=1)
    calls: CallsSpec
    #: Answers classified by status and body before the status rules (see error_matchers.py).
    errors: list[ErrorMatcherSpec] = Field(default_factory=list)
    timeout: Optional[Duration] = None
    allow_insecure_http: bool = False  # plain http:// to a non-loopback host (refused otherwise)
    tls_verify: bool = True            # false is refused when KEYROTOR_ENV=production

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        _refuse_literal_in_url(value)
        if not re.match(r"^https?://[^/\s{}]+", value):
            raise PydanticCustomError("url", "expected an absolute http(s) URL such as https://api.example.com, got {value}", {"value": repr(value)})
        return value.rstrip("/")

    @model_validator(mode="after")
    def _calls_for_mode(self) -> "HttpProviderSpec":
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for call in REQUIRED_CALLS[self.mode]:
            if getattr(self.calls, call) is None:
                problems.append((("calls",), f"mode {self.mode} needs the calls {', '.join(REQUIRED_CALLS[self.mode])}; '{call}' is missing"))
        for loc, name, call in self._declared_calls():
            problems.extend(self._call_problems(loc, name, call))
        problems.extend(self._plain_http_problems())
        problems.extend(self._endpoint_group_problems())
        _raise(problems, self)
        return self

    def _endpoint_group_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """A group's concurrency above the provider's could never be reached."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for name, group in self.endpoint_groups.items():
            if group.concurrency is not None and self.concurrency is not None and group.concurrency > self.concurrency:
                problems.append((("endpoint_groups", name, "concurrency"),
                                 f"{group.concurrency} is more than the provider's concurrency ({self.concurrency}); "
                                 "it could never be reached"))
        return problems

    def _declared_calls(self) -> list[tuple[tuple[str | int, ...], str, HttpCallSpec]]:
        """``(location, call name, call)`` for the provider's calls and every type's overrides."""
        found: list[tuple[tuple[str | int, ...], str, HttpCallSpec]] = []
        for name in ("issue", "verify", "revoke", "list"):
            call = getattr(self.calls, name)
            if call is not None:
                found.append((("calls", name), name, call))
        for tname, ctype in self.credential_types.items():
            for name in ("issue", "verify", "revoke", "list"):
                call = getattr(ctype.calls, name) if ctype.calls is not None else None
                if call is not None:
                    found.append((("credential_types", tname, "calls", name), name, call))
        return found

    def _call_problems(self, loc: tuple[str | int, ...], name: str, call: HttpCallSpec) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if name == "verify" and not call.uses_secret():
            problems.append((loc, 'verify must authenticate with the credential being checked: auth {type: bearer, token: "{secret}"} or a {secret} placeholder'))
        if name in ("issue", "revoke", "list") and call.auth is None and self.auth is None and not _carries_refs(call):
            problems.append((loc, f"the '{name}' call has no auth: set the provider's 'auth' or this call's 'auth' "
                             "(or send a secret reference in its headers, query, form or body)"))
        if name == "issue" and call.response.secret is None:
            problems.append(((*loc, "response"), "issue needs response.secret: the JSON path of the new credential"))
        return problems

    def call_for(self, name: str, credential_type: str | None) -> HttpCallSpec | None:
        """The call ``name`` for ``credential_type``: the type's override, else the provider's."""
        ctype = self.credential_types.get(credential_type) if credential_type else None
        override = getattr(ctype.calls, name) if ctype is not None and ctype.calls is not None else None
        return override if override is not None else getattr(self.calls, name)

    def call_urls(self) -> dict[tuple[str | int, ...], str]:
        """Every URL this provider calls, ``{base_url}`` filled in, by its location."""
        urls: dict[tuple[str | int, ...], str] = {("base_url",): self.base_url}
        for loc, _name, call in self._declared_calls():
            for index, step in enumerate(call.before):
                urls[(*loc, "before", index, "url")] = step.url.replace("{base_url}", self.base_url)
            urls[(*loc, "url")] = call.url.replace("{base_url}", self.base_url)
        return urls

    def _plain_http_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        found = ((loc, insecure_http_problem(url, self.allow_insecure_http, "admin tokens and new keys"))
                 for loc, url in self.call_urls().items())
        return [(loc, problem) for loc, problem in found if problem is not None]



def _carries_refs(call: HttpCallSpec) -> bool:
    """Whether a request of the call sends a secret reference (a login with a password, say)."""
    return any(next(iter_refs([r.headers, r.query, r.form, r.body]), None) is not None
               or any(isinstance(v, SecretRef) for v in (*r.headers.values(), *r.query.values(), *r.form.values()))
               for r in call.requests())


# Imported here, after the building blocks it uses are defined (it imports them from this module).
from worker.inventory.oauth_schema import OAuthClientProviderSpec  # noqa: E402

#: Provider kinds, told apart by ``kind``: the generic HTTP provider and OAuth 2.0 clients.
ProviderSpec = Annotated[Union[HttpProviderSpec, OAuthClientProviderSpec], Field(discriminator="kind")]
PROVIDER_KINDS = ("http", "oauth_client")


# --------------------------------------------------------------------------- integrations


class WebhookIntegrationSpec(_Model):
    """A signed webhook tells a consumer a new version exists (and, if asked, carries the secret)."""

    kind: Literal["webhook"]
    url: HttpUrl
    signing_secret: SecretRefOnly
    include_secret: bool = False
    health_url: Optional[HttpUrl] = None
    timeout: Duration = timedelta(seconds=10)
    allow_insecure_http: bool = False  # plain http:// to a non-loopback host (refused otherwise)
    tls_verify: bool = True            # false is refused when KEYROTOR_ENV=production

    @model_validator(mode="after")
    def _plain_http(self) -> "WebhookIntegrationSpec":
        found = ((("url",), self.url), (("health_url",), self.health_url))
        _raise([(loc, problem) for loc, url in found if url is not None
                for problem in [insecure_http_problem(url, self.allow_insecure_http, "signatures and secrets")]
                if problem is not None], self)
        return self


class VaultCopyIntegrationSpec(_Model):
    """Writes a copy of the secret to another Vault mount/path (an application's own copy)."""

    kind: Literal["vault_copy"]
    mount: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: TemplateStr
    field: Optional[str] = None   # None: the key's own field name


#: Kubernetes object names: a namespace is a DNS-1123 label, a Secret or workload a DNS-1123 subdomain.
K8S_NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def _k8s_name(pattern: str, limit: int, what: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, str) and (len(value) > limit or not re.match(pattern, value)):
            raise PydanticCustomError("k8s_name", "not a valid Kubernetes {what}: lower-case letters, digits and '-'{dots}, "
                                      "starting and ending with a letter or digit, at most {limit} characters",
                                      {"what": what, "dots": "" if what == "namespace" else " or '.'", "limit": limit})
        return value
    return BeforeValidator(check)


K8sNamespace = Annotated[str, _k8s_name(K8S_NAMESPACE_PATTERN, 63, "namespace")]
K8sName = Annotated[str, _k8s_name(K8S_NAME_PATTERN, 253, "object name")]


class WorkloadRef(_Model):
    """A Deployment or StatefulSet (in the Secret's namespace) restarted after the Secret changes."""

    kind: Literal["Deployment", "StatefulSet"]
    name: K8sName


class KubernetesSecretIntegrationSpec(_Model):
    """Writes the new value under one data key of a Kubernetes Secret (other keys untouched) and,
    optionally, restarts the workloads that read it, once per batch (docs/internals.md)."""

    kind: Literal["kubernetes_secret"]
    namespace: K8sNamespace
    secret: K8sName
    data_key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")  # a Secret's data key
    workloads: list[WorkloadRef] = Field(default_factory=list)
    rollout_timeout: Duration = timedelta(minutes=5)

    @field_validator("workloads")
    @classmethod
    def _unique_workloads(cls, workloads: list[WorkloadRef]) -> list[WorkloadRef]:
        seen = [(w.kind, w.name) for w in workloads]
        duplicates = sorted({f"{k}/{n}" for k, n in seen if seen.count((k, n)) > 1})
        if duplicates:
            raise PydanticCustomError("duplicate", "listed more than once: {names}", {"names": ", ".join(duplicates)})
        return workloads

    @field_validator("rollout_timeout")
    @classmethod
    def _positive_timeout(cls, value: timedelta) -> timedelta:
        return _positive(value)


IntegrationSpec = Annotated[
    Union[WebhookIntegrationSpec, VaultCopyIntegrationSpec, KubernetesSecretIntegrationSpec], Field(discriminator="kind")
]


# --------------------------------------------------------------------------- owners' contacts
SLACK_TARGET = r"^(#[a-z0-9][a-z0-9._-]{0,79}|@[A-Za-z0-9._-]{1,80}|[CDGUW][A-Z0-9]{6,20})$"
EMAIL_ADDRESS = r"^[^@\s]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$"


class WebhookContactSpec(_Model):
    url: Annotated[Union[Annotated[HttpUrl, Tag("literal")], Annotated[SecretRef, Tag("ref")]], Discriminator(lambda v: "literal" if isinstance(v, str) else "ref")]
    signing_secret: Optional[SecretRefOnly] = None

    @field_validator("url", mode="before")
    @classmethod
    def _no_literal_webhook_url(cls, value: Any) -> Any:
        return _refuse_literal_in_url(value) if isinstance(value, str) else value


class ContactSpec(_Model):
    """Where a key's owner is told what to do (exactly one): a Slack channel (``#team-x``, a
    channel id) or user (``@alice``, a user id), an email address, or a signed webhook."""

    slack: Optional[Annotated[str, Field(pattern=SLACK_TARGET)]] = None
    email: Optional[Annotated[str, Field(pattern=EMAIL_ADDRESS, max_length=254)]] = None
    webhook: Optional[WebhookContactSpec] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ContactSpec":
        given = [name for name in ("slack", "email", "webhook") if getattr(self, name) is not None]
        if len(given) != 1:
            raise PydanticCustomError("contact", "give exactly one of slack, email, webhook (got {given})",
                                      {"given": ", ".join(given) or "none"})
        return self

    @property
    def kind(self) -> str:
        return "slack" if self.slack else "email" if self.email else "webhook"

    def describe(self) -> str:
        """The contact as shown in notices and audit details (a webhook URL may be a credential)."""
        return f"slack {self.slack}" if self.slack else f"email {self.email}" if self.email else "webhook"


class SlackDeliverySpec(_Model):
    """Slack Web API (``chat.postMessage``) with a bot token; posting to a user id sends a DM."""

    token: SecretRefOnly
    api_url: HttpUrl = "https://slack.com/api"


class EmailDeliverySpec(_Model):
    """SMTP submission for owners' email notices."""

    smtp_host: str = Field(min_length=1, max_length=253)
    smtp_port: int = Field(587, ge=1, le=65535)
    sender: str = Field(alias="from", pattern=EMAIL_ADDRESS)
    starttls: bool = True
    username: Optional[str] = None
    password: Optional[SecretRefOnly] = None
    timeout: Duration = timedelta(seconds=10)


class OwnerDeliverySpec(_Model):
    """How notices reach owners' contacts (``slack`` and ``email`` contacts need their section)."""

    slack: Optional[SlackDeliverySpec] = None
    email: Optional[EmailDeliverySpec] = None


class AssistedSpec(_Model):
    """Timings of an assisted rotation (a person creates the credential): remind the owner every
    ``remind_every`` until the deposit; after ``deposit_deadline`` (from the request) the run needs
    attention. Where the provider cannot revoke, the owner revokes the old credential and keyrotor
    polls until it is rejected, at most ``revoke_deadline`` after the grace period."""

    remind_every: Duration = timedelta(days=1)
    deposit_deadline: Duration = timedelta(days=7)
    revoke_deadline: Duration = timedelta(days=3)
    revoke_check_every: Duration = timedelta(minutes=1)

    @field_validator("remind_every", "deposit_deadline", "revoke_deadline", "revoke_check_every")
    @classmethod
    def _pos(cls, value: timedelta) -> timedelta:
        return _positive(value)


# --------------------------------------------------------------------------- notifications
def _url_tag(value: Any) -> str:
    return "literal" if isinstance(value, str) else "ref"


class NotificationSpec(_Model):
    """Where run outcomes are announced. A Slack webhook URL is itself a secret: use a reference."""

    kind: Literal["slack", "webhook"]
    url: Annotated[Union[Annotated[HttpUrl, Tag("literal")], Annotated[SecretRef, Tag("ref")]], Discriminator(_url_tag)]
    signing_secret: Optional[SecretRefOnly] = None
    events: list[Literal["started", "succeeded", "failed", "rolled_back", "needs_attention", "reminder"]] = Field(
        default_factory=lambda: list(NOTIFICATION_EVENTS)
    )
    allow_insecure_http: bool = False  # plain http:// to a non-loopback host (refused otherwise)

    @model_validator(mode="after")
    def _plain_http(self) -> "NotificationSpec":
        if isinstance(self.url, str):
            problem = insecure_http_problem(self.url, self.allow_insecure_http, "notifications")
            _raise([(("url",), problem)] if problem else [], self)
        return self

    @field_validator("url", mode="before")
    @classmethod
    def _no_literal_webhook_url(cls, value: Any) -> Any:
        return _refuse_literal_in_url(value) if isinstance(value, str) else value

    def wants(self, event: str) -> bool:
        return event in self.events


# --------------------------------------------------------------------------- policies and keys
DEFAULT_EXPIRY_LEAD_TIME = timedelta(days=7)
DEFAULT_GRACE_PERIOD = timedelta(hours=1)


class PolicySpec(_Model):
    expiry_lead_time: Duration = DEFAULT_EXPIRY_LEAD_TIME
    max_age: Optional[Duration] = None
    grace_period: Duration = DEFAULT_GRACE_PERIOD

    @field_validator("max_age")
    @classmethod
    def _max_age(cls, value: Optional[timedelta]) -> Optional[timedelta]:
        return None if value is None else _positive(value)


class ResolvedPolicy(_Model):
    """A key's effective timings: its policy with the key's own overrides applied."""

    expiry_lead_time: timedelta
    max_age: Optional[timedelta]
    grace_period: timedelta


class VaultLocation(_Model):
    mount: str = Field("secret", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    field: str = Field("api_key", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")


KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)*$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
KeyName = Annotated[str, Field(pattern=KEY_NAME_PATTERN, max_length=200)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=128)]


class KeySpec(_Model):
    provider: str
    credential_type: str
    owner: str = Field(min_length=1, max_length=200)
    contact: Optional[ContactSpec] = None
    assisted: AssistedSpec = Field(default_factory=AssistedSpec)
    vault: VaultLocation
    policy: Optional[str] = None
    expiry_lead_time: Optional[Duration] = None
    max_age: Optional[Duration] = None
    grace_period: Optional[Duration] = None
    integrations: list[str] = Field(default_factory=list)
    labels: dict[str, Annotated[str, BeforeValidator(_stringify_scalar)]] = Field(default_factory=dict)
    expires_at: Optional[AwareDatetime] = None
    enabled: bool = True

    @field_validator("integrations")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PydanticCustomError("duplicate", "listed more than once: {names}", {"names": ", ".join(duplicates)})
        return names

    def resolved(self, policy: PolicySpec | None) -> ResolvedPolicy:
        base = policy or PolicySpec()
        return ResolvedPolicy(
            expiry_lead_time=self.expiry_lead_time if self.expiry_lead_time is not None else base.expiry_lead_time,
            max_age=self.max_age if self.max_age is not None else base.max_age,
            grace_period=self.grace_period if self.grace_period is not None else base.grace_period,
        )


# --------------------------------------------------------------------------- the document
class Inventory(_Model):
    version: Literal[1]
    policies: dict[Name, PolicySpec] = Field(default_factory=dict)
    providers: dict[Name, ProviderSpec] = Field(default_factory=dict)
    integrations: dict[Name, IntegrationSpec] = Field(default_factory=dict)
    notifications: list[NotificationSpec] = Field(default_factory=list)
    owner_delivery: OwnerDeliverySpec = Field(default_factory=OwnerDeliverySpec)
    keys: dict[KeyName, KeySpec] = Field(default_factory=dict)

    @field_validator("providers", mode="wrap")
    @classmethod
    def _provider_locations(cls, value: Any, handler: Any) -> Any:
        """Error locations as before there were provider kinds: without the ``kind`` tag pydantic
        inserts after the provider's name (``providers.alloy.calls``, not ``providers.alloy.http.calls``)."""
        try:
            return handler(value)
        except ValidationError as exc:
            kinds = set(PROVIDER_KINDS)
            details = [InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]),
                                        loc=tuple(p for i, p in enumerate(e["loc"]) if not (i == 1 and p in kinds)),
                                        input=e.get("input"))
                       for e in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, details) from None

    @model_validator(mode="after")
    def _references(self) -> "Inventory":
        _raise(reference_problems(self.model_dump(mode="json", by_alias=True)), self)
        return self

    def policy_for(self, key: KeySpec) -> ResolvedPolicy:
        return key.resolved(self.policies.get(key.policy) if key.policy else None)

    def summary(self) -> str:
        return ", ".join((count(len(self.providers), "provider"), count(len(self.keys), "key"),
                          count(len(self.integrations), "integration")))


def _raise(problems: list[tuple[tuple[str | int, ...], str]], value: Any) -> None:
    if problems:
        raise ValidationError.from_exception_data(
            type(value).__name__,
            [InitErrorDetails(type=PydanticCustomError("reference", msg), loc=loc, input=None) for loc, msg in problems],
        )


def reference_problems(data: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Broken cross-references in an inventory given as plain data; tolerant of malformed parts.

    Returns ``(location, message)`` pairs; the location is a path into ``data``.
    """
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if not isinstance(data, Mapping):
        return problems

    def section(name: str) -> Mapping[str, Any]:
        value = data.get(name)
        return value if isinstance(value, Mapping) else {}

    providers, integrations, policies, keys = section("providers"), section("integrations"), section("policies"), section("keys")

    for pname, provider in providers.items():
        types = provider.get("credential_types") if isinstance(provider, Mapping) else None
        if not isinstance(types, Mapping):
            continue
        for tname, tspec in types.items():
            replacement = tspec.get("replacement") if isinstance(tspec, Mapping) else None
            if isinstance(replacement, str):
                if replacement not in types:
                    problems.append(((("providers", pname, "credential_types", tname, "replacement")),
                                     f"unknown credential type {replacement!r} of provider {pname!r} (known: {_known(types)})"))
                elif replacement == tname:
                    problems.append((("providers", pname, "credential_types", tname, "replacement"), "a credential type cannot replace itself"))
            deprecation = tspec.get("deprecation") if isinstance(tspec, Mapping) else None
            if isinstance(deprecation, list) and not replacement and any(
                isinstance(p, Mapping) and p.get("phase") in CUTOFF_PHASES for p in deprecation
            ):
                problems.append((("providers", pname, "credential_types", tname),
                                 "a credential type with an amnesty or rejected phase needs a 'replacement' type to rotate to"))

    problems.extend(lost_expiry_problems(providers, keys))
    for kname, key in keys.items():
        if not isinstance(key, Mapping):
            continue
        pname = key.get("provider")
        provider = providers.get(pname) if isinstance(pname, str) else None
        if isinstance(pname, str) and pname not in providers:
            problems.append((("keys", kname, "provider"), f"unknown provider {pname!r} (known: {_known(providers)})"))
        ctype = key.get("credential_type")
        if isinstance(provider, Mapping) and isinstance(ctype, str):
            types = provider.get("credential_types")
            if isinstance(types, Mapping) and ctype not in types:
                problems.append((("keys", kname, "credential_type"), f"provider {pname!r} has no credential type {ctype!r} (known: {_known(types)})"))
        policy = key.get("policy")
        if isinstance(policy, str) and policy not in policies:
            problems.append((("keys", kname, "policy"), f"unknown policy {policy!r} (known: {_known(policies)})"))
        contact = key.get("contact")
        delivery = data.get("owner_delivery") if isinstance(data.get("owner_delivery"), Mapping) else {}
        if isinstance(contact, Mapping):
            for kind in ("slack", "email"):
                if contact.get(kind) and not delivery.get(kind):
                    problems.append((("keys", kname, "contact", kind),
                                     f"a {kind} contact needs owner_delivery.{kind} (how keyrotor reaches {kind})"))
        used = key.get("integrations")
        if isinstance(used, list):
            for index, iname in enumerate(used):
                if isinstance(iname, str) and iname not in integrations:
                    problems.append((("keys", kname, "integrations", index), f"unknown integration {iname!r} (known: {_known(integrations)})"))
    return problems


def _known(names: Iterable[str]) -> str:
    listed = sorted(str(n) for n in names)
    return ", ".join(listed) if listed else "none declared"
