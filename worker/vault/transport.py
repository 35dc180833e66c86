"""Building the hvac client: TLS, namespace, timeout, and an adapter that keeps status + Retry-After.

hvac's exceptions drop the response headers and map unknown statuses (e.g. 504, 412) to
``UnexpectedError``; our adapter records the real status and a parsed ``Retry-After`` on the
exception so the error mapping and the retry loop can use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import hvac
import hvac.exceptions as hvac_exc
import requests
import requests.cookies
from hvac.adapters import JSONAdapter
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from worker import log
from worker.retry import parse_retry_after
from worker.vault import wire


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


class DirectSession(requests.Session):
    """The session hvac sends every Vault request through, minus requests' general machinery.

    ``Session.request`` merges environment settings, hooks and cookie jars twice and looks for a
    redirect on every answer: 9 % of a read's CPU and 21 % of a write's (docs/performance.md,
    seventh round). Here a request hvac makes (a JSON body or none, query parameters) goes on
    urllib3's pool directly (``worker/vault/wire.py``), requests' exceptions kept; one with
    anything else (a proxy, a cookie to send, a transport adapter mounted in place of requests'
    own, form data) is prepared once and handed to the mounted adapter. Kept either way: the
    session's default headers, cookies (a load balancer's affinity cookie is sent back), TLS
    settings, and redirects (a standby Vault answers 307 to the active node), followed by requests
    only when one comes."""

    #: What hvac's adapter passes; any other keyword takes requests' own path.
    _DIRECT_KWARGS = frozenset({"params", "data", "json", "timeout", "verify", "cert", "proxies"})

    def __init__(self) -> None:
        super().__init__()
        self._pools = wire.Pools()

    def close(self) -> None:
        super().close()
        self._pools.clear()

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if args or self.trust_env or self.hooks["response"] or not self._DIRECT_KWARGS.issuperset(
                kwargs.keys() - {"headers", "allow_redirects"}):
            return super().request(method, url, *args, **kwargs)
        method = method.upper()
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(self.headers)
        headers.update(kwargs.get("headers") or {})
        send: dict[str, Any] = {"timeout": kwargs.get("timeout"),
                                "verify": kwargs["verify"] if kwargs.get("verify") is not None else self.verify,
                                "cert": kwargs.get("cert") or self.cert,
                                "proxies": {**self.proxies, **(kwargs.get("proxies") or {})}}
        prepared: Optional[requests.PreparedRequest] = None
        if self._straight(url, kwargs, send["proxies"]):
            response = wire.send(self._pools, method, wire.with_query(url, kwargs.get("params")), headers,
                                 kwargs.get("json"), timeout=send["timeout"], verify=send["verify"], cert=send["cert"])
        else:
            prepared = self._prepare(method, url, headers, kwargs)
            response = self.get_adapter(prepared.url or "").send(prepared, stream=False, **send)
        redirect = kwargs.get("allow_redirects", True) and response.is_redirect
        if redirect or "Set-Cookie" in response.headers:
            if prepared is None:  # sent by ``wire``: what requests' redirect and cookie handling read
                prepared = response.request = self._prepare(method, url, headers, kwargs)
            requests.cookies.extract_cookies_to_jar(self.cookies, prepared, response.raw)
            if redirect:
                history = [response, *self.resolve_redirects(response, prepared, **send)]
                response = history.pop()
                response.history = history
        response.content  # read the body now: the connection goes back to the pool
        return response

    def _straight(self, url: str, kwargs: dict[str, Any], proxies: dict[str, str]) -> bool:
        """Whether ``wire.send`` sends this request as requests would: plain http(s) to requests'
        own adapter, no proxy, no cookie to send, a JSON body or none, a URL requests would not
        re-quote."""
        params = kwargs.get("params")
        return (not proxies and not self.cookies and kwargs.get("data") is None
                and (params is None or isinstance(params, Mapping))
                and url.startswith(("http://", "https://")) and url.isascii() and " " not in url
                and type(self.get_adapter(url)) is HTTPAdapter)

    def _prepare(self, method: str, url: str, headers: CaseInsensitiveDict[str],
                 kwargs: dict[str, Any]) -> requests.PreparedRequest:
        prepared = requests.PreparedRequest()
        prepared.prepare(method=method, url=url, headers=headers, params=kwargs.get("params"), data=kwargs.get("data"),
                         json=kwargs.get("json"), cookies=self.cookies)
        return prepared


def _session_for(addr: str) -> DirectSession:
    """A session whose environment (proxies, CA bundle) is read once, here: with ``trust_env``
    requests re-reads every proxy variable on every call, a third of the client's CPU per call."""
    session = DirectSession()
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
