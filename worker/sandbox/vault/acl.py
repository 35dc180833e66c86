"""ACL policies: HCL parsing (pyhcl) and evaluation with Vault's matching rules.

Evaluation (vault/acl.go): policies are merged path by path (capabilities unioned, ``deny``
alone wins on the same path); an exact path rule beats any wildcard; otherwise, among the glob
(``*`` suffix) and segment-wildcard (``+``) rules that match, the highest priority wins:
the later the first wildcard, then not-a-glob over glob, then fewer ``+`` segments, then the
longer path, then the lexicographically larger one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from hcl.parser import HclParser

from .errors import bad_request

CAPABILITIES = ("create", "read", "update", "delete", "list", "patch", "sudo", "deny", "subscribe", "recover")
_LEGACY = {
    "deny": {"deny"},
    "read": {"read", "list"},
    "write": {"create", "read", "update", "delete", "list"},
    "sudo": {"create", "read", "update", "delete", "list", "sudo"},
}

# The parts of Vault's built-in "default" policy that the stand-in can serve.
DEFAULT_POLICY = """# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}

# Allow a token to look up its resultant ACL from all policies
path "sys/internal/ui/resultant-acl" {
    capabilities = ["read"]
}

# Allow a token to renew a lease via lease_id in the request body
path "sys/renew" {
    capabilities = ["update"]
}
path "sys/leases/renew" {
    capabilities = ["update"]
}

# Allow looking up lease properties
path "sys/leases/lookup" {
    capabilities = ["update"]
}

# Allow a token to manage its own cubbyhole
path "cubbyhole/*" {
    capabilities = ["create", "read", "update", "delete", "list"]
}

# Allow a token to wrap arbitrary values in a response-wrapping token
path "sys/wrapping/wrap" {
    capabilities = ["update"]
}
path "sys/wrapping/lookup" {
    capabilities = ["update"]
}
path "sys/wrapping/unwrap" {
    capabilities = ["update"]
}

