"""``keyrotor sandbox vault`` as a process: one ready line on stdout, serves hvac, stops on SIGTERM."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys

import hvac
import pytest

from worker.cli.sandbox_cmd import parse_k8s_role
from worker.errors import ConfigError

pytestmark = pytest.mark.integration


def _first_line(proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        proc.kill()
        pytest.fail(f"no ready line within {timeout}s; stderr: {proc.stderr.read() if proc.stderr else ''}")
    return proc.stdout.readline().strip()


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli.main", "sandbox", "vault", "--port", "0", "--root-token", "cli-root",
         "--k8s-role", "kr:keyrotor-worker,other:keyrotor:p1,p2:15m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _first_line(proc)
        assert line.startswith("vault stand-in listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        client = hvac.Client(url=url, token="cli-root")
        assert client.sys.read_health_status(method="GET")["initialized"] is True
        role = client.auth.kubernetes.read_role("kr")
        assert role["bound_service_account_names"] == ["keyrotor-worker", "other"]
        assert role["token_policies"] == ["p1", "p2"] and role["token_ttl"] == 900
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None and proc.stdout.read() == ""  # exactly one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parse_k8s_role() -> None:
    assert parse_k8s_role("kr:a,b:ns:p") == ("kr", {"bound_service_account_names": "a,b",
                                                    "bound_service_account_namespaces": "ns", "token_policies": "p"})
    assert parse_k8s_role("kr:*:ns:p:1h")[1]["token_ttl"] == "1h"
    for bad in ("kr", "kr:a:ns", ":a:ns:p", "kr:a:ns:p:1h:extra"):
        with pytest.raises(ConfigError):
            parse_k8s_role(bad)


def test_cli_rejects_malformed_role() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli.main", "sandbox", "vault", "--port", "0", "--root-token", "x", "--k8s-role", "oops"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "NAME:SA_NAMES:NAMESPACES:POLICIES" in result.stderr and result.stdout == ""
