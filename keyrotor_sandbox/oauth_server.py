"""An OAuth 2.0 authorization server stand-in (client credentials grant) with an admin API and a
scoped resource API, over real HTTP, for the demo and tests only (seed 004: private-key JWT client
authentication, scoped short-lived tokens, 403 without the right scope).

Token endpoint ``POST /oauth/token`` (form, RFC 6749 4.4):
  client authentication, one of
  - RFC 7523 2.2 private-key JWT: ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer``
    and ``client_assertion``; validated as RFC 7523 3 requires: signature against the client's
    registered JWK named by ``kid`` (unknown or expired kid refused), ``iss`` = ``sub`` = client id,
    ``aud`` = the token endpoint URL, ``exp`` in the future, ``nbf``/``iat`` not in the future
    (5 s leeway), ``jti`` present and never seen before (replays refused while the assertion is valid);
  - RFC 6749 2.3.1 ``client_secret_basic`` / ``client_secret_post`` against the client's active secrets.
  Errors as RFC 6749 5.2 (JSON ``error``): ``invalid_client`` → 401, ``invalid_request``,
  ``unsupported_grant_type``, ``invalid_scope`` → 400. Success: ``{access_token, token_type: Bearer,
  expires_in, scope}`` where ``scope`` is what was granted: the requested scopes the client is
  allowed (all allowed ones when none were requested); requesting only scopes it is not allowed → invalid_scope.
Resource API ``GET /api/*``: Bearer token; unknown or expired → 401; the route's scope missing → 403
  with ``WWW-Authenticate: Bearer error="insufficient_scope", scope="<scope>"`` (RFC 6750 3.1).
Admin API (Bearer admin token), per client:
  GET    /admin/clients/{id}/jwks            {"keys": [{kid, name, created_at, expires_at, jwk}]}
  POST   /admin/clients/{id}/jwks            {"jwk": {...public JWK with kid}, "name"?, "expires_at"?} → 201; same kid → 409
  DELETE /admin/clients/{id}/jwks/{kid}      204 / 404
  GET    /admin/clients/{id}/secrets         {"secrets": [{id, name, created_at, expires_at, hint}]}
  POST   /admin/clients/{id}/secrets         {"name"?, "expires_at"?} → 201 {id, secret, name, created_at, expires_at};
                                             409 when two secrets are already active (the server's limit)
  DELETE /admin/clients/{id}/secrets/{sid}   204 / 404
  A private JWK (one with ``d``) is refused (400): the server must never receive a private key.
Rate limit (``rate_limit=(requests, per_s)``): over every route, a sliding window; past it 429 with
``Retry-After`` (whole seconds until a slot frees). Every answer is logged with its arrival time.
Faults (``AuthServerHandle.add_fault``): per route (``token``, ``resource``, ``add_jwk``, ``list_jwks``,
``remove_jwk``, ``add_secret``, ``list_secrets``, ``remove_secret``): a status (with ``Retry-After``),
or ``after_effect_delay`` (do the work, then answer too late: a client timeout with the effect landed),
after ``skip`` matching requests; an injected 403 on the resource API is an ``insufficient_scope`` answer.
"""

from __future__ import annotations

import base64
import hmac
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from keyrotor_sandbox.standin_http import Request, Response, ServerHandle, serve_in_thread

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LEEWAY_S = 5
ALGORITHMS = ("RS256", "PS256", "ES256")
ROUTES = ("token", "resource", "add_jwk", "list_jwks", "remove_jwk", "add_secret", "list_secrets", "remove_secret")


@dataclass
class RegisteredJwk:
    kid: str
    jwk: dict[str, Any]
    name: str | None
    created_at: float
    expires_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {"kid": self.kid, "name": self.name, "created_at": _iso(self.created_at),
                "expires_at": _iso(self.expires_at) if self.expires_at else None, "jwk": self.jwk}


@dataclass
class ClientSecret:
    id: str
    value: str = field(repr=False)
    name: str | None = None
    created_at: float = 0.0
    expires_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": _iso(self.created_at),
                "expires_at": _iso(self.expires_at) if self.expires_at else None, "hint": f"…{self.value[-4:]}"}


@dataclass
class Client:
    client_id: str
    allowed_scopes: set[str]
    jwks: dict[str, RegisteredJwk] = field(default_factory=dict)
    secrets: dict[str, ClientSecret] = field(default_factory=dict)


@dataclass
class Fault:
    route: str
    status: int | None = None
    count: int = 1
    retry_after: str | None = None
    after_effect_delay: float = 0.0
    skip: int = 0       # let this many matching requests through first


