"""ACL policy parsing and evaluation of the Vault stand-in, checked against Vault's documented
priority rules (https://developer.hashicorp.com/vault/docs/concepts/policies#priority-matching)."""

from __future__ import annotations

import pytest

from worker.sandbox.vault.acl import ACL, DEFAULT_POLICY, PathRule, parse_policy
from worker.sandbox.vault.errors import VaultHTTPError
from worker.sandbox.vault.policies import PolicyStore


def acl(*texts: str) -> ACL:
    return ACL(parse_policy(t) for t in texts)


def test_parse_capabilities_and_legacy_policy_keyword() -> None:
    rules = {r.pattern: r.capabilities for r in parse_policy('''
        path "secret/data/a" { capabilities = ["read", "list"] }
        path "secret/data/b" { policy = "write" }
    ''')}
    assert rules["secret/data/a"] == {"read", "list"}
    assert rules["secret/data/b"] == {"create", "read", "update", "delete", "list"}


def test_repeated_path_blocks_in_one_policy_are_merged() -> None:
    a = acl('''
        path "secret/data/x" { capabilities = ["read"] }
        path "secret/data/x" { capabilities = ["update"] }
        path "secret/data/y" { capabilities = ["read"] }
        path "secret/data/y" { capabilities = ["deny"] }
    ''')
    assert a.capabilities("secret/data/x") == {"read", "update"}
    assert not a.allows("secret/data/y", "read")


def test_json_policy_is_accepted() -> None:
    a = acl('{"path": {"secret/data/j": {"capabilities": ["read"]}}}')
    assert a.allows("secret/data/j", "read")


@pytest.mark.parametrize("text, fragment", [
    ('path "x" { capabilities = ["fly"] }', 'invalid capability "fly"'),
    ('path "x" { policy = "all" }', 'invalid policy "all"'),
    ('path "x" { capabilities = ["read"] ', "failed to parse policy"),
    ('path "a*b" { capabilities = ["read"] }', "invalid use of globbing"),
])
def test_parse_errors_are_400_with_reason(text: str, fragment: str) -> None:
    with pytest.raises(VaultHTTPError) as info:
        parse_policy(text)
    assert info.value.status == 400
    assert fragment in info.value.errors[0]


def test_exact_rule_beats_glob() -> None:
    a = acl('''
        path "secret/data/*" { capabilities = ["read"] }
        path "secret/data/admin" { capabilities = ["deny"] }
    ''')
    assert a.allows("secret/data/app", "read")
    assert not a.allows("secret/data/admin", "read")


def test_longer_glob_beats_shorter_glob() -> None:
    a = acl('''
        path "secret/*" { capabilities = ["deny"] }
        path "secret/data/apps/*" { capabilities = ["read", "update"] }
    ''')
    assert a.allows("secret/data/apps/x", "update")
    assert not a.allows("secret/data/other", "read")


def test_glob_later_than_plus_wins() -> None:
    # The first wildcard occurs later in "secret/data/apps/*" than in "secret/+/apps/x".
    a = acl('''
        path "secret/+/apps/x" { capabilities = ["deny"] }
        path "secret/data/apps/*" { capabilities = ["read"] }
    ''')
    assert a.allows("secret/data/apps/x", "read")


def test_non_glob_beats_glob_at_same_wildcard_position() -> None:
    a = acl('''
        path "secret/+/x*" { capabilities = ["read"] }
        path "secret/+/x" { capabilities = ["update"] }
    ''')
    assert a.capabilities("secret/data/x") == {"update"}
    assert a.capabilities("secret/data/xyz") == {"read"}


def test_fewer_plus_segments_win() -> None:
    a = acl('''
        path "secret/+/+/c" { capabilities = ["read"] }
        path "secret/+/b/c" { capabilities = ["update"] }
    ''')
    assert a.capabilities("secret/a/b/c") == {"update"}


