"""The server's check of a client's receipt signature (ECDSA P-256 with its TLS certificate key)."""

from __future__ import annotations

import pytest

from koinon.deploy.certs import client_credentials, create_certs
from koinon.deploy.server import check_receipt
from koinon.deploy.wire import Rejected, pb
from koinon.ledger.certsign import CertificateKey, issued_by, receipt_statement, sign_receipt
from koinon.topology.server import digest

PAYLOADS = [b"\x01\x02\x03" * 50, b"update bytes"]
MODEL = "ab" * 32


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    create_certs(folder, 2, ["localhost"])
    return folder


def signed_header(key: bytes, round_index: int = 4, num_samples: int = 37, payloads=PAYLOADS) -> pb.UploadHeader:
    statement = receipt_statement(round_index + 1, MODEL, digest(payloads), num_samples)
    return pb.UploadHeader(round=round_index, num_samples=num_samples, model_sha256=MODEL,
                           receipt_signature=sign_receipt(key, statement))


def test_a_receipt_signed_with_the_callers_certificate_key_is_accepted(certs):
    creds = client_credentials(certs, "client-0")
    cert = check_receipt(signed_header(creds.key), PAYLOADS, creds.cert)
    assert cert == CertificateKey.from_pem(creds.cert)
    assert len(cert.public_key) == 130 and cert.public_key.startswith("04")  # uncompressed P-256 point
    assert issued_by(cert.pem, (certs / "ca.crt").read_bytes()) is None


@pytest.mark.parametrize("change", ["other key", "payload", "round", "num_samples", "model", "flipped", "missing"])
def test_a_bad_receipt_signature_is_rejected_with_a_reason(certs, change):
    mine, other = client_credentials(certs, "client-0"), client_credentials(certs, "client-1")
    header = signed_header(other.key if change == "other key" else mine.key)
    payloads = list(PAYLOADS)
    if change == "payload":
        payloads[1] = b"update bytez"
    elif change == "round":
        header.round = 5
    elif change == "num_samples":
        header.num_samples = 38
    elif change == "model":
        header.model_sha256 = "cd" * 32
    elif change == "flipped":
        sig = bytearray(header.receipt_signature)
        sig[-1] ^= 1
        header.receipt_signature = bytes(sig)
    elif change == "missing":
        header.receipt_signature = b""
    with pytest.raises(Rejected) as exc:
        check_receipt(header, payloads, mine.cert)
    reason = str(exc.value)
    assert "\n" not in reason
    assert ("no receipt signature" if change == "missing" else "bad receipt signature") in reason


def test_no_peer_certificate_or_a_certificate_of_another_ca(certs, tmp_path):
    creds = client_credentials(certs, "client-0")
    with pytest.raises(Rejected, match="no client certificate"):
        check_receipt(signed_header(creds.key), PAYLOADS, None)
    create_certs(tmp_path / "other", 0, ["localhost"])
    why = issued_by(creds.cert.decode(), (tmp_path / "other" / "ca.crt").read_bytes())
    assert why is not None and "was not issued by the CA" in why
