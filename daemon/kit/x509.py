"""X.509 on the node: keys, CSRs, PEM parsing, the checks before a certificate is used, a local CA, PKCS#12.

The only module that imports ``cryptography``. It sits in ``kit`` because the
agent's issuer (``issuers/certificate.py``), the rotator's certificate
generator (``providers/certificate.py``) and the ``pkcs12`` template filter
(``files/render.py``) all need it and none of them may import the others.

Everything a CA sends is hostile: ``check_issued`` refuses a truncated or
oversized PEM, a certificate whose public key is not the key's, a chain whose
links do not verify, one not yet valid or expired, or one that does not name
what was asked for. A message names what is wrong, never key material.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from daemon.errors import CertificateError

# A certificate chain of real CAs is a few KiB; anything near this is not one.
MAX_PEM = 256 * 1024
MAX_CHAIN = 10

KeyType = Literal["ec", "rsa", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
_CURVES: dict[str, type[ec.EllipticCurve]] = {"p256": ec.SECP256R1, "p384": ec.SECP384R1, "p521": ec.SECP521R1}


def new_key(kind: KeyType = "ec", *, curve: str = "p256", bits: int = 3072) -> PrivateKey:
    """A fresh private key, made here (it never leaves the node in sign mode)."""
    if kind == "ec":
        return ec.generate_private_key(_CURVES[curve]())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return ed25519.Ed25519PrivateKey.generate()


def key_pem(key: PrivateKey) -> str:
    """PKCS#8 PEM, unencrypted (the writer's file mode protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def load_key(pem: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError("the private key is not a readable unencrypted PEM key", reason="pem") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise CertificateError(f"unsupported private key type {type(key).__name__}", reason="pem")
    return key


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _san(dns: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return x509.SubjectAlternativeName(names)


def make_csr(key: PrivateKey, *, common_name: str, alt_names: Sequence[str] = (), ip_sans: Sequence[str] = ()) -> str:
    """A PEM CSR for ``key``: the only thing that leaves the node in sign mode."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    dns = [common_name, *[a for a in alt_names if a != common_name]]
    builder = builder.add_extension(_san(dns, ip_sans), critical=False)
    return builder.sign(key, _sign_hash(key)).public_bytes(serialization.Encoding.PEM).decode()


def _split_pem(text: str, what: str) -> list[str]:
    """The ``CERTIFICATE`` blocks of a PEM text, each checked complete."""
    if len(text) > MAX_PEM:
        raise CertificateError(f"{what} is over {MAX_PEM} bytes", reason="pem")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    blocks, rest = [], text
    while begin in rest:
        start = rest.index(begin)
        stop = rest.find(end, start)
        if stop < 0:
            raise CertificateError(f"{what} is truncated (a certificate without its END line)", reason="pem")
        blocks.append(rest[start : stop + len(end)] + "\n")
        rest = rest[stop + len(end) :]
    if end in rest:
        raise CertificateError(f"{what} is truncated (an END line without its BEGIN)", reason="pem")
    return blocks


def load_certs(text: str, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM text, in order; a truncated or unreadable block is refused."""
    out = []
    for block in _split_pem(text, what):
        try:
            out.append(x509.load_pem_x509_certificate(block.encode()))
        except ValueError:
            raise CertificateError(f"{what} holds an unreadable certificate", reason="pem") from None
    if len(out) > MAX_CHAIN:
        raise CertificateError(f"{what} holds {len(out)} certificates, over {MAX_CHAIN}", reason="pem")
    return out


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def serial_text(cert: x509.Certificate) -> str:
    """The serial as Vault writes it: colon-separated hex bytes."""
    raw = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8 or 1, "big")
    return ":".join(f"{b:02x}" for b in raw)


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined, no-any-return]


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True)
class Checked:
    """A certificate that passed ``check_issued``: its PEMs and what status and metrics show."""

    certificate: str = field(repr=False)
    private_key: str = field(repr=False)
    ca_chain: str = field(repr=False)
    issuing_ca: str = field(repr=False)
    serial: str
    subject: str
    not_before: float
    not_after: float


def check_issued(
    *,
    certificate: str,
    private_key: str,
    chain: Sequence[str] = (),
    issuing_ca: str = "",
    trust: Sequence[str] = (),
    names: Sequence[str] = (),
    ips: Sequence[str] = (),
    now: float,
) -> Checked:
    """Refuse what must never be swapped in; ``CertificateError`` (with its ``reason``) says why.

    ``chain`` (issuer first) must link the leaf up: each certificate signed by the
    next, the leaf by the first (or by ``issuing_ca`` when there is no chain). The
    top of the chain must be signed by, or be, one of ``trust`` when given. The
    library parses lazily, so a damaged field can fail anywhere: any such failure
    is a ``CertificateError`` too (reason ``pem``), naming only its kind.
    """
    try:
        return _check_issued(
            certificate=certificate,
            private_key=private_key,
            chain=chain,
            issuing_ca=issuing_ca,
            trust=trust,
            names=names,
            ips=ips,
            now=now,
        )
    except CertificateError:
        raise
    except Exception as e:
        raise CertificateError(f"a certificate or key is unreadable ({type(e).__name__})", reason="pem") from None