# Allow general purpose tools
path "sys/tools/hash" {
    capabilities = ["update"]
}
path "sys/tools/hash/*" {
    capabilities = ["update"]
}
"""


class _PolicyParser(HclParser):  # type: ignore[misc]
    """pyhcl folds repeated blocks into one, the later overwriting the earlier; Vault keeps every
    ``path`` block and unions their capabilities, so keep them all as a list."""

    def objectlist_flat(self, lt, replace):  # type: ignore[no-untyped-def]
        paths = [value for key, value in lt if key == "path"]
        flat = super().objectlist_flat([(k, v) for k, v in lt if k != "path"], replace)
        if paths:
            flat["path"] = paths
        return flat


@dataclass(frozen=True)
class PathRule:
    pattern: str  # as written, e.g. "secret/data/apps/*"
    capabilities: frozenset[str]

    @property
    def is_prefix(self) -> bool:
        return self.pattern.endswith("*")

    @property
    def stem(self) -> str:
        return self.pattern[:-1] if self.is_prefix else self.pattern

    @property
    def has_segment_wildcard(self) -> bool:
        return "+" in self.stem.split("/")

    @property
    def is_exact(self) -> bool:
        return not self.is_prefix and not self.has_segment_wildcard

    def first_wildcard(self) -> int:
        positions = [len(self.stem)] if self.is_prefix else []
        offset = 0
        for segment in self.stem.split("/"):
            if segment == "+":
                positions.append(offset)
                break
            offset += len(segment) + 1
        return min(positions) if positions else len(self.pattern)

    def wildcard_count(self) -> int:
        return self.stem.split("/").count("+")

    def matches(self, path: str) -> bool:
        if self.is_exact:
            return path == self.pattern
        if not self.has_segment_wildcard:
            return path.startswith(self.stem)
        segments = self.stem.split("/")
        parts = path.split("/")
        if (not self.is_prefix and len(parts) != len(segments)) or len(parts) < len(segments):
            return False
        last = len(segments) - 1
        for index, segment in enumerate(segments):
            if segment == "+":
                continue
            if index == last and self.is_prefix:
                if not parts[index].startswith(segment):
                    return False
            elif parts[index] != segment:
                return False
        return True

    def priority(self) -> tuple[int, bool, int, int, str]:
        return (self.first_wildcard(), not self.is_prefix, -self.wildcard_count(), len(self.stem), self.stem)


def parse_policy(text: str) -> list[PathRule]:
    """HCL (or JSON) policy text → rules. Raises 400 with Vault's wording on bad input."""
    try:
        parsed = json.loads(text) if text.lstrip().startswith("{") else _PolicyParser().parse(text)
    except Exception as exc:  # pyhcl raises ValueError subclasses with line/column detail
        raise bad_request(f"failed to parse policy: {exc}") from None
    if not isinstance(parsed, dict):
        raise bad_request("failed to parse policy: top level must be an object")
    unknown = set(parsed) - {"path", "name"}
    if unknown:
        raise bad_request(f"failed to parse policy: invalid key {sorted(unknown)[0]!r} on line 1")
    blocks = parsed.get("path", {})
    items: Iterable[tuple[str, Any]]
    if isinstance(blocks, list):
        items = [pair for block in blocks for pair in block.items()]
    elif isinstance(blocks, dict):
        items = blocks.items()
    else:
        raise bad_request("failed to parse policy: 'path' must be a block")
    rules: dict[str, set[str]] = {}
    for pattern, body in items:
        if not isinstance(body, dict):
            raise bad_request(f'failed to parse policy: path "{pattern}": expected a block')
        caps: set[str] = set()
        legacy = body.get("policy")
        if legacy is not None:
            if legacy not in _LEGACY:
                raise bad_request(f'failed to parse policy: path "{pattern}": invalid policy "{legacy}"')
            caps |= _LEGACY[legacy]
        raw_caps = body.get("capabilities", [])
        if isinstance(raw_caps, str):
            raw_caps = [raw_caps]
        for cap in raw_caps:
            if cap not in CAPABILITIES:
                raise bad_request(f'failed to parse policy: path "{pattern}": invalid capability "{cap}"')
            caps.add(cap)
        pattern = pattern.lstrip("/")
        if "*" in pattern[:-1]:
            raise bad_request(f'failed to parse policy: path "{pattern}": invalid use of globbing')
        merged = rules.setdefault(pattern, set()) | caps
        rules[pattern] = {"deny"} if "deny" in merged else merged
    return [PathRule(p, frozenset(c)) for p, c in rules.items()]


class ACL:
    """The merged rules of a token's policies."""

    def __init__(self, policies: Iterable[list[PathRule]], *, root: bool = False) -> None:
        self.root = root
        merged: dict[str, set[str]] = {}
        for rules in policies:
            for rule in rules:
                caps = merged.setdefault(rule.pattern, set()) | set(rule.capabilities)
                merged[rule.pattern] = {"deny"} if "deny" in caps else caps
        self.rules = [PathRule(p, frozenset(c)) for p, c in merged.items()]
        self.exact = {r.pattern: r for r in self.rules if r.is_exact}
        self.wildcards = [r for r in self.rules if not r.is_exact]

    def capabilities(self, path: str, *, listing: bool = False) -> set[str]:
        """The capabilities the ACL grants on ``path`` (``{"root"}`` for the root policy)."""
        if self.root:
            return {"root"}
        rule = self.exact.get(path)
        if rule is None and listing:
            rule = self.exact.get(path.rstrip("/"))
        if rule is None:
            matches = [r for r in self.wildcards if r.matches(path)]
            rule = max(matches, key=PathRule.priority) if matches else None
        if rule is None or "deny" in rule.capabilities:
            return {"deny"}
        return set(rule.capabilities)

    def allows(self, path: str, capability: str, *, sudo: bool = False) -> bool:
        caps = self.capabilities(path, listing=capability == "list")
        if "root" in caps:
            return True
        if capability not in caps:
            return False
        return "sudo" in caps if sudo else True
