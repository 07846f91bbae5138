"""Credentials for a deployment: a private CA, a server certificate and one certificate per client.

Mutual TLS is the client authentication: the server accepts only certificates signed by the
run's CA, and the client's name is its certificate's common name. A certificate cannot be
un-issued, so revocation is a list: `revoked.txt` in the certs folder (one client name a line),
read by the server on every call, so revoking takes effect without a restart.

Layout of `koinon certs --out DIR --clients N`:

    DIR/ca.crt                     the CA certificate (every party needs it)
    DIR/ca.key                     the CA key (keep it offline: it can mint new clients)
    DIR/server.crt, server.key     the server's identity (names from --hosts)
    DIR/clients/NAME.crt, NAME.key one pair per client (copy only its own pair to a client)
    DIR/revoked.txt                revoked client names
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from koinon.errors import KoinonError

REVOKED = "revoked.txt"
_VALID_DAYS = 825


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "koinon"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Private keys are created readable by their owner only (mode 0600)."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    hosts: list[str] | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def check_client_name(name: str) -> str:
    """Client names become file names and log fields: letters, digits, '-', '_', '.' only."""
    if not name or len(name) > 64 or not all(ch.isalnum() or ch in "-_." for ch in name) or name[0] == ".":
        raise KoinonError(f"client name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
    return name


def create_certs(out: Path, num_clients: int, hosts: list[str], prefix: str = "client-") -> list[str]:
    """A new CA with server and client credentials in `out`; returns the client names.

    Refuses a folder that already holds a CA: re-running would silently invalidate every
    credential already handed out. `add_clients` mints more clients from the same CA.
    """
    if num_clients < 0:
        raise KoinonError(f"--clients {num_clients}: must be >= 0")
    if (out / "ca.key").exists():
        raise KoinonError(f"{out} already holds a CA (ca.key); use --add to mint more clients")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("koinon CA", ca_key, None, ca_key, ca=True)
    _write_key(out / "ca.key", ca_key)
    _write_cert(out / "ca.crt", ca_cert)
    server_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(out / "server.key", server_key)
    _write_cert(out / "server.crt", _issue("koinon server", server_key, ca_cert, ca_key, hosts=hosts))
    (out / REVOKED).touch()
    return add_clients(out, [f"{prefix}{i}" for i in range(num_clients)])


def add_clients(out: Path, names: list[str]) -> list[str]:
    """Client credentials signed by the CA in `out` (which must exist)."""
    try:
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    except FileNotFoundError:
        raise KoinonError(f"{out} holds no CA (ca.key, ca.crt); create one with koinon certs --out") from None
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    folder = out / "clients"
    folder.mkdir(exist_ok=True)
    for name in names:
        check_client_name(name)
        if (folder / f"{name}.crt").exists():
            raise KoinonError(f"client {name!r} already exists in {folder}")
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(folder / f"{name}.key", key)
        _write_cert(folder / f"{name}.crt", _issue(name, key, ca_cert, ca_key, client=True))
    return names


def revoke(out: Path, names: list[str]) -> None:
    path = out / REVOKED
    current = read_revoked(out)
    with path.open("a") as f:
        for name in names:
            if name not in current:
                f.write(check_client_name(name) + "\n")


def read_revoked(folder: Path) -> set[str]:
    path = folder / REVOKED
    if not path.is_file():
        return set()
    return {ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}


@dataclass(frozen=True)
class Credentials:
    """PEM bytes a party presents: the CA to trust, its own certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KoinonError(f"cannot read {path}: {exc.strerror}") from None


def server_credentials(folder: Path) -> Credentials:
    return Credentials(_read(folder / "ca.crt"), _read(folder / "server.crt"), _read(folder / "server.key"))


def client_credentials(folder: Path, name: str) -> Credentials:
    """A client's pair, from `DIR/clients/NAME.*` or, on a client machine, `DIR/NAME.*`."""
    check_client_name(name)
    for base in (folder / "clients", folder):
        if (base / f"{name}.crt").is_file():
            return Credentials(_read(folder / "ca.crt"), _read(base / f"{name}.crt"), _read(base / f"{name}.key"))
    raise KoinonError(f"no credentials for client {name!r} in {folder} (expected clients/{name}.crt)")
