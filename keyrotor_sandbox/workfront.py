"""An Adobe Workfront API stand-in (seed 003, "Manage API keys"), speaking real HTTP on loopback.

What the documentation says, and how the stand-in does it:

- Each user has one API key; an administrator's key carries administrator rights.
- ``generateApiKey`` with the user's username and password makes a new key and *resets* the old
  one (it stops working at once: rotation is a cutover). The documented form puts them in the
  query string; the stand-in also takes them in a form-encoded or JSON body, which is where
  keyrotor sends them (a URL is logged by proxies).
- A key can be removed (``clearApiKey``), and all keys of all users removed at once
  (``remove_all_api_keys``, the "Remove all API keys" button).
- Keys expire after a configurable period (default one month); changing the period starts the
  new timeframe from the change. Optionally a key is removed when its user's password expires.
- With an X.509 certificate required, a login (``/login``, and ``generateApiKey`` with username
  and password, which is a login) without ``apiCertificate`` answers 500 "Untrusted request.
  Please contact your system administrator and attach certificate."; with it, 200 + sessionID.

API (``/attask/api/vX.Y/…``, parameters in the query, a form body or a JSON body):
  POST|GET /login                 username, password[, apiCertificate] → {"data": {"sessionID", "userID"}}
  PUT      /user/generateApiKey   username+password[+apiCertificate], or a ``sessionID`` header
                                  → {"data": {"result": "<new key>"}}  (``POST …?method=PUT`` too)
  PUT      /user/getApiKey        same auth → the current key (one is made if the user has none)
  PUT      /user/clearApiKey      same auth → {"data": {"result": true}}; the key stops working
  GET      /session               apiKey (header or query) → {"data": {"userID", "username", "isAdmin"}}
  GET      /user/search           apiKey → the caller (an admin's key: every user)
Errors: {"error": {"class": …, "message": …}}; 401 for a bad key or login, 429 (+ Retry-After)
over the rate limit.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal
from urllib.parse import parse_qs

from keyrotor_sandbox.standin_http import Request, Response, ServerHandle, same_secret, serve_in_thread, window_wait

UNTRUSTED = "Untrusted request. Please contact your system administrator and attach certificate."
DEFAULT_KEY_TTL_S = 30 * 86400.0  # "By default, API Keys expire each month."
_API = re.compile(r"^/attask/api/v\d+(\.\d+)?(?P<rest>/.*)$")


@dataclass
class WorkfrontUser:
    id: str
    username: str
    password: str = field(repr=False)
    admin: bool = False
    password_expires_at: float | None = None
    api_key: str | None = field(default=None, repr=False)
    key_created_at: float | None = None


@dataclass
class WorkfrontState:
    """Everything the stand-in knows; one lock (requests are served concurrently)."""

    clock: Callable[[], float] = time.time
    key_ttl: float | None = DEFAULT_KEY_TTL_S
    #: When the expiry period was last changed: the new timeframe counts from then.
    ttl_changed_at: float = 0.0
    remove_on_password_expiry: bool = False
    certificate: str | None = field(default=None, repr=False)  # None: no certificate required
    rate_limit: tuple[int, float] | None = None
    #: Until when every request is answered 429 (a throttle the vendor imposes for a while).
    throttled_until: float = 0.0
    #: Seconds to hold the next answers of a route *after* acting (an answer the client gives up on).
    slow_answers: dict[str, list[float]] = field(default_factory=dict)
    users: dict[str, WorkfrontUser] = field(default_factory=dict)  # by username
    sessions: dict[str, str] = field(default_factory=dict, repr=False)  # sessionID → username
    #: Every key ever generated (tests search what keyrotor wrote for them).
    issued: list[str] = field(default_factory=list, repr=False)
    requests_seen: deque[float] = field(default_factory=deque)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # ------------------------------------------------------------------ users and keys
    def add_user(self, username: str, password: str, *, admin: bool = False,
                 password_expires_at: float | None = None) -> WorkfrontUser:
        with self.lock:
            user = WorkfrontUser(uuid.uuid4().hex[:16], username, password, admin, password_expires_at)
            self.users[username] = user
            return user

    def generate_key(self, user: WorkfrontUser) -> str:
        """A new key for ``user``; the old one (if any) stops working now (reset)."""
        with self.lock:
            user.api_key = "wf_" + secrets.token_urlsafe(24)
            user.key_created_at = self.clock()
            self.issued.append(user.api_key)
            return user.api_key

    def clear_key(self, user: WorkfrontUser) -> None:
        with self.lock:
            user.api_key, user.key_created_at = None, None

    def remove_all_api_keys(self) -> int:
        """"Remove all API keys": every user's key stops working; returns how many there were."""
        with self.lock:
            had = [u for u in self.users.values() if u.api_key is not None]
            for user in had:
                self.clear_key(user)
            return len(had)

    def set_key_ttl(self, seconds: float | None) -> None:
        """Change the expiry period; existing keys expire that long after the change."""
        with self.lock:
            self.key_ttl = seconds
            self.ttl_changed_at = self.clock()

    def key_expires_at(self, user: WorkfrontUser) -> float | None:
        if user.key_created_at is None or self.key_ttl is None:
            return None
        return max(user.key_created_at, self.ttl_changed_at) + self.key_ttl

    def password_expired(self, user: WorkfrontUser) -> bool:
        return user.password_expires_at is not None and self.clock() >= user.password_expires_at

    def user_for_key(self, api_key: str | None) -> WorkfrontUser | None:
        """The user whose *working* key this is (not reset, removed or expired)."""
        if not api_key:
            return None
        with self.lock:
            user = next((u for u in self.users.values() if u.api_key is not None and same_secret(u.api_key, api_key)), None)
            if user is None:
                return None
            expires = self.key_expires_at(user)
            if expires is not None and self.clock() >= expires:
                return None
            if self.remove_on_password_expiry and self.password_expired(user):
                return None
            return user

    def is_live(self, api_key: str) -> bool:
        return self.user_for_key(api_key) is not None

    # ------------------------------------------------------------------ rate limit and stats
    def take_rate_slot(self) -> float | None:
        throttled = self.throttled_until - self.clock()
        if throttled > 0:
            return throttled
        if self.rate_limit is None:
            return None
        limit, per = self.rate_limit
        with self.lock:
            return window_wait(self.requests_seen, limit, per, self.clock())

    def count(self, route: str, status: int) -> None:
        with self.lock:
            per_route = self.stats.setdefault(route, {})
            per_route[str(status)] = per_route.get(str(status), 0) + 1


