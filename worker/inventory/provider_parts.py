"""What every provider kind's model is built from: management auth, declared HTTP calls and the
JSON paths into their answers, credential types (with dated deprecation phases), rate limits and
activation timings.

``worker.inventory.schema`` (the ``http`` kind, the document) and ``worker.inventory.oauth_schema``
(the ``oauth_client`` kind) both import from here; this module imports neither.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Iterable, Literal, Mapping, Optional, Union

from pydantic import AwareDatetime, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from worker.inventory.error_matchers import ErrorMatcherSpec
from worker.inventory.field_types import (
    HttpMethod,
    SECRET_TEMPLATE,
    CredentialValue,
    Duration,
    HeaderValue,
    HttpUrl,
    SecretRefOnly,
    StrictModel,
    TemplateOrRef,
    TemplateStr,
    check_body_templates,
    is_ref_shaped,
    literal_header_problems,
    positive_duration,
    raise_problems,
    refuse_literal_in_url,
    template_placeholders,
)
from worker.inventory.literals import value_problem

# --------------------------------------------------------------------------- auth
class BearerAuthSpec(StrictModel):
    """``Authorization: Bearer <token>``."""

    type: Literal["bearer"]
    token: CredentialValue


class HeaderAuthSpec(StrictModel):
    """A named header carrying the credential, e.g. ``apiKey: <value>``."""

    type: Literal["header"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    value: CredentialValue


class BasicAuthSpec(StrictModel):
    """HTTP basic auth; the user name is not secret, the password is."""

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: CredentialValue


class MtlsAuthSpec(StrictModel):
    """A client certificate; the private key comes from a reference, the files are mounted."""

    type: Literal["mtls"]
    cert_file: str = Field(min_length=1)
    key: SecretRefOnly
    ca_file: Optional[str] = None


AuthSpec = Annotated[
    Union[BearerAuthSpec, HeaderAuthSpec, BasicAuthSpec, MtlsAuthSpec],
    Field(discriminator="type"),
]


def auth_uses_secret_template(auth: Any) -> bool:
    return any(getattr(auth, f, None) == SECRET_TEMPLATE for f in ("token", "value", "password"))


# --------------------------------------------------------------------------- HTTP calls
class ResponseSpec(StrictModel):
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


class _RequestSpec(StrictModel):
    """One HTTP request; strings are templates over :data:`URL_PLACEHOLDERS`. Header, query and
    form values, and any value inside a JSON body, may instead be a secret reference
    (``{vault: "MOUNT/PATH#FIELD"}`` or ``{env: NAME}``; a Vault path may hold placeholders such as
    ``{labels[user]}``), read when the request is sent and never logged."""

    method: HttpMethod = "GET"
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

    @field_validator("body")
    @classmethod
    def _body(cls, value: Any) -> Any:
        check_body_templates(value)
        raise_problems(_value_problems(value, ()), value)
        return value

    @field_validator("url")
    @classmethod
    def _no_literal_secret_in_url(cls, value: str) -> str:
        return refuse_literal_in_url(value)

    @field_validator("headers")
    @classmethod
    def _no_literal_credentials(cls, headers: dict[str, Any]) -> dict[str, Any]:
        # A header that carries a credential takes it from a placeholder, never spells it out.
        raise_problems(literal_header_problems(headers), headers)
        return headers

    @field_validator("query", "form")
    @classmethod
    def _no_literal_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        raise_problems(_value_problems(values, ()), values)
        return values

    @model_validator(mode="after")
    def _one_body(self) -> "_RequestSpec":
        if self.form and self.body is not None:
            raise_problems([(("form",), "give either 'form' (form-encoded) or 'body' (JSON or text), not both")], self)
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
        raise_problems(problems, self)
        return self

    def uses_secret(self) -> bool:
        """Whether the call carries the credential being checked (``{secret}`` anywhere)."""
        if self.auth is not None and auth_uses_secret_template(self.auth):
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


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


class CallsSpec(StrictModel):
    issue: Optional[HttpCallSpec] = None
    verify: Optional[HttpCallSpec] = None
    revoke: Optional[HttpCallSpec] = None
    list: Optional[HttpCallSpec] = None


# --------------------------------------------------------------------------- deprecation
PhaseName = Literal["no_new_credentials", "amnesty", "rejected"]
_PHASE_ORDER = {"no_new_credentials": 0, "amnesty": 1, "rejected": 2}
#: Phases in which an existing credential of the type no longer works as before.
CUTOFF_PHASES = frozenset({"amnesty", "rejected"})


class DeprecationPhase(StrictModel):
    """From ``from`` on: no new credentials can be issued / calls need ``headers`` / calls are rejected."""

    phase: PhaseName
    from_: AwareDatetime = Field(alias="from")
    headers: dict[str, HeaderValue] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _no_literal_credentials(cls, headers: dict[str, str]) -> dict[str, str]:
        raise_problems(literal_header_problems(headers), headers)
        return headers


class CredentialTypeSpec(StrictModel):
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
        return None if value is None else positive_duration(value)

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
class RateLimitSpec(StrictModel):
    requests: int = Field(gt=0)
    per: Duration = timedelta(seconds=1)

    @field_validator("per")
    @classmethod
    def _per(cls, value: timedelta) -> timedelta:
        return positive_duration(value)


class ActivationSpec(StrictModel):
    """New credentials may go live with a delay: poll ``verify`` this often, for at most ``timeout``."""

    poll_interval: Duration = timedelta(seconds=2)
    timeout: Duration = timedelta(minutes=2)

    @field_validator("poll_interval", "timeout")
    @classmethod
    def _pos(cls, value: timedelta) -> timedelta:
        return positive_duration(value)


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
