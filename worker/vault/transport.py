"""Building the hvac client: TLS, namespace, timeout, and an adapter that keeps status + Retry-After.

hvac's exceptions drop the response headers and map unknown statuses (e.g. 504, 412) to
``UnexpectedError``; our adapter records the real status and a parsed ``Retry-After`` on the
exception so the error mapping and the retry loop can use them.
"""

from __future__ import annotations

import os
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


def _env_ca_bundle() -> str | None:
    """The CA bundle requests would take from the environment (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def _session_for(addr: str) -> requests.Session:
    """A session whose environment (proxies, CA bundle) is read once, here: with ``trust_env``
    requests re-reads every proxy variable on every call, a third of the client's CPU per call."""
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(addr))
    return session


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
    if session is None:
        if verify is True:
            verify = _env_ca_bundle() or True
        session = _session_for(addr)
        session.verify = verify  # hvac prefers a session's own ``verify`` to its argument
    return hvac.Client(
        url=addr,
        token=token,
        namespace=namespace or None,
        verify=verify,
        timeout=timeout,  # requests accepts floats
        session=session,
        adapter=KeyrotorAdapter,
    )
