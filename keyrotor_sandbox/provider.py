"""A provider API stand-in modelled on Alloy's key management (seed 002), with the behaviours
keyrotor must survive from the other seeds: Asana's deprecation timeline and 434/amnesty header
(000), its rate limits and error codes (001), and Workfront's one-key-per-user reset (003).

API (Bearer auth with the admin token or a live key):
  POST   /api/api-key        {"name", "credentialType"?, "username"?} → 201 {id, name, apiKey, createdAt, expiresAt}
  GET    /api/user/me        200 {"user": {...}, "apiKeyId"} for a live key, 401 otherwise
  GET    /api/api-key        {"keys": [{id, name, createdAt, expiresAt, credentialType, hint, revoked}]} (never the
                             secret; revoked keys only with the ``list_revoked`` setting)
  DELETE /api/api-key/{id}   204, or 404 when unknown / already revoked
Control (Bearer admin token):
  POST /_sandbox/faults {"route": "issue|check|revoke|list|any", "status"?, "count"?, "delay"?,
                         "garbage"?, "retry_after"?}
  POST /_sandbox/deprecation {"credential_type", "phase": "none|no_new_credentials|amnesty|rejected"}
  POST /_sandbox/config {"activation_delay"?, "key_ttl"?, "rate_limit"?: {"requests", "per"} | null, "cutover"?,
                         "list_revoked"?, "rejected_status"?}
  POST /_sandbox/keys {"name", "credentialType"?, "username"?, "active"?} → the key, *with* apiKey (seeding)
  GET  /_sandbox/stats → {"routes": {route: {status: count}}, "requests": n}
  POST /_sandbox/stats/reset
"""

from __future__ import annotations

import math
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from keyrotor_sandbox.standin_http import (
    Request,
    Response,
    ServerHandle,
    same_secret,
    serve_in_thread,
    serve_until_signalled,
    window_wait,
)

ROUTES = ("issue", "check", "revoke", "list")
PHASES = ("none", "no_new_credentials", "amnesty", "rejected")
DEFAULT_AMNESTY_HEADER = "Asana-Amnesty-Api-Key"


@dataclass
class SandboxKey:
    id: str
    name: str
    secret: str = field(repr=False)  # a repr (traceback, debugger) must not show a key
    owner: str
    credential_type: str
    created_at: float
    active_at: float
    expires_at: float | None
    revoked: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "createdAt": _iso(self.created_at),
            "expiresAt": _iso(self.expires_at) if self.expires_at is not None else None,
            "credentialType": self.credential_type,
            # What dashboards show of a key (its prefix and last four characters), never the key.
            "hint": f"{self.secret[:4]}…{self.secret[-4:]}",
        }


@dataclass
class Fault:
    route: str
    status: int | None = None
    count: int = 1
    delay: float = 0.0
    garbage: bool = False
    retry_after: str | None = None


