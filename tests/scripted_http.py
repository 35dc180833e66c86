"""A small HTTP server in a thread that answers from a script and records what it received (the
unit tests of the HTTP clients: worker/providers/client.py, worker/vault/transport.py)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedServer:
    """Answers each request with the next of ``answers``: ``(status, headers, body)`` or
    ``(status, headers, body, delay_s)``; a body that is not bytes is sent as JSON (with that
    ``Content-Type`` unless the headers name one). Keeps ``(method, target, headers, body)`` of
    each request in ``received``. HTTP/1.1, so a client keeps its connection."""

    def __init__(self) -> None:
        self.answers: list[tuple[Any, ...]] = []
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.received.append((self.command, self.path, dict(self.headers), self.rfile.read(length)))
                status, headers, body, *delay = outer.answers.pop(0)
                if not isinstance(body, bytes):
                    body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
                time.sleep(delay[0] if delay else 0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
