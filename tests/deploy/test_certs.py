"""`koinon certs`: a CA, a server certificate for the given hosts, client certificates, revocation."""

import stat

from cryptography import x509
from cryptography.x509.oid import NameOID

from koinon.cli import main
from koinon.deploy.certs import read_revoked


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_certs_are_signed_by_the_ca_and_keys_are_private(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--clients", "2", "--hosts", "10.0.0.5,fl.example.org"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    for i in range(2):
        client = x509.load_pem_x509_certificate((out / "clients" / f"client-{i}.crt").read_bytes())
        client.verify_directly_issued_by(ca)
        assert cn(client) == f"client-{i}"
        assert stat.S_IMODE((out / "clients" / f"client-{i}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600


def test_user_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--clients", "1"]) == 0
    capsys.readouterr()
    assert main(["certs", "--out", str(out), "--clients", "1"]) == 2  # would invalidate issued certs
    err = capsys.readouterr().err
    assert err.startswith("koinon: error:") and "already holds a CA" in err and err.count("\n") == 1
    assert main(["certs", "--out", str(out), "--add", "bad name"]) == 2
    assert main(["certs", "--clients", "1"]) == 2


def test_add_and_revoke(tmp_path):
    out = tmp_path / "certs"
    main(["certs", "--out", str(out), "--clients", "1"])
    assert main(["certs", "--out", str(out), "--add", "hospital-a"]) == 0
    assert (out / "clients" / "hospital-a.crt").is_file()
    assert main(["certs", "--out", str(out), "--revoke", "hospital-a"]) == 0
    assert main(["certs", "--out", str(out), "--revoke", "hospital-a"]) == 0
    assert read_revoked(out) == {"hospital-a"}
