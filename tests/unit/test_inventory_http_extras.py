"""`config check` of the declarative provider's richer calls: secret references in headers, query,
form and body; requests before a call and their captures; error matchers; per-type call
overrides; lifetime and admin. Every problem is reported as FILE:LINE: path: message."""

from __future__ import annotations

import textwrap

from worker.inventory.loader import check_text

BASE = """\
version: 1
providers:
  wf:
    kind: http
    mode: cutover
    base_url: https://wf.example
    errors:
{errors}
    credential_types:
      user_api_key: {{lifetime: {lifetime}}}
      admin_api_key: {{lifetime: 30d, admin: true{override}}}
    calls:
      issue:
        before:
          - name: login
            method: POST
            url: "{{base_url}}/login"
            form:
              username: "{{labels[user]}}"
              password: {password}
            capture: {{session_id: "$.data.sessionID"}}
        method: PUT
        url: "{{base_url}}/user/generateApiKey"
        headers: {{sessionID: "{{captured[{captured}]}}"}}
        response: {{secret: "$.data.result"}}
      verify:
        method: GET
        url: "{{base_url}}/session"
        auth: {{type: header, name: apiKey, value: "{{secret}}"}}
keys: {{}}
"""

GOOD_ERRORS = """\
      - {status: 500, body_contains: "Untrusted request", outcome: configuration, message: "$.error.message"}"""


def check(**fields: str) -> list[str]:
    values = {"errors": GOOD_ERRORS, "lifetime": "30d", "override": "", "password": '{vault: "secret/wf/users/{labels[user]}#password"}',
              "captured": "session_id", **fields}
    _inventory, problems = check_text(BASE.format(**values), "inv.yaml")
    return [p.format() for p in problems]


def test_the_workfront_shape_is_valid() -> None:
    assert check() == []


def test_a_literal_password_in_a_form_is_refused_at_its_line() -> None:
    problems = check(password='"Tr0ub4dor-and-3"')
    assert len(problems) == 1
    assert problems[0].startswith("inv.yaml:20: providers.wf.calls.issue.before[0].form.password")
    assert "a literal secret is not allowed here" in problems[0] and "Tr0ub4dor" not in problems[0]


def test_a_malformed_reference_is_refused() -> None:
    problems = check(password='{vault: "no-field-here"}')
    assert problems and problems[0].startswith("inv.yaml:20:") and "MOUNT/PATH#FIELD" in problems[0]


def test_a_value_captured_by_no_step_is_named() -> None:
    problems = check(captured="session")
    assert problems == [
        "inv.yaml:13: providers.wf.calls.issue: {captured[session]} is not captured by a step in 'before' (captured: session_id)"]


def test_error_matchers_are_checked() -> None:
    problems = check(errors='      - {status: 700, outcome: configuration}\n      - {status: 500, outcome: explode, message: "error.message"}')
    joined = "\n".join(problems)
    assert "inv.yaml:8: providers.wf.errors[0].status" in joined and "700 is not an HTTP status" in joined
    assert "inv.yaml:9: providers.wf.errors[1].outcome" in joined
    assert "inv.yaml:9: providers.wf.errors[1].message" in joined and "JSON path" in joined


def test_lifetime_must_be_a_positive_duration() -> None:
    problems = check(lifetime="0s")
    assert len(problems) == 1 and problems[0].startswith("inv.yaml:10: providers.wf.credential_types.user_api_key.lifetime")


def test_a_type_override_is_validated_like_the_providers_calls() -> None:
    override = ', calls: {verify: {method: GET, url: "{base_url}/user/search"}}'
    problems = check(override=override)
    assert len(problems) == 1
    assert problems[0].startswith("inv.yaml:11: providers.wf.credential_types.admin_api_key.calls.verify")
    assert "verify must authenticate with the credential" in problems[0]


