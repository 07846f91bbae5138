"""Receipts signed by deployed clients with the key of their TLS certificate.

A `koinon client` signs a receipt statement for every upload: the canonical bytes of (round,
SHA-256 of the model it trained from, SHA-256 digest of its upload payloads as the server
computes it (`koinon.topology.server.digest`), num_samples), with the private key of its
client certificate (ECDSA P-256 / SHA-256, from `koinon certs`; `cryptography` does the
signing). The server checks the signature against the public key of the certificate that
authenticated the TLS call before it accepts the upload, and the ledger records the receipt
with the signature, the certificate (PEM, its SHA-256 fingerprint and public key) and
`"client_key": "certificate"`, countersigned by the server. `koinon verify` checks the client's
signature with the recorded public key and, given the run's CA (`--ca`), that the recorded
certificate was issued by it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from koinon.errors import KoinonError
from koinon.ledger.roundlog import canonical

STATEMENT = "koinon receipt v1"
"""Names what the signed bytes are, so a signature over them cannot pass for anything else."""


def receipt_statement(round_number: int, model_sha256: str, payload_sha256: str, num_samples: int) -> bytes:
    """The bytes a client signs for its upload of round `round_number` (1-based, as in the log)."""
    return canonical({"statement": STATEMENT, "round": int(round_number), "model_sha256": model_sha256,
                      "payload_sha256": payload_sha256, "num_samples": int(num_samples)})


def sign_receipt(key_pem: bytes, statement: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature (DER) of `statement` with a client's certificate key."""
    key = load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KoinonError("the client key is not an EC key: receipts are signed with ECDSA P-256 "
                          "(make keys with `koinon certs`)")
    return key.sign(statement, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class CertificateKey:
    """What the log records of the certificate that authenticated an upload."""

    pem: str
    sha256: str  # fingerprint: SHA-256 of the certificate's DER bytes
    public_key: str  # hex, X9.62 uncompressed point

    @staticmethod
    def from_pem(pem: bytes | str) -> CertificateKey:
        data = pem.encode() if isinstance(pem, str) else pem
        cert = x509.load_pem_x509_certificate(data)
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the certificate's key is not ECDSA P-256")
        return CertificateKey(data.decode(), cert.fingerprint(hashes.SHA256()).hex(),
                              key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex())


def verify_certificate_signature(public_key: str, signature: str, statement: bytes) -> bool:
    """Whether hex `signature` is the P-256 key's (hex X9.62 point) ECDSA/SHA-256 over `statement`."""
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(public_key))
        key.verify(bytes.fromhex(signature), statement, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def check_upload_signature(cert_pem: bytes | None, signature: bytes, statement: bytes) -> CertificateKey:
    """The server's check before accepting an upload: `signature` must be the statement signed by
    the key of the peer certificate `cert_pem`. Raises ValueError with a one-line reason."""
    if not signature:
        raise ValueError("the upload carries no receipt signature (clients sign with their certificate key)")
    if not cert_pem:
        raise ValueError("no client certificate on this connection to check the receipt signature against")
    try:
        cert = CertificateKey.from_pem(cert_pem)
    except ValueError as exc:
        raise ValueError(f"the client certificate cannot check receipts: {exc}") from None
    if not verify_certificate_signature(cert.public_key, signature.hex(), statement):
        raise ValueError(f"bad receipt signature: it does not verify with the key of certificate "
                         f"{cert.sha256[:16]}... over this upload's round, model, payload digest and num_samples")
    return cert


def issued_by(cert_pem: str, ca_pem: bytes) -> str | None:
    """None when `cert_pem` is valid PEM whose fingerprint and signature check against the CA; else why not."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        return f"unreadable certificate: {exc}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return f"the certificate {hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()[:16]}... " \
               f"was not issued by the CA {ca.subject.rfc4514_string()} ({type(exc).__name__})"
    return None
