"""What a CA sends, damaged at random: kit.x509.check_issued refuses it with a CertificateError, never anything else.

A valid leaf, key and chain from a local CA are cut, spliced and bit-flipped in
their PEM bodies; whatever comes out either passes every check (then it is the
same certificate) or is a ``CertificateError`` with a known reason, and the
message never quotes key material.
"""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from daemon.errors import CERTIFICATE_REASONS, CertificateError
from daemon.kit import x509

NOW = time.time()
_CA_CERT, _CA_KEY = x509.self_signed_ca("Fuzz CA", ttl=86400, now=NOW)


def _leaf(tmp: Path) -> tuple[str, str]:
    (tmp / "ca.crt").write_text(_CA_CERT)
    (tmp / "ca.key").write_text(_CA_KEY)
    key = x509.new_key("ec")
    cert = x509.LocalCA(cert_file=tmp / "ca.crt", key_file=tmp / "ca.key").sign(
        x509.make_csr(key, common_name="web.example.test"), ttl=3600, now=NOW
    )
    return cert, x509.key_pem(key)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _damage(text: str, edits: list[tuple[int, int, int]]) -> str:
    chars = list(text)
    for kind, where, what in edits:
        if not chars:
            break
        i = where % len(chars)
        if kind == 0:
            chars[i] = _B64[what % len(_B64)]  # a flipped character
        elif kind == 1:
            del chars[i:]  # cut short
        else:
            chars.insert(i, "-----END CERTIFICATE-----\n" if what % 2 else "\n")  # a spliced line
    return "".join(chars)


_EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=4)
CERT, KEY = _leaf(Path(__import__("tempfile").mkdtemp()))


@given(part=st.sampled_from(["certificate", "private_key", "chain"]), edits=_EDITS)
def test_a_damaged_answer_is_refused_with_a_known_reason_or_passes_whole(part: str, edits: list) -> None:  # type: ignore[type-arg]
    fields = {"certificate": CERT, "private_key": KEY, "chain": _CA_CERT}
    fields[part] = _damage(fields[part], edits)
    try:
        checked = x509.check_issued(
            certificate=fields["certificate"],
            private_key=fields["private_key"],
            chain=[fields["chain"]],
            trust=[_CA_CERT],
            names=["web.example.test"],
            now=NOW + 1,
        )
    except CertificateError as e:
        assert e.reason in CERTIFICATE_REASONS
        assert "PRIVATE KEY" not in str(e) and KEY.splitlines()[1][:20] not in str(e)
    else:
        assert checked.certificate == x509.cert_pem(x509.load_certs(CERT, "x")[0])