@dataclass
class AuthServerState:
    admin_token: str = field(repr=False)
    token_url: str = ""
    token_ttl_s: int = 300
    max_active_secrets: int = 2
    #: resource path → the scope it needs
    resource_scopes: dict[str, str] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    clients: dict[str, Client] = field(default_factory=dict)
    tokens: dict[str, tuple[str, frozenset[str], float]] = field(default_factory=dict, repr=False)
    seen_jti: dict[str, float] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    #: the server's own limit over every route: (requests, per seconds); excess → 429 + Retry-After
    rate_limit: tuple[int, float] | None = None
    recent: deque[float] = field(default_factory=deque)
    #: every answer: (arrival time, route, status, Retry-After seconds or None)
    log: list[tuple[float, str, int, float | None]] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    #: why each refused client authentication was refused (for tests; never a secret)
    refusals: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def count(self, route: str, status: int) -> None:
        with self.lock:
            per = self.stats.setdefault(route, {})
            per[str(status)] = per.get(str(status), 0) + 1

    def take_rate_slot(self, now: float) -> float | None:
        """None when the request may go ahead, else seconds until a slot frees (sliding window)."""
        if self.rate_limit is None:
            return None
        requests, per = self.rate_limit
        with self.lock:
            while self.recent and self.recent[0] <= now - per:
                self.recent.popleft()
            if len(self.recent) >= requests:
                return self.recent[0] + per - now
            self.recent.append(now)
        return None

    def take_fault(self, route: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.route == route and fault.count > 0:
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    fault.count -= 1
                    return fault
        return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_ts(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _oauth_error(status: int, error: str, description: str) -> Response:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="token"'
    return Response.json(status, {"error": error, "error_description": description}, headers)


class _Refused(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class AuthServerApp:
    def __init__(self, state: AuthServerState) -> None:
        self.state = state

    def __call__(self, request: Request) -> Response:
        route, handler = self._route(request)
        if handler is None:
            return Response.json(404, {"error": "not_found"})
        arrived = time.time()
        wait = self.state.take_rate_slot(arrived)
        if wait is not None:
            retry_after = max(1, math.ceil(wait))
            self._record(arrived, route, 429, retry_after)
            return Response.json(429, {"error": "rate limited"}, {"Retry-After": str(retry_after)})
        fault = self.state.take_fault(route)
        if fault is not None and fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            needed = self.state.resource_scopes.get(request.path)
            if route == "resource" and fault.status == 403 and needed:  # the scope was taken away for this call
                headers["WWW-Authenticate"] = f'Bearer error="insufficient_scope", scope="{needed}"'
            self._record(arrived, route, fault.status, float(fault.retry_after) if fault.retry_after else None)
            return Response.json(fault.status, {"error": "injected fault"}, headers)
        response = handler(request)
        self._record(arrived, route, response.status, None)
        if fault is not None and fault.after_effect_delay:
            time.sleep(fault.after_effect_delay)  # the effect happened; the answer comes too late
        return response

    def _record(self, arrived: float, route: str, status: int, retry_after: float | None) -> None:
        self.state.count(route, status)
        with self.state.lock:
            self.state.log.append((arrived, route, status, retry_after))

    def _route(self, request: Request) -> tuple[str, Callable[[Request], Response] | None]:
        parts = [unquote(p) for p in request.path.strip("/").split("/")]
        if request.path == "/oauth/token" and request.method == "POST":
            return "token", self._token
        if parts[0] == "api" and request.method == "GET":
            return "resource", self._resource
        if len(parts) >= 4 and parts[:2] == ["admin", "clients"]:
            client_id, what = parts[2], parts[3]
            item = parts[4] if len(parts) > 4 else None
            table = {("jwks", "GET", False): ("list_jwks", self._list_jwks), ("jwks", "POST", False): ("add_jwk", self._add_jwk),
                     ("jwks", "DELETE", True): ("remove_jwk", self._remove_jwk),
                     ("secrets", "GET", False): ("list_secrets", self._list_secrets),
                     ("secrets", "POST", False): ("add_secret", self._add_secret),
                     ("secrets", "DELETE", True): ("remove_secret", self._remove_secret)}
            entry = table.get((what, request.method, item is not None))
            if entry is not None:
                name, fn = entry
                return name, lambda r: self._admin(r, client_id, item, fn)
        return "unknown", None

    # ------------------------------------------------------------------ token endpoint
    def _token(self, request: Request) -> Response:
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
        try:
            client = self._authenticate(request, form)
        except _Refused as refused:
            with self.state.lock:
                self.state.refusals.append(refused.why)
            return _oauth_error(401, "invalid_client", refused.why)
        requested = set(form.get("scope", "").split())
        granted = (requested & client.allowed_scopes) if requested else set(client.allowed_scopes)
        if requested and not granted:
            return _oauth_error(400, "invalid_scope", "none of the requested scopes is allowed for this client")
        token = secrets.token_urlsafe(32)
        now = self.state.clock()
        with self.state.lock:
            self.state.tokens[token] = (client.client_id, frozenset(granted), now + self.state.token_ttl_s)
        return Response.json(200, {"access_token": token, "token_type": "Bearer", "expires_in": self.state.token_ttl_s,
                                   "scope": " ".join(sorted(granted))}, {"Cache-Control": "no-store"})

    def _authenticate(self, request: Request, form: dict[str, str]) -> Client:
        assertion_type = form.get("client_assertion_type")
        if assertion_type is not None or "client_assertion" in form:
            if assertion_type != JWT_BEARER:
                raise _Refused("unsupported client_assertion_type")
            return self._assertion_client(form.get("client_assertion", ""), form.get("client_id"))
        basic = request.headers.get("authorization", "")
        if basic.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(basic[6:].strip()).decode("utf-8")
            except ValueError:
                raise _Refused("malformed Basic credentials") from None
            client_id, _, secret = decoded.partition(":")
            return self._secret_client(unquote(client_id), unquote(secret))
        if "client_secret" in form:
            return self._secret_client(form.get("client_id", ""), form["client_secret"])
        raise _Refused("no client authentication")

    def _secret_client(self, client_id: str, secret: str) -> Client:
        with self.state.lock:
            client = self.state.clients.get(client_id)
            if client is None:
                raise _Refused("unknown client")
            now = self.state.clock()
            for entry in client.secrets.values():
                if hmac.compare_digest(entry.value.encode(), secret.encode()):
                    if entry.expires_at is not None and now >= entry.expires_at:
                        raise _Refused("client secret expired")
                    return client
        raise _Refused("wrong client secret")

    def _assertion_client(self, assertion: str, form_client_id: str | None) -> Client:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _Refused("client_assertion is not a JWT") from None
        client_id = unverified.get("sub")
        with self.state.lock:
            client = self.state.clients.get(client_id) if isinstance(client_id, str) else None
            if client is None:
                raise _Refused("unknown client (sub)")
            if form_client_id is not None and form_client_id != client_id:
                raise _Refused("client_id does not match the assertion's sub")
            kid = header.get("kid")
            registered = client.jwks.get(kid) if isinstance(kid, str) else None
            now = self.state.clock()
            if registered is None:
                raise _Refused("unknown kid")
            if registered.expires_at is not None and now >= registered.expires_at:
                raise _Refused("the JWK has expired")
            jwk = dict(registered.jwk)
        alg = header.get("alg")
        if alg not in ALGORITHMS or jwk.get("alg", alg) != alg:
            raise _Refused("algorithm not allowed for this key")
        key = ECAlgorithm.from_jwk(jwk) if jwk.get("kty") == "EC" else RSAAlgorithm.from_jwk(jwk)
        try:
            claims = jwt.decode(assertion, key=key, algorithms=[alg], audience=self.state.token_url,
                                options={"require": ["iss", "sub", "aud", "exp", "jti"], "verify_iat": False,
                                         "verify_exp": False, "verify_nbf": False})
        except jwt.InvalidSignatureError:
            raise _Refused("bad signature") from None
        except jwt.InvalidAudienceError:
            raise _Refused("wrong aud") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _Refused(f"missing claim {exc.claim}") from None
        except jwt.PyJWTError as exc:
            raise _Refused(f"invalid assertion ({type(exc).__name__})") from None
        now = self.state.clock()
        # Times against the stand-in's clock (a test may move it), not PyJWT's wall clock.
        if float(claims["exp"]) <= now:
            raise _Refused("assertion expired")
        for claim in ("nbf", "iat"):
            if claim in claims and float(claims[claim]) > now + LEEWAY_S:
                raise _Refused(f"{claim} in the future")
        if claims["iss"] != client_id:
            raise _Refused("iss is not the client id")
        jti = str(claims["jti"])
        with self.state.lock:
            self.state.seen_jti = {j: exp for j, exp in self.state.seen_jti.items() if exp > now}
            if jti in self.state.seen_jti:
                raise _Refused("replayed jti")
            self.state.seen_jti[jti] = float(claims["exp"])
        return client

    # ------------------------------------------------------------------ resource API
    def _resource(self, request: Request) -> Response:
        token = request.bearer()
        now = self.state.clock()
        with self.state.lock:
            entry = self.state.tokens.get(token or "")
        if entry is None or entry[2] <= now:
            return Response.json(401, {"error": "invalid_token"}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        needed = self.state.resource_scopes.get(request.path)
        if needed is not None and needed not in entry[1]:
            return Response.json(403, {"error": "insufficient_scope"},
                                 {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'})
        return Response.json(200, {"ok": True, "client_id": entry[0], "path": request.path})

    # ------------------------------------------------------------------ admin API
    def _admin(self, request: Request, client_id: str, item: str | None,
               fn: Callable[[Request, Client, str | None], Response]) -> Response:
        if not hmac.compare_digest((request.bearer() or "").encode(), self.state.admin_token.encode()):
            return Response.json(401, {"error": "unauthorized"})
        with self.state.lock:
            client = self.state.clients.get(client_id)
            if client is None:
                return Response.json(404, {"error": "unknown client"})
            return fn(request, client, item)

    def _list_jwks(self, _request: Request, client: Client, _item: str | None) -> Response:
        return Response.json(200, {"keys": [k.public() for k in client.jwks.values()]})

    def _add_jwk(self, request: Request, client: Client, _item: str | None) -> Response:
        try:
            body = request.json() or {}
        except ValueError:
            return Response.json(400, {"error": "body is not JSON"})
        jwk = body.get("jwk") if isinstance(body, dict) else None
        if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC") or not isinstance(jwk.get("kid"), str):
            return Response.json(400, {"error": "expected {jwk: {kty, kid, ...}}"})
        if "d" in jwk or "p" in jwk:
            return Response.json(400, {"error": "a private key was sent; register the public JWK only"})
        try:
            (ECAlgorithm.from_jwk(jwk) if jwk["kty"] == "EC" else RSAAlgorithm.from_jwk(jwk))
        except (jwt.PyJWTError, ValueError, KeyError):
            return Response.json(400, {"error": "not a valid public JWK"})
        if jwk["kid"] in client.jwks:
            return Response.json(409, {"error": "a JWK with this kid is registered"})
        entry = RegisteredJwk(kid=jwk["kid"], jwk=dict(jwk), name=body.get("name"), created_at=self.state.clock(),
                              expires_at=_parse_ts(body.get("expires_at")))
        client.jwks[entry.kid] = entry
        return Response.json(201, entry.public())

    def _remove_jwk(self, _request: Request, client: Client, kid: str | None) -> Response:
        if client.jwks.pop(kid or "", None) is None:
            return Response.json(404, {"error": "no such kid"})
        return Response.empty(204)

    def _list_secrets(self, _request: Request, client: Client, _item: str | None) -> Response:
        return Response.json(200, {"secrets": [s.public() for s in client.secrets.values()]})

    def _add_secret(self, request: Request, client: Client, _item: str | None) -> Response:
        try:
            body = request.json() or {}
        except ValueError:
            return Response.json(400, {"error": "body is not JSON"})
        now = self.state.clock()
        active = [s for s in client.secrets.values() if s.expires_at is None or s.expires_at > now]
        if len(active) >= self.state.max_active_secrets:
            return Response.json(409, {"error": f"at most {self.state.max_active_secrets} active secrets; remove one first"})
        entry = ClientSecret(id="cs_" + secrets.token_hex(6), value="cs_" + secrets.token_urlsafe(32),
                             name=body.get("name") if isinstance(body, dict) else None, created_at=now,
                             expires_at=_parse_ts(body.get("expires_at")) if isinstance(body, dict) else None)
        client.secrets[entry.id] = entry
        return Response.json(201, {**entry.public(), "secret": entry.value})

    def _remove_secret(self, _request: Request, client: Client, sid: str | None) -> Response:
        if client.secrets.pop(sid or "", None) is None:
            return Response.json(404, {"error": "no such secret"})
        return Response.empty(204)


class AuthServerHandle:
    """A running authorization server stand-in (``url``, ``token_url``, ``admin_token``, ``state``)."""

    def __init__(self, server: ServerHandle, state: AuthServerState) -> None:
        self._server = server
        self.state = state
        self.url = server.url
        self.token_url = state.token_url
        self.admin_token = state.admin_token

    def add_client(self, client_id: str, scopes: set[str] | list[str]) -> Client:
        with self.state.lock:
            client = Client(client_id=client_id, allowed_scopes=set(scopes))
            self.state.clients[client_id] = client
            return client

    def client(self, client_id: str) -> Client:
        return self.state.clients[client_id]

    def register_jwk(self, client_id: str, jwk: dict[str, Any], *, name: str | None = None,
                     expires_at: float | None = None) -> RegisteredJwk:
        with self.state.lock:
            entry = RegisteredJwk(kid=jwk["kid"], jwk=dict(jwk), name=name, created_at=self.state.clock(), expires_at=expires_at)
            self.state.clients[client_id].jwks[entry.kid] = entry
            return entry

    def add_secret(self, client_id: str, *, name: str | None = None) -> ClientSecret:
        with self.state.lock:
            entry = ClientSecret(id="cs_" + secrets.token_hex(6), value="cs_" + secrets.token_urlsafe(32), name=name,
                                 created_at=self.state.clock())
            self.state.clients[client_id].secrets[entry.id] = entry
            return entry

    def set_scopes(self, client_id: str, scopes: set[str] | list[str]) -> None:
        with self.state.lock:
            self.state.clients[client_id].allowed_scopes = set(scopes)

    def add_fault(self, route: str, *, status: int | None = None, count: int = 1, retry_after: str | None = None,
                  after_effect_delay: float = 0.0, skip: int = 0) -> None:
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r} (known: {', '.join(ROUTES)})")
        with self.state.lock:
            self.state.faults.append(Fault(route, status, count, retry_after, after_effect_delay, skip))

    def stats(self) -> dict[str, dict[str, int]]:
        with self.state.lock:
            return {route: dict(counts) for route, counts in self.state.stats.items()}

    def stop(self) -> None:
        self._server.stop()


def start_auth_server_in_thread(*, resource_scopes: dict[str, str] | None = None, token_ttl_s: int = 300,
                                clock: Callable[[], float] = time.time, admin_token: str | None = None,
                                rate_limit: tuple[int, float] | None = None) -> AuthServerHandle:
    """Serve on a free loopback port; ``token_url`` is the ``aud`` assertions must carry."""
    state = AuthServerState(admin_token=admin_token or "adm_" + secrets.token_urlsafe(24), token_ttl_s=token_ttl_s,
                            resource_scopes=dict(resource_scopes or {}), clock=clock, rate_limit=rate_limit)
    server = serve_in_thread(AuthServerApp(state), name="oauth-standin")
    state.token_url = f"{server.url}/oauth/token"
    return AuthServerHandle(server, state)


def standin_oauth_spec(server: AuthServerHandle, *, client_id: str, scopes: list[str], scoped_path: str,
                       admin_token_ref: dict[str, str], credential_types: tuple[str, ...] = ("private_key_jwt",),
                       **overrides: Any) -> dict[str, Any]:
    """The inventory ``providers`` entry for a client of this stand-in (what a user would write)."""
    spec: dict[str, Any] = {
        "kind": "oauth_client",
        "client_id": client_id,
        "token_url": server.token_url,
        "scopes": list(scopes),
        "scoped_call": {"method": "GET", "url": f"{server.url}{scoped_path}"},
        "admin": {
            "base_url": f"{server.url}/admin",
            "auth": {"type": "bearer", "token": admin_token_ref},
            "calls": {
                "add_jwk": {"method": "POST", "url": "{base_url}/clients/{client_id}/jwks",
                            "body": {"jwk": "{jwk}", "name": "{key_name}"}},
                "list_jwks": {"url": "{base_url}/clients/{client_id}/jwks",
                              "response": {"items": "$.keys", "key_id": "$.kid", "name": "$.name",
                                           "created_at": "$.created_at"}},
                "remove_jwk": {"method": "DELETE", "url": "{base_url}/clients/{client_id}/jwks/{key_id}"},
                "add_secret": {"method": "POST", "url": "{base_url}/clients/{client_id}/secrets",
                               "body": {"name": "{key_name}"},
                               "response": {"secret": "$.secret", "key_id": "$.id", "expires_at": "$.expires_at"}},
                "list_secrets": {"url": "{base_url}/clients/{client_id}/secrets",
                                 "response": {"items": "$.secrets", "key_id": "$.id", "name": "$.name",
                                              "created_at": "$.created_at"}},
                "remove_secret": {"method": "DELETE", "url": "{base_url}/clients/{client_id}/secrets/{key_id}"},
            },
        },
        "credential_types": {name: {} for name in credential_types},
    }
    spec.update(overrides)
    return spec
