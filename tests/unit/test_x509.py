"""daemon.kit.x509: what a CA sends is refused unless it is whole, matches the key, chains, and is valid now."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon.errors import CertificateError
from daemon.kit import x509

NOW = time.time()


def _ca(tmp_path: Path, name: str = "Test CA") -> x509.LocalCA:
    cert, key = x509.self_signed_ca(name, ttl=86400, now=NOW)
    (tmp_path / f"{name}.crt").write_text(cert)
    (tmp_path / f"{name}.key").write_text(key)
    return x509.LocalCA(cert_file=tmp_path / f"{name}.crt", key_file=tmp_path / f"{name}.key")


def _issued(ca: x509.LocalCA, *, kind: x509.KeyType = "ec", ttl: float = 60, now: float = NOW) -> tuple[str, str]:
    key = x509.new_key(kind)
    csr = x509.make_csr(key, common_name="web.example.test", alt_names=["localhost"], ip_sans=["127.0.0.1"])
    return ca.sign(csr, ttl=ttl, now=now), x509.key_pem(key)


@pytest.mark.parametrize("kind", ["ec", "rsa", "ed25519"])
def test_a_certificate_signed_by_the_local_ca_passes_every_check(tmp_path: Path, kind: x509.KeyType) -> None:
    ca = _ca(tmp_path)
    cert, key = _issued(ca, kind=kind)
    checked = x509.check_issued(
        certificate=cert,
        private_key=key,
        chain=[ca.ca_pem()],
        trust=[ca.ca_pem()],
        names=["web.example.test", "localhost"],
        ips=["127.0.0.1"],
        now=NOW + 1,
    )
    assert checked.subject == "CN=web.example.test"
    assert checked.not_after - checked.not_before == pytest.approx(60, abs=1.5)
    assert checked.serial.count(":") >= 7


def test_a_certificate_whose_key_is_not_ours_is_refused(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    cert, _ = _issued(ca)
    other = x509.key_pem(x509.new_key("ec"))
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert, private_key=other, chain=[ca.ca_pem()], now=NOW + 1)
    assert e.value.reason == "key_mismatch"
    assert "PRIVATE" not in str(e.value)


def test_a_chain_from_another_ca_does_not_verify(tmp_path: Path) -> None:
    ca, other = _ca(tmp_path, "A"), _ca(tmp_path, "B")
    cert, key = _issued(ca)
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert, private_key=key, chain=[other.ca_pem()], now=NOW + 1)
    assert e.value.reason == "chain"
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert, private_key=key, chain=[ca.ca_pem()], trust=[other.ca_pem()], now=NOW + 1)
    assert e.value.reason == "chain"


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_a_truncated_pem_is_refused(tmp_path: Path, cut: float) -> None:
    ca = _ca(tmp_path)
    cert, key = _issued(ca)
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert[: int(len(cert) * cut)], private_key=key, now=NOW + 1)
    assert e.value.reason == "pem"
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert, private_key=key[: int(len(key) * cut)], now=NOW + 1)
    assert e.value.reason == "pem"


def test_expired_and_not_yet_valid_certificates_are_refused(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    cert, key = _issued(ca, ttl=10)
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert, private_key=key, chain=[ca.ca_pem()], now=NOW + 20)
    assert e.value.reason == "expired"
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert, private_key=key, chain=[ca.ca_pem()], now=NOW - 120)
    assert e.value.reason == "not_yet_valid"


def test_a_certificate_not_naming_what_was_asked_is_refused(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    cert, key = _issued(ca)
    with pytest.raises(CertificateError) as e:
        x509.check_issued(certificate=cert, private_key=key, names=["evil.example.test"], now=NOW + 1)
    assert e.value.reason == "names"


def test_pkcs12_bundles_the_key_certificate_and_chain(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs12

    ca = _ca(tmp_path)
    cert, key = _issued(ca)
    blob = x509.pkcs12_bundle(cert, key, ca.ca_pem(), password="changeit")
    loaded = pkcs12.load_pkcs12(blob, b"changeit")
    assert loaded.cert is not None and loaded.key is not None
    assert len(loaded.additional_certs) == 1
