"""The session the Vault client sends through (``worker/vault/transport.DirectSession``): a request goes
on urllib3's pool (``worker/vault/wire.py``) or to requests' transport adapter, carrying what
``requests.Session.request`` would have sent.
A scripted HTTP server in a thread (tests/scripted_http.py) answers and records what it received."""

from __future__ import annotations

import json
from typing import Any, Iterator

import hvac.exceptions
import pytest
import requests

from tests.scripted_http import ScriptedServer
from worker.vault.transport import DirectSession, build_client


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    server = ScriptedServer()

    def general_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("requests.Session.request was called: the Vault call took requests' general path")

    monkeypatch.setattr(requests.Session, "request", general_path)
    yield server
    server.stop()


def test_a_vault_call_goes_straight_to_the_transport_with_what_requests_would_send(vault: ScriptedServer) -> None:
    vault.answers.append((200, {}, {"data": {"version": 3}}))
    client = build_client(vault.url, token="hvs.test-token")
    assert isinstance(client.session, DirectSession)
    answer = client.secrets.kv.v2.create_or_update_secret(path="apps/x", secret={"api_key": "v"}, mount_point="kv")
    assert answer == {"data": {"version": 3}}
    [(method, path, headers, body)] = vault.received
    assert (method, path) == ("POST", "/v1/kv/data/apps/x")
    assert headers["X-Vault-Token"] == "hvs.test-token" and headers["X-Vault-Request"] == "true"
    assert headers["User-Agent"].startswith("python-requests/")  # the session's default headers
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"data": {"api_key": "v"}, "options": {}}


def test_a_redirect_to_the_active_node_is_followed_with_the_same_method_and_body(vault: ScriptedServer) -> None:
    """A standby Vault answers 307 with the active node's address; the call follows it as
    ``Session.request`` would, POST body included."""
    vault.answers += [(307, {"Location": f"{vault.url}/active/v1/kv/data/apps/x"}, {}), (200, {}, {"data": {"version": 4}})]
    client = build_client(vault.url, token="hvs.test-token")
    assert client.secrets.kv.v2.create_or_update_secret(path="apps/x", secret={"api_key": "v"},
                                                        mount_point="kv") == {"data": {"version": 4}}
    (_, _, _, first_body), (method, path, headers, body) = vault.received
    assert (method, path) == ("POST", "/active/v1/kv/data/apps/x")
    assert body == first_body and headers["X-Vault-Token"] == "hvs.test-token"


def test_query_parameters_cookies_and_errors_keep_their_meaning(vault: ScriptedServer) -> None:
    vault.answers += [
        (200, {"Set-Cookie": "affinity=node-2; Path=/"}, {"data": {"data": {}, "metadata": {"version": 2}}}),
        (503, {"Retry-After": "7"}, {"errors": ["Vault is sealed"]}),
    ]
    client = build_client(vault.url, token="hvs.test-token")
    client.secrets.kv.v2.read_secret_version(path="apps/x", mount_point="kv", version=2, raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.VaultDown) as raised:
        client.secrets.kv.v2.read_secret_version(path="apps/x", mount_point="kv", raise_on_deleted_version=True)
    (_, first_path, _, _), (_, _, headers, _) = vault.received
    assert first_path == "/v1/kv/data/apps/x?version=2"
    assert headers.get("Cookie") == "affinity=node-2"  # a load balancer's affinity cookie is sent back
    assert raised.value.keyrotor_status == 503 and raised.value.keyrotor_retry_after == 7.0  # type: ignore[attr-defined]


def test_a_refused_connection_is_still_requests_connection_error(vault: ScriptedServer) -> None:
    """worker/vault/errors.py reads requests' exceptions (refused: not sent; read timeout: unknown)."""
    url = vault.url
    vault.server.shutdown()
    vault.server.server_close()
    with pytest.raises(requests.exceptions.ConnectionError):
        build_client(url, token="t", timeout=2).secrets.kv.v2.read_secret_version(path="x", mount_point="kv",
                                                                             raise_on_deleted_version=True)


