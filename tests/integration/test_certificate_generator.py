"""The rotator's ``certificate`` generator: a TLS Secret's tls.crt/tls.key minted from OpenBao's PKI or a local CA.

The provider is driven as the rotator drives it (create, test, retire), against
the real PKI engine of the session's ``bao server -dev``; one test runs a real
rotator on the local store with ``rotation.every`` derived from ``renew_at``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.config import CertificateGeneratorConfig, parse_config
from daemon.errors import ProviderError
from daemon.kit import x509
from daemon.model import Secret
from daemon.providers.certificate import CertificateProvider
from daemon.rotation.service import Rotator
from tests.fixtures.pki import LocalCa, Pki

pytestmark = pytest.mark.integration


def _gen(issuer: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "kind": "certificate",
        "issuer": issuer,
        "common_name": "web.example.test",
        "alt_names": ["localhost"],
        "ttl": "60s",
        **more,
    }


def _vault_issuer(pki: Pki, tmp_path: Path) -> dict[str, Any]:
    token = tmp_path / "token"
    token.write_text(pki.target.root_token)
    return {
        "kind": "vault",
        "path": pki.sign_path,
        "url": pki.target.direct_url,
        "auth": {"method": "token_file", "token_file": str(token)},
    }


def _fields(s: Secret) -> dict[str, str]:
    data: dict[str, str] = json.loads(s.reveal())
    return data


async def test_the_generator_mints_a_tls_secret_from_the_pki_and_revokes_it_at_retire(
    openbao_pki: Pki, tmp_path: Path
) -> None:
    spec = CertificateGeneratorConfig.model_validate(_gen(_vault_issuer(openbao_pki, tmp_path), revoke_retired=True))
    provider = CertificateProvider(spec)
    try:
        first = await provider.create(current=None)
        await provider.test(first)
        got = _fields(first)
        assert {"tls.crt", "tls.key", "ca.crt"} <= set(got)
        # tls.crt is the leaf then its chain, as a TLS Secret wants it; the key is the leaf's.
        checked = x509.check_issued(
            certificate=got["certificate"],
            private_key=got["tls.key"],
            chain=[got["tls.crt"][len(got["certificate"]) :]],
            trust=[openbao_pki.root_pem],
            now=time.time(),
        )
        assert got["tls.crt"].startswith(got["certificate"])
        second = await provider.create(current=first)
        assert _fields(second)["serial_number"] != checked.serial
        await provider.retire(first, keep=())
        assert checked.serial in openbao_pki.revoked()
        assert _fields(second)["serial_number"] not in openbao_pki.revoked()
    finally:
        await provider.aclose()


async def test_a_role_that_refuses_the_csr_is_a_provider_error_without_key_material(
    openbao_pki: Pki, tmp_path: Path
) -> None:
    openbao_pki.role_config(allowed_domains="other.test", allow_localhost=False)
    spec = CertificateGeneratorConfig.model_validate(_gen(_vault_issuer(openbao_pki, tmp_path)))
    provider = CertificateProvider(spec)
    try:
        with pytest.raises(ProviderError) as e:
            await provider.create(current=None)
        assert "PRIVATE" not in str(e.value) and "REQUEST" not in str(e.value)
    finally:
        await provider.aclose()


async def test_test_refuses_a_payload_whose_key_is_not_the_certificates(local_ca: LocalCa) -> None:
    issuer = {"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)}
    provider = CertificateProvider(CertificateGeneratorConfig.model_validate(_gen(issuer)))
    good = _fields(await provider.create(current=None))
    bad = Secret(json.dumps({**good, "private_key": x509.key_pem(x509.new_key("ec"))}))
    with pytest.raises(ProviderError, match="does not match"):
        await provider.test(bad)


async def test_a_rotator_rotates_the_certificate_at_renew_at_of_its_ttl(local_ca: LocalCa, tmp_path: Path) -> None:
    issuer = {"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)}
    cfg = parse_config(
        {
            "node_id": "r1",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "credentials": [
                {
                    "name": "web",
                    "key": "web-tls",
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"generator": _gen(issuer, ttl="5s", renew_at=0.4, jitter=0)},
                }
            ],
        }
    )
    rotation = cfg.credentials[0].rotation
    assert rotation is not None and rotation.every == pytest.approx(2.0)
    rotator = Rotator(cfg, install_signals=False, serve_api=False)
    task = asyncio.create_task(rotator.serve())
    try:
        deadline = time.monotonic() + 30
        while len([v for v in await rotator.store.versions("web-tls")]) < 2:
            assert time.monotonic() < deadline, "no second rotation"
            await asyncio.sleep(0.1)
        current = await rotator.store.read("web-tls")
        got = _fields(current.payload)
        x509.check_issued(
            certificate=got["certificate"],
            private_key=got["tls.key"],
            trust=[local_ca.pem],
            chain=[got["ca.crt"]],
            now=time.time(),
        )
    finally:
        rotator.should_exit.set()
        await asyncio.wait_for(task, 30)
