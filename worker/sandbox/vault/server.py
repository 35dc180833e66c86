"""The HTTP server around ``VaultApp``: a stdlib ThreadingHTTPServer that also accepts Vault's
``LIST`` verb. ``start_in_thread`` serves tests; ``run_forever`` serves the CLI."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from .app import VaultApp

MAX_BODY = 32 * 1024 * 1024  # Vault's default max_request_size


class _Handler(BaseHTTPRequestHandler):
    server_version = "vault-standin"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # One write per response: unbuffered header/body writes meet delayed ACKs on keep-alive
    # connections and cost ~40 ms a request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    app: VaultApp  # set on the subclass built per server

    def _serve(self) -> None:
        split = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(413, b'{"errors":["http: request body too large"]}', {"Content-Type": "application/json"})
            return
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        response = self.app.handle(self.command, split.path, query, headers, body)
        self._send(response.status, response.body, response.headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_LIST = do_HEAD = _serve
    do_OPTIONS = _serve

    def __getattr__(self, name: str) -> Any:
        # Any other verb reaches the app, which answers 405 as Vault does (stdlib would say 501).
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # request lines may carry secret paths; stay quiet like `vault server` without audit


def make_server(host: str, port: int, app: VaultApp) -> ThreadingHTTPServer:
    handler = type("VaultStandinHandler", (_Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


@dataclass
class StandinHandle:
    url: str
    root_token: str = field(repr=False)
    app: VaultApp
    _server: ThreadingHTTPServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # Test helpers: seal/unseal without going through the API.
    def seal(self) -> None:
        with self.app.lock:
            self.app.sealed = True

    def unseal(self) -> None:
        with self.app.lock:
            self.app.sealed = False


def _build_app(root_token: str, k8s_roles: dict[str, dict[str, Any]] | None, k8s_pem_keys: list[str] | None) -> VaultApp:
    if not root_token:
        raise ValueError("root_token must not be empty")
    app = VaultApp(root_token)
    if k8s_roles or k8s_pem_keys:
        app.enable_kubernetes(pem_keys=k8s_pem_keys, roles=k8s_roles)
    return app


def start_in_thread(host: str = "127.0.0.1", port: int = 0, root_token: str = "root", *,
                    k8s_roles: dict[str, dict[str, Any]] | None = None,
                    k8s_pem_keys: list[str] | None = None) -> StandinHandle:
    """Serve on a background thread; ``port=0`` picks a free port (see ``handle.url``)."""
    app = _build_app(root_token, k8s_roles, k8s_pem_keys)
    server = make_server(host, port, app)
    bound_host, bound_port = server.server_address[:2]
    thread = threading.Thread(target=server.serve_forever, name="vault-standin", daemon=True)
    thread.start()
    return StandinHandle(f"http://{bound_host}:{bound_port}", root_token, app, server, thread)


def run_forever(host: str, port: int, root_token: str, *,
                k8s_roles: dict[str, dict[str, Any]] | None = None,
                k8s_pem_keys: list[str] | None = None,
                on_ready: Callable[[str], None] | None = None) -> None:
    """Serve in the foreground until SIGTERM/SIGINT."""
    app = _build_app(root_token, k8s_roles, k8s_pem_keys)
    server = make_server(host, port, app)
    bound_host, bound_port = server.server_address[:2]

    def _stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready is not None:
            on_ready(f"http://{bound_host}:{bound_port}")
        server.serve_forever()
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
