"""The token store: service tokens with TTLs, renewal, use counts, parent/child revocation.

Time comes from ``worker.clock.utcnow`` so tests can make tokens expire without sleeping.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .errors import bad_request
from .request import as_bool, as_int, as_str_list
from .timeutil import now, parse_duration, rfc3339

SYSTEM_MAX_TTL = 768 * 3600  # Vault's default max_lease_ttl (32 days)
_ALPHABET = string.ascii_letters + string.digits


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


@dataclass
class Token:
    id: str = field(repr=False)  # the token itself; the accessor identifies it safely
    accessor: str
    policies: list[str]
    path: str
    display_name: str
    created: datetime
    ttl: int  # creation TTL in seconds; 0 = never expires
    expires: datetime | None
    renewable: bool
    orphan: bool
    parent: str | None = None
    meta: dict[str, str] | None = None
    num_uses: int = 0  # 0 = unlimited
    explicit_max_ttl: int = 0
    period: int = 0
    last_renewal: datetime | None = None
    lease: int = 0  # the duration granted by the last create/renew (the auth block's lease_duration)
    exhausted: bool = False  # its last use is in progress; revoked when the request ends
    children: set[str] = field(default_factory=set)

    @property
    def is_root(self) -> bool:
        return "root" in self.policies

    def remaining(self, at: datetime) -> int:
        if self.expires is None:
            return 0
        return max(0, int((self.expires - at).total_seconds()))

    def lookup_data(self) -> dict[str, Any]:
        at = now()
        data: dict[str, Any] = {
            "accessor": self.accessor,
            "creation_time": int(self.created.timestamp()),
            "creation_ttl": self.ttl,
            "display_name": self.display_name,
            "entity_id": "",
            "expire_time": rfc3339(self.expires) if self.expires else None,
            "explicit_max_ttl": self.explicit_max_ttl,
            "id": self.id,
            "issue_time": rfc3339(self.created),
            "meta": dict(self.meta) if self.meta else None,
            "num_uses": self.num_uses,
            "orphan": self.orphan,
            "path": self.path,
            "policies": list(self.policies),
            "renewable": self.renewable,
            "ttl": self.remaining(at),
            "type": "service",
        }
        if self.period:
            data["period"] = self.period
        if self.last_renewal is not None:
            data["last_renewal"] = rfc3339(self.last_renewal)
            data["last_renewal_time"] = int(self.last_renewal.timestamp())
        return data

    def auth_block(self) -> dict[str, Any]:
        return {
            "client_token": self.id,
            "accessor": self.accessor,
            "policies": list(self.policies),
            "token_policies": list(self.policies),
            "metadata": dict(self.meta) if self.meta else None,
            "lease_duration": self.lease if self.expires else 0,
            "renewable": self.renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": self.orphan,
            "mfa_requirement": None,
            "num_uses": self.num_uses,
        }


def _with_default(policies: list[str], no_default: bool) -> list[str]:
    policies = sorted({p.strip().lower() for p in policies if p.strip()})
    if policies == ["root"] or no_default:
        return policies
    return sorted({*policies, "default"})


class TokenStore:
    def __init__(self) -> None:
        self.tokens: dict[str, Token] = {}
        self.by_accessor: dict[str, str] = {}

    # ------------------------------------------------------------------ lookup and use
    def lookup(self, token_id: str | None) -> Token | None:
        """The live token, or None (unknown, expired or used up). Expired tokens are revoked."""
        if not token_id:
            return None
        token = self.tokens.get(token_id)
        if token is None:
            return None
        if token.expires is not None and token.expires <= now():
            self.revoke(token)
            return None
        return token

    def use(self, token: Token) -> None:
        """Count one use of a limited-use token before the request runs (as Vault does); the
        request that spends the last use still succeeds and the token is revoked after it."""
        if token.num_uses > 0:
            token.num_uses -= 1
            token.exhausted = token.num_uses == 0

    def finish(self, token: Token) -> None:
        if token.exhausted:
            self.revoke(token)

    # ------------------------------------------------------------------ creation
    def create_root(self, token_id: str) -> Token:
        token = Token(token_id, _random(24), ["root"], "auth/token/root", "root", now(), 0, None, False, True)
        self._add(token)
        return token

    def issue(
        self,
        *,
        policies: list[str],
        path: str,
        display_name: str,
        ttl: int,
        max_ttl: int = 0,
        renewable: bool = True,
        parent: Token | None = None,
        meta: dict[str, str] | None = None,
        num_uses: int = 0,
        explicit_max_ttl: int = 0,
        period: int = 0,
        token_id: str | None = None,
        no_default_policy: bool = False,
    ) -> Token:
        at = now()
        policies = _with_default(policies, no_default_policy)
        cap = explicit_max_ttl or max_ttl or SYSTEM_MAX_TTL
        if period:
            ttl = min(period, explicit_max_ttl) if explicit_max_ttl else period
        elif ttl or policies != ["root"]:  # only a root-policy token may live forever
            ttl = min(ttl or SYSTEM_MAX_TTL, cap)
        if parent is not None and parent.expires is not None:
            ttl = min(ttl or parent.remaining(at), parent.remaining(at))  # a child never outlives its parent
        token_id = token_id or "hvs." + _random(24)
        if token_id in self.tokens:
            raise bad_request("cannot create a token with a duplicate ID")
        token = Token(
            token_id, _random(24), policies, path, display_name, at, ttl,
            at + timedelta(seconds=ttl) if ttl else None, renewable, parent is None,
            parent.id if parent else None, meta or None, num_uses, explicit_max_ttl, period,
        )
        token.lease = ttl
        self._add(token)
        if parent is not None:
            parent.children.add(token.id)
        return token

    def create_from_request(self, parent: Token, body: dict[str, Any], *, orphan_endpoint: bool, sudo: bool) -> Token:
        """``auth/token/create`` and ``create-orphan`` with Vault's privilege rules."""
        privileged = parent.is_root or sudo
        no_parent = orphan_endpoint or as_bool(body.get("no_parent", False), "no_parent")
        if no_parent and not orphan_endpoint and not privileged:
            raise bad_request("root or sudo privileges required to create orphan token")
        if body.get("id") and not privileged:
            raise bad_request("root or sudo privileges required to specify token id")
        requested = as_str_list(body.get("policies"))
        parent_policies = [p for p in parent.policies if p != "default" or not requested]
        policies = requested or parent_policies
        if not parent.is_root:
            extra = set(policies) - set(parent.policies) - {"default"}
            if extra:
                raise bad_request("child policies must be subset of parent")
        num_uses = as_int(body.get("num_uses", 0) or 0, "num_uses")
        if num_uses < 0:
            raise bad_request("number of uses cannot be negative")
        ttl = parse_duration(body.get("ttl") or body.get("lease"), field="ttl")
        if ttl < 0:
            raise bad_request("ttl must be positive")
        renewable = as_bool(body.get("renewable", True), "renewable")
        meta = body.get("meta") or None
        if meta is not None and not isinstance(meta, dict):
            raise bad_request('error converting input for field "meta": expected a map of strings')
        display = str(body.get("display_name") or "")
        return self.issue(
            policies=policies,
            path="auth/token/create-orphan" if orphan_endpoint else "auth/token/create",
            display_name="token" + (f"-{display}" if display else ""),
            ttl=ttl,
            renewable=renewable,
            parent=None if no_parent else parent,
            meta={str(k): str(v) for k, v in meta.items()} if meta else None,
            num_uses=num_uses,
            explicit_max_ttl=parse_duration(body.get("explicit_max_ttl"), field="explicit_max_ttl"),
            period=parse_duration(body.get("period"), field="period"),
            token_id=str(body["id"]) if body.get("id") else None,
            no_default_policy=as_bool(body.get("no_default_policy", False), "no_default_policy"),
        )

    # ------------------------------------------------------------------ renewal and revocation
    def renew(self, token: Token, increment: Any) -> Token:
        if not token.renewable or token.expires is None:
            raise bad_request("lease is not renewable")
        at = now()
        wanted = parse_duration(increment, field="increment") or token.period or token.ttl
        limit = token.explicit_max_ttl or SYSTEM_MAX_TTL
        if not token.period:
            remaining_max = int((token.created + timedelta(seconds=limit) - at).total_seconds())
            wanted = min(wanted, max(0, remaining_max))
        token.expires = at + timedelta(seconds=wanted)
        token.last_renewal = at
        token.lease = wanted
        return token

    def revoke(self, token: Token, *, children: bool = True) -> None:
        self.tokens.pop(token.id, None)
        self.by_accessor.pop(token.accessor, None)
        if token.parent and token.parent in self.tokens:
            self.tokens[token.parent].children.discard(token.id)
        for child_id in list(token.children):
            child = self.tokens.get(child_id)
            if child is None:
                continue
            if children:
                self.revoke(child)
            else:  # revoke-orphan: children survive as orphans
                child.parent, child.orphan = None, True

    def _add(self, token: Token) -> None:
        self.tokens[token.id] = token
        self.by_accessor[token.accessor] = token.id
