"""The chaos tests share the end-to-end world (stand-ins over HTTP, workers as subprocesses)."""

from tests.e2e.conftest import make_world  # noqa: F401  (re-exported fixture)
