"""``keyrotor sandbox ...``: local stand-ins for the demo and the tests. Each command runs in the
foreground until SIGTERM/SIGINT and prints exactly one line on stdout once it is ready."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from worker.errors import ConfigError

app = typer.Typer(no_args_is_help=True)


# --------------------------------------------------------------------------- vault
def parse_k8s_role(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:SA_NAMES:NAMESPACES:POLICIES[:TTL]`` → (name, role body for auth/kubernetes/role/NAME)."""
    parts = spec.split(":")
    if len(parts) not in (4, 5) or not all(parts[:3]):
        raise ConfigError(
            f"--k8s-role {spec!r}: expected NAME:SA_NAMES:NAMESPACES:POLICIES[:TTL], "
            "e.g. keyrotor:keyrotor-worker:keyrotor:keyrotor-rotator:1h"
        )
    name, names, namespaces, policies = parts[:4]
    body: dict[str, Any] = {
        "bound_service_account_names": names,
        "bound_service_account_namespaces": namespaces,
        "token_policies": policies,
    }
    if len(parts) == 5 and parts[4]:
        body["token_ttl"] = parts[4]
    return name, body


@app.command("vault")
def vault(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (keep it on loopback)."),
    port: int = typer.Option(8200, help="Port to listen on; 0 picks a free one."),
    root_token: str = typer.Option(..., "--root-token", envvar="KEYROTOR_SANDBOX_VAULT_ROOT_TOKEN",
                                   help="The root token the stand-in accepts."),
    k8s_role: list[str] = typer.Option(
        [], "--k8s-role",
        help="Pre-create a Kubernetes auth role (enables auth/kubernetes). Repeatable. Syntax: "
             "NAME:SA_NAMES:NAMESPACES:POLICIES[:TTL], lists comma-separated, '*' matches any; "
             "e.g. keyrotor:keyrotor-worker:keyrotor:keyrotor-rotator:1h",
    ),
    k8s_pem_key: list[Path] = typer.Option(
        [], "--k8s-pem-key", exists=True, dir_okay=False, readable=True,
        help="PEM public key that signs service-account JWTs (auth/kubernetes/config pem_keys). Repeatable.",
    ),
) -> None:
    """A faithful HashiCorp Vault HTTP API stand-in (KV v2, mounts, tokens, ACL, Kubernetes auth)."""
    from worker.sandbox.vault.server import run_forever

    roles = dict(parse_k8s_role(spec) for spec in k8s_role)
    pem_keys = [path.read_text() for path in k8s_pem_key]

    def ready(url: str) -> None:
        typer.echo(f"vault stand-in listening on {url}")

    run_forever(host, port, root_token, k8s_roles=roles or None, k8s_pem_keys=pem_keys or None, on_ready=ready)
