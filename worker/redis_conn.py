"""Every Redis connection keyrotor makes starts here: ``redis_client(url, socket_timeout=…)``.

One URL (``KEYROTOR_REDIS_URL``) serves the broker, the scheduler's leader lock, the shared rate
limiter, the queue metrics and the health checks. Besides redis-py's own forms (``redis://``,
``rediss://``, ``unix://``) it may name a Redis Sentinel deployment:

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?sentinel_password=PW]

- ``HOST[:PORT]``: the sentinels (at least one, port 26379 by default; ``[::1]:26379`` for IPv6);
- ``MASTER_NAME``: the name the sentinels monitor (``sentinel monitor MASTER_NAME ...``);
- ``DB``: the database number on the master (0 by default);
- ``USER``/``PASSWORD``: the master's (and replicas') ACL user/``requirepass``;
- ``sentinel_password``: the sentinels' own ``requirepass``, when they have one (the same
  password again when the chart configures both alike). Percent-encode ``@ : / ? # % ,`` in it.

The client asks the sentinels for the current master on every new connection and drops its
connections when the master stops answering or turns read-only (demoted), so callers see one
``ConnectionError`` per failover and the next command goes to the promoted replica.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_URL_FORM = ("redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]"
                     "[?sentinel_password=PASSWORD]")
_DIGITS = re.compile(r"[0-9]+")
_HOST = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<v6port>[^:]*))?$|(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>.*))?$")
_QUERY_KEYS = {"sentinel_password"}


class RedisUrlError(ValueError):
    """A Redis URL keyrotor would not read exactly as written; the message never repeats the URL."""


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names (passwords hidden from ``repr``)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, master name, database and passwords of ``url``; ``RedisUrlError`` (one line
    naming the part that is wrong, see ``SENTINEL_URL_FORM``) otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise RedisUrlError(f"expected {SENTINEL_URL_FORM}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:  # redis-py reads a bare user@ as a password too; be explicit instead
            raise RedisUrlError("give the master's password as :PASSWORD@ (or USER:PASSWORD@) before the sentinels")
    sentinels = tuple(_sentinel_address(item) for item in hostlist.split(",")) if hostlist else ()
    if not sentinels:
        raise RedisUrlError(f"no sentinel address; expected {SENTINEL_URL_FORM}")
    segments = parts.path.split("/")[1:] if parts.path else []
    if not segments or not segments[0]:
        raise RedisUrlError(f"no master name after the sentinels; expected {SENTINEL_URL_FORM}")
    if len(segments) > 2:
        raise RedisUrlError(f"too many path parts: the path is /MASTER_NAME[/DB]; expected {SENTINEL_URL_FORM}")
    master_name = unquote(segments[0])
    db_text = segments[1] if len(segments) == 2 else ""
    if db_text and not _DIGITS.fullmatch(db_text):
        raise RedisUrlError(f"the database {db_text!r} after the master name is not a number")
    if parts.fragment:
        raise RedisUrlError("a redis+sentinel:// URL has no #fragment; percent-encode '#' in passwords as %23")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _QUERY_KEYS)
    if unknown:
        raise RedisUrlError(f"unknown query parameter {unknown[0]!r}; the only one is sentinel_password")
    if len(query.get("sentinel_password", [])) > 1:
        raise RedisUrlError("sentinel_password is given twice; give it once")
    sentinel_password = query["sentinel_password"][0] if "sentinel_password" in query else None
    return SentinelTarget(sentinels=sentinels, master_name=master_name, db=int(db_text or 0), username=username,
                          password=password, sentinel_password=sentinel_password or None)


def _sentinel_address(item: str) -> tuple[str, int]:
    match = _HOST.match(item)
    if not item or match is None:
        raise RedisUrlError(f"sentinel address {item!r} is not HOST[:PORT]; separate sentinels with commas")
    host = match.group("v6") or match.group("host")
    port_text = match.group("v6port") if match.group("v6") else match.group("port")
    if port_text is None:
        return host, DEFAULT_SENTINEL_PORT
    if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise RedisUrlError(f"sentinel port {port_text!r} of {host} is not a number between 1 and 65535")
    return host, int(port_text)


def redis_client(url: str, *, socket_timeout: float | None, socket_connect_timeout: float | None = None,
                 **options: Any) -> Any:
    """A ``redis.Redis`` for ``url`` (validated by ``worker.settings.redis_url_problem``); for a
    ``redis+sentinel://`` URL, a client of the current master. ``options`` go to every
    connection to Redis itself (e.g. ``health_check_interval``)."""
    import redis

    connect_timeout = socket_timeout if socket_connect_timeout is None else socket_connect_timeout
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                    **options)
    from redis.sentinel import Sentinel

    target = parse_sentinel_url(url)
    # Sentinels answer at once or not at all: the same bounded waits, their own password.
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(target.master_name, db=target.db, username=target.username, password=target.password,
                               socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout, **options)

