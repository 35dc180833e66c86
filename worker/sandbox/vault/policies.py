"""The ACL policy store (``sys/policies/acl`` and the legacy ``sys/policy``)."""

from __future__ import annotations

from .acl import ACL, DEFAULT_POLICY, PathRule, parse_policy
from .errors import bad_request, not_found


class PolicyStore:
    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.parsed: dict[str, list[PathRule]] = {}
        self.put("default", DEFAULT_POLICY)

    def put(self, name: str, text: str) -> None:
        name = name.strip().lower()  # Vault lower-cases policy names
        if not name:
            raise bad_request("policy name must be provided")
        if name == "root":
            raise bad_request("cannot update root policy")
        if not text or not text.strip():
            raise bad_request("'policy' parameter not supplied or empty")
        self.parsed[name] = parse_policy(text)
        self.texts[name] = text

    def get(self, name: str) -> str:
        name = name.strip().lower()
        if name not in self.texts:
            raise not_found()
        return self.texts[name]

    def delete(self, name: str) -> None:
        name = name.strip().lower()
        if name == "root":
            raise bad_request("cannot delete root policy")
        if name == "default":
            raise bad_request("cannot delete default policy")
        self.texts.pop(name, None)
        self.parsed.pop(name, None)

    def names(self) -> list[str]:
        return sorted([*self.texts, "root"])

    def acl_for(self, policies: list[str]) -> ACL:
        """Unknown policy names grant nothing, as in Vault."""
        if "root" in policies:
            return ACL([], root=True)
        return ACL(self.parsed[p] for p in policies if p in self.parsed)
