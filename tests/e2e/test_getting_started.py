"""docs/getting-started.md, run as a newcomer would: every ```sh block, in order, in one shell,
in a fresh copy of the repository (tracked files only: no .venv, no database), with the ports and
paths the guide reads from its own variables (KR_*, KEYROTOR_*) pointed at free ports and a
temporary directory. The guide cannot rot: a command that fails fails this test.

Services: the real Redis (a namespace of this test's own); the guide starts its own OpenBao dev
server, provider and consumer stand-ins, worker and scheduler. There is no Kubernetes cluster or
helm binary here: `helm` is the Helm library behind a small script (tests/e2e/helm_template.py),
and the rendered manifests are checked, not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GUIDE = REPO / "docs" / "getting-started.md"
TIMEOUT_S = 1500


def guide_script() -> str:
    blocks = re.findall(r"^```sh\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, "docs/getting-started.md has no ```sh blocks"
    return "set -euo pipefail\n" + "\n".join(blocks)


def fresh_copy(target: Path) -> None:
    """What `git clone` gives: the tracked files (plus files not committed yet, so the test sees
    the working tree under development), never .venv or local state."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_getting_started_guide_runs_end_to_end(tmp_path: Path, redis_url: str, redis_namespace: str) -> None:
    if shutil.which("curl") is None or shutil.which("redis-cli") is None:
        pytest.skip("the guide needs curl and redis-cli")
    clone, home, tools = tmp_path / "keyrotor", tmp_path / "home", tmp_path / "tools"
    clone.mkdir()
    tools.mkdir()
    fresh_copy(clone)
    if shutil.which("helm") is None:
        shim = tools / "helm"
        shim.write_text(f"#!/bin/sh\nexec \"{clone}/.venv/bin/python\" \"{REPO}/tests/e2e/helm_template.py\" \"$@\"\n")
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYROTOR_", "VAULT_", "BAO_", "KR_", "PYTEST_"))}
    env.pop("VIRTUAL_ENV", None)
    env.update({
        "PATH": f"{tools}:{env.get('PATH', '')}".replace(str(Path(sys.executable).parent) + ":", ""),
        "KR_HOME": str(home), "KR_VAULT_PORT": str(free_port()), "KR_PROVIDER_PORT": str(free_port()),
        "KR_CONSUMER_PORT": str(free_port()), "KR_WORKER_METRICS_PORT": str(free_port()),
        "KR_SCHEDULER_METRICS_PORT": str(free_port()),
        "KEYROTOR_REDIS_URL": redis_url, "KEYROTOR_QUEUE_NAMESPACE": redis_namespace,
    })
    script = tmp_path / "guide.sh"
    script.write_text(guide_script())
    started = time.monotonic()
    proc = subprocess.Popen(["bash", str(script)], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the guide did not finish within {TIMEOUT_S}s:\n{out[-4000:]}\n{_logs(home)}")
    finally:
        for pid_file in home.glob("*.pid"):  # the guide's own clean-up did not run if a step failed
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    elapsed = time.monotonic() - started
    print(f"getting-started guide: {elapsed:.0f}s end to end")
    assert proc.returncode == 0, f"the guide failed (exit {proc.returncode}):\n{out[-6000:]}\n{_logs(home)}"

    # What the guide promises: the key was adopted, rotated, and the hand-made key revoked.
    assert "adopted credential" in out and "alloy/reporting" in out
    assert "done: alloy/reporting completed" in out, out[-3000:]
    assert "the hand-made key now gets HTTP 401" in out, out[-3000:]
    manifests = [d for d in yaml.safe_load_all((home / "keyrotor.yaml").read_text()) if d]
    kinds = {d["kind"] for d in manifests}
    assert {"Deployment", "ConfigMap", "Job"} <= kinds, kinds
    inventory = next(d for d in manifests if d["kind"] == "ConfigMap" and "inventory.yaml" in d.get("data", {}))
    assert "alloy/reporting" in inventory["data"]["inventory.yaml"]


def _logs(home: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(home.glob("*.log")))
