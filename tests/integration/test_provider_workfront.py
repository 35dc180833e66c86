"""The generic HTTP provider, driven by the Workfront entry of config/keyrotor.example.yaml as it is
shipped (only its base_url pointed at the stand-in), against the Workfront stand-in over real HTTP:
a login whose session feeds generateApiKey, secrets from references in a form body (never in a
URL or a log line), error matchers, and calls overridden per credential type."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from worker.errors import ConfigError, InvalidCredential, PermanentError, RateLimited
from worker.inventory.schema import HttpProviderSpec
from worker.providers.base import CheckOutcome
from worker.providers.http import HttpProvider
from worker.providers.ratelimit import InMemoryRateLimiter
from keyrotor_sandbox.standin_http import Response, serve_in_thread
from keyrotor_sandbox.workfront import UNTRUSTED, WorkfrontHandle, start_workfront_in_thread
from worker.secret import Secret
from worker.secret_refs import SecretRef

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
USER, PASSWORD = "docs-sync@example.com", "Tr0ub4dor&3-docs-sync"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBstandin0123456789\n-----END CERTIFICATE-----"
LABELS = {"workfront_user": USER}


def example_spec(base_url: str) -> dict[str, Any]:
    data = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["providers"]["workfront"])
    data["base_url"] = base_url
    return data  # type: ignore[no-any-return]


class Vaultish:
    """The values the example's references name (a resolver as the worker builds it, minus Vault)."""

    def __init__(self) -> None:
        self.values = {
            f"secret/keyrotor/workfront/users/{USER}#password": PASSWORD,
            "secret/keyrotor/providers/workfront#api_certificate": CERT,
        }
        self.read: list[str] = []

    def __call__(self, ref: SecretRef) -> Secret:
        self.read.append(ref.describe())
        if ref.vault not in self.values:
            raise ConfigError(f"secret reference {ref.describe()}: no such field")
        return Secret(self.values[ref.vault])


