"""The ``certificate`` generator: one certificate shared through the store (a Kubernetes TLS Secret).

``rotation.generator: {kind: certificate, ...}`` takes the fields of a
``certificate:`` block (issuer, names, ttl, key, renew_at) and mints, at each
rotation, a new key and a certificate for it from the PKI engine (``pki/sign`` or
``pki/issue``, on its own ``issuer.url``) or a local CA. The payload holds
``tls.crt`` (certificate and chain), ``tls.key`` and ``ca.crt`` (the Secret keys
of a TLS Secret; names set by ``cert_field``/``key_field``/``ca_field``) and
the template fields of a node-issued certificate (``certificate``,
``private_key``, ``ca_chain``, ``issuing_ca``, ``serial_number``, ``not_before``,
``not_after``). ``rotation.every`` defaults to ``renew_at`` of ``ttl``.

What the CA answers is checked (``kit.x509.check_issued``) at create and again at
test; retire revokes the old certificate at the CA with ``revoke_retired``, once
the rotator's gate says no node holds it. Keys never reach a log line or an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from daemon.config import CertificateGeneratorConfig, LocalCaIssuerConfig
from daemon.errors import CertificateError, ProviderError, StoreError
from daemon.kit import x509
from daemon.kit.logs import event
from daemon.model import Secret
from daemon.payload import payload_object
from daemon.providers.base import Provider, Session

log = logging.getLogger(__name__)


class CertificateProvider(Provider):
    """Mints a key and its certificate per rotation; revokes a retired one (``revoke_retired``)."""

    def __init__(self, config: CertificateGeneratorConfig) -> None:
        self.config = config
        self.slots: int | None = None
        self._client: Any = None

    # ------------------------------------------------------------ the CA

    def _vault(self) -> Any:
        if self._client is None:
            from daemon.clients.vault import VaultClient

            issuer = self.config.issuer
            assert not isinstance(issuer, LocalCaIssuerConfig)
            if issuer.url is None:
                raise ProviderError("certificate generator: issuer.url is not set")
            self._client = VaultClient(
                url=issuer.url,
                auth=issuer.auth,
                namespace=issuer.namespace,
                timeout=issuer.timeout,
                verify=str(issuer.verify) if isinstance(issuer.verify, Path) else issuer.verify,
            )
        return self._client

    async def _issue(self) -> x509.Checked:
        spec = self.config
        issuer = spec.issuer
        key_pem: str | None = None
        chain: list[str] = []
        trust: list[str] = []
        if isinstance(issuer, LocalCaIssuerConfig) or issuer.mode == "sign":
            key = await asyncio.to_thread(x509.new_key, spec.key.type, curve=spec.key.curve, bits=spec.key.bits)
            key_pem = x509.key_pem(key)
            csr = await asyncio.to_thread(
                x509.make_csr, key, common_name=spec.common_name, alt_names=spec.alt_names, ip_sans=spec.ip_sans
            )
        else:
            csr = None
        if isinstance(issuer, LocalCaIssuerConfig):
            assert csr is not None
            ca = x509.LocalCA(cert_file=issuer.cert_file, key_file=issuer.key_file)
            cert = await asyncio.to_thread(ca.sign, csr, ttl=spec.ttl, now=time.time())
            ca_pem = await asyncio.to_thread(ca.ca_pem)
            chain, issuing, trust = [ca_pem], ca_pem, [ca_pem]
        else:
            got = await self._vault().pki_certificate(
                issuer.path,
                common_name=spec.common_name,
                alt_names=spec.alt_names,
                ip_sans=spec.ip_sans,
                ttl=spec.ttl,
                csr=csr,
            )
            cert, chain, issuing = got["certificate"], list(got["ca_chain"]), got["issuing_ca"]
            if key_pem is None:
                key_pem = got["private_key"] or ""
            if issuer.ca_file is not None:
                trust = [await asyncio.to_thread(Path(issuer.ca_file).read_text)]
        assert key_pem is not None
        return await asyncio.to_thread(
            x509.check_issued,
            certificate=cert,
            private_key=key_pem,
            chain=chain,
            issuing_ca=issuing,
            trust=trust,
            names=[spec.common_name, *spec.alt_names],
            ips=spec.ip_sans,
            now=time.time(),
        )

    # ------------------------------------------------------------ the Provider Protocol

    async def create(self, *, current: Secret | None) -> Secret:
        try:
            c = await self._issue()
        except (CertificateError, StoreError) as e:
            raise ProviderError(f"certificate not issued: {e}") from None
        event(log, "certificate_issued", serial=c.serial, not_after=c.not_after, subject=c.subject)
        cfg = self.config
        fields = {
            cfg.cert_field: c.certificate + c.ca_chain,
            cfg.key_field: c.private_key,
            cfg.ca_field: c.issuing_ca,
            "certificate": c.certificate.rstrip("\n"),
            "private_key": c.private_key.rstrip("\n"),
            "ca_chain": c.ca_chain.rstrip("\n"),
            "issuing_ca": c.issuing_ca.rstrip("\n"),
            "serial_number": c.serial,
            "not_before": _iso(c.not_before),
            "not_after": _iso(c.not_after),
        }
        return Secret(json.dumps(fields))

    def _checked(self, payload: Secret) -> x509.Checked:
        data = payload_object(payload) or {}
        cert, key = data.get("certificate"), data.get("private_key")
        if not isinstance(cert, str) or not isinstance(key, str):
            raise CertificateError("the payload holds no certificate and key", reason="pem")
        chain = data.get("ca_chain")
        return x509.check_issued(
            certificate=cert,
            private_key=key,
            chain=[chain] if isinstance(chain, str) and chain else [],
            names=[self.config.common_name, *self.config.alt_names],
            ips=self.config.ip_sans,
            now=time.time(),
        )

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        return None  # a certificate needs nothing done at the CA before use

    async def test(self, new: Secret) -> None:
        try:
            await asyncio.to_thread(self._checked, new)
        except CertificateError as e:
            raise ProviderError(f"the new certificate does not pass: {e}") from None

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        if not self.config.revoke_retired or isinstance(self.config.issuer, LocalCaIssuerConfig):
            return None
        data = payload_object(old) or {}
        serial = data.get("serial_number")
        if not isinstance(serial, str) or serial in keep:
            return None
        try:
            await self._vault().pki_write(
                f"{self.config.issuer.mount}/revoke", {"serial_number": serial}, needs_data=False
            )
        except StoreError as e:
            raise ProviderError(f"certificate {serial} not revoked: {e}") from None
        event(log, "certificate_revoked", serial=serial)
        return None

    def principal(self, payload: Secret) -> str | None:
        return None

    async def sessions(self, old: Secret) -> list[Session]:
        return []

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
