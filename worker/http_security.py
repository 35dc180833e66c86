"""Transport security of keyrotor's outgoing HTTP: plain ``http://`` and TLS verification.

Provider management calls carry admin tokens and new secrets; integration and notification calls
carry signatures and, when asked, the secret itself. So:

- a URL that is plain ``http://`` to a host other than the loopback is refused by the inventory
  (``FILE:LINE``) unless the provider, integration or notification says ``allow_insecure_http:
  true``; a client built for such a URL logs a warning (``insecure_http``) naming the host;
- TLS verification is on unless the inventory says ``tls_verify: false`` (or, for Vault,
  ``VAULT_SKIP_VERIFY``); turning it off is refused when ``KEYROTOR_ENV=production`` (the
  default) and logged as an error each time a client is built otherwise.

Messages name the host, never the whole URL (an incoming-webhook URL is itself a credential).
"""

from __future__ import annotations

import ipaddress
from typing import Optional
from urllib.parse import urlsplit

from worker import log
from worker.errors import ConfigError
from worker.settings import get_settings

logger = log.get_logger("keyrotor.http_security")

ALLOW_FIELD = "allow_insecure_http"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_http_host(url: str) -> Optional[str]:
    """The host of ``url`` when it is plain http:// to a non-loopback host, else ``None``."""
    text = url.strip()
    if not text.lower().startswith("http://"):
        return None
    try:
        host = urlsplit(text).hostname or ""
    except ValueError:
        host = ""
    if not host:
        host = text[len("http://"):].split("/", 1)[0].rsplit("@", 1)[-1] or "?"
    return None if is_loopback(host) else host


def insecure_http_problem(url: str, allowed: bool, what: str) -> Optional[str]:
    """Why ``url`` is refused (plain http to a non-loopback host, not allowed), or ``None``."""
    host = insecure_http_host(url)
    if host is None or allowed:
        return None
    return (f"plain http:// to {host} would send {what} unencrypted; use https://, or set "
            f"{ALLOW_FIELD}: true on this entry if the network is trusted")


def note_insecure_http(kind: str, name: str, urls: list[Optional[str]]) -> None:
    """Log a warning for each distinct plain-http host a client of ``kind``/``name`` will call."""
    hosts = sorted({h for h in (insecure_http_host(u) for u in urls if u) if h is not None})
    for host in hosts:
        logger.warning("insecure_http", target=kind, name=name, host=host,
                       detail=f"{ALLOW_FIELD}: credentials and signatures cross the network unencrypted")


def current_env() -> str:
    return get_settings().env


def check_tls_verify(kind: str, name: str, tls_verify: bool, env: Optional[str] = None) -> bool:
    """``tls_verify`` if allowed: ``False`` raises ``ConfigError`` in production and is logged as an
    error otherwise."""
    if tls_verify:
        return True
    env = env or current_env()
    if env == "production":
        raise ConfigError(f"{kind} {name!r}: tls_verify: false is refused when KEYROTOR_ENV=production (the default); "
                          "give the server a certificate the system trusts, or set KEYROTOR_ENV=development on a test system")
    logger.error("tls_verification_disabled", target=kind, name=name,
                 detail="tls_verify: false; the server's certificate is not checked; never do this in production")
    return False