def test_a_session_that_reads_its_environment_takes_requests_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    def general_path(self: requests.Session, method: str, url: str, **kwargs: Any) -> Any:
        called.append(method)
        return "general"

    monkeypatch.setattr(requests.Session, "request", general_path)
    session = DirectSession()
    assert session.trust_env is True
    assert session.request("GET", "http://vault.example:8200/v1/sys/health", timeout=1) == "general"
    assert called == ["GET"]


def test_a_vault_call_goes_on_urllib3s_pool_not_through_requests_adapter(vault: ScriptedServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """hvac's requests are sent by ``worker/vault/wire.py``: requests' adapter is not called, and the
    answer is requests' ``Response`` hvac reads (status, JSON, headers for Retry-After)."""
    def adapter_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("requests' HTTPAdapter.send was called")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", adapter_path)
    vault.answers += [(200, {}, {"data": {"data": {"api_key": "v"}, "metadata": {"version": 5}}}),
                      (429, {"Retry-After": "3"}, {"errors": ["rate limited"]})]
    client = build_client(vault.url, token="hvs.test-token")
    read = client.secrets.kv.v2.read_secret_version(path="apps/x", mount_point="kv", version=5,
                                                    raise_on_deleted_version=True)
    assert read["data"]["metadata"]["version"] == 5
    with pytest.raises(hvac.exceptions.VaultError) as raised:
        client.secrets.kv.v2.delete_metadata_and_all_versions(path="apps/x", mount_point="kv")
    assert raised.value.keyrotor_status == 429 and raised.value.keyrotor_retry_after == 3.0  # type: ignore[attr-defined]
    (_, path, _, _), (method, _, headers, body) = vault.received
    assert path == "/v1/kv/data/apps/x?version=5"
    assert (method, headers["Content-Length"], body) == ("DELETE", "0", b"")  # as requests sends a body-less DELETE


def test_an_answer_that_never_comes_is_requests_read_timeout() -> None:
    """A read timeout is ``requests.exceptions.Timeout`` (the write's outcome is unknown: the store
    reads back before it tries again), as through requests' adapter."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        client = build_client(f"http://127.0.0.1:{listener.getsockname()[1]}", token="t", timeout=0.3)
        with pytest.raises(requests.exceptions.ReadTimeout):
            client.secrets.kv.v2.read_secret_version(path="x", mount_point="kv", raise_on_deleted_version=True)
    finally:
        listener.close()


def test_a_mounted_adapter_or_a_proxy_takes_requests_adapter(vault: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport adapter mounted in place of requests' own (a test's fault injector) and a proxy
    from the environment are requests' to use: those requests go through the adapter."""
    sent: list[str] = []

    class Recording(requests.adapters.HTTPAdapter):
        def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
            sent.append(request.url or "")
            return super().send(request, *args, **kwargs)

    vault.answers += [(200, {}, {"data": {"version": 1}}), (200, {}, {"data": {"version": 2}})]
    mounted = DirectSession()
    mounted.trust_env = False
    mounted.mount("http://", Recording())
    client = build_client(vault.url, token="t", session=mounted)
    client.secrets.kv.v2.create_or_update_secret(path="apps/x", secret={"k": "v"}, mount_point="kv")
    assert sent == [f"{vault.url}/v1/kv/data/apps/x"]

    from worker.vault import wire

    def wire_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request with a proxy configured went on urllib3's pool directly")

    monkeypatch.setattr(wire, "send", wire_path)
    proxied = DirectSession()
    proxied.trust_env = False
    proxied.proxies = {"https": "http://proxy.invalid:3128"}  # not this URL's scheme: requests sends it directly
    build_client(vault.url, token="t", session=proxied).secrets.kv.v2.create_or_update_secret(
        path="apps/y", secret={"k": "v"}, mount_point="kv")
    assert [path for _, path, _, _ in vault.received] == ["/v1/kv/data/apps/x", "/v1/kv/data/apps/y"]
