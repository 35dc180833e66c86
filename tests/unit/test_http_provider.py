"""The generic HTTP provider's request building (auth kinds, templates, encoding), JSON paths,
and the mTLS client context — with httpx.MockTransport, no network."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from worker.errors import ConfigError, PermanentError
from worker.inventory.schema import HttpProviderSpec
from worker.protocol.states import Mode
from worker.providers.base import CheckOutcome
from worker.providers.http import HttpProvider, _mtls_context
from worker.providers.jsonpath import JsonPathError, compile_path, extract
from worker.providers.ratelimit import InMemoryRateLimiter, RateLimit
from worker.providers.registry import build_provider
from worker.providers.templating import render, render_json, render_url
from worker.secret import Secret

ADMIN = Secret("admin-token-value-123")


def spec(**overrides: Any) -> HttpProviderSpec:
    data: dict[str, Any] = {
        "kind": "http", "mode": "overlap", "base_url": "https://api.example.test/",
        "rate_limit": {"requests": 7, "per": "1m"},
        "auth": {"type": "bearer", "token": {"env": "ADMIN"}},
        "credential_types": {"api_key": {}},
        "calls": {
            "issue": {"method": "post", "url": "{base_url}/users/{labels[user]}/keys",
                      "headers": {"X-Run": "{run_id}"}, "body": {"name": "{key_name}", "tags": ["{credential_type}"]},
                      "response": {"secret": "$.data.key", "key_id": "$.data.id", "expires_at": "$.data.exp"}},
            "verify": {"url": "{base_url}/me", "auth": {"type": "header", "name": "apiKey", "value": "{secret}"}},
            "revoke": {"method": "DELETE", "url": "{base_url}/keys/{key_id}",
                       "auth": {"type": "basic", "username": "ops", "password": {"env": "ADMIN"}}},
        },
    }
    data.update(overrides)
    return HttpProviderSpec.model_validate(data)


def provider(handler: Callable[[httpx.Request], httpx.Response], s: HttpProviderSpec | None = None,
             limiter: Any = None) -> tuple[HttpProvider, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return handler(request)

    p = build_provider(s or spec(), name="example", resolve=lambda ref: ADMIN, limiter=limiter or InMemoryRateLimiter(),
                       http=httpx.Client(transport=httpx.MockTransport(record)), attempts=1)
    assert isinstance(p, HttpProvider)
    return p, seen


def test_issue_renders_url_labels_headers_and_body() -> None:
    p, seen = provider(lambda r: httpx.Response(201, json={"data": {"key": "new-key-value", "id": 17, "exp": 1_900_000_000}}))
    issued = p.issue(name="keyrotor-run7", credential_type="api_key", labels={"user": "docs sync@x"})
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "https://api.example.test/users/docs%20sync%40x/keys"
    assert request.headers["Authorization"] == f"Bearer {ADMIN.reveal()}"
    assert request.headers["X-Run"] == "run7"
    assert json.loads(request.content) == {"name": "keyrotor-run7", "tags": ["api_key"]}
    assert issued.secret == Secret("new-key-value") and issued.key_id == "17"
    assert issued.expires_at == dt.datetime.fromtimestamp(1_900_000_000, tz=dt.timezone.utc)


def test_check_uses_named_header_with_the_checked_secret() -> None:
    p, seen = provider(lambda r: httpx.Response(200, json={"user": "x"}))
    assert p.check(Secret("candidate-key"), credential_type="api_key") is CheckOutcome.valid
    assert seen[0].headers["apiKey"] == "candidate-key"
    assert "Authorization" not in seen[0].headers


def test_revoke_uses_basic_auth_and_encodes_key_id() -> None:
    p, seen = provider(lambda r: httpx.Response(204))
    p.revoke(key_id="a/b", secret=None, credential_type="api_key")
    assert seen[0].url.raw_path == b"/keys/a%2Fb"
    assert seen[0].headers["Authorization"] == "Basic " + base64.b64encode(f"ops:{ADMIN.reveal()}".encode()).decode()


def test_revoke_needs_a_key_id_when_the_url_uses_one() -> None:
    p, seen = provider(lambda r: httpx.Response(204))
    with pytest.raises(PermanentError, match="key_id"):
        p.revoke(key_id=None, secret=None, credential_type="api_key")
    assert seen == []


def test_missing_calls_and_capabilities() -> None:
    s = spec(mode="assisted", calls={"verify": {"url": "{base_url}/me", "auth": {"type": "bearer", "token": "{secret}"}}})
    p, seen = provider(lambda r: httpx.Response(200), s)
    assert p.mode is Mode.assisted and not (p.can_issue or p.can_revoke or p.can_list)
    with pytest.raises(PermanentError, match="issue"):
        p.issue(name="keyrotor-x", credential_type="api_key", labels={})
    with pytest.raises(PermanentError, match="list"):
        p.list_keys()
    assert seen == []


def test_unknown_credential_type_is_refused() -> None:
    p, _ = provider(lambda r: httpx.Response(201))
    with pytest.raises(PermanentError, match="known: api_key"):
        p.issue(name="keyrotor-x", credential_type="oauth", labels={})


def test_rate_limit_is_registered_from_spec() -> None:
    limiter = InMemoryRateLimiter(max_wait=0)
    provider(lambda r: httpx.Response(200), limiter=limiter)
    assert limiter._limits["example"] == RateLimit(7, 60.0)


# --------------------------------------------------------------------------- helpers
def test_jsonpath_subset() -> None:
    doc = {"data": {"items": [{"id": 1}, {"id": 2, "x-y": "z"}]}}
    assert extract(doc, "$") is doc
    assert extract(doc, "$.data.items[1].id") == 2
    assert extract(doc, "$.data.items[1]['x-y']") == "z"
    for bad_path in ("$.data.items[5]", "$.nope", "$.data.items.id"):
        with pytest.raises(JsonPathError):
            extract(doc, bad_path)
    with pytest.raises(JsonPathError):
        compile_path("data.items")
    with pytest.raises(JsonPathError):
        compile_path("$..id")


def test_templates() -> None:
    variables = {"base_url": "https://h", "key_id": "x y", "secret": Secret("s3"), "labels": {"u": "me"}}
    assert render_url("{base_url}/k/{key_id}?q={{lit}}", variables) == "https://h/k/x%20y?q={lit}"
    assert render_json({"a": ["{secret}", 3, None], "{labels[u]}": True}, variables) == {"a": ["s3", 3, None], "me": True}
    with pytest.raises(ConfigError, match="unknown placeholder"):
        render("{nope}", variables)
    with pytest.raises(ConfigError, match="labels"):
        render("{labels[other]}", variables)


def _self_signed(tmp_path: Path) -> tuple[Path, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyrotor-client")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path = tmp_path / "client.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return cert_path, pem


def test_mtls_context_loads_certificate_and_leaves_no_key_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.inventory.provider_parts import MtlsAuthSpec

    cert_path, pem = _self_signed(tmp_path)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp_root))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    auth = MtlsAuthSpec.model_validate({"type": "mtls", "cert_file": str(cert_path), "key": {"env": "KEY"}})
    context = _mtls_context(auth, lambda ref: Secret(pem))
    assert context is not None
    assert list(temp_root.iterdir()) == []  # the key file is gone
    bad = MtlsAuthSpec.model_validate({"type": "mtls", "cert_file": str(tmp_path / "missing.crt"), "key": {"env": "KEY"}})
    with pytest.raises(ConfigError, match="mTLS"):
        _mtls_context(bad, lambda ref: Secret(pem))
    assert list(temp_root.iterdir()) == []  # cleaned up on failure too