def test_plus_matches_exactly_one_segment() -> None:
    a = acl('path "secret/data/+/config" { capabilities = ["read"] }')
    assert a.allows("secret/data/team/config", "read")
    assert not a.allows("secret/data/team/sub/config", "read")
    assert not a.allows("secret/data/config", "read")


def test_nothing_matches_means_denied() -> None:
    a = acl('path "secret/data/a" { capabilities = ["read"] }')
    assert a.capabilities("secret/data/b") == {"deny"}
    assert not a.allows("secret/data/a", "update")


def test_policies_merge_per_path_and_deny_wins_on_same_path() -> None:
    a = acl('path "kv/data/x" { capabilities = ["read"] }', 'path "kv/data/x" { capabilities = ["update"] }')
    assert a.capabilities("kv/data/x") == {"read", "update"}
    b = acl('path "kv/data/x" { capabilities = ["read"] }', 'path "kv/data/x" { capabilities = ["deny"] }')
    assert not b.allows("kv/data/x", "read")


def test_more_specific_allow_overrides_broader_deny_across_policies() -> None:
    a = acl('path "kv/*" { capabilities = ["deny"] }', 'path "kv/data/ok" { capabilities = ["read"] }')
    assert a.allows("kv/data/ok", "read")
    assert not a.allows("kv/data/no", "read")


def test_list_uses_exact_rule_without_trailing_slash() -> None:
    a = acl('path "secret/metadata/apps" { capabilities = ["list"] }')
    assert a.allows("secret/metadata/apps/", "list")


def test_sudo_required_on_root_paths() -> None:
    a = acl('path "sys/auth/*" { capabilities = ["create", "update"] }')
    assert a.allows("sys/auth/kubernetes", "update")
    assert not a.allows("sys/auth/kubernetes", "update", sudo=True)
    b = acl('path "sys/auth/*" { capabilities = ["update", "sudo"] }')
    assert b.allows("sys/auth/kubernetes", "update", sudo=True)


def test_root_policy_allows_everything_and_unknown_policies_grant_nothing() -> None:
    store = PolicyStore()
    assert store.acl_for(["root"]).allows("anything/at/all", "delete", sudo=True)
    assert not store.acl_for(["nope"]).allows("secret/data/x", "read")


def test_default_policy_grants_self_token_operations_only() -> None:
    store = PolicyStore()
    default = store.acl_for(["default"])
    assert default.allows("auth/token/lookup-self", "read")
    assert default.allows("auth/token/renew-self", "update")
    assert default.allows("auth/token/revoke-self", "update")
    assert not default.allows("auth/token/create", "update")
    assert not default.allows("secret/data/x", "read")
    assert store.get("default") == DEFAULT_POLICY


def test_policy_store_guards_builtin_policies() -> None:
    store = PolicyStore()
    for action in (lambda: store.put("root", 'path "x" { capabilities = ["read"] }'),
                   lambda: store.delete("root"), lambda: store.delete("default"),
                   lambda: store.put("empty", "  ")):
        with pytest.raises(VaultHTTPError) as info:
            action()
        assert info.value.status == 400
    store.put("MyPolicy", 'path "x" { capabilities = ["read"] }')
    assert "mypolicy" in store.names() and "root" in store.names()


def test_priority_key_orders_like_vault() -> None:
    def best(path: str, *patterns: str) -> str:
        rules = [PathRule(p, frozenset({"read"})) for p in patterns]
        return max((r for r in rules if r.matches(path)), key=PathRule.priority).pattern

    # Rule 1: the later first wildcard wins ('*' at 5 beats '+' at 4).
    assert best("a/b/c", "a/*", "a/b*", "a/+/c", "a/b/c*", "a/b/+") == "a/b/c*"
    # Rule 2: same position, the non-glob wins.
    assert best("a/b/c", "a/b/*", "a/b/+") == "a/b/+"
    # Rule 4: same position, both globs, same '+' count: the longer one wins.
    assert best("a/b/cd", "a/+/c*", "a/+/*") == "a/+/c*"
