"""``keyrotor adopt KEY``: take a key that exists already (made by hand, before keyrotor) into
management, so its first rotation can revoke it. The logic is ``worker/adoption.py``."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from worker.cli.common import EXIT_FAILED, EXIT_OK, cli_settings, fail, open_database, operator
from worker.cli.output import print_json

# Commands import the service modules they use inside the command function, not here:
# `keyrotor --help` and each command start without importing the whole service (start-up cost).


def adopt(
    key: str = typer.Argument(..., help="Managed key to adopt, as in the inventory."),
    key_id: Optional[str] = typer.Option(None, "--key-id", help="The provider's id of the key, when the provider cannot tell."),
    from_stdin: bool = typer.Option(False, "--from-stdin",
                                    help="Read the key from stdin and write it to Vault (only when Vault has no value yet)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Adopt an existing key: check it at the provider, find its provider key id, record it in Vault
    and the database. The value comes from Vault (or stdin), never from the command line."""
    from worker.adoption import AdoptionRefused, CredentialRejected, adopt as adopt_key
    from worker.cli.act_cmds import read_deposit_secret
    from worker.pipeline.context import context_from_settings
    from worker.secret import Secret

    settings = cli_settings()
    open_database(settings)
    secret: Optional[Secret] = None
    if from_stdin:
        if sys.stdin is None or sys.stdin.isatty():
            fail("--from-stdin: pipe the key in, e.g. `vault kv get -field=api_key … | keyrotor adopt KEY --from-stdin`")
        secret = read_deposit_secret("")
    ctx = context_from_settings(settings)
    try:
        adopted = adopt_key(ctx, key, actor=operator(), secret=secret, key_id=key_id)
    except AdoptionRefused as exc:
        fail(str(exc))
    except CredentialRejected as exc:
        fail(str(exc), EXIT_FAILED)
    doc = {"key": adopted.key, "fingerprint": adopted.fingerprint, "provider_key_id": adopted.provider_key_id,
           "found_by": adopted.found_by, "vault_version": adopted.vault_version}
    if json_out:
        print_json(doc)
    else:
        how = {"given": "given with --key-id", "verify": "named by the provider's verify answer",
               "list_hint": "matched in the provider's key list", "not_needed": "not needed to revoke"}[adopted.found_by]
        typer.echo(f"{adopted.key}: adopted credential {adopted.fingerprint} (provider key id "
                   f"{adopted.provider_key_id or '-'}, {how}; Vault version {adopted.vault_version}); "
                   f"rotate it with `keyrotor rotate {adopted.key}`")
    raise typer.Exit(EXIT_OK)


def register(app: typer.Typer) -> None:
    app.command("adopt")(adopt)