def _error(status: int, message: str, cls: str = "com.attask.common.AuthenticationException",
           headers: dict[str, str] | None = None) -> Response:
    return Response.json(status, {"error": {"class": cls, "message": message}}, headers)


def _params(request: Request) -> dict[str, str]:
    """Query parameters, overlaid by a form-encoded or JSON body's fields."""
    params = dict(request.query)
    content_type = request.headers.get("content-type", "")
    if request.body and "application/x-www-form-urlencoded" in content_type:
        params.update({k: v[-1] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()})
    elif request.body and "json" in content_type:
        try:
            body = json.loads(request.body.decode("utf-8"))
        except ValueError:
            body = None
        if isinstance(body, dict):
            params.update({k: str(v) for k, v in body.items() if v is not None})
    return params


class WorkfrontApp:
    """Routes requests against a ``WorkfrontState``."""

    def __init__(self, state: WorkfrontState) -> None:
        self.state = state

    def __call__(self, request: Request) -> Response:
        match = _API.match(request.path.rstrip("/"))
        if match is None:
            return _error(404, f"no route {request.path}", "com.attask.common.NotFoundException")
        rest = match["rest"]
        params = _params(request)
        method = params.get("method", request.method).upper()  # Workfront's method override
        if params.get("action"):  # the documented form: /user?action=generateApiKey&…
            rest = f"{rest}/{params['action']}"
        route, handler = self._route(method, rest)
        if handler is None:
            response = _error(404, f"no route {method} {rest}", "com.attask.common.NotFoundException")
        else:
            wait = self.state.take_rate_slot()
            if wait is not None:
                response = _error(429, "Too many requests; retry later", "com.attask.common.RateLimitException",
                                  {"Retry-After": str(max(1, math.ceil(wait)))})
            else:
                response = handler(request, params)
        self.state.count(route, response.status)
        with self.state.lock:
            pending = self.state.slow_answers.get(route)
            delay = pending.pop(0) if pending else 0.0
        if delay:
            time.sleep(delay)  # the work is done; only the answer is late
        return response

    def _route(self, method: str, rest: str) -> tuple[str, Callable[[Request, dict[str, str]], Response] | None]:
        routes: dict[tuple[str, str], tuple[str, Callable[[Request, dict[str, str]], Response]]] = {
            ("POST", "/login"): ("login", self._login),
            ("GET", "/login"): ("login", self._login),
            ("PUT", "/user/generateApiKey"): ("generate", self._generate),
            ("PUT", "/user/getApiKey"): ("get", self._get),
            ("PUT", "/user/clearApiKey"): ("clear", self._clear),
            ("GET", "/session"): ("session", self._session),
            ("GET", "/user/search"): ("search", self._search),
        }
        found = routes.get((method, rest))
        return (found[0], found[1]) if found else ("unknown", None)

    # --------------------------------------------------------------- authentication
    def _login_user(self, params: dict[str, str]) -> tuple[WorkfrontUser | None, Response | None]:
        """A username+password login (``/login``, or ``generateApiKey`` called with them)."""
        if self.state.certificate is not None:
            given = params.get("apiCertificate")
            if not given or not same_secret(given.strip(), self.state.certificate.strip()):
                return None, _error(500, UNTRUSTED, "com.attask.common.UntrustedRequestException")
        user = self.state.users.get(params.get("username", ""))
        if user is None or not same_secret(params.get("password", ""), user.password):
            return None, _error(401, "Invalid username or password.")
        if self.state.password_expired(user):
            return None, _error(401, "Your password has expired. Please reset your password.")
        return user, None

    def _caller(self, request: Request, params: dict[str, str]) -> tuple[WorkfrontUser | None, Response | None]:
        """A key action's user: by a session (``sessionID`` header or parameter) or by a login."""
        session_id = request.headers.get("sessionid") or params.get("sessionID")
        if session_id:
            with self.state.lock:
                username = next((u for s, u in self.state.sessions.items() if same_secret(s, session_id)), None)
            if username is None:
                return None, _error(401, "You are not currently logged in")
            return self.state.users[username], None
        if "username" in params:
            return self._login_user(params)
        return None, _error(401, "You are not currently logged in")

    def _key_user(self, request: Request, params: dict[str, str]) -> tuple[WorkfrontUser | None, Response | None]:
        user = self.state.user_for_key(request.headers.get("apikey") or params.get("apiKey"))
        if user is None:
            return None, _error(401, "You are not currently logged in")
        return user, None

    # --------------------------------------------------------------- routes
    def _login(self, _request: Request, params: dict[str, str]) -> Response:
        user, failure = self._login_user(params)
        if failure is not None:
            return failure
        assert user is not None
        session_id = secrets.token_hex(16)
        with self.state.lock:
            self.state.sessions[session_id] = user.username
        return Response.json(200, {"data": {"sessionID": session_id, "userID": user.id}})

    def _generate(self, request: Request, params: dict[str, str]) -> Response:
        user, failure = self._caller(request, params)
        if failure is not None:
            return failure
        assert user is not None
        return Response.json(200, {"data": {"result": self.state.generate_key(user)}})

    def _get(self, request: Request, params: dict[str, str]) -> Response:
        user, failure = self._caller(request, params)
        if failure is not None:
            return failure
        assert user is not None
        with self.state.lock:
            key = user.api_key if self.state.is_live(user.api_key or "") else self.state.generate_key(user)
        return Response.json(200, {"data": {"result": key}})

    def _clear(self, request: Request, params: dict[str, str]) -> Response:
        user, failure = self._caller(request, params)
        if failure is not None:
            return failure
        assert user is not None
        self.state.clear_key(user)
        return Response.json(200, {"data": {"result": True}})

    def _session(self, request: Request, params: dict[str, str]) -> Response:
        user, failure = self._key_user(request, params)
        if failure is not None:
            return failure
        assert user is not None
        return Response.json(200, {"data": {"userID": user.id, "username": user.username, "isAdmin": user.admin}})

    def _search(self, request: Request, params: dict[str, str]) -> Response:
        user, failure = self._key_user(request, params)
        if failure is not None:
            return failure
        assert user is not None
        with self.state.lock:
            visible = list(self.state.users.values()) if user.admin else [user]
            data = [{"ID": u.id, "username": u.username, "isAdmin": u.admin} for u in visible]
        return Response.json(200, {"data": data})