class Sent:
    """Every request the provider sent (method, full URL, body), via an httpx event hook."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []

    def hook(self, request: httpx.Request) -> None:
        request.read()
        self.requests.append((request.method, str(request.url), request.content))


@pytest.fixture
def wf() -> Iterator[WorkfrontHandle]:
    handle = start_workfront_in_thread()
    handle.add_user(USER, PASSWORD)
    handle.require_certificate(CERT)
    try:
        yield handle
    finally:
        handle.stop()


def make(base_url: str, *, resolve: Any = None, sent: Sent | None = None, attempts: int = 3,
         spec: dict[str, Any] | None = None, limiter: Any = None) -> HttpProvider:
    client = httpx.Client(event_hooks={"request": [sent.hook]} if sent else {}, timeout=5)
    return HttpProvider("workfront", HttpProviderSpec.model_validate(spec or example_spec(base_url)),
                        resolve=resolve or Vaultish(), limiter=limiter or InMemoryRateLimiter(max_wait=0), http=client,
                        attempts=attempts, sleep=lambda _s: None)


def test_issue_logs_in_and_generates_the_key_with_the_session(wf: WorkfrontHandle) -> None:
    sent = Sent()
    provider = make(wf.url, sent=sent)
    first = provider.issue(name="keyrotor-r1", credential_type="user_api_key", labels=LABELS)
    assert wf.is_live(first.secret.reveal()) and first.expires_at is None  # Workfront's answer has no expiry
    second = provider.issue(name="keyrotor-r2", credential_type="user_api_key", labels=LABELS)
    assert not wf.is_live(first.secret.reveal()) and wf.is_live(second.secret.reveal())  # reset: cutover
    assert provider.check(second.secret, credential_type="user_api_key") is CheckOutcome.valid
    assert provider.check(first.secret, credential_type="user_api_key") is CheckOutcome.invalid
    login, generate = sent.requests[0], sent.requests[1]
    assert login[0] == "POST" and login[1].endswith("/attask/api/v15.0/login")
    form = dict(httpx.QueryParams(login[2].decode()))
    assert form == {"username": USER, "password": PASSWORD, "apiCertificate": CERT}
    assert generate[0] == "PUT" and generate[1].endswith("/user/generateApiKey") and not generate[2]
    for _method, url, _body in sent.requests:  # the password and certificate never in a URL
        assert PASSWORD not in url and "apiCertificate" not in url and "password" not in url
    assert wf.stats()["login"] == {"200": 2} and wf.stats()["generate"] == {"200": 2}


def test_missing_certificate_is_a_configuration_error_with_workfronts_message_not_retried(wf: WorkfrontHandle) -> None:
    resolve = Vaultish()
    resolve.values["secret/keyrotor/providers/workfront#api_certificate"] = "-----BEGIN CERTIFICATE-----\nOTHER\n-----END CERTIFICATE-----"
    provider = make(wf.url, resolve=resolve, attempts=3)
    with pytest.raises(ConfigError) as caught:
        provider.issue(name="keyrotor-r1", credential_type="user_api_key", labels=LABELS)
    text = str(caught.value)
    assert UNTRUSTED in text and "answered 500" in text and "api_certificate" in text  # vendor's words + the hint
    assert PASSWORD not in text and "OTHER" not in text
    assert wf.stats() == {"login": {"500": 1}}  # one request: a configuration error is not retried


def test_wrong_or_expired_password_is_a_configuration_error(wf: WorkfrontHandle) -> None:
    resolve = Vaultish()
    resolve.values[f"secret/keyrotor/workfront/users/{USER}#password"] = "stale-password-1"
    with pytest.raises(ConfigError, match="Invalid username or password"):
        make(wf.url, resolve=resolve).issue(name="keyrotor-r1", credential_type="user_api_key", labels=LABELS)


def test_the_password_path_follows_the_keys_label(wf: WorkfrontHandle) -> None:
    resolve = Vaultish()
    with pytest.raises((ConfigError, PermanentError), match="users/someone-else@example.com#password"):
        make(wf.url, resolve=resolve).issue(name="keyrotor-r1", credential_type="user_api_key",
                                            labels={"workfront_user": "someone-else@example.com"})


def test_no_secret_reaches_logs_or_errors(wf: WorkfrontHandle) -> None:
    from worker.log import configure_logging

    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    try:
        provider = make(wf.url)
        issued = provider.issue(name="keyrotor-r1", credential_type="user_api_key", labels=LABELS)
        provider.check(issued.secret, credential_type="user_api_key")
        wf.require_certificate("-----BEGIN CERTIFICATE-----\nROTATED\n-----END CERTIFICATE-----")
        with pytest.raises(ConfigError) as caught:
            provider.issue(name="keyrotor-r2", credential_type="user_api_key", labels=LABELS)
    finally:
        configure_logging("INFO", "json")
    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any(line.get("event") == "provider_request" and line.get("call") == "issue/login" for line in lines)
    assert any(line.get("event") == "provider_answer_matched" and line.get("outcome") == "configuration" for line in lines)
    sessions = list(wf.state.sessions)
    for value in (issued.secret.reveal(), PASSWORD, CERT, "MIIBstandin", *sessions):
        assert value not in output and value not in str(caught.value)


def test_rate_limit_blocks_every_caller_after_one_429(wf: WorkfrontHandle) -> None:
    wf.configure(rate_limit=(1, 60.0))
    limiter = InMemoryRateLimiter(max_wait=0)
    provider = make(wf.url, limiter=limiter, attempts=1)
    provider.check(Secret("wf_unknown"), credential_type="user_api_key")  # takes the only slot
    with pytest.raises(RateLimited) as caught:
        provider.check(Secret("wf_unknown"), credential_type="user_api_key")
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1
    with pytest.raises(RateLimited):  # refused before it is sent: the block is shared
        provider.check(Secret("wf_unknown"), credential_type="user_api_key")
    assert wf.stats()["session"].get("429") == 1


def test_calls_are_overridden_per_credential_type(wf: WorkfrontHandle) -> None:
    spec = example_spec(wf.url)
    spec["credential_types"]["admin_api_key"]["calls"] = {
        "verify": {"method": "GET", "url": "{base_url}/attask/api/v15.0/user/search",
                   "query": {"fields": "ID,isAdmin"}, "auth": {"type": "header", "name": "apiKey", "value": "{secret}"}}}
    sent = Sent()
    wf.add_user("root@example.com", "root-password-42", admin=True)
    resolve = Vaultish()
    resolve.values["secret/keyrotor/workfront/users/root@example.com#password"] = "root-password-42"
    provider = make(wf.url, resolve=resolve, sent=sent, spec=spec)
    admin = provider.issue(name="keyrotor-a", credential_type="admin_api_key", labels={"workfront_user": "root@example.com"})
    assert provider.check(admin.secret, credential_type="admin_api_key") is CheckOutcome.valid
    assert provider.check(admin.secret, credential_type="user_api_key") is CheckOutcome.valid
    urls = [url for _m, url, _b in sent.requests]
    assert urls[-2].split("?")[0].endswith("/user/search") and "fields=ID%2CisAdmin" in urls[-2]
    assert urls[-1].endswith("/session")


def test_secret_refs_in_query_and_json_body_and_vendor_messages_scrubbed() -> None:
    """A generic API: a token in a query parameter and a password inside a JSON body, and an
    error answer that echoes what it was sent: the shown message carries neither."""
    seen: list[Any] = []

    def app(request: Any) -> Response:
        seen.append((request.query, request.json()))
        echoed = f"bad request: token={request.query.get('token')} body={request.body.decode()}"
        return Response.json(400, {"error": {"message": echoed}})

    server = serve_in_thread(app)
    spec = {
        "kind": "http", "mode": "cutover", "base_url": server.url,
        "errors": [{"status": 400, "outcome": "permanent", "message": "$.error.message"}],
        "credential_types": {"t": {}},
        "calls": {
            "issue": {"method": "POST", "url": "{base_url}/keys",
                      "query": {"token": {"env": "WF_TEST_TOKEN"}},
                      "body": {"user": "{labels[workfront_user]}", "auth": {"password": {"env": "WF_TEST_PASSWORD"}}},
                      "response": {"secret": "$.key"}},
            "verify": {"method": "GET", "url": "{base_url}/me", "auth": {"type": "bearer", "token": "{secret}"}},
        },
    }
    values = {"WF_TEST_TOKEN": "tok-9f8e7d6c5b4a", "WF_TEST_PASSWORD": "pw-0a1b2c3d4e5f"}
    provider = make(server.url, spec=spec, resolve=lambda ref: Secret(values[ref.env]))
    try:
        with pytest.raises(PermanentError) as caught:
            provider.issue(name="keyrotor-x", credential_type="t", labels=LABELS)
    finally:
        server.stop()
    assert seen[0] == ({"token": values["WF_TEST_TOKEN"]}, {"user": USER, "auth": {"password": values["WF_TEST_PASSWORD"]}})
    text = str(caught.value)
    assert "bad request: token=[REDACTED]" in text and "[REDACTED]" in text
    assert all(v not in text for v in values.values())
    assert not isinstance(caught.value, InvalidCredential)