@dataclass
class ProviderState:
    """Everything the stand-in knows; guarded by one lock (requests are served concurrently)."""

    admin_token: str = field(repr=False)
    activation_delay: float = 0.0
    key_ttl: float | None = None
    rate_limit: tuple[int, float] | None = None
    cutover: bool = False
    #: List revoked keys too (flagged ``"revoked": true``), as some providers do.
    list_revoked: bool = False
    amnesty_header: str = DEFAULT_AMNESTY_HEADER
    #: What a credential of a type in its ``rejected`` phase gets: 434 (Asana-style) or 401
    #: (Alloy's old keys after January 2023 were simply no longer valid).
    rejected_status: int = 434
    clock: Callable[[], float] = time.time
    keys: dict[str, SandboxKey] = field(default_factory=dict)
    deprecation: dict[str, str] = field(default_factory=dict)  # credential type → phase
    faults: list[Fault] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    requests_seen: deque[float] = field(default_factory=deque)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str, *, owner: str = "admin", credential_type: str = "api_key",
                   active: bool = False, secret: str | None = None) -> SandboxKey:
        with self.lock:
            now = self.clock()
            if self.cutover:  # Workfront-style reset: one key per user, the old one stops working now
                for key in self.keys.values():
                    if key.owner == owner and not key.revoked:
                        key.revoked = True
            key = SandboxKey(
                id=uuid.uuid4().hex[:12],
                name=name,
                secret=secret or "sbx_" + secrets.token_urlsafe(24),
                owner=owner,
                credential_type=credential_type,
                created_at=now,
                active_at=now if active else now + self.activation_delay,
                expires_at=now + self.key_ttl if self.key_ttl else None,
            )
            self.keys[key.id] = key
            return key

    def find_secret(self, secret: str | None) -> SandboxKey | None:
        if not secret:
            return None
        with self.lock:
            for key in self.keys.values():
                if same_secret(key.secret, secret):
                    return key
        return None

    def key_is_live(self, key: SandboxKey) -> bool:
        now = self.clock()
        return not key.revoked and now >= key.active_at and (key.expires_at is None or now < key.expires_at)

    def live_keys(self) -> list[SandboxKey]:
        with self.lock:
            return [k for k in self.keys.values() if self.key_is_live(k)]

    # ------------------------------------------------------------------ stats
    def count(self, route: str, status: int) -> None:
        with self.lock:
            per_route = self.stats.setdefault(route, {})
            per_route[str(status)] = per_route.get(str(status), 0) + 1

    def snapshot_stats(self) -> dict[str, Any]:
        with self.lock:
            routes = {r: dict(v) for r, v in self.stats.items()}
        return {"routes": routes, "requests": sum(sum(v.values()) for v in routes.values())}

    def failures(self, route: str | None = None) -> int:
        """Requests answered with anything but 2xx (per route or overall)."""
        with self.lock:
            items = [self.stats.get(route, {})] if route else list(self.stats.values())
            return sum(n for per in items for status, n in per.items() if not status.startswith("2"))

    # ------------------------------------------------------------------ rate limit
    def take_rate_slot(self) -> float | None:
        """None when the request may proceed, else seconds until a slot frees (Retry-After)."""
        if self.rate_limit is None:
            return None
        limit, per = self.rate_limit
        with self.lock:
            return window_wait(self.requests_seen, limit, per, self.clock())

    def take_fault(self, route: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.route in (route, "any") and fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                    return fault
        return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response.json(status, {"errors": [{"message": message}]}, headers)


class ProviderApp:
    """Routes requests against a ``ProviderState``."""

    def __init__(self, state: ProviderState) -> None:
        self.state = state

    # --------------------------------------------------------------- entry
    def __call__(self, request: Request) -> Response:
        if request.path.startswith("/_sandbox/"):
            return self._control(request)
        route, handler = self._route(request)
        if handler is None:
            return _error(404, f"no route {request.method} {request.path}")
        response = self._guarded(route, request, handler)
        self.state.count(route, response.status)
        return response

    def _route(self, request: Request) -> tuple[str, Callable[[Request], Response] | None]:
        path = request.path.rstrip("/")
        if path == "/api/api-key" and request.method == "POST":
            return "issue", self._issue
        if path == "/api/api-key" and request.method == "GET":
            return "list", self._list
        if path.startswith("/api/api-key/") and request.method == "DELETE":
            return "revoke", self._revoke
        if path == "/api/user/me" and request.method == "GET":
            return "check", self._check
        return "unknown", None

    def _guarded(self, route: str, request: Request, handler: Callable[[Request], Response]) -> Response:
        fault = self.state.take_fault(route)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.garbage:
                return Response(200, b"<html><body>502 Bad Gateway (upstream hiccup)</body>", {"Content-Type": "text/html"})
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return _error(fault.status, f"injected fault {fault.status}", headers)
        wait = self.state.take_rate_slot()
        if wait is not None:
            return _error(429, "rate limit exceeded; retry later", {"Retry-After": str(max(1, math.ceil(wait)))})
        return handler(request)

    # --------------------------------------------------------------- auth
    def _principal(self, request: Request) -> tuple[str | None, Response | None]:
        """The authenticated user (admin token or a live key), or the error to answer."""
        token = request.bearer()
        if token is None:
            return None, _error(401, "missing Bearer token (Authorization: Bearer <api key>)")
        if same_secret(token, self.state.admin_token):
            return "admin", None
        key = self.state.find_secret(token)
        if key is None or not self.state.key_is_live(key):
            return None, _error(401, "Not Authorized")
        phase = self.state.deprecation.get(key.credential_type, "none")
        if phase == "rejected":
            return None, _error(self.state.rejected_status, f"{key.credential_type} credentials are no longer accepted")
        if phase == "amnesty" and request.headers.get(self.state.amnesty_header.lower(), "").lower() != "true":
            return None, _error(434, f"{key.credential_type} credentials need the {self.state.amnesty_header}: true header")
        return key.owner, None

    # --------------------------------------------------------------- routes
    def _issue(self, request: Request) -> Response:
        owner, failure = self._principal(request)
        if failure is not None:
            return failure
        try:
            body = request.json() or {}
        except ValueError:
            return _error(400, "body must be JSON")
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            return _error(400, "'name' is required")
        credential_type = body.get("credentialType") or "api_key"
        if not isinstance(credential_type, str):
            return _error(400, "'credentialType' must be a string")
        if self.state.deprecation.get(credential_type, "none") != "none":
            return _error(434, f"new {credential_type} credentials can no longer be created")
        username = body.get("username")
        if username is not None and owner != "admin" and username != owner:
            return _error(403, "only an admin may create keys for another user")
        key = self.state.create_key(name.strip(), owner=str(username or owner), credential_type=credential_type)
        return Response.json(201, {**key.public(), "apiKey": key.secret})

    def _check(self, request: Request) -> Response:
        owner, failure = self._principal(request)
        if failure is not None:
            return failure
        key = self.state.find_secret(request.bearer())
        return Response.json(200, {"user": {"username": owner, "admin": owner == "admin"}, "apiKeyId": key.id if key else None})

    def _list(self, request: Request) -> Response:
        _owner, failure = self._principal(request)
        if failure is not None:
            return failure
        with self.state.lock:
            keys = [{**k.public(), "revoked": k.revoked} for k in self.state.keys.values()
                    if self.state.list_revoked or not k.revoked]
        return Response.json(200, {"keys": keys})

    def _revoke(self, request: Request) -> Response:
        owner, failure = self._principal(request)
        if failure is not None:
            return failure
        key_id = request.path.rstrip("/").rsplit("/", 1)[-1]
        with self.state.lock:
            key = self.state.keys.get(key_id)
            if key is None or key.revoked:
                return _error(404, f"no API key {key_id}")
            if owner != "admin" and key.owner != owner:
                return _error(403, "only an admin may revoke another user's key")
            key.revoked = True
        return Response.empty(204)

    # --------------------------------------------------------------- control
    def _control(self, request: Request) -> Response:
        token = request.bearer()
        if token is None or not same_secret(token, self.state.admin_token):
            return _error(401, "the sandbox control API needs the admin token")
        try:
            body = request.json() or {}
        except ValueError:
            return _error(400, "body must be JSON")
        path, method = request.path.rstrip("/"), request.method
        try:
            if path == "/_sandbox/stats" and method == "GET":
                return Response.json(200, self.state.snapshot_stats())
            if path == "/_sandbox/stats/reset" and method == "POST":
                with self.state.lock:
                    self.state.stats.clear()
                return Response.empty(204)
            if path == "/_sandbox/faults" and method == "POST":
                add_fault(self.state, **body)
                return Response.empty(204)
            if path == "/_sandbox/faults" and method == "DELETE":
                with self.state.lock:
                    self.state.faults.clear()
                return Response.empty(204)
            if path == "/_sandbox/deprecation" and method == "POST":
                set_deprecation(self.state, body["credential_type"], body["phase"])
                return Response.empty(204)
            if path == "/_sandbox/config" and method == "POST":
                configure(self.state, **body)
                return Response.empty(204)
            if path == "/_sandbox/keys" and method == "POST":
                key = self.state.create_key(
                    body["name"], owner=body.get("username", "admin"),
                    credential_type=body.get("credentialType", "api_key"), active=bool(body.get("active", True)))
                return Response.json(201, {**key.public(), "apiKey": key.secret})
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, f"bad control request: {exc}")
        return _error(404, f"no control route {method} {path}")


