"""``keyrotor sandbox ...``: local provider and consumer stand-ins for the demo and the tests (Vault
is a real OpenBao server: ``keyrotor_sandbox.openbao``). Each command runs in the foreground until
SIGTERM/SIGINT and prints exactly one line on stdout once it is ready.

The stand-ins live in ``keyrotor_sandbox``, which ``make install`` installs and the image does not
ship: they are imported inside the commands so every other command works without them."""

from __future__ import annotations

import typer

from worker.cli.common import port_in_use_fails
from worker.errors import ConfigError
from worker.inventory.field_types import parse_duration

app = typer.Typer(no_args_is_help=True)


# --------------------------------------------------------------------------- provider
def parse_rate_limit(spec: str) -> tuple[int, float]:
    """``REQUESTS/PER`` (``120/60s``, ``10/1``) → (requests, seconds)."""
    requests, _, per = spec.partition("/")
    try:
        count = int(requests)
        seconds = parse_duration(per.strip()).total_seconds()
    except Exception:
        raise ConfigError(f"--rate-limit {spec!r}: expected REQUESTS/PER, e.g. 120/60s or 10/1s") from None
    if count < 1 or seconds <= 0:
        raise ConfigError(f"--rate-limit {spec!r}: requests and period must be positive")
    return count, seconds


def parse_deprecation(spec: str) -> tuple[str, str]:
    from keyrotor_sandbox.provider import PHASES  # not shipped in the image: see the module docstring

    credential_type, _, phase = spec.partition("=")
    if not credential_type or phase not in PHASES:
        raise ConfigError(f"--deprecate {spec!r}: expected TYPE=PHASE with PHASE one of {', '.join(PHASES)}")
    return credential_type, phase


@app.command("provider")
def provider(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (keep it on loopback)."),
    port: int = typer.Option(8300, help="Port to listen on; 0 picks a free one."),
    admin_token: str = typer.Option(..., "--admin-token", envvar="KEYROTOR_SANDBOX_PROVIDER_ADMIN_TOKEN",
                                    help="Token that may manage keys and the /_sandbox control API."),
    activation_delay: float = typer.Option(0.0, min=0, help="Seconds before a new key is accepted (401 until then)."),
    rate_limit: str = typer.Option("", help="REQUESTS/PER, e.g. 120/60s: beyond it answer 429 with Retry-After."),
    key_ttl: float = typer.Option(0.0, min=0, help="Seconds until an issued key expires (0: never)."),
    cutover: bool = typer.Option(False, help="Issuing a key invalidates the user's previous key (Workfront-style reset)."),
    deprecate: list[str] = typer.Option([], help="TYPE=PHASE (no_new_credentials|amnesty|rejected); repeatable."),
) -> None:
    """An Alloy-like provider API stand-in (POST/GET /api/api-key, GET /api/user/me, DELETE /api/api-key/ID)."""
    from keyrotor_sandbox.provider import run_provider_forever  # not shipped in the image: see the module docstring

    limit = parse_rate_limit(rate_limit) if rate_limit else None
    deprecations = dict(parse_deprecation(spec) for spec in deprecate)

    def ready(url: str, _token: str) -> None:
        typer.echo(f"provider stand-in listening on {url}")

    with port_in_use_fails(port, "; pass --port with a free one (0 picks one)"):
        run_provider_forever(host=host, port=port, admin_token=admin_token, activation_delay=activation_delay,
                             rate_limit=limit, key_ttl=key_ttl or None, cutover=cutover, ready=ready,
                             deprecations=deprecations)


# --------------------------------------------------------------------------- asana
@app.command("asana")
def asana(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (keep it on loopback)."),
    port: int = typer.Option(8310, help="Port to listen on; 0 picks a free one."),
    control_token: str = typer.Option(..., "--control-token", envvar="KEYROTOR_SANDBOX_ASANA_CONTROL_TOKEN",
                                      help="Token of the /_sandbox control routes (the stand-in's web UI and calendar)."),
    plan: str = typer.Option("free", help="free (150 requests a minute per user) or paid (1,500; search allowed)."),
    today: str = typer.Option("", help="The stand-in's date, e.g. 2017-01-15 (default: the real one)."),
) -> None:
    """An Asana API stand-in: the API key deprecation timeline (amnesty header, 434), personal access
    tokens made and revoked only through its UI routes, limits by plan, search, concurrency."""
    from datetime import datetime, timezone

    from keyrotor_sandbox.asana import PLAN_LIMITS, run_asana_forever  # not shipped in the image: see the module docstring

    if plan not in PLAN_LIMITS:
        raise ConfigError(f"--plan {plan!r}: expected one of {', '.join(PLAN_LIMITS)}")
    try:
        when = datetime.fromisoformat(today).replace(tzinfo=timezone.utc) if today else None
    except ValueError:
        raise ConfigError(f"--today {today!r}: expected a date such as 2017-01-15") from None

    def ready(url: str) -> None:
        typer.echo(f"asana stand-in listening on {url}")

    with port_in_use_fails(port, "; pass --port with a free one (0 picks one)"):
        run_asana_forever(host=host, port=port, control_token=control_token, plan=plan, today=when, ready=ready)


# --------------------------------------------------------------------------- consumer
@app.command("consumer")
def consumer(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (keep it on loopback)."),
    port: int = typer.Option(8400, help="Port to listen on; 0 picks a free one."),
    vault_addr: str = typer.Option(..., "--vault-addr", envvar="VAULT_ADDR", help="Vault the application reads its key from."),
    vault_token: str = typer.Option(..., "--vault-token", envvar="VAULT_TOKEN", help="Token of the application (read-only on its path)."),
    mount: str = typer.Option("secret", help="KV v2 mount of the key."),
    path: str = typer.Option(..., help="Path of the key in the mount, e.g. apps/reporting/alloy."),
    field: str = typer.Option("api_key", help="Field holding the key."),
    provider_url: str = typer.Option(..., "--provider-url", help="Base URL of the provider the key is for."),
    check_path: str = typer.Option("/api/user/me", help="Provider path that answers 2xx for a working key."),
    signing_secret: str = typer.Option(..., "--signing-secret", envvar="KEYROTOR_SANDBOX_CONSUMER_SIGNING_SECRET",
                                       help="Webhook signing secret shared with keyrotor (prefer the env variable)."),
    probe_interval_ms: int = typer.Option(0, min=0, help="Call the provider with the current key every N ms (0: off)."),
) -> None:
    """An application stand-in: reads its key from Vault, reloads on keyrotor's signed webhook, serves /health and /stats."""
    from keyrotor_sandbox.consumer import ConsumerConfig, run_consumer_forever  # not shipped in the image: see the module docstring

    config = ConsumerConfig(vault_addr=vault_addr.rstrip("/"), vault_token=vault_token, mount=mount, path=path,
                            field=field, provider_url=provider_url, signing_secret=signing_secret,
                            check_path=check_path, probe_interval_ms=probe_interval_ms or None)

    def ready(url: str) -> None:
        typer.echo(f"consumer stand-in listening on {url} (webhook {url}/hooks/keyrotor)")

    with port_in_use_fails(port, "; pass --port with a free one (0 picks one)"):
        run_consumer_forever(config, host=host, port=port, ready=ready)
