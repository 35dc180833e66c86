"""An Asana API stand-in, modelled on the vendor documents (docs/providers.md, "Asana").

Credentials:
- legacy **API keys** (one per user; sent as HTTP Basic with the key as user name, as Asana's
  clients did, or as a Bearer token). Their dated timeline, against the stand-in's *today*
  (settable): from 2016-01-01 no new key can be generated; from 2017-01-01 a request with one is
  answered 434 unless it carries ``Asana-Amnesty-Api-Key: true``; from 2017-02-01 always 434.
- **personal access tokens** (Bearer): only a person creates one, in the web UI, with a name
  (the UI is the ``person_*`` methods and the ``/_sandbox/ui/*`` control routes, never the API);
  a person revokes them one by one there too. The token is shown once, at creation.

Limits, per user: 150 requests a minute on a free plan, 1,500 on a paid one; search (premium
only: 402 on a free plan) 60 a minute; at most 50 GET and 15 write requests in flight. Past a
limit: 429 with ``Retry-After`` (seconds). Errors as documented: 400 missing or bad parameter,
401 no or unknown credential, 402 premium-only, 404 unknown resource or route, 429 rate limit,
434 deprecated API key. Bodies are ``{"errors": [{"message": ...}]}``.

API:  GET  /api/1.0/users/me                         → 200 {"data": {gid, name, email}}
      GET  /api/1.0/workspaces/{gid}/tasks/search     → 200 {"data": [...]} (``text`` required)
      GET  /api/1.0/tasks/{gid}                        → 200 / 404
      POST /api/1.0/tasks {"data": {"name", "workspace"}} → 201 / 400
Control (Bearer control token): POST /_sandbox/today {"today": ISO date}, POST /_sandbox/ui/pat
{"user", "name"} → {gid, token}, POST /_sandbox/ui/pat/revoke {"gid"}, GET /_sandbox/stats.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from keyrotor_sandbox.standin_http import Request, Response, ServerHandle, serve_in_thread, serve_until_signalled

AMNESTY_HEADER = "Asana-Amnesty-Api-Key"
#: The documented timeline (000): no new API keys; amnesty header needed; API keys rejected.
NO_NEW_API_KEYS = datetime(2016, 1, 1, tzinfo=timezone.utc)
AMNESTY_REQUIRED = datetime(2017, 1, 1, tzinfo=timezone.utc)
AMNESTY_ENDS = datetime(2017, 2, 1, tzinfo=timezone.utc)
#: Requests a minute per user (001), and the search endpoint's own limit.
PLAN_LIMITS = {"free": 150, "paid": 1500}
SEARCH_LIMIT = 60
#: Requests in flight per user, by kind of method ("can vary depending on your HTTP method").
CONCURRENCY = {"read": 50, "write": 15}
API_PREFIX = "/api/1.0"


class PersonOnly(Exception):
    """A thing only a person can do in the web UI was refused (e.g. a new API key after 2015)."""


@dataclass
class Credential:
    gid: str
    user: str
    kind: str  # "api_key" | "personal_access_token"
    name: str
    token: str = field(repr=False)
    created_at: datetime
    revoked: bool = False


@dataclass
class AsanaState:
    control_token: str = field(repr=False)
    plan: str = "free"
    today: datetime | None = None          # None: the real date
    window_s: float = 60.0                 # "a minute" (tests may shorten it)
    #: Requests per window by plan, and search's (the documented figures; tests may scale them down).
    plan_limits: dict[str, int] = field(default_factory=lambda: dict(PLAN_LIMITS))
    search_limit: int = SEARCH_LIMIT
    monotonic: Callable[[], float] = time.monotonic
    credentials: dict[str, Credential] = field(default_factory=dict)
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    calls: dict[str, deque[float]] = field(default_factory=dict)   # "user" / "user:search" → times
    in_flight: Counter[str] = field(default_factory=Counter)        # "user:read|write" → count
    peak: Counter[str] = field(default_factory=Counter)             # the most ever in flight at once
    statuses: Counter[str] = field(default_factory=Counter)         # "route status" → count
    history: list[tuple[float, str, int]] = field(default_factory=list)   # (monotonic, route, status)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def now(self) -> datetime:
        return self.today or datetime.now(timezone.utc)

    # ------------------------------------------------------------------ what a person does in the UI
    def add_user(self, user: str) -> None:
        with self.lock:
            self.users.setdefault(user, {"gid": str(1000 + len(self.users)), "name": user, "email": f"{user}@example.com"})

    def generate_api_key(self, user: str, *, before_deprecation: bool = False) -> Credential:
        """The user's (one) API key; generating one replaces the old. Refused from 2016 on unless
        ``before_deprecation`` (a key made back then, for seeding)."""
        if not before_deprecation and self.now() >= NO_NEW_API_KEYS:
            raise PersonOnly("users can no longer generate new API keys (since January 2016)")
        with self.lock:
            for cred in self.credentials.values():
                if cred.user == user and cred.kind == "api_key":
                    cred.revoked = True
            return self._add(user, "api_key", "API key", "0/" + secrets.token_hex(16))

    def create_pat(self, user: str, name: str) -> Credential:
        if not name.strip():
            raise PersonOnly("a personal access token needs a description (its name)")
        return self._add(user, "personal_access_token", name.strip(), "1/" + secrets.token_hex(8) + ":" + secrets.token_hex(16))

    def revoke(self, gid: str) -> None:
        with self.lock:
            self.credentials[gid].revoked = True

    def _add(self, user: str, kind: str, name: str, token: str) -> Credential:
        self.add_user(user)
        with self.lock:
            cred = Credential(gid=str(10_000 + len(self.credentials)), user=user, kind=kind, name=name, token=token,
                              created_at=self.now())
            self.credentials[cred.gid] = cred
            return cred

    def find(self, token: str) -> Credential | None:
        with self.lock:
            for cred in self.credentials.values():
                if secrets.compare_digest(cred.token.encode(), token.encode("utf-8", "surrogateescape")):
                    return cred
        return None

    # ------------------------------------------------------------------ limits
    def take(self, bucket: str, limit: int) -> float | None:
        """None when a request may proceed, else seconds until the oldest leaves the window."""
        with self.lock:
            now = self.monotonic()
            seen = self.calls.setdefault(bucket, deque())
            while seen and seen[0] <= now - self.window_s:
                seen.popleft()
            if len(seen) >= limit:
                return max(0.001, seen[0] + self.window_s - now)
            seen.append(now)
            return None

    @contextmanager
    def slot(self, user: str, method: str) -> Iterator[bool]:
        kind = "read" if method in ("GET", "HEAD") else "write"
        key = f"{user}:{kind}"
        with self.lock:
            taken = self.in_flight[key] < CONCURRENCY[kind]
            if taken:
                self.in_flight[key] += 1
                self.peak[key] = max(self.peak[key], self.in_flight[key])
        try:
            yield taken
        finally:
            if taken:
                with self.lock:
                    self.in_flight[key] -= 1

    def count(self, route: str, status: int) -> None:
        with self.lock:
            self.statuses[f"{route} {status}"] += 1
            self.history.append((self.monotonic(), route, status))

    def busiest_window(self) -> int:
        """The most requests answered within any one window (what the limit is about)."""
        with self.lock:
            times = sorted(t for t, _route, _status in self.history)
        most, start = 0, 0
        for end, at in enumerate(times):
            while times[start] <= at - self.window_s:
                start += 1
            most = max(most, end - start + 1)
        return most

    def answered(self, status: int, route: str | None = None) -> int:
        with self.lock:
            return sum(n for k, n in self.statuses.items()
                       if k.endswith(f" {status}") and (route is None or k.startswith(f"{route} ")))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response.json(status, {"errors": [{"message": message}]}, headers)


def _basic_user(request: Request) -> str | None:
    from base64 import b64decode

    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        user, _, _password = b64decode(value.strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user or None


class AsanaApp:
    def __init__(self, state: AsanaState, *, slow: float = 0.0) -> None:
        self.state = state
        self.slow = slow   # seconds each API request takes (to make concurrency observable)

    def __call__(self, request: Request) -> Response:
        if request.path.startswith("/_sandbox/"):
            return self._control(request)
        route = self._route_name(request)
        response = self._serve(route, request)
        self.state.count(route, response.status)
        return response

    @staticmethod
    def _route_name(request: Request) -> str:
        parts = request.path.rstrip("/").split("/")
        if request.path.rstrip("/") == f"{API_PREFIX}/users/me":
            return "me"
        if len(parts) == 7 and parts[3] == "workspaces" and parts[5:] == ["tasks", "search"]:
            return "search"
        if parts[:4] == ["", "api", "1.0", "tasks"]:
            return "tasks"
        return "unknown"

    def _authenticate(self, request: Request) -> tuple[Credential | None, Response | None]:
        token = request.bearer() or _basic_user(request)
        cred = self.state.find(token) if token else None
        if cred is None or cred.revoked:
            return None, _error(401, "Not Authorized")
        if cred.kind == "api_key":
            now = self.state.now()
            amnesty = request.headers.get(AMNESTY_HEADER.lower(), "").strip().lower() == "true"
            if now >= AMNESTY_ENDS or (now >= AMNESTY_REQUIRED and not amnesty):
                return None, _error(434, "API keys are deprecated: use a personal access token or OAuth"
                                    + ("" if now >= AMNESTY_ENDS else f" (or send {AMNESTY_HEADER}: true until February 2017)"))
        return cred, None

    def _serve(self, route: str, request: Request) -> Response:
        cred, failure = self._authenticate(request)
        if failure is not None:
            return failure
        assert cred is not None
        wait = self.state.take(cred.user, self.state.plan_limits[self.state.plan])
        if wait is None and route == "search":
            wait = self.state.take(f"{cred.user}:search", self.state.search_limit)
        if wait is not None:
            return _error(429, "You have made too many requests recently", {"Retry-After": str(max(1, math.ceil(wait)))})
        with self.state.slot(cred.user, request.method) as taken:
            if not taken:
                return _error(429, "Too many concurrent requests", {"Retry-After": "1"})
            if self.slow:
                time.sleep(self.slow)
            return self._handle(route, request, cred)

    def _handle(self, route: str, request: Request, cred: Credential) -> Response:
        user = self.state.users[cred.user]
        if route == "me" and request.method == "GET":
            return Response.json(200, {"data": {"gid": user["gid"], "name": user["name"], "email": user["email"],
                                                "resource_type": "user"}})
        if route == "search" and request.method == "GET":
            if self.state.plan != "paid":
                return _error(402, "Search is only available to premium organizations and workspaces")
            if not request.query.get("text"):
                return _error(400, "text: Missing input")
            return Response.json(200, {"data": []})
        if route == "tasks" and request.method == "POST" and request.path.rstrip("/") == f"{API_PREFIX}/tasks":
            try:
                body = request.json() or {}
            except ValueError:
                return _error(400, "Could not parse request data, invalid JSON")
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, dict) or not data.get("workspace"):
                return _error(400, "workspace: Missing input")
            return Response.json(201, {"data": {"gid": secrets.token_hex(6), "name": data.get("name", "")}})
        if route == "tasks" and request.method == "GET":
            return _error(404, "task: Unknown object: " + request.path.rsplit("/", 1)[-1])
        return _error(404, f"No matching route for request {request.method} {request.path}")

    # ------------------------------------------------------------------ control (the web UI, the calendar)
    def _control(self, request: Request) -> Response:
        token = request.bearer()
        if token is None or not secrets.compare_digest(token.encode(), self.state.control_token.encode()):
            return _error(401, "the stand-in's control routes need the control token")
        try:
            body = request.json() or {}
            path = request.path.rstrip("/")
            if path == "/_sandbox/today" and request.method == "POST":
                self.state.today = datetime.fromisoformat(str(body["today"]).replace("Z", "+00:00")).astimezone(timezone.utc)
                return Response.empty(204)
            if path == "/_sandbox/ui/pat" and request.method == "POST":
                cred = self.state.create_pat(str(body["user"]), str(body["name"]))
                return Response.json(201, {"gid": cred.gid, "token": cred.token})
            if path == "/_sandbox/ui/pat/revoke" and request.method == "POST":
                self.state.revoke(str(body["gid"]))
                return Response.empty(204)
            if path == "/_sandbox/stats" and request.method == "GET":
                with self.state.lock:
                    return Response.json(200, dict(self.state.statuses))
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, f"bad control request: {type(exc).__name__}")
        except PersonOnly as exc:
            return _error(400, str(exc))
        return _error(404, f"no control route {request.method} {request.path}")


class AsanaHandle:
    """The stand-in running in a background thread; ``state`` is what a person does in the UI."""

    def __init__(self, server: ServerHandle, state: AsanaState) -> None:
        self._server = server
        self.state = state
        self.url = server.url
        self.control_token = state.control_token

    def set_today(self, when: datetime | str) -> None:
        self.state.today = datetime.fromisoformat(when.replace("Z", "+00:00")) if isinstance(when, str) else when

    def is_live(self, token: str) -> bool:
        cred = self.state.find(token)
        return cred is not None and not cred.revoked

    def stop(self) -> None:
        self._server.stop()


def start_asana_in_thread(*, plan: str = "free", today: datetime | None = None, window_s: float = 60.0,
                          slow: float = 0.0, monotonic: Callable[[], float] | None = None) -> AsanaHandle:
    if plan not in PLAN_LIMITS:
        raise ValueError(f"plan must be one of {', '.join(PLAN_LIMITS)}")
    state = AsanaState(control_token="asana-ctl-" + secrets.token_urlsafe(16), plan=plan, today=today,
                       window_s=window_s, monotonic=monotonic or time.monotonic)
    server = serve_in_thread(AsanaApp(state, slow=slow), name="asana-standin")
    return AsanaHandle(server, state)


def run_asana_forever(*, host: str, port: int, control_token: str, plan: str, today: datetime | None,
                      ready: Callable[[str], None]) -> None:
    """Foreground server for ``keyrotor sandbox asana``; ``ready(url)`` once bound."""
    if plan not in PLAN_LIMITS:
        raise ValueError(f"plan must be one of {', '.join(PLAN_LIMITS)}")
    state = AsanaState(control_token=control_token, plan=plan, today=today)
    serve_until_signalled(AsanaApp(state), host, port, lambda handle: ready(handle.url))


def asana_provider_spec(base_url: str, *, rate_limit: dict[str, Any] | None = None,
                        endpoint_groups: dict[str, Any] | None = None, concurrency: int | None = 50) -> dict[str, Any]:
    """The inventory entry (plain data, as in the YAML) for this stand-in: legacy API key →
    personal access token, assisted, with the documented limits (free plan) unless told otherwise."""
    return {
        "kind": "http",
        "mode": "assisted",
        "base_url": base_url,
        "rate_limit": rate_limit or {"requests": PLAN_LIMITS["free"], "per": "60s"},
        "concurrency": concurrency,
        "endpoint_groups": endpoint_groups if endpoint_groups is not None else {
            "search": {"paths": [f"{API_PREFIX}/workspaces/*/tasks/search"], "rate_limit": {"requests": SEARCH_LIMIT, "per": "60s"}},
            "writes": {"methods": ["POST", "PUT", "PATCH", "DELETE"], "concurrency": CONCURRENCY["write"]},
        },
        "activation": {"poll_interval": "1s", "timeout": "10s"},
        "status_codes": {"invalid": [401], "deprecated": [434]},
        "credential_types": {
            "api_key": {"replacement": "personal_access_token", "deprecation": [
                {"phase": "no_new_credentials", "from": NO_NEW_API_KEYS.isoformat()},
                {"phase": "amnesty", "from": AMNESTY_REQUIRED.isoformat(), "headers": {AMNESTY_HEADER: "true"}},
                {"phase": "rejected", "from": AMNESTY_ENDS.isoformat()},
            ]},
            "personal_access_token": {"create_url": "https://app.asana.com/0/my-apps"},
        },
        "calls": {"verify": {"method": "GET", "url": "{base_url}" + API_PREFIX + "/users/me",
                             "auth": {"type": "bearer", "token": "{secret}"}}},
    }
