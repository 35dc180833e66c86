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
from datetime import timedelta
from typing import Annotated, Any, Iterable, Literal, Mapping, Optional, Union, get_args

from pydantic import AwareDatetime, BeforeValidator, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from worker.http_security import insecure_http_problem
from worker.inventory.error_matchers import ErrorMatcherSpec
from worker.inventory.expiry_rules import lost_expiry_problems
from worker.inventory.field_types import (
    Duration,
    HttpUrl,
    SecretRefOnly,
    StrictModel,
    TemplateStr,
    positive_duration,
    raise_problems,
    refuse_literal_in_url,
    stringify_scalar,
)
from worker.inventory.oauth_schema import OAuthClientProviderSpec
from worker.inventory.provider_parts import (
    CUTOFF_PHASES,
    ActivationSpec,
    AuthSpec,
    CallsSpec,
    CredentialTypeSpec,
    DeclaresCredentialTypes,
    HttpCallSpec,
    RateLimitSpec,
)
from worker.secret_refs import SecretRef, iter_refs
from worker.text import count

__all__ = [
    "PROVIDER_KINDS",
    "AssistedSpec",
    "ContactSpec",
    "EmailDeliverySpec",
    "EndpointGroupSpec",
    "HttpProviderSpec",
    "IntegrationSpec",
    "Inventory",
    "KeySpec",
    "KubernetesSecretIntegrationSpec",
    "NotificationSpec",
    "OwnerDeliverySpec",
    "PolicySpec",
    "ProviderSpec",
    "ResolvedPolicy",
    "VaultCopyIntegrationSpec",
    "VaultLocation",
    "WebhookIntegrationSpec",
    "WorkloadRef",
    "reference_problems",
]

NotificationEvent = Literal["started", "succeeded", "failed", "rolled_back", "needs_attention", "reminder"]
NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = get_args(NotificationEvent)


#: Calls each rotation mode cannot work without.
REQUIRED_CALLS: dict[str, tuple[str, ...]] = {
    "overlap": ("issue", "verify", "revoke"),
    "cutover": ("issue", "verify"),
    "assisted": ("verify",),
}


HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_PATH_GLOB = re.compile(r"^/[A-Za-z0-9._~!$&'()+,;=:@%*/{}-]*$")


class EndpointGroupSpec(StrictModel):
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


class StatusCodesSpec(StrictModel):
    invalid: list[int] = Field(default_factory=lambda: [401, 403])
    deprecated: list[int] = Field(default_factory=list)

    @field_validator("invalid", "deprecated")
    @classmethod
    def _codes(cls, codes: list[int]) -> list[int]:
        for code in codes:
            if not 400 <= code <= 599:
                raise PydanticCustomError("status_code", "{code} is not an HTTP error status (400-599)", {"code": code})
        return codes


class HttpProviderSpec(DeclaresCredentialTypes, StrictModel):
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
        refuse_literal_in_url(value)
        if not re.match(r"^https?://[^/\s{}]+", value):
            raise PydanticCustomError("url", "expected an absolute http(s) URL such as https://api.example.com, got {value}", {"value": repr(value)})
        return value.rstrip("/")

    @model_validator(mode="after")
    def _calls_for_mode(self) -> "HttpProviderSpec":
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for required in REQUIRED_CALLS[self.mode]:
            if getattr(self.calls, required) is None:
                problems.append((("calls",), f"mode {self.mode} needs the calls {', '.join(REQUIRED_CALLS[self.mode])}; '{required}' is missing"))
        for loc, name, call in self._declared_calls():
            problems.extend(self._call_problems(loc, name, call))
        problems.extend(self._plain_http_problems())
        problems.extend(self._endpoint_group_problems())
        raise_problems(problems, self)
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


#: Provider kinds, told apart by ``kind``: the generic HTTP provider and OAuth 2.0 clients.
ProviderSpec = Annotated[Union[HttpProviderSpec, OAuthClientProviderSpec], Field(discriminator="kind")]
PROVIDER_KINDS = ("http", "oauth_client")


# --------------------------------------------------------------------------- integrations


class WebhookIntegrationSpec(StrictModel):
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
        raise_problems([(loc, problem) for loc, url in found if url is not None
                for problem in [insecure_http_problem(url, self.allow_insecure_http, "signatures and secrets")]
                if problem is not None], self)
        return self


class VaultCopyIntegrationSpec(StrictModel):
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


class WorkloadRef(StrictModel):
    """A Deployment or StatefulSet (in the Secret's namespace) restarted after the Secret changes."""

    kind: Literal["Deployment", "StatefulSet"]
    name: K8sName


class KubernetesSecretIntegrationSpec(StrictModel):
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
        return positive_duration(value)


IntegrationSpec = Annotated[
    Union[WebhookIntegrationSpec, VaultCopyIntegrationSpec, KubernetesSecretIntegrationSpec], Field(discriminator="kind")
]


# --------------------------------------------------------------------------- owners' contacts
SLACK_TARGET = r"^(#[a-z0-9][a-z0-9._-]{0,79}|@[A-Za-z0-9._-]{1,80}|[CDGUW][A-Z0-9]{6,20})$"
EMAIL_ADDRESS = r"^[^@\s]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$"


