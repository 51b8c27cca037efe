"""The ``pkcs12`` template filter: a keystore file for Java-style consumers, in-process and through the render child."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from daemon.errors import PayloadError
from daemon.files.render import render
from daemon.files.renderworker import RenderWorker
from daemon.kit import x509
from daemon.model import Secret

TEMPLATES = {
    "keystore.p12": '{{ private_key | pkcs12(certificate, ca_chain, password="changeit") }}',
    "tls.crt": "{{ certificate }}\n",
}


def _payload(tmp_path: Path) -> Secret:
    now = time.time()
    cert, key = x509.self_signed_ca("CA", ttl=3600, now=now)
    (tmp_path / "ca.crt").write_text(cert)
    (tmp_path / "ca.key").write_text(key)
    ca = x509.LocalCA(cert_file=tmp_path / "ca.crt", key_file=tmp_path / "ca.key")
    leaf_key = x509.new_key("ec")
    leaf = ca.sign(x509.make_csr(leaf_key, common_name="web.example.test"), ttl=60, now=now)
    return Secret(json.dumps({"certificate": leaf, "private_key": x509.key_pem(leaf_key), "ca_chain": cert}))


def _check(blob: bytes) -> None:
    loaded = pkcs12.load_pkcs12(blob, b"changeit")
    assert loaded.key is not None and loaded.cert is not None and len(loaded.additional_certs) == 1


def test_the_pkcs12_filter_renders_a_binary_keystore_in_process(tmp_path: Path) -> None:
    files = render(TEMPLATES, _payload(tmp_path))
    _check(files["keystore.p12"])
    assert files["tls.crt"].startswith(b"-----BEGIN CERTIFICATE-----")


async def test_the_pkcs12_filter_renders_a_binary_keystore_through_the_render_child(tmp_path: Path) -> None:
    worker = RenderWorker()
    try:
        out = await worker.render(files=TEMPLATES, env={}, payload=_payload(tmp_path), time_limit=20, max_bytes=1 << 20)
    finally:
        await worker.aclose()
    _check(out.files["keystore.p12"])


def test_a_keystore_with_text_around_it_or_a_forged_marker_is_refused(tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    with pytest.raises(PayloadError, match="whole file"):
        render({"k": "x{{ private_key | pkcs12(certificate) }}"}, payload)
    # A payload field that looks like the marker is text, written as is.
    forged = Secret(json.dumps({"value": "\u0000baton-binary-00:AAAA"}))
    assert render({"v": "{{ value }}"}, forged)["v"] == b"\0baton-binary-00:AAAA"


def test_a_key_that_is_not_the_certificates_or_truncated_is_a_payload_error(tmp_path: Path) -> None:
    data = json.loads(_payload(tmp_path).reveal())
    data["private_key"] = data["private_key"][:40]
    with pytest.raises(PayloadError) as e:
        render(TEMPLATES, Secret(json.dumps(data)))
    assert e.value.reason == "template"
    assert "PRIVATE" not in str(e.value)
