"""Transport security of outgoing calls: plain http:// to a non-loopback host is refused by
`config check` unless the inventory allows it (and then logged per client); TLS verification is
on by default and turning it off is refused in production, logged as an error otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from worker.cli.main import main
from worker.errors import ConfigError
from worker.http_security import check_tls_verify, insecure_http_host
from worker.inventory.loader import check_text
from worker.inventory.schema import HttpProviderSpec, WebhookIntegrationSpec
from worker.settings import load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "keyrotor.example.yaml"
TEXT = EXAMPLE.read_text(encoding="utf-8")


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _problems(text: str) -> list[str]:
    inventory, problems = check_text(text, "inv.yaml")
    assert (inventory is None) == bool(problems)
    return [p.format() for p in problems]


# --------------------------------------------------------------------------- plain http://
@pytest.mark.parametrize("url, host", [
    ("http://api.example.com/x", "api.example.com"),
    ("HTTP://10.0.0.7:8080", "10.0.0.7"),
    ("http://user@[2001:db8::1]/", "2001:db8::1"),
    ("http://127.0.0.1:9/x", None), ("http://localhost/x", None), ("http://[::1]:80/", None),
    ("http://127.8.9.10/", None), ("http://svc.localhost/", None), ("https://api.example.com", None),
])
def test_insecure_http_host(url: str, host: str | None) -> None:
    assert insecure_http_host(url) == host


def test_config_check_refuses_a_plain_http_provider_url_at_its_line() -> None:
    text = TEXT.replace("base_url: https://api.alloyapp.example", "base_url: http://api.alloyapp.example")
    line = _line_of(text, "base_url: http://api.alloyapp.example")
    problems = _problems(text)
    assert any(p.startswith(f"inv.yaml:{line}: providers.alloy.base_url: plain http:// to api.alloyapp.example")
               and "allow_insecure_http: true" in p for p in problems), problems


def test_config_check_refuses_an_absolute_plain_http_call_url() -> None:
    text = TEXT.replace('url: "{base_url}/api/api-key/{key_id}"', 'url: "http://revoker.example/api-key/{key_id}"')
    line = _line_of(text, "http://revoker.example")
    assert any(p.startswith(f"inv.yaml:{line}: providers.alloy.calls.revoke.url: plain http:// to revoker.example")
               for p in _problems(text))


def test_allow_insecure_http_lets_the_provider_through() -> None:
    text = TEXT.replace("base_url: https://api.alloyapp.example",
                        "base_url: http://api.alloyapp.example\n    allow_insecure_http: true")
    assert _problems(text) == []


def test_loopback_http_needs_no_permission() -> None:
    assert _problems(TEXT.replace("https://api.alloyapp.example", "http://127.0.0.1:8080")) == []


def test_config_check_refuses_plain_http_integration_and_health_urls() -> None:
    text = TEXT.replace("https://reporting.internal.example/", "http://reporting.internal.example/")
    problems = _problems(text)
    for field in ("url", "health_url"):
        line = _line_of(text, f"{field}: http://reporting.internal.example")
        assert any(p.startswith(f"inv.yaml:{line}: integrations.reporting-service.{field}: plain http://")
                   for p in problems), problems
    allowed = text.replace("    include_secret: false", "    include_secret: false\n    allow_insecure_http: true")
    assert _problems(allowed) == []


def test_config_check_refuses_a_plain_http_notification_url() -> None:
    text = TEXT.replace('url: "https://alerts.internal.example/keyrotor"', 'url: "http://alerts.internal.example/keyrotor"')
    line = _line_of(text, "http://alerts.internal.example")
    assert any(p.startswith(f"inv.yaml:{line}: notifications[1].url: plain http:// to alerts.internal.example")
               for p in _problems(text))
    allowed = text.replace('"http://alerts.internal.example/keyrotor",', '"http://alerts.internal.example/keyrotor", allow_insecure_http: true,')
    assert _problems(allowed) == []


def test_the_cli_exits_2_on_a_plain_http_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(TEXT.replace("base_url: https://api.alloyapp.example", "base_url: http://api.alloyapp.example"))
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "providers.alloy.base_url: plain http://" in err and "Traceback" not in err


def _provider_spec(**extra: Any) -> HttpProviderSpec:
    import yaml

    data = yaml.safe_load(TEXT)["providers"]["alloy"]
    data["auth"] = {"type": "bearer", "token": {"env": "ALLOY_ADMIN"}}
    return HttpProviderSpec.model_validate({**data, **extra})


def _build_provider(spec: HttpProviderSpec) -> Any:
    from worker.providers.ratelimit import InMemoryRateLimiter
    from worker.providers.registry import build_provider

    return build_provider(spec, name="alloy", resolve=lambda ref: None, limiter=InMemoryRateLimiter())  # type: ignore[arg-type,return-value]


def test_an_allowed_plain_http_provider_is_logged_as_insecure_when_its_client_is_built() -> None:
    spec = _provider_spec(base_url="http://api.alloyapp.example", allow_insecure_http=True)
    with structlog.testing.capture_logs() as logs:
        provider = _build_provider(spec)
    provider.close()
    insecure = [e for e in logs if e["event"] == "insecure_http"]
    assert [(e["target"], e["name"], e["host"], e["log_level"]) for e in insecure] == [
        ("provider", "alloy", "api.alloyapp.example", "warning")]


def test_a_https_provider_logs_nothing_insecure() -> None:
    with structlog.testing.capture_logs() as logs:
        _build_provider(_provider_spec()).close()
    assert not [e for e in logs if e["event"] in ("insecure_http", "tls_verification_disabled")]


def test_notification_sink_from_a_reference_is_held_to_the_same_rule() -> None:
    from worker.notify import Notifier, Sink
    from worker.secret import Secret

    sent: list[str] = []
    http = httpx.Client(transport=httpx.MockTransport(lambda req: sent.append(str(req.url)) or httpx.Response(200)))
    sink = Sink(kind="webhook", url=Secret("http://alerts.example/hook"))
    with structlog.testing.capture_logs() as logs:
        Notifier([sink], http=http, attempts=1).notify("failed", key_name="k", run_id="r", detail={})
    assert sent == []
    assert any(e["event"] == "notification_failed" and "plain http://" in e["detail"] for e in logs)
    allowed = Sink(kind="webhook", url=Secret("http://alerts.example/hook"), allow_insecure_http=True)
    with structlog.testing.capture_logs() as logs:
        Notifier([allowed], http=http, attempts=1).notify("failed", key_name="k", run_id="r", detail={})
    assert sent == ["http://alerts.example/hook"]
    assert any(e["event"] == "insecure_http" and e["host"] == "alerts.example" for e in logs)


# --------------------------------------------------------------------------- TLS verification
def test_tls_verification_is_on_by_default_for_providers_and_integrations() -> None:
    assert _provider_spec().tls_verify is True
    spec = WebhookIntegrationSpec.model_validate({"kind": "webhook", "url": "https://h.example/x",
                                                  "signing_secret": {"env": "S"}})
    assert spec.tls_verify is True


def test_vault_tls_verification_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.vault.transport import build_client

    monkeypatch.delenv("VAULT_SKIP_VERIFY", raising=False)
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(variable, raising=False)
    settings = load_settings(vault_addr="https://vault.example:8200", vault_token="t")
    assert settings.vault_skip_verify is False and settings.env == "production"
    assert build_client(settings.vault_addr or "").adapter._kwargs.get("verify", True) is True  # type: ignore[attr-defined]


def test_the_vault_client_reads_its_environment_once_and_keeps_the_ca_bundle_and_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session does not re-read the environment on every call (``trust_env`` off), so what
    requests would have taken from it is read when the client is built."""
    from worker.vault.transport import build_client

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/keyrotor/ca.pem")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = build_client("https://vault.example:8200")
    assert client.session.trust_env is False
    assert client.adapter._kwargs["verify"] == "/etc/keyrotor/ca.pem"  # type: ignore[attr-defined]
    assert client.session.proxies.get("https") == "http://proxy.example:3128"
    monkeypatch.setenv("NO_PROXY", "vault.example")
    assert not build_client("https://vault.example:8200").session.proxies.get("https")


