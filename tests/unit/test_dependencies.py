"""Dependencies: the lock files pin (with hashes) a set that satisfies pyproject.toml, `make
install` takes that set, the runtime set holds only what the service imports, and the package's
license is an SPDX expression. (That the declared *minimums* work is `make test-lowest`.)"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
TEST_LOCK = ROOT / "requirements" / "test.txt"
#: Imported only by the tests and the stand-ins: never in the runtime set. (cryptography and PyJWT
#: joined the runtime set with the OAuth private-key JWT provider.)
STANDIN_ONLY: dict[str, str] = {}


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) from a `uv pip compile --generate-hashes` file."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            current = canonicalize_name(match.group(1))
            pins[current] = (match.group(2), 0)
        elif current and "--hash=sha256:" in line:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def declared(extra: str | None = None) -> list[Requirement]:
    deps = PYPROJECT["project"]["dependencies"] if extra is None else PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(d) for d in deps]


@pytest.mark.parametrize(("lock", "extras"), [(RUNTIME_LOCK, []), (TEST_LOCK, ["test"])])
def test_the_lock_pins_every_declared_dependency_within_its_range_with_hashes(lock: Path, extras: list[str]) -> None:
    assert lock.exists(), f"{lock.relative_to(ROOT)} is missing: run `make lock`"
    pins = locked(lock)
    assert pins and all(hashes > 0 for _, hashes in pins.values()), "every pin needs its hashes (make lock)"
    wanted = declared() + [r for extra in extras for r in declared(extra)]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not locked: run `make lock`"
        version, _ = pins[name]
        assert req.specifier.contains(version, prereleases=True), \
            f"{req.name}=={version} in {lock.name} is outside {req.specifier}: run `make lock`"


def test_the_runtime_set_holds_no_standin_only_package() -> None:
    # Nothing the service runs imports them: only the Vault stand-in and the tests do.
    for path in list((ROOT / "worker").rglob("*.py")) + list((ROOT / "jobs").rglob("*.py")):
        if "sandbox" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in STANDIN_ONLY, f"{path.relative_to(ROOT)} imports {name}"
    runtime = {canonicalize_name(r.name) for r in declared()}
    assert not runtime & set(STANDIN_ONLY.values())
    assert not set(locked(RUNTIME_LOCK)) & set(STANDIN_ONLY.values())
    assert set(STANDIN_ONLY.values()) <= set(locked(TEST_LOCK))


def test_the_oauth_provider_s_jose_and_key_libraries_are_runtime_dependencies() -> None:
    runtime = {canonicalize_name(r.name): r for r in declared()}
    assert "crypto" in runtime["pyjwt"].extras and "cryptography" in runtime
    assert {"pyjwt", "cryptography"} <= set(locked(RUNTIME_LOCK))


def test_license_is_an_spdx_expression_the_build_backend_understands() -> None:
    # The table form ({text = ...}) is deprecated and printed a warning block on every install.
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    backend = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    setuptools = next(r for r in backend if r.name == "setuptools")
    assert not setuptools.specifier.contains("76.9"), "SPDX license expressions need setuptools >= 77"


def test_make_install_takes_the_locked_set_and_then_only_the_project() -> None:
    dry = subprocess.run(["make", "-n", "-B", "install", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    installs = [line for line in dry.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs[0].split()[-3:] == ["--require-hashes", "-r", "requirements/test.txt"], installs
    assert "--no-deps" in installs[1].split() and installs[1].split()[-2:] == ["-e", "."], installs
    assert len(installs) == 2, installs
