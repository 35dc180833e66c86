"""URLs fit for messages: a password in a URL is never printed."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def display_url(url: str) -> str:
    """``url`` fit for a message: a password in it (``redis://:PASS@host``, or a query parameter
    naming a password such as ``?sentinel_password=PASS``) is shown as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:  # rpartition: a list of sentinels after the @ is kept whole
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any("password" in name.lower() for name, _ in pairs):
        query = urlencode([(n, "***" if "password" in n.lower() else v) for n, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