# ---------------------------------------------------------------------- control helpers (in-process)
def add_fault(state: ProviderState, route: str, status: int | None = None, count: int = 1, delay: float = 0.0,
              garbage: bool = False, retry_after: str | int | float | None = None) -> None:
    if route not in (*ROUTES, "any"):
        raise ValueError(f"route must be one of {', '.join(ROUTES)} or any")
    if status is None and not garbage and not delay:
        raise ValueError("a fault needs a status, garbage or a delay")
    with state.lock:
        state.faults.append(Fault(route, status, int(count), float(delay), bool(garbage),
                                  None if retry_after is None else str(retry_after)))


def set_deprecation(state: ProviderState, credential_type: str, phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}")
    with state.lock:
        if phase == "none":
            state.deprecation.pop(credential_type, None)
        else:
            state.deprecation[credential_type] = phase


def configure(state: ProviderState, **values: Any) -> None:
    with state.lock:
        for name, value in values.items():
            if name == "rate_limit":
                state.rate_limit = None if value is None else (int(value["requests"]), float(value["per"]))
                state.requests_seen.clear()
            elif name in ("activation_delay", "key_ttl"):
                setattr(state, name, None if value is None else float(value))
            elif name in ("cutover", "list_revoked"):
                setattr(state, name, bool(value))
            elif name == "rejected_status":
                state.rejected_status = int(value)
            else:
                raise ValueError(f"unknown setting {name!r}")


