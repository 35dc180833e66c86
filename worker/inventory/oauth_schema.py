"""The inventory model of an OAuth 2.0 client whose credentials keyrotor rotates (``kind: oauth_client``).

Two credential types, named by what they are: ``private_key_jwt`` (a key pair; the public JWK is
registered with the authorization server, the client authenticates with an RFC 7523 assertion
signed by the private key) and ``client_secret`` (for servers that allow two active secrets at
once). Everything vendor-specific is declared: the admin API's calls (URL, method, body template,
JSON paths into the answers), the token endpoint, the scopes and a scoped API call that proves a
token for those scopes works. No code per vendor.

Placeholders in admin call templates: ``{base_url}`` (the admin API), ``{client_id}``, ``{key_id}``
(a JWK's ``kid`` or a secret's id), ``{key_name}`` (``keyrotor-<run id>``), ``{run_id}``,
``{expires_at}`` (ISO-8601, when ``key_lifetime`` is set). In a body, a string that is exactly
``"{jwk}"`` becomes the public JWK object and ``"{public_key_pem}"`` the public key as PEM.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from worker.http_security import insecure_http_problem
from worker.inventory.field_types import (
    HttpMethod,
    Duration,
    HttpUrl,
    StrictModel,
    positive_duration,
    refuse_literal_in_url,
    template_placeholders,
)
from worker.inventory.literals import looks_like_credential, secret_name
from worker.inventory.provider_parts import (
    ActivationSpec,
    AuthSpec,
    CredentialTypeSpec,
    DeclaresCredentialTypes,
    RateLimitSpec,
    ResponseSpec,
    auth_uses_secret_template,
)

#: The credential types an OAuth client can have, by name.
PRIVATE_KEY_JWT = "private_key_jwt"
CLIENT_SECRET = "client_secret"
OAUTH_CREDENTIAL_TYPES = (PRIVATE_KEY_JWT, CLIENT_SECRET)

#: Placeholders an admin call's URL or body may use.
ADMIN_PLACEHOLDERS = frozenset({"base_url", "client_id", "key_id", "key_name", "run_id", "expires_at"})
#: Whole-string body values replaced by the public key (an object / a PEM string).
JWK_VALUE = "{jwk}"
PUBLIC_KEY_PEM_VALUE = "{public_key_pem}"
_BODY_VALUES = frozenset({JWK_VALUE, PUBLIC_KEY_PEM_VALUE})

#: Token request parameters keyrotor sets (client authentication, grant, scopes).
RESERVED_TOKEN_PARAMS = frozenset({"grant_type", "scope", "client_id", "client_secret", "client_assertion",
                                   "client_assertion_type"})

#: Admin calls each credential type needs: add, list (by kid/id, for unknown outcomes and the
#: orphan scan) and remove.
REQUIRED_ADMIN_CALLS: dict[str, tuple[str, str, str]] = {
    PRIVATE_KEY_JWT: ("add_jwk", "list_jwks", "remove_jwk"),
    CLIENT_SECRET: ("add_secret", "list_secrets", "remove_secret"),
}


def _problem(loc: tuple[str | int, ...], message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("oauth_client", message), loc=loc, input=None)


def _check_admin_template(value: str) -> str:
    for name in template_placeholders(value):
        if name not in ADMIN_PLACEHOLDERS:
            raise PydanticCustomError("template", "unknown placeholder {name}; known here: {known}",
                                      {"name": "{" + name + "}", "known": ", ".join("{" + p + "}" for p in sorted(ADMIN_PLACEHOLDERS))})
    return value


def _check_admin_body(value: Any) -> Any:
    if isinstance(value, str):
        if value not in _BODY_VALUES:
            _check_admin_template(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _check_admin_body(item)
    elif isinstance(value, list):
        for item in value:
            _check_admin_body(item)
    return value


class AdminCallSpec(StrictModel):
    """One call of the authorization server's admin API (management credentials: the admin ``auth``)."""

    method: HttpMethod = "GET"
    url: str
    body: Optional[Union[dict[str, Any], list[Any]]] = None
    response: ResponseSpec = Field(default_factory=ResponseSpec)
    timeout: Optional[Duration] = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_admin_template(refuse_literal_in_url(value))

    @field_validator("body")
    @classmethod
    def _body(cls, value: Any) -> Any:
        return _check_admin_body(value)