class WebhookContactSpec(StrictModel):
    url: Annotated[Union[Annotated[HttpUrl, Tag("literal")], Annotated[SecretRef, Tag("ref")]], Discriminator(lambda v: "literal" if isinstance(v, str) else "ref")]
    signing_secret: Optional[SecretRefOnly] = None

    @field_validator("url", mode="before")
    @classmethod
    def _no_literal_webhook_url(cls, value: Any) -> Any:
        return refuse_literal_in_url(value) if isinstance(value, str) else value


class ContactSpec(StrictModel):
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


class SlackDeliverySpec(StrictModel):
    """Slack Web API (``chat.postMessage``) with a bot token; posting to a user id sends a DM."""

    token: SecretRefOnly
    api_url: HttpUrl = "https://slack.com/api"


class EmailDeliverySpec(StrictModel):
    """SMTP submission for owners' email notices."""

    smtp_host: str = Field(min_length=1, max_length=253)
    smtp_port: int = Field(587, ge=1, le=65535)
    sender: str = Field(alias="from", pattern=EMAIL_ADDRESS)
    starttls: bool = True
    username: Optional[str] = None
    password: Optional[SecretRefOnly] = None
    timeout: Duration = timedelta(seconds=10)


class OwnerDeliverySpec(StrictModel):
    """How notices reach owners' contacts (``slack`` and ``email`` contacts need their section)."""

    slack: Optional[SlackDeliverySpec] = None
    email: Optional[EmailDeliverySpec] = None


class AssistedSpec(StrictModel):
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
        return positive_duration(value)


# --------------------------------------------------------------------------- notifications
def _url_tag(value: Any) -> str:
    return "literal" if isinstance(value, str) else "ref"


class NotificationSpec(StrictModel):
    """Where run outcomes are announced. A Slack webhook URL is itself a secret: use a reference."""

    kind: Literal["slack", "webhook"]
    url: Annotated[Union[Annotated[HttpUrl, Tag("literal")], Annotated[SecretRef, Tag("ref")]], Discriminator(_url_tag)]
    signing_secret: Optional[SecretRefOnly] = None
    events: list[NotificationEvent] = Field(default_factory=lambda: list(NOTIFICATION_EVENTS))
    allow_insecure_http: bool = False  # plain http:// to a non-loopback host (refused otherwise)

    @model_validator(mode="after")
    def _plain_http(self) -> "NotificationSpec":
        if isinstance(self.url, str):
            problem = insecure_http_problem(self.url, self.allow_insecure_http, "notifications")
            raise_problems([(("url",), problem)] if problem else [], self)
        return self

    @field_validator("url", mode="before")
    @classmethod
    def _no_literal_webhook_url(cls, value: Any) -> Any:
        return refuse_literal_in_url(value) if isinstance(value, str) else value

    def wants(self, event: str) -> bool:
        return event in self.events


# --------------------------------------------------------------------------- policies and keys
DEFAULT_EXPIRY_LEAD_TIME = timedelta(days=7)
DEFAULT_GRACE_PERIOD = timedelta(hours=1)


class PolicySpec(StrictModel):
    expiry_lead_time: Duration = DEFAULT_EXPIRY_LEAD_TIME
    max_age: Optional[Duration] = None
    grace_period: Duration = DEFAULT_GRACE_PERIOD

    @field_validator("max_age")
    @classmethod
    def _max_age(cls, value: Optional[timedelta]) -> Optional[timedelta]:
        return None if value is None else positive_duration(value)


class ResolvedPolicy(StrictModel):
    """A key's effective timings: its policy with the key's own overrides applied."""

    expiry_lead_time: timedelta
    max_age: Optional[timedelta]
    grace_period: timedelta


class VaultLocation(StrictModel):
    mount: str = Field("secret", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    field: str = Field("api_key", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")


KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)*$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
KeyName = Annotated[str, Field(pattern=KEY_NAME_PATTERN, max_length=200)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=128)]


class KeySpec(StrictModel):
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
    labels: dict[str, Annotated[str, BeforeValidator(stringify_scalar)]] = Field(default_factory=dict)
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
class Inventory(StrictModel):
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
        raise_problems(reference_problems(self.model_dump(mode="json", by_alias=True)), self)
        return self

    def policy_for(self, key: KeySpec) -> ResolvedPolicy:
        return key.resolved(self.policies.get(key.policy) if key.policy else None)

    def summary(self) -> str:
        return ", ".join((count(len(self.providers), "provider"), count(len(self.keys), "key"),
                          count(len(self.integrations), "integration")))


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
        key_provider = key.get("provider")
        provider = providers.get(key_provider) if isinstance(key_provider, str) else None
        if isinstance(key_provider, str) and key_provider not in providers:
            problems.append((("keys", kname, "provider"), f"unknown provider {key_provider!r} (known: {_known(providers)})"))
        ctype = key.get("credential_type")
        if isinstance(provider, Mapping) and isinstance(ctype, str):
            types = provider.get("credential_types")
            if isinstance(types, Mapping) and ctype not in types:
                problems.append((("keys", kname, "credential_type"), f"provider {key_provider!r} has no credential type {ctype!r} (known: {_known(types)})"))
        policy = key.get("policy")
        if isinstance(policy, str) and policy not in policies:
            problems.append((("keys", kname, "policy"), f"unknown policy {policy!r} (known: {_known(policies)})"))
        contact = key.get("contact")
        declared_delivery = data.get("owner_delivery")
        delivery = declared_delivery if isinstance(declared_delivery, Mapping) else {}
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