# ---------------------------------------------------------------------- running it
class ProviderHandle:
    """A provider stand-in running in a background thread (tests, demo)."""

    def __init__(self, server: ServerHandle, state: ProviderState) -> None:
        self._server = server
        self.state = state
        self.url = server.url
        self.port = server.port
        self.admin_token = state.admin_token

    def seed_key(self, name: str = "seed", *, credential_type: str = "api_key", owner: str = "admin",
                 active: bool = True, secret: str | None = None) -> SandboxKey:
        """A key as if created earlier (live now unless ``active=False``)."""
        return self.state.create_key(name, owner=owner, credential_type=credential_type, active=active, secret=secret)

    def key(self, key_id: str) -> SandboxKey:
        return self.state.keys[key_id]

    def is_live(self, secret: str) -> bool:
        key = self.state.find_secret(secret)
        return key is not None and self.state.key_is_live(key)

    def add_fault(self, route: str, **kwargs: Any) -> None:
        add_fault(self.state, route, **kwargs)

    def set_deprecation(self, credential_type: str, phase: str) -> None:
        set_deprecation(self.state, credential_type, phase)

    def configure(self, **values: Any) -> None:
        configure(self.state, **values)

    def stats(self) -> dict[str, Any]:
        return self.state.snapshot_stats()

    def failures(self, route: str | None = None) -> int:
        return self.state.failures(route)

    def reset_stats(self) -> None:
        with self.state.lock:
            self.state.stats.clear()

    def stop(self) -> None:
        self._server.stop()


def _state(admin_token: str | None, activation_delay: float, rate_limit: tuple[int, float] | None,
           key_ttl: float | None, cutover: bool, clock: Callable[[], float] | None,
           amnesty_header: str) -> ProviderState:
    return ProviderState(
        admin_token=admin_token or "sbx-admin-" + secrets.token_urlsafe(16),
        activation_delay=activation_delay,
        rate_limit=rate_limit,
        key_ttl=key_ttl,
        cutover=cutover,
        amnesty_header=amnesty_header,
        clock=clock or time.time,
    )


def start_provider_in_thread(*, host: str = "127.0.0.1", port: int = 0, admin_token: str | None = None,
                             activation_delay: float = 0.0, rate_limit: tuple[int, float] | None = None,
                             key_ttl: float | None = None, cutover: bool = False,
                             clock: Callable[[], float] | None = None,
                             amnesty_header: str = DEFAULT_AMNESTY_HEADER) -> ProviderHandle:
    state = _state(admin_token, activation_delay, rate_limit, key_ttl, cutover, clock, amnesty_header)
    server = serve_in_thread(ProviderApp(state), host, port, name="sandbox-provider")
    return ProviderHandle(server, state)


def run_provider_forever(*, host: str, port: int, admin_token: str | None, activation_delay: float,
                         rate_limit: tuple[int, float] | None, key_ttl: float | None, cutover: bool,
                         ready: Callable[[str, str], None], deprecations: dict[str, str] | None = None,
                         amnesty_header: str = DEFAULT_AMNESTY_HEADER) -> None:
    """Foreground server for ``keyrotor sandbox provider``; ``ready(url, admin_token)`` once bound."""
    state = _state(admin_token, activation_delay, rate_limit, key_ttl, cutover, None, amnesty_header)
    for credential_type, phase in (deprecations or {}).items():
        set_deprecation(state, credential_type, phase)
    serve_until_signalled(ProviderApp(state), host, port, lambda handle: ready(handle.url, state.admin_token))


def standin_provider_spec(base_url: str, *, admin_token_ref: dict[str, str], mode: str = "overlap",
                          rate_limit: dict[str, Any] | None = None, credential_types: dict[str, Any] | None = None,
                          activation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inventory entry (plain data, as in the YAML) that drives this stand-in with the generic
    HTTP provider; the demo and the tests use it so both exercise the same calls as ``alloy``."""
    return {
        "kind": "http",
        "mode": mode,
        "base_url": base_url,
        "rate_limit": rate_limit or {"requests": 50, "per": "1s"},
        "auth": {"type": "bearer", "token": admin_token_ref},
        "activation": activation or {"poll_interval": "1s", "timeout": "30s"},
        "status_codes": {"deprecated": [434]},
        "credential_types": credential_types or {"api_key": {}},
        "calls": {
            "issue": {"method": "POST", "url": "{base_url}/api/api-key",
                      "body": {"name": "{key_name}", "credentialType": "{credential_type}"},
                      "response": {"secret": "$.apiKey", "key_id": "$.id", "expires_at": "$.expiresAt"}},
            # The answer names the key's id: `keyrotor adopt` learns the id of a key made by hand.
            "verify": {"method": "GET", "url": "{base_url}/api/user/me", "auth": {"type": "bearer", "token": "{secret}"},
                       "response": {"key_id": "$.apiKeyId"}},
            "revoke": {"method": "DELETE", "url": "{base_url}/api/api-key/{key_id}"},
            "list": {"method": "GET", "url": "{base_url}/api/api-key",
                     "response": {"items": "$.keys", "key_id": "$.id", "name": "$.name", "created_at": "$.createdAt",
                                  "secret_hint": "$.hint"}},
        },
    }
