"""The HTTP glue shared by the provider and consumer stand-ins: a threaded stdlib server on
loopback, a tiny request/response shape, and a handle to run it in a background thread.

The stand-ins speak real HTTP so the real clients (httpx, hvac) are exercised end to end.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not JSON."""
        if not self.body:
            return None
        return json.loads(self.body.decode("utf-8"))

    def bearer(self) -> str | None:
        value = self.headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> "Response":
        return cls(status, json.dumps(payload).encode("utf-8"), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def empty(cls, status: int = 204) -> "Response":
        return cls(status)


Handler = Callable[[Request], Response]


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison that also copes with non-ASCII tokens (``compare_digest`` raises
    TypeError on such ``str``s: a garbage header would have been a 500 instead of a 401)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def window_wait(seen: deque[float], limit: int, per: float, now: float) -> float | None:
    """A sliding-window rate limit over the times in ``seen``: None (and ``now`` recorded) when a
    request may proceed, else the seconds until a slot frees (the Retry-After). Callers hold
    their lock."""
    while seen and seen[0] <= now - per:
        seen.popleft()
    if len(seen) >= limit:
        return max(0.0, seen[0] + per - now)
    seen.append(now)
    return None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128   # many clients connecting at once are queued, not reset

    def handle_error(self, request: Any, client_address: Any) -> None:  # client hung up mid-answer
        pass


def _handler_class(app: Handler) -> type[BaseHTTPRequestHandler]:
    class _H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes; no 40 ms stalls

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # stand-ins never print request lines (they can carry keys in query strings)

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            request = Request(
                method=self.command,
                path=parts.path,
                query=query,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            try:
                response = app(request)
            except Exception as exc:  # a stand-in bug must answer 500, not hang the client
                response = Response.json(500, {"error": f"stand-in failure: {type(exc).__name__}"})
            try:
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                if response.body and self.command != "HEAD":
                    self.wfile.write(response.body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    return _H


class ServerHandle:
    """A running stand-in server; ``stop()`` shuts it down and frees the port."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread | None) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.host = str(host)
        self.port = int(port)
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def make_server(app: Handler, host: str, port: int) -> ThreadingHTTPServer:
    return _QuietServer((host, port), _handler_class(app))


def serve_in_thread(app: Handler, host: str = "127.0.0.1", port: int = 0, name: str = "standin") -> ServerHandle:
    server = make_server(app, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
    thread.start()
    return ServerHandle(server, thread)


def serve_until_signalled(app: Handler, host: str, port: int, ready: Callable[[ServerHandle], None]) -> None:
    """Serve in the foreground until SIGTERM/SIGINT; ``ready`` is called once the port is bound."""
    import signal

    server = make_server(app, host, port)
    handle = ServerHandle(server, None)
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    ready(handle)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        server.server_close()
