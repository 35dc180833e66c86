"""Error matchers: how a provider's answer is classified when its status alone says too little.

Declared on a provider (``errors:``, every call) or on one call / one step of a call (tried first)::

    errors:
      - status: 500
        body_contains: "Untrusted request"
        outcome: configuration          # not retried; the vendor's message is shown
        message: "$.error.message"      # where the vendor's own words are (else the matched text)
        hint: "store the API certificate in Vault at secret/keyrotor/providers/workfront#api_certificate"

The first matcher that fits decides; an answer no matcher fits is classified by its status
(``worker/providers/http.py``). Outcomes map to the exception vocabulary of ``worker.errors``.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

#: What a matched answer means; ``configuration`` and ``permanent`` are never retried.
Outcome = Literal["configuration", "permanent", "invalid", "deprecated", "transient", "rate_limited", "success"]

_JSON_PATH = re.compile(r"^\$(\.[A-Za-z0-9_-]+|\[\d+\])*$")


class ErrorMatcherSpec(BaseModel):
    """One rule: an answer with this status (one code or a list) whose body contains this text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Union[int, list[int]]
    body_contains: Optional[str] = Field(None, min_length=1, max_length=500)
    outcome: Outcome
    #: JSON path to the vendor's message in the answer; shown to the user with the error.
    message: Optional[str] = None
    #: What the user should do; shown after the vendor's message.
    hint: Optional[str] = Field(None, max_length=500)

    @field_validator("status")
    @classmethod
    def _codes(cls, value: Union[int, list[int]]) -> Union[int, list[int]]:
        codes = value if isinstance(value, list) else [value]
        if not codes:
            raise PydanticCustomError("status_code", "give at least one HTTP status")
        for code in codes:
            if not 100 <= code <= 599:
                raise PydanticCustomError("status_code", "{code} is not an HTTP status (100-599)", {"code": code})
        return value

    @field_validator("message")
    @classmethod
    def _json_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _JSON_PATH.match(value):
            raise PydanticCustomError("json_path", "expected a JSON path such as $.error.message, got {value}", {"value": repr(value)})
        return value

    def codes(self) -> list[int]:
        return self.status if isinstance(self.status, list) else [self.status]

    def matches(self, status: int, body: str) -> bool:
        return status in self.codes() and (self.body_contains is None or self.body_contains in body)


def first_match(matchers: list[ErrorMatcherSpec], status: int, body: str) -> Optional[ErrorMatcherSpec]:
    return next((m for m in matchers if m.matches(status, body)), None)


__all__ = ["ErrorMatcherSpec", "Outcome", "first_match"]
