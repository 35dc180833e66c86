"""Kubernetes client failures become keyrotor errors without the response body."""

from __future__ import annotations

import pytest
from kubernetes.client.rest import ApiException
from urllib3.exceptions import MaxRetryError

from worker.errors import PermanentError, TransientError, is_permanent
from worker.integrations.kube_api import KubeConflict, ObjectRef, api_error, decode_value, encode_value

REF = ObjectRef("Secret", "apps", "billing")
BODY = '{"kind":"Secret","data":{"api_key":"c2VjcmV0LXZhbHVl"},"message":"secret-value"}'


def _exc(status: int, headers: dict[str, str] | None = None) -> ApiException:
    exc = ApiException(status=status, reason="Reason")
    exc.body, exc.headers = BODY, headers or {}
    return exc


@pytest.mark.parametrize(("status", "kind", "permanent"), [
    (409, KubeConflict, False), (401, PermanentError, True), (403, PermanentError, True), (404, PermanentError, True),
    (422, PermanentError, True), (429, TransientError, False), (500, TransientError, False), (503, TransientError, False),
])
def test_statuses_map_to_classes_and_never_carry_the_body(status: int, kind: type, permanent: bool) -> None:
    error = api_error(_exc(status), "update", REF)
    assert isinstance(error, kind) and is_permanent(error) is permanent
    assert "secret-value" not in str(error) and "c2VjcmV0" not in str(error)
    assert "Secret apps/billing" in str(error)


def test_retry_after_is_kept_and_connection_failures_are_transient() -> None:
    assert api_error(_exc(429, {"Retry-After": "7"}), "get", REF).retry_after == 7  # type: ignore[attr-defined]
    error = api_error(MaxRetryError(None, "/api/v1/namespaces/apps/secrets/billing"), "get", REF)  # type: ignore[arg-type]
    assert isinstance(error, TransientError) and "no answer from the API server" in str(error)


def test_values_round_trip_through_base64() -> None:
    assert decode_value(encode_value("ключ-✓")) == "ключ-✓"
    assert decode_value("not base64!") is None