def _check_issued(
    *,
    certificate: str,
    private_key: str,
    chain: Sequence[str] = (),
    issuing_ca: str = "",
    trust: Sequence[str] = (),
    names: Sequence[str] = (),
    ips: Sequence[str] = (),
    now: float,
) -> Checked:
    leaves = load_certs(certificate, "the certificate")
    if len(leaves) != 1:
        raise CertificateError(f"the certificate field holds {len(leaves)} certificates, expected 1", reason="pem")
    leaf = leaves[0]
    key = load_key(private_key)
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise CertificateError("the certificate's public key does not match the private key", reason="key_mismatch")
    links = [c for text in chain for c in load_certs(text, "the CA chain")]
    issuing = load_certs(issuing_ca, "the issuing CA") if issuing_ca else []
    if not links and issuing:
        links = issuing
    path = [leaf, *links]
    for child, parent in itertools.pairwise(path):
        if not _issued_by(child, parent):
            raise CertificateError(
                f"the chain does not verify: {child.subject.rfc4514_string()} is not signed by "
                f"{parent.subject.rfc4514_string()}",
                reason="chain",
            )
    anchors = [c for text in trust for c in load_certs(text, "the trusted CA")]
    if anchors:
        top = path[-1]
        if not any(top == a or _issued_by(top, a) for a in anchors):
            raise CertificateError("the chain does not end at a trusted CA", reason="chain")
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_before > now:
        raise CertificateError(
            f"the certificate is not valid yet (from {leaf.not_valid_before_utc.isoformat()})", reason="not_yet_valid"
        )
    if not_after <= now:
        raise CertificateError(f"the certificate expired at {leaf.not_valid_after_utc.isoformat()}", reason="expired")
    _check_names(leaf, names, ips)
    chain_pem = "".join(cert_pem(c) for c in links)
    return Checked(
        certificate=cert_pem(leaf),
        private_key=private_key if private_key.endswith("\n") else private_key + "\n",
        ca_chain=chain_pem,
        issuing_ca=cert_pem(issuing[0]) if issuing else (cert_pem(links[0]) if links else ""),
        serial=serial_text(leaf),
        subject=leaf.subject.rfc4514_string(),
        not_before=not_before,
        not_after=not_after,
    )


def _check_names(leaf: x509.Certificate, names: Sequence[str], ips: Sequence[str]) -> None:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = {d.lower() for d in san.get_values_for_type(x509.DNSName)}
        got_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        dns, got_ips = set(), set()
    cns = {str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    missing = [n for n in names if n.lower() not in dns | cns]
    missing += [i for i in ips if str(ipaddress.ip_address(i)) not in got_ips]
    if missing:
        raise CertificateError(f"the certificate does not name {', '.join(missing)}", reason="names")


def pkcs12_bundle(
    certificate: str, private_key: str, chain: str = "", *, password: str = "", name: str = "baton"
) -> bytes:
    """A PKCS#12 keystore (Java-style consumers) of the key, its certificate and the chain."""
    key = load_key(private_key)
    leaves = load_certs(certificate, "the certificate")
    if not leaves:
        raise CertificateError("no certificate to put into the PKCS#12 bundle", reason="pem")
    cas = load_certs(chain, "the CA chain") if chain else []
    encryption = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(name.encode(), key, leaves[0], cas or None, encryption)


# ---------------------------------------------------------------- a local CA


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)


def self_signed_ca(common_name: str, *, ttl: float, now: float, key: PrivateKey | None = None) -> tuple[str, str]:
    """A root CA (certificate PEM, key PEM): for tests, demos and a node's own local CA."""
    key = key or new_key("ec")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 60))
        .not_valid_after(_utc(now + ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _sign_hash(key))
    )
    return cert_pem(cert), key_pem(key)


class LocalCA:
    """Signs CSRs with a CA certificate and key from files (``issuer: {kind: local-ca}``)."""

    def __init__(self, *, cert_file: Path, key_file: Path, max_ttl: float | None = None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.max_ttl = max_ttl

    def _load(self) -> tuple[x509.Certificate, PrivateKey]:
        try:
            cert_text = self.cert_file.read_text()
            key_text = self.key_file.read_text()
        except OSError as e:
            raise CertificateError(f"local CA: cannot read {e.filename}: {e.strerror}", reason="unavailable") from None
        except UnicodeDecodeError:
            raise CertificateError("local CA: its certificate or key is not PEM text", reason="pem") from None
        certs = load_certs(cert_text, "the local CA certificate")
        if not certs:
            raise CertificateError("local CA: no certificate in its cert_file", reason="pem")
        key = load_key(key_text)
        if _public_der(certs[0].public_key()) != _public_der(key.public_key()):
            raise CertificateError("local CA: its key_file does not match its cert_file", reason="key_mismatch")
        return certs[0], key

    def ca_pem(self) -> str:
        return cert_pem(self._load()[0])

    def sign(self, csr_pem: str, *, ttl: float, now: float, backdate: float = 0.0) -> str:
        """Sign a CSR (names taken from it) for ``ttl`` seconds; the certificate's PEM. Blocking: call in a thread."""
        ca, ca_key = self._load()
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise CertificateError("local CA: the CSR is not readable", reason="rejected") from None
        if not csr.is_signature_valid:
            raise CertificateError("local CA: the CSR's signature does not verify", reason="rejected")
        if self.max_ttl is not None:
            ttl = min(ttl, self.max_ttl)
        not_after = min(now + ttl, ca.not_valid_after_utc.timestamp())
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(ca.subject)
            .public_key(csr.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1)
            .not_valid_before(_utc(int(now - backdate)))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            builder = builder.add_extension(san.value, critical=False)
        except x509.ExtensionNotFound:
            pass
        return cert_pem(builder.sign(ca_key, _sign_hash(ca_key)))
