"""The client of a provider's calls (``worker/providers/client.ProviderClient``): a request goes straight
to httpx's transport and comes back as httpx's ``send`` would return it, without a cookie jar. A
scripted HTTP server in a thread (tests/scripted_http.py) answers and records what it received."""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest

from tests.scripted_http import ScriptedServer
from worker.providers.client import ProviderClient


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    def general_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("httpx.Client.send was called: the request took httpx's general path")

    server = ScriptedServer()
    monkeypatch.setattr(httpx.Client, "send", general_path)
    yield server
    server.stop()


def test_a_request_goes_to_the_transport_and_its_answer_is_read(api: ScriptedServer) -> None:
    api.answers.append((201, {"Content-Type": "application/json", "X-Request-Id": "r1"}, b'{"id": "k1"}', 0))
    with ProviderClient(follow_redirects=False, timeout=5) as client:
        request = client.build_request("POST", f"{api.url}/api/api-key?x=1", headers={"Authorization": "Bearer k"},
                                       content=b'{"name": "n"}')
        response = client.send(request)
    assert (response.status_code, response.json(), response.headers["X-Request-Id"]) == (201, {"id": "k1"}, "r1")
    assert response.request is request and response.is_closed
    [(method, target, headers, body)] = api.received
    assert (method, target, body) == ("POST", "/api/api-key?x=1", b'{"name": "n"}')
    assert headers["Authorization"] == "Bearer k" and headers["User-Agent"].startswith("python-httpx/")


def test_a_cookie_one_answer_sets_is_not_sent_with_the_next_request(api: ScriptedServer) -> None:
    """One client calls the provider with every key's credentials: nothing of one answer rides on
    another key's request (httpx's own client would keep the cookie and send it)."""
    api.answers += [(200, {"Set-Cookie": "session=from-key-a; Path=/"}, b"{}", 0), (200, {}, b"{}", 0)]
    with ProviderClient(follow_redirects=False, timeout=5) as client:
        client.send(client.build_request("GET", f"{api.url}/api/user/me", headers={"Authorization": "Bearer a"}))
        client.send(client.build_request("GET", f"{api.url}/api/user/me", headers={"Authorization": "Bearer b"}))
        assert not client.cookies
    assert "Cookie" not in api.received[1][2]


def test_a_redirect_is_returned_not_followed(api: ScriptedServer) -> None:
    api.answers.append((302, {"Location": f"{api.url}/elsewhere"}, b"", 0))
    with ProviderClient(follow_redirects=False, timeout=5) as client:
        response = client.send(client.build_request("GET", f"{api.url}/api/user/me"))
    assert (response.status_code, response.headers["Location"]) == (302, f"{api.url}/elsewhere")
    assert len(api.received) == 1


def test_the_clients_timeout_holds_and_raises_httpxs_timeout(api: ScriptedServer) -> None:
    api.answers.append((200, {}, b"{}", 1.0))
    with ProviderClient(follow_redirects=False, timeout=0.2) as client:
        request = httpx.Request("GET", f"{api.url}/slow")  # built without the client: its timeout applies
        with pytest.raises(httpx.ReadTimeout):
            client.send(request)


def test_a_refused_connection_is_httpxs_connect_error() -> None:
    with ProviderClient(follow_redirects=False, timeout=2) as client:
        with pytest.raises(httpx.ConnectError):
            client.send(client.build_request("GET", "http://127.0.0.1:9/"))  # discard port: nobody listens


def test_the_proxy_the_environment_names_is_used(api: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY routes the request through the proxy (the client's mounts), as httpx's send would."""
    monkeypatch.setenv("HTTP_PROXY", api.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    api.answers.append((200, {}, b"{}", 0))
    with ProviderClient(follow_redirects=False, timeout=5) as client:
        assert client.send(client.build_request("GET", "http://provider.invalid/api/user/me")).status_code == 200
    [(method, target, headers, _body)] = api.received
    assert (method, target, headers["Host"]) == ("GET", "http://provider.invalid/api/user/me", "provider.invalid")


def test_a_closed_client_sends_nothing(api: ScriptedServer) -> None:
    client = ProviderClient(follow_redirects=False, timeout=5)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.send(httpx.Request("GET", f"{api.url}/x"))
    assert api.received == []


def test_a_client_with_auth_or_hooks_takes_httpxs_path(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[str] = []
    monkeypatch.setattr(httpx.Client, "send", lambda self, request, **kw: taken.append(str(request.url)))
    with ProviderClient(auth=("u", "p")) as with_auth, \
            ProviderClient(event_hooks={"request": [lambda r: None]}) as with_hooks:
        with_auth.send(httpx.Request("GET", "http://a.invalid/"))
        with_hooks.send(httpx.Request("GET", "http://b.invalid/"))
    assert taken == ["http://a.invalid/", "http://b.invalid/"]
