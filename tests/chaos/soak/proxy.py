"""A fault-injecting HTTP proxy on loopback, put in front of Vault and the provider stand-in.

Every request keyrotor's processes make to either goes through it; a fraction ``rate`` of them
meets one fault drawn from ``kinds``:

- ``503``: Service Unavailable, the request never reaches the upstream.
- ``5xx``: 500, 502 or 504, never forwarded.
- ``429``: Too Many Requests with ``Retry-After: 1``, never forwarded.
- ``garbage``: forwarded (it takes effect), then answered 200 with a body that is not JSON.
- ``hang``: held without an answer past the client's timeout, then the connection is closed;
  never forwarded.
- ``late_answer``: forwarded, the answer sent ``late_s`` later (within the client's timeout).
- ``late_write``: a write (POST/PUT/PATCH/DELETE) held past the client's timeout and only then
  forwarded: it lands after the client gave up (an unknown outcome). A read meets ``hang``.

The prober and the checker talk to Vault and to the stand-in directly, never through here.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import urlparse

FAULT_KINDS = ("503", "5xx", "429", "garbage", "hang", "late_answer", "late_write")
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"})


@dataclass
class FaultPlan:
    """What the proxy injects: ``rate`` of the requests (0 turns it off) meet one of ``kinds``."""

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    hang_s: float = 4.5        # longer than the clients' timeouts (3 s in the chaos run)
    late_s: float = 1.5        # shorter than them
    exempt: Callable[[str, str], bool] = lambda method, path: False
    rng: random.Random = field(default_factory=random.Random)


class FaultProxy:
    """``FaultProxy(name, upstream_url, plan)``: serves on ``.url`` until ``.stop()``."""

    def __init__(self, name: str, upstream: str, plan: FaultPlan) -> None:
        parsed = urlparse(upstream)
        self.name, self.plan = name, plan
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"proxy-{name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ decisions
    def _choose(self, method: str, path: str) -> Optional[str]:
        plan = self.plan
        with self.lock:
            self.requests += 1
            if plan.rate <= 0 or plan.exempt(method, path) or plan.rng.random() >= plan.rate:
                return None
            kind = plan.rng.choice(plan.kinds)
            if kind == "late_write" and method not in WRITES:
                kind = "hang"
            self.injected[kind] += 1
            return kind

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes,
                timeout: float = 30.0) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=timeout)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"   # one request per connection: no pooled state to corrupt

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                method, path = self.command, self.path
                kind = proxy._choose(method, path)
                json_type = [("Content-Type", "application/json")]
                try:
                    if kind == "503":
                        self._send(503, json_type, b'{"errors": ["injected 503"]}')
                    elif kind == "5xx":
                        status = proxy.plan.rng.choice((500, 502, 504))
                        self._send(status, json_type, b'{"errors": ["injected"]}')
                    elif kind == "429":
                        self._send(429, json_type + [("Retry-After", "1")], b'{"errors": ["injected 429"]}')
                    elif kind == "hang":
                        time.sleep(proxy.plan.hang_s)
                        self.close_connection = True
                    elif kind == "late_write":
                        time.sleep(proxy.plan.hang_s)     # the client has given up by now
                        proxy.forward(method, path, headers, body)
                        self.close_connection = True
                    elif kind == "garbage":
                        proxy.forward(method, path, headers, body)
                        self._send(200, json_type, b"<html>\x00not json at all")
                    else:
                        status, answer_headers, answer = proxy.forward(method, path, headers, body)
                        if kind == "late_answer":
                            time.sleep(proxy.plan.late_s)
                        self._send(status, answer_headers, answer)
                except (OSError, http.client.HTTPException):
                    self.close_connection = True   # upstream or client went away: the client sees a reset

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_LIST = _serve

        return Handler