def test_a_management_call_without_auth_or_references_is_refused() -> None:
    text = textwrap.dedent("""\
        version: 1
        providers:
          p:
            kind: http
            mode: cutover
            base_url: https://p.example
            credential_types: {t: {}}
            calls:
              issue: {method: POST, url: "{base_url}/k", response: {secret: "$.k"}}
              verify: {method: GET, url: "{base_url}/me", auth: {type: bearer, token: "{secret}"}}
        keys: {}
        """)
    _inv, problems = check_text(text, "inv.yaml")
    assert [p.format() for p in problems] == [
        "inv.yaml:9: providers.p.calls.issue: the 'issue' call has no auth: set the provider's 'auth' or this call's "
        "'auth' (or send a secret reference in its headers, query, form or body)"]


def test_form_and_body_together_are_refused() -> None:
    text = BASE.format(errors=GOOD_ERRORS, lifetime="30d", override="", captured="session_id",
                       password='{vault: "secret/wf/u#password"}').replace(
        '        method: PUT\n', '        method: PUT\n        form: {a: "b"}\n        body: {c: "d"}\n')
    _inv, problems = check_text(text, "inv.yaml")
    assert any("give either 'form'" in p.format() for p in problems)


def test_a_key_that_expires_needs_a_way_to_know_its_next_expiry() -> None:
    text = textwrap.dedent("""\
        version: 1
        providers:
          p:
            kind: http
            mode: cutover
            base_url: https://p.example
            auth: {type: bearer, token: {env: P_TOKEN}}
            credential_types: {t: {}, timed: {lifetime: 30d}}
            calls:
              issue: {method: POST, url: "{base_url}/k", response: {secret: "$.k"}}
              verify: {method: GET, url: "{base_url}/me", auth: {type: bearer, token: "{secret}"}}
        keys:
          p/a:
            provider: p
            credential_type: t
            owner: o
            vault: {path: apps/a}
            expires_at: "2026-12-20T00:00:00Z"
          p/b:
            provider: p
            credential_type: timed
            owner: o
            vault: {path: apps/b}
            expires_at: "2026-12-20T00:00:00Z"
        """)
    _inv, problems = check_text(text, "inv.yaml")
    assert [p.format() for p in problems] == [
        "inv.yaml:18: keys.p/a.expires_at: this key expires, but neither the issue answer (response.expires_at) nor "
        "credential type 't' (lifetime) says when its next credential will: after the first rotation keyrotor would "
        "not know; declare 'lifetime' on the credential type (e.g. 30d)"]
    _inv, problems = check_text(text.replace('response: {secret: "$.k"}', 'response: {secret: "$.k", expires_at: "$.exp"}'), "inv.yaml")
    assert problems == []


def test_resolve_checks_per_key_references_for_each_key_at_the_keys_line() -> None:
    """`config check --resolve`: a reference whose Vault path names a key's label is resolved for
    every key of its provider; a missing one is reported at that key, naming the path."""
    from worker.doctor import reference_problems
    from worker.errors import ConfigError
    from worker.secret import Secret

    text = BASE.format(errors=GOOD_ERRORS, lifetime="30d", override="", captured="session_id",
                       password='{vault: "secret/wf/users/{labels[user]}#password"}').replace(
        "keys: {}\n", textwrap.dedent("""\
            keys:
              wf/alice:
                provider: wf
                credential_type: user_api_key
                owner: o
                vault: {path: apps/alice}
                labels: {user: alice@example.com}
              wf/bob:
                provider: wf
                credential_type: user_api_key
                owner: o
                vault: {path: apps/bob}
                labels: {user: bob@example.com}
            """))
    inventory, problems = check_text(text, "inv.yaml")
    assert problems == [] and inventory is not None
    stored = {"secret/wf/users/alice@example.com#password": "pw"}

    def resolve(ref: object) -> Secret:
        vault = getattr(ref, "vault")
        if vault not in stored:
            raise ConfigError(f"secret reference vault:{vault}: no such field")
        return Secret(stored[vault])

    found = reference_problems(inventory.model_dump(mode="json", by_alias=True), resolve)
    assert found == [(("keys", "wf/bob"), "provider 'wf' for this key: secret reference "
                      "vault:secret/wf/users/bob@example.com#password: no such field")]
