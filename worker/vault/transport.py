"""Building the hvac client: TLS, namespace, timeout, and an adapter that keeps status + Retry-After.

hvac's exceptions drop the response headers and map unknown statuses (e.g. 504, 412) to
``UnexpectedError``; our adapter records the real status and a parsed ``Retry-After`` on the
exception so the error mapping and the retry loop can use them.
"""

from __future__ import annotations

from pathlib import Path

import hvac
import hvac.exceptions as hvac_exc
import requests
from hvac.adapters import JSONAdapter

from worker import log
from worker.retry import parse_retry_after


class KeyrotorAdapter(JSONAdapter):
    """hvac's JSON adapter, plus ``keyrotor_status`` and ``keyrotor_retry_after`` on raised errors."""

    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> None:
        try:
            super()._raise_for_error(method, url, response)
        except hvac_exc.VaultError as exc:
            exc.keyrotor_status = response.status_code
            exc.keyrotor_retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise


def build_client(
    addr: str,
    *,
    token: str | None = None,
    namespace: str | None = None,
    cacert: Path | str | None = None,
    timeout: float = 10.0,
    session: requests.Session | None = None,
    skip_verify: bool = False,
) -> hvac.Client:
    """An hvac client for ``addr``; ``cacert`` verifies TLS with that bundle, else system CAs.
    ``skip_verify`` (VAULT_SKIP_VERIFY, refused in production by the settings) turns verification
    off, logged as an error every time a client is built."""
    verify: bool | str = str(cacert) if cacert else True
    if skip_verify:
        verify = False
        log.get_logger("keyrotor.vault").error(
            "tls_verification_disabled", target="vault", addr=addr,
            detail="VAULT_SKIP_VERIFY: Vault's certificate is not checked; anyone on the path can read the tokens "
                   "and secrets; never do this in production")
    return hvac.Client(
        url=addr,
        token=token,
        namespace=namespace or None,
        verify=verify,
        timeout=timeout,  # requests accepts floats
        session=session,
        adapter=KeyrotorAdapter,
    )
