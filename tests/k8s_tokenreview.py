"""What OpenBao's ``kubernetes`` auth method asks of a cluster, and nothing more: the TokenReview API
(``POST /apis/authentication.k8s.io/v1/tokenreviews``), answering for service-account JWTs signed
by one RSA key, plus a way to mint such JWTs. Lets the real auth method log keyrotor in on a
machine without Kubernetes.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from keyrotor_sandbox.standin_http import Request, Response, make_server

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
_SA_NAMESPACE = "kubernetes.io/serviceaccount/namespace"
_SA_NAME = "kubernetes.io/serviceaccount/service-account.name"
_SA_UID = "kubernetes.io/serviceaccount/service-account.uid"


def new_signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_jwt(key: rsa.RSAPrivateKey, namespace: str, name: str, *, serial: int = 1) -> str:
    """A legacy (secret-based) service-account token, as the API server signs them; another
    ``serial`` gives another token for the same account (as after the kubelet rotates it)."""
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        _SA_NAMESPACE: namespace,
        _SA_NAME: name,
        _SA_UID: str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}")),
        "kubernetes.io/serviceaccount/secret.name": f"{name}-token-{serial:05d}",
        "iat": int(time.time()),
    }
    return pyjwt.encode(claims, key, algorithm="RS256")


@dataclass
class TokenReviewer:
    """Authenticates a JWT when ``key`` signed it and it is not in ``revoked`` (as when its
    service account or pod is gone); records the answer of every review."""

    key: rsa.RSAPrivateKey
    revoked: set[str] = field(default_factory=set)
    reviews: list[bool] = field(default_factory=list)  # authenticated?, per review

    def __call__(self, request: Request) -> Response:
        if request.method != "POST" or request.path != REVIEW_PATH:
            return Response.json(404, {"kind": "Status", "status": "Failure", "reason": "NotFound"})
        try:
            token = request.json()["spec"]["token"]
            claims = pyjwt.decode(token, self.key.public_key(), algorithms=["RS256"],
                                  options={"verify_aud": False})
            if token in self.revoked:
                raise ValueError("revoked")
        except Exception as exc:  # any bad token is "not authenticated", as the API server says
            self.reviews.append(False)
            return Response.json(201, _review({"authenticated": False, "error": f"invalid token: {type(exc).__name__}"}))
        self.reviews.append(True)
        user = {"username": f"system:serviceaccount:{claims[_SA_NAMESPACE]}:{claims[_SA_NAME]}",
                "uid": claims[_SA_UID],
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{claims[_SA_NAMESPACE]}"]}
        return Response.json(201, _review({"authenticated": True, "user": user}))


def _review(status: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "spec": {}, "status": status}


@dataclass
class ReviewApi:
    """The running TokenReview API: HTTPS on loopback, with the CA the auth method must trust."""

    reviewer: TokenReviewer
    url: str
    ca_pem: str
    _server: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_token_reviewer(key: rsa.RSAPrivateKey, tmp_path: Path) -> ReviewApi:
    """Serve the TokenReview API over TLS (the auth method insists on a CA for the API server)."""
    cert_pem, key_pem = _self_signed("127.0.0.1")
    (tmp_path / "api.crt").write_bytes(cert_pem)
    (tmp_path / "api.key").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "api.crt", tmp_path / "api.key")
    reviewer = TokenReviewer(key)
    server = make_server(reviewer, "127.0.0.1", 0)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="tokenreview",
                     daemon=True).start()
    return ReviewApi(reviewer, f"https://127.0.0.1:{server.server_address[1]}", cert_pem.decode(), server)


def _self_signed(ip: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