class WorkfrontHandle:
    """A Workfront stand-in running in a background thread (tests)."""

    def __init__(self, server: ServerHandle, state: WorkfrontState) -> None:
        self._server = server
        self.state = state
        self.url = server.url
        self.port = server.port

    def add_user(self, username: str, password: str, **kwargs: Any) -> WorkfrontUser:
        return self.state.add_user(username, password, **kwargs)

    def user(self, username: str) -> WorkfrontUser:
        return self.state.users[username]

    def is_live(self, api_key: str) -> bool:
        return self.state.is_live(api_key)

    def require_certificate(self, pem: str | None) -> None:
        """Require (or, with None, stop requiring) this certificate on API logins."""
        with self.state.lock:
            self.state.certificate = pem

    def configure(self, *, rate_limit: tuple[int, float] | None | Literal["keep"] = "keep",
                  key_ttl: float | None | Literal["keep"] = "keep",
                  remove_on_password_expiry: bool | None = None) -> None:
        with self.state.lock:
            if not isinstance(rate_limit, str):  # "keep" is the only string
                self.state.rate_limit = rate_limit
                self.state.requests_seen.clear()
            if not isinstance(key_ttl, str):
                self.state.set_key_ttl(key_ttl)
            if remove_on_password_expiry is not None:
                self.state.remove_on_password_expiry = remove_on_password_expiry

    def throttle(self, seconds: float) -> None:
        """Answer every request 429 (Retry-After: the time left) for the next ``seconds``."""
        with self.state.lock:
            self.state.throttled_until = self.state.clock() + seconds

    def slow_answer(self, route: str, seconds: float) -> None:
        """Hold the next answer of ``route`` (``generate``, ``login``, …) this long, after acting."""
        with self.state.lock:
            self.state.slow_answers.setdefault(route, []).append(seconds)

    def stats(self) -> dict[str, dict[str, int]]:
        with self.state.lock:
            return {route: dict(counts) for route, counts in self.state.stats.items()}

    def stop(self) -> None:
        self._server.stop()


def start_workfront_in_thread(*, host: str = "127.0.0.1", port: int = 0,
                              clock: Callable[[], float] | None = None,
                              key_ttl: float | None = DEFAULT_KEY_TTL_S) -> WorkfrontHandle:
    state = WorkfrontState(clock=clock or time.time, key_ttl=key_ttl)
    return WorkfrontHandle(serve_in_thread(WorkfrontApp(state), host, port, name="sandbox-workfront"), state)


__all__ = ["DEFAULT_KEY_TTL_S", "UNTRUSTED", "WorkfrontApp", "WorkfrontHandle", "WorkfrontState", "WorkfrontUser",
           "start_workfront_in_thread"]