class AdminCallsSpec(StrictModel):
    add_jwk: Optional[AdminCallSpec] = None
    list_jwks: Optional[AdminCallSpec] = None
    remove_jwk: Optional[AdminCallSpec] = None
    add_secret: Optional[AdminCallSpec] = None
    list_secrets: Optional[AdminCallSpec] = None
    remove_secret: Optional[AdminCallSpec] = None


class AdminApiSpec(StrictModel):
    """Where and how keyrotor manages the client's JWKs and secrets."""

    base_url: str
    auth: AuthSpec
    calls: AdminCallsSpec

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        refuse_literal_in_url(value)
        if not re.match(r"^https?://[^/\s{}]+", value):
            raise PydanticCustomError("url", "expected an absolute http(s) URL such as https://auth.example.com/admin")
        return value.rstrip("/")

    @field_validator("auth")
    @classmethod
    def _management_credential(cls, value: Any) -> Any:
        if auth_uses_secret_template(value):
            raise PydanticCustomError("literal_secret", 'the admin API authenticates with a management credential: '
                                                        'a {vault: ...} or {env: ...} reference, not "{secret}"')
        return value


class ScopedCallSpec(StrictModel):
    """An API call that needs the configured scopes; made with a fresh token to verify a credential."""

    method: Literal["GET", "POST", "HEAD"] = "GET"
    url: HttpUrl


class KeyPairSpec(StrictModel):
    """The key pair a rotation generates for ``private_key_jwt``."""

    algorithm: Literal["RS256", "PS256", "ES256"] = "RS256"
    rsa_bits: Literal[2048, 3072, 4096] = 2048


