"""Key pairs and client assertions for OAuth 2.0 private-key JWT clients (RFC 7523, RFC 7638).

The ``kid`` of a generated key is its RFC 7638 JWK thumbprint, so it follows from the private key
alone: a check given only the PEM from Vault signs with the right ``kid``, and a registration
whose answer was lost is found again by listing the client's JWKs for that ``kid``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from worker.errors import PermanentError
from worker.secret import Secret

#: RFC 7523 section 2.2: the client_assertion_type of a JWT client assertion.
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True)
class KeyPair:
    private_pem: Secret        # PKCS#8 PEM; lives in Vault and in memory only
    public_pem: str
    public_jwk: dict[str, Any]  # with kid, alg, use
    kid: str


def generate_key_pair(algorithm: str, rsa_bits: int = 2048) -> KeyPair:
    """A fresh key pair for ``algorithm`` (RS256/PS256: RSA ``rsa_bits``; ES256: P-256)."""
    private: Any
    if algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return key_pair_from_pem(Secret(pem), algorithm)


def _load_private(pem: Secret) -> Any:
    try:
        return serialization.load_pem_private_key(pem.reveal().encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        # The cryptography error text never holds key material, but say nothing about the value anyway.
        raise PermanentError("the stored private key is not an unencrypted PEM private key") from None


def key_pair_from_pem(pem: Secret, algorithm: str) -> KeyPair:
    """The public half, JWK and ``kid`` (RFC 7638 thumbprint) of a stored private key."""
    private = _load_private(pem)
    public = private.public_key()
    if algorithm == "ES256":
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise PermanentError("the stored private key is not an EC key, but the client signs with ES256")
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        if not isinstance(private, rsa.RSAPrivateKey):
            raise PermanentError(f"the stored private key is not an RSA key, but the client signs with {algorithm}")
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    kid = thumbprint(jwk)
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    return KeyPair(private_pem=pem, public_pem=public_pem, public_jwk={**jwk, "kid": kid, "alg": algorithm, "use": "sig"}, kid=kid)


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of a public RSA or EC JWK."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = {name: jwk[name] for name in required}
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":"), sort_keys=True).encode("ascii")).digest()
    return jwt.utils.base64url_encode(digest).decode("ascii")


def client_assertion(pem: Secret, *, algorithm: str, client_id: str, audience: str, lifetime_s: float,
                     now: float | None = None) -> str:
    """An RFC 7523 client assertion: ``iss`` = ``sub`` = client id, ``aud``, ``iat``, ``exp``, a fresh ``jti``,
    signed with the private key, ``kid`` in the header."""
    pair = key_pair_from_pem(pem, algorithm)
    issued = int(now if now is not None else time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "iat": issued, "nbf": issued,
              "exp": issued + max(1, int(lifetime_s)), "jti": uuid.uuid4().hex}
    return jwt.encode(claims, _load_private(pem), algorithm=algorithm, headers={"kid": pair.kid})