def test_vault_skip_verify_is_refused_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_SKIP_VERIFY", "true")
    monkeypatch.delenv("KEYROTOR_ENV", raising=False)
    with pytest.raises(ConfigError, match="VAULT_SKIP_VERIFY .*refused when KEYROTOR_ENV=production"):
        load_settings()


def test_vault_skip_verify_in_development_is_logged_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.vault.store import VaultStore

    monkeypatch.setenv("VAULT_SKIP_VERIFY", "1")
    monkeypatch.setenv("KEYROTOR_ENV", "development")
    settings = load_settings(vault_addr="https://vault.example:8200", vault_token="t")
    with structlog.testing.capture_logs() as logs:
        store = VaultStore.from_settings(settings)
    assert store.client.adapter._kwargs.get("verify") is False  # type: ignore[attr-defined]
    assert [(e["event"], e["log_level"], e["target"]) for e in logs if e["event"] == "tls_verification_disabled"] == [
        ("tls_verification_disabled", "error", "vault")]


def test_the_cli_reports_a_refused_skip_verify_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VAULT_SKIP_VERIFY", "true")
    monkeypatch.setenv("KEYROTOR_CONFIG", str(EXAMPLE))
    from worker.settings import get_settings

    get_settings.cache_clear()
    try:
        assert main(["config", "check", "--resolve"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "VAULT_SKIP_VERIFY" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["provider", "integration"])
def test_tls_verify_false_is_refused_in_production(kind: str) -> None:
    with pytest.raises(ConfigError, match="tls_verify: false is refused when KEYROTOR_ENV=production"):
        check_tls_verify(kind, "x", False, env="production")


def test_tls_verify_false_on_a_provider_is_refused_in_production_when_its_client_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import get_settings

    monkeypatch.delenv("KEYROTOR_ENV", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="provider 'alloy': tls_verify: false is refused"):
            _build_provider(_provider_spec(tls_verify=False))
    finally:
        get_settings.cache_clear()


def test_tls_verify_false_in_development_turns_verification_off_and_logs_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.integrations.webhook import WebhookIntegration
    from worker.settings import get_settings

    monkeypatch.setenv("KEYROTOR_ENV", "development")
    get_settings.cache_clear()
    try:
        spec = WebhookIntegrationSpec.model_validate({"kind": "webhook", "url": "https://h.example/x",
                                                      "signing_secret": {"env": "S"}, "tls_verify": False})
        with structlog.testing.capture_logs() as logs:
            integration = WebhookIntegration("svc", spec, resolve=lambda ref: None)  # type: ignore[arg-type]
            provider = _build_provider(_provider_spec(tls_verify=False))
        provider.close()
    finally:
        get_settings.cache_clear()
    assert integration._http._transport._pool._ssl_context.verify_mode.name == "CERT_NONE"  # type: ignore[attr-defined]
    assert [(e["target"], e["name"]) for e in logs if e["event"] == "tls_verification_disabled"
            and e["log_level"] == "error"] == [("integration", "svc"), ("provider", "alloy")]