class OAuthClientProviderSpec(DeclaresCredentialTypes, StrictModel):
    """An OAuth 2.0 client (client credentials grant) whose key pair or client secret keyrotor rotates."""

    kind: Literal["oauth_client"]
    mode: Literal["overlap"] = "overlap"   # a new JWK/secret is added next to the old one
    client_id: str = Field(min_length=1, max_length=256)
    token_url: HttpUrl
    audience: Optional[str] = None          # the assertion's `aud`; default: token_url
    #: extra, non-secret form parameters of the token request (e.g. Auth0's `audience`, RFC 8707 `resource`)
    token_params: dict[str, str] = Field(default_factory=dict)
    scopes: list[str] = Field(min_length=1)
    scoped_call: ScopedCallSpec
    admin: AdminApiSpec
    key_pair: KeyPairSpec = Field(default_factory=KeyPairSpec)
    assertion_lifetime: Duration = timedelta(seconds=60)
    client_secret_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    key_lifetime: Optional[Duration] = None  # registered JWKs/secrets expire after this (when the server supports it)
    rate_limit: RateLimitSpec = Field(default_factory=lambda: RateLimitSpec(requests=5, per=timedelta(seconds=1)))
    activation: ActivationSpec = Field(default_factory=ActivationSpec)
    credential_types: dict[str, CredentialTypeSpec] = Field(min_length=1)
    timeout: Optional[Duration] = None
    allow_insecure_http: bool = False
    tls_verify: bool = True

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:  # RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
            if not re.match(r'^[\x21\x23-\x5b\x5d-\x7e]+$', scope):
                raise PydanticCustomError("scope", "{scope} is not a scope token (no spaces, quotes or backslashes)", {"scope": repr(scope)})
        return scopes

    @field_validator("token_params")
    @classmethod
    def _token_params(cls, params: dict[str, str]) -> dict[str, str]:
        taken = sorted(set(params) & RESERVED_TOKEN_PARAMS)
        if taken:
            raise PydanticCustomError("token_params", "{names} set by keyrotor itself; remove it here",
                                      {"names": ", ".join(taken) + (" is" if len(taken) == 1 else " are")})
        for name, value in params.items():
            if secret_name(name) or looks_like_credential(value):
                raise PydanticCustomError("literal_secret", "token parameter {name} looks like it holds a literal "
                                          "credential (the value is not shown); token_params are for non-secret "
                                          "values such as audience or resource", {"name": name})
        return params

    @field_validator("assertion_lifetime", "key_lifetime")
    @classmethod
    def _positive(cls, value: Optional[timedelta]) -> Optional[timedelta]:
        return None if value is None else positive_duration(value)

    @model_validator(mode="after")
    def _consistent(self) -> "OAuthClientProviderSpec":
        problems: list[InitErrorDetails] = []
        for tname in self.credential_types:
            if tname not in OAUTH_CREDENTIAL_TYPES:
                problems.append(_problem(("credential_types", tname),
                                         f"an oauth_client has the credential types {' and '.join(OAUTH_CREDENTIAL_TYPES)}; {tname!r} is not one"))
                continue
            add, listing, remove = REQUIRED_ADMIN_CALLS[tname]
            for call in (add, listing, remove):
                if getattr(self.admin.calls, call) is None:
                    problems.append(_problem(("admin", "calls"), f"credential type {tname} needs the admin calls {add}, {listing}, {remove}; "
                                                                 f"'{call}' is missing"))
            listed = getattr(self.admin.calls, listing)
            if listed is not None and not (listed.response.key_id and listed.response.name):
                problems.append(_problem(("admin", "calls", listing, "response"),
                                         "needs response.key_id and response.name (keyrotor finds a JWK or secret by its id "
                                         "after a call whose answer was lost, and orphans by their keyrotor-<run id> name)"))
            removal = getattr(self.admin.calls, remove)
            if removal is not None and "key_id" not in template_placeholders(removal.url):
                problems.append(_problem(("admin", "calls", remove, "url"), "needs {key_id} in the URL: which JWK or secret to remove"))
        added = self.admin.calls.add_secret
        if CLIENT_SECRET in self.credential_types and added is not None and not (added.response.secret and added.response.key_id):
            problems.append(_problem(("admin", "calls", "add_secret", "response"),
                                     "needs response.secret and response.key_id: the new secret and its id"))
        jwk_body = self.admin.calls.add_jwk.body if self.admin.calls.add_jwk else None
        if PRIVATE_KEY_JWT in self.credential_types and self.admin.calls.add_jwk is not None and not _mentions_public_key(jwk_body):
            problems.append(_problem(("admin", "calls", "add_jwk", "body"),
                                     'needs "{jwk}" or "{public_key_pem}" somewhere in the body: the public key to register'))
        for loc, url in self.call_urls().items():
            problem = insecure_http_problem(url, self.allow_insecure_http, "admin tokens, client secrets and access tokens")
            if problem is not None:
                problems.append(_problem(loc, problem))
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    def call_urls(self) -> dict[tuple[str | int, ...], str]:
        """Every URL this client calls, by its location in the document."""
        urls: dict[tuple[str | int, ...], str] = {("token_url",): self.token_url, ("scoped_call", "url"): self.scoped_call.url,
                                                  ("admin", "base_url"): self.admin.base_url}
        for name in AdminCallsSpec.model_fields:
            call = getattr(self.admin.calls, name)
            if call is not None:
                urls[("admin", "calls", name, "url")] = call.url.replace("{base_url}", self.admin.base_url)
        return urls

    @property
    def assertion_audience(self) -> str:
        return self.audience or self.token_url


def _mentions_public_key(body: Any) -> bool:
    if isinstance(body, str):
        return body in _BODY_VALUES
    if isinstance(body, Mapping):
        return any(_mentions_public_key(v) for v in body.values())
    if isinstance(body, list):
        return any(_mentions_public_key(v) for v in body)
    return False
