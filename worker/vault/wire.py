"""A Vault request sent on urllib3's pool directly and answered as requests' ``Response``.

hvac speaks requests; requests sends through urllib3. Between the two, requests prepares each
request (headers, URL, body, a cookie header through a ``urllib.request`` stand-in) and its
transport adapter looks up the pool, sets its TLS options and builds the answer (cookies again):
about a third of a Vault call's CPU next to urllib3's own (docs/performance.md, twelfth round).
``send`` does what is left of it for the requests hvac makes (a JSON body or none, query
parameters, a timeout) and raises requests' exceptions for urllib3's, as its adapter does, so
``worker/vault/errors.py`` reads them alike: a refused connection is ``ConnectionError`` (not
sent), a timeout ``Timeout`` (outcome unknown), a TLS failure ``SSLError``.
``worker/vault/transport.DirectSession`` decides when a request may go this way.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping, Optional
from urllib.parse import urlencode

import requests
import requests.adapters
import requests.utils
import urllib3
import urllib3.exceptions as u3
from requests.structures import CaseInsensitiveDict

#: Methods requests sends ``Content-Length: 0`` with when there is no body (as urllib3 does not).
_BODILESS = frozenset({"GET", "HEAD"})


def tls_options(verify: bool | str, cert: Optional[str | tuple[str, str]]) -> dict[str, Any]:
    """urllib3's pool options for requests' ``verify`` and ``cert`` (as its adapter sets them):
    ``verify=True`` checks against requests' CA bundle (certifi's), a path against that bundle or
    directory, ``False`` checks nothing."""
    if verify is False:
        options: dict[str, Any] = {"cert_reqs": "CERT_NONE"}
    else:
        bundle = verify if isinstance(verify, str) else requests.utils.extract_zipped_paths(
            requests.utils.DEFAULT_CA_BUNDLE_PATH)
        options = {"cert_reqs": "CERT_REQUIRED", ("ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"): bundle}
    if isinstance(cert, str):
        options["cert_file"] = cert
    elif cert:
        options["cert_file"], options["key_file"] = cert
    return options


class Pools:
    """One urllib3 pool manager per TLS setting (``verify``, ``cert``), sized as requests' adapter
    sizes its own; made on first use, shared by every thread."""

    def __init__(self) -> None:
        self._managers: dict[tuple[Any, Any], urllib3.PoolManager] = {}
        self._lock = threading.Lock()

    def manager(self, verify: bool | str, cert: Optional[str | tuple[str, str]]) -> urllib3.PoolManager:
        key = (verify, tuple(cert) if isinstance(cert, (list, tuple)) else cert)
        manager = self._managers.get(key)
        if manager is None:
            with self._lock:
                manager = self._managers.get(key)
                if manager is None:
                    manager = urllib3.PoolManager(num_pools=requests.adapters.DEFAULT_POOLSIZE,
                                                  maxsize=requests.adapters.DEFAULT_POOLSIZE, block=False,
                                                  **tls_options(verify, cert))
                    self._managers[key] = manager
        return manager

    def clear(self) -> None:
        with self._lock:
            for manager in self._managers.values():
                manager.clear()
            self._managers.clear()


def with_query(url: str, params: Optional[Mapping[str, Any]]) -> str:
    """``url`` with ``params`` appended as requests encodes them (``None`` values left out, a
    list's values repeated)."""
    if not params:
        return url
    query = urlencode([(name, value) for name, value in params.items() if value is not None], doseq=True)
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"


def send(pools: Pools, method: str, url: str, headers: CaseInsensitiveDict[str], body: Any, *,
         timeout: Any, verify: bool | str, cert: Optional[str | tuple[str, str]]) -> requests.Response:
    """Send one request (``body``: a JSON document, or ``None``) and return the answer unread, as
    requests' adapter returns it (the caller reads ``content``)."""
    data: Optional[bytes] = None
    if body is not None:
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        headers.setdefault("Content-Type", "application/json")
    elif method not in _BODILESS:
        headers.setdefault("Content-Length", "0")
    if isinstance(timeout, tuple):
        limits = urllib3.Timeout(connect=timeout[0], read=timeout[1])
    else:
        limits = urllib3.Timeout(connect=timeout, read=timeout)
    try:
        raw = pools.manager(verify, cert).urlopen(method, url, body=data, headers=dict(headers), redirect=False,
                                                  retries=False, timeout=limits, preload_content=False,
                                                  decode_content=False)
    except u3.NewConnectionError as exc:  # before ConnectTimeoutError: a refused connection is one of them
        raise requests.exceptions.ConnectionError(exc) from exc
    except u3.ConnectTimeoutError as exc:
        raise requests.exceptions.ConnectTimeout(exc) from exc
    except u3.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(exc) from exc
    except u3.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    except u3.ProxyError as exc:
        raise requests.exceptions.ProxyError(exc) from exc
    except (u3.HTTPError, OSError) as exc:  # ProtocolError (reset, aborted), a closed pool, …
        raise requests.exceptions.ConnectionError(exc) from exc
    response = requests.Response()
    response.status_code = raw.status
    response.headers = CaseInsensitiveDict(raw.headers)
    response.encoding = requests.utils.get_encoding_from_headers(response.headers)
    response.raw = raw
    response.reason = raw.reason or ""
    response.url = url
    return response
