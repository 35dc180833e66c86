"""Which shared limits a provider request counts against, and taking them before it is sent.

A request counts against the provider's own ``rate_limit``/``concurrency`` (bucket: the provider's
name) and against every declared endpoint group it matches (bucket ``provider/group``): a search
call at Asana takes a slot of the provider's 1,500/min and one of search's 60/min. The limiter
(``worker/providers/ratelimit.py``) keeps the buckets in Redis, so every worker shares them.

A 429 blocks the provider's bucket, so every worker waits out the Retry-After before any request
(which group tripped is unknowable from outside): one 429 reaches one worker, not one per worker.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from typing import Iterator
from urllib.parse import urlsplit

from worker.inventory.schema import EndpointGroupSpec, HttpProviderSpec
from worker.providers.ratelimit import RateLimit, RateLimiter


@lru_cache(maxsize=256)
def _glob_regex(glob: str) -> re.Pattern[str]:
    """``*`` is one path segment, ``**`` any number of segments (including none)."""
    parts = re.split(r"(\*\*/?|\*)", glob.rstrip("/") or "/")
    out = []
    for part in parts:
        if part in ("**", "**/"):
            out.append(r"(?:[^/]+/?)*")
        elif part == "*":
            out.append(r"[^/]+")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "/?$")


def group_matches(group: EndpointGroupSpec, method: str, url: str) -> bool:
    """Whether a request (method, URL or path) belongs to the group."""
    if group.methods and method.upper() not in group.methods:
        return False
    if not group.paths:
        return True
    path = urlsplit(url).path or "/"
    return any(_glob_regex(glob).match(path) for glob in group.paths)


def group_bucket(provider: str, group: str) -> str:
    return f"{provider}/{group}"


class ProviderLimits:
    """The limits of one provider, registered with the shared limiter."""

    def __init__(self, name: str, spec: HttpProviderSpec, limiter: RateLimiter, *, lease_s: float) -> None:
        self.name = name
        self._groups = spec.endpoint_groups
        self._limiter = limiter
        self._lease_s = lease_s
        limiter.register(name, RateLimit(spec.rate_limit.requests, spec.rate_limit.per.total_seconds()))
        limiter.register_concurrency(name, spec.concurrency, lease_s)
        for group_name, group in self._groups.items():
            bucket = group_bucket(name, group_name)
            limit = group.rate_limit
            limiter.register(bucket, RateLimit(limit.requests, limit.per.total_seconds()) if limit else None)
            limiter.register_concurrency(bucket, group.concurrency, lease_s)

    def buckets(self, method: str, url: str) -> list[str]:
        """The provider's bucket, then each matching group's (declaration order)."""
        return [self.name] + [group_bucket(self.name, g) for g, spec in self._groups.items()
                              if group_matches(spec, method, url)]

    def acquire(self, method: str, url: str) -> None:
        """A rate-limit slot in every bucket the request counts against, all at once (waits,
        bounded; a 429 block of any of them is honoured first), ending at once."""
        self._limiter.acquire(*self.buckets(method, url))

    @contextmanager
    def sending(self, method: str, url: str) -> Iterator[None]:
        """Around sending one request that is ready to go: the concurrency leases first (waiting
        for one must not age a rate slot already taken), then a rate slot in every bucket, which
        counts until the answer is in (see ``worker/providers/ratelimit.py``)."""
        buckets = self.buckets(method, url)
        with ExitStack() as stack:
            for bucket in buckets:
                stack.enter_context(self._limiter.hold(bucket))
            with self._limiter.slot(*buckets, hold_s=self._lease_s):
                yield

    @contextmanager
    def in_flight(self, method: str, url: str) -> Iterator[None]:
        """Hold a concurrency lease in every bucket with a concurrency limit while the request runs."""
        with ExitStack() as stack:
            for bucket in self.buckets(method, url):
                stack.enter_context(self._limiter.hold(bucket))
            yield

    def block(self, retry_after: float) -> None:
        self._limiter.block(self.name, retry_after)
