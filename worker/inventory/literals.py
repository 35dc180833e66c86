"""Literal secrets where the inventory should only hold references: headers, URLs, webhook URLs.

The inventory is kept in git and applied to the database (``provider``, ``integration`` and
``inventory_snapshot`` rows), so a token spelled out in a header or a URL ends up in both. Each
check returns a message (never the value) or ``None``; the schema turns it into a
``FILE:LINE: path: message`` problem.

What counts as credential-shaped (after ``{placeholders}`` are taken out, since those are filled in
at call time from references or the credential being checked):
- a known token format (``Bearer …``, ``sk_live_…``, ``ghp_…``, ``xoxb-…``, ``AKIA…``, a JWT …);
- a long run of letters and digits with the entropy of a random token (not a UUID, a date, a word);
- under a name that says "secret" (``X-Api-Key``, ``?api_token=``, ``client_secret``), any value
  that is more than a short word or flag.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional
from urllib.parse import parse_qsl, urlsplit

REFERENCE_HINT = 'use a secret reference ({vault: "MOUNT/PATH#FIELD"} or {env: NAME})'

#: Headers whose value is a credential whatever it looks like.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "apikey", "x-auth-token",
                                "private-token", "cookie"})

#: Names (headers, query parameters) that say the value is secret.
_SECRET_NAME = re.compile(
    r"(?i)(token|secret|passw(or)?d|passwd|pwd|api[-_]?key|apikey|access[-_]?key|private[-_]?key|credential|"
    r"signature|session|cookie|auth)|^(key|sig|code)$")

_KNOWN_TOKEN = re.compile(
    r"(?i)^(bearer|basic|token|digest)\s+\S{6,}"                      # an Authorization value
    r"|^(sk|pk|rk)_(live|test)_[A-Za-z0-9]{8,}"                       # Stripe
    r"|^sk-[A-Za-z0-9_-]{16,}"                                        # OpenAI-style
    r"|^(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|^github_pat_\w{20,}"  # GitHub
    r"|^glpat-[A-Za-z0-9_-]{16,}"                                     # GitLab
    r"|^xox[abposr]-[A-Za-z0-9-]{10,}"                                # Slack
    r"|^(AKIA|ASIA)[0-9A-Z]{16}$"                                     # AWS access key id
    r"|^eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\."                    # a JWT
)
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_\-+/=.~]+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")

#: Incoming-webhook URLs whose path is the credential: they must come from a reference.
_WEBHOOK_URLS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Slack", re.compile(r"(?i)^https?://hooks\.slack(-gov)?\.com/(services|workflows|triggers)/")),
    ("Discord", re.compile(r"(?i)^https?://([a-z]+\.)?discord(app)?\.com/api/(v\d+/)?webhooks/")),
    ("Microsoft Teams", re.compile(r"(?i)^https?://([^/]+\.)?(webhook\.office\.com|outlook\.office(365)?\.com/webhook)")),
    ("Microsoft Teams (Power Automate)", re.compile(r"(?i)^https?://[^/]+\.logic\.azure\.com(:\d+)?/.*[?&]sig=")),
    ("Google Chat", re.compile(r"(?i)^https?://chat\.googleapis\.com/v1/spaces/[^/]+/messages\?.*key=")),
)


def strip_placeholders(template: str) -> str:
    """The literal text of a template: ``{placeholders}`` removed, ``{{``/``}}`` as single braces."""
    return _PLACEHOLDER.sub("", template.replace("{{", "\x00").replace("}}", "\x01")).replace("\x00", "{").replace("\x01", "}")


def _entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def looks_like_credential(value: str) -> bool:
    """A known token format, or a long random-looking run of token characters."""
    value = value.strip()
    if _KNOWN_TOKEN.search(value):
        return True
    if len(value) < 20 or not _TOKEN_CHARS.match(value) or _UUID.match(value):
        return False
    if not (re.search(r"[A-Za-z]", value) and re.search(r"\d", value)):
        return False  # words, dates, numbers
    return _entropy(value) >= 3.5


def secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _more_than_a_flag(value: str) -> bool:
    """Under a secret-sounding name: anything but a short word, number or boolean."""
    value = value.strip()
    return len(value) >= 8 and " " not in value and value.lower() not in {"true", "false", "required", "optional"}


def header_problem(name: str, value: str) -> Optional[str]:
    """Why header ``name`` would carry a literal credential, or None."""
    literal = strip_placeholders(value).strip()
    scheme_only = re.fullmatch(r"(?i)(bearer|basic|token|digest|apikey|api-key)?", literal) is not None
    if name.lower() in CREDENTIAL_HEADERS and not scheme_only:
        return (f"header {name} would carry a literal credential; use the call's 'auth' with a secret reference, "
                "or the {secret} placeholder")
    if looks_like_credential(literal) or any(looks_like_credential(part) for part in literal.split()) \
            or (secret_name(name) and _more_than_a_flag(literal)):
        return (f"header {name} looks like it holds a literal credential; use the call's 'auth' with a secret "
                "reference, or the {secret} placeholder (the value is not shown)")
    return None


def value_problem(name: str, value: str) -> Optional[str]:
    """Why a body, form or query field ``name`` would carry a literal credential, or None."""
    literal = strip_placeholders(value).strip()
    if looks_like_credential(literal) or (secret_name(name) and _more_than_a_flag(literal)):
        return (f"{name!r} looks like a credential: a literal secret is not allowed here; {REFERENCE_HINT} as its "
                "value, or a placeholder (the value is not shown)")
    return None


def webhook_url_kind(url: str) -> Optional[str]:
    """``"Slack"`` etc. when ``url`` is an incoming-webhook URL that is itself a credential."""
    return next((kind for kind, pattern in _WEBHOOK_URLS if pattern.match(url.strip())), None)


def url_problem(url: str) -> Optional[str]:
    """Why a URL (template) carries a literal credential, or None. Never includes the value."""
    kind = webhook_url_kind(url)
    if kind is not None:
        return f"a {kind} webhook URL is itself a secret; {REFERENCE_HINT} instead of the URL"
    literal = strip_placeholders(url)
    try:
        parts = urlsplit(literal)
        password = parts.password
    except ValueError:
        return None  # not a URL: the URL checks report it
    if password:
        return f"the URL carries a password (user:password@host); {REFERENCE_HINT} in the call's 'auth'"
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and (looks_like_credential(value) or (secret_name(name) and _more_than_a_flag(value))):
            return (f"query parameter {name!r} looks like a literal credential; use the {{secret}} placeholder or the "
                    f"call's 'auth' with a secret reference (the value is not shown)")
    for segment in parts.path.split("/"):
        if looks_like_credential(segment):
            return f"a path segment looks like a literal credential; {REFERENCE_HINT} (the value is not shown)"
    return None
