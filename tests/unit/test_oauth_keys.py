"""Key pairs, kids and client assertions of the OAuth private-key JWT provider."""

from __future__ import annotations

import jwt
import pytest
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from worker.errors import PermanentError
from worker.providers.oauth_keys import client_assertion, generate_key_pair, key_pair_from_pem, thumbprint
from worker.secret import Secret

#: RFC 7638 section 3.1: this key's thumbprint is NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
RFC7638_KEY = {
    "kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n"
         "3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0z"
         "gdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-cs"
         "FCur-kEgU8awapJzKnqDKgw",
}


def test_the_kid_is_the_rfc_7638_thumbprint() -> None:
    assert thumbprint(RFC7638_KEY) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(("algorithm", "kty"), [("RS256", "RSA"), ("PS256", "RSA"), ("ES256", "EC")])
def test_a_generated_pair_round_trips_from_its_pem_and_signs_verifiable_assertions(algorithm: str, kty: str) -> None:
    pair = generate_key_pair(algorithm)
    again = key_pair_from_pem(pair.private_pem, algorithm)
    assert again.kid == pair.kid and again.public_jwk == pair.public_jwk
    assert pair.public_jwk["kty"] == kty and pair.public_jwk["alg"] == algorithm and "d" not in pair.public_jwk
    token = client_assertion(pair.private_pem, algorithm=algorithm, client_id="c1", audience="https://as/token",
                             lifetime_s=60, now=1_000_000)
    assert jwt.get_unverified_header(token)["kid"] == pair.kid
    public = (ECAlgorithm if kty == "EC" else RSAAlgorithm).from_jwk(pair.public_jwk)
    claims = jwt.decode(token, public, algorithms=[algorithm], audience="https://as/token",
                        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    assert claims["iss"] == claims["sub"] == "c1" and claims["exp"] - claims["iat"] == 60 and claims["jti"]
    second = client_assertion(pair.private_pem, algorithm=algorithm, client_id="c1", audience="https://as/token",
                              lifetime_s=60, now=1_000_000)
    assert jwt.decode(second, options={"verify_signature": False})["jti"] != claims["jti"]


def test_a_key_that_is_not_a_pem_or_of_the_wrong_type_is_a_permanent_error_that_names_no_value() -> None:
    value = "not-a-key-but-maybe-secret"
    with pytest.raises(PermanentError) as garbled:
        key_pair_from_pem(Secret(value), "RS256")
    assert value not in str(garbled.value)
    ec_pair = generate_key_pair("ES256")
    with pytest.raises(PermanentError, match="not an RSA key"):
        key_pair_from_pem(ec_pair.private_pem, "RS256")
