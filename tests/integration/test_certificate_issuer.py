"""issuers/certificate.py against a real OpenBao PKI engine and a local CA on disk.

The issuer is driven as the agent drives it (watch, read, observe); the PKI is
``bao server -dev`` with a fresh ``pki`` mount per test (tests/fixtures/pki.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.clients.vault import VaultClient
from daemon.config import CertificateConfig, VaultAuthConfig
from daemon.errors import CertificateError, StoreUnavailable
from daemon.issuers.certificate import CertificateIssuer, Issued, LocalCertificateAuthority, VaultCA, open_ca
from daemon.kit import metrics, x509
from daemon.model import VersionInfo
from daemon.report.base import Holder
from tests.fixtures.pki import LocalCa, Pki

pytestmark = pytest.mark.integration


def _spec(issuer: dict[str, Any], **more: Any) -> CertificateConfig:
    return CertificateConfig.model_validate(
        {
            "issuer": issuer,
            "common_name": "web.example.test",
            "alt_names": ["localhost"],
            "ip_sans": ["127.0.0.1"],
            "ttl": "4s",
            "renew_at": 0.5,
            "jitter": 0.0,
            **more,
        }
    )


def _vault_issuer(pki: Pki, tmp_path: Path, *, path: str | None = None, **more: Any) -> CertificateIssuer:
    spec = _spec({"kind": "vault", "path": path or pki.sign_path}, **more)
    client = VaultClient(
        url=pki.target.direct_url, auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": pki.target.root_token}
    )
    assert spec.issuer.kind == "vault"
    ca = VaultCA(spec.issuer, client, own_client=True)
    return CertificateIssuer(
        name="web-tls", spec=spec, ca=ca, state_file=tmp_path / "state" / "web-tls.json", retry_min=0.1, retry_max=0.5
    )


async def _next(it: AsyncIterator[VersionInfo], timeout: float = 20.0) -> VersionInfo:
    return await asyncio.wait_for(it.__anext__(), timeout)


def _fields(payload: Any) -> dict[str, str]:
    data: dict[str, str] = json.loads(payload.reveal())
    return data


async def test_sign_mode_sends_only_a_csr_and_the_certificate_matches_the_key_made_here(
    openbao_pki: Pki, tmp_path: Path
) -> None:
    issuer = _vault_issuer(openbao_pki, tmp_path)
    it = issuer.watch("web-tls")
    try:
        first = await _next(it)
        got = _fields((await issuer.read("web-tls", first.id)).payload)
        assert set(got) == {
            "certificate",
            "private_key",
            "ca_chain",
            "issuing_ca",
            "serial_number",
            "not_before",
            "not_after",
        }
        checked = x509.check_issued(
            certificate=got["certificate"],
            private_key=got["private_key"],
            chain=[got["ca_chain"]],
            trust=[openbao_pki.root_pem],
            names=["web.example.test", "localhost"],
            ips=["127.0.0.1"],
            now=time.time(),
        )
        assert checked.serial == got["serial_number"]
        assert issuer.status()["key_made_here"] is True
        # The state file holds the key: 0600, in a 0700 directory.
        st = os.stat(issuer.state_file)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(issuer.state_file.parent).st_mode) == 0o700
        # Renewal comes from the lifetime: at half of ~4 s, a second version.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        second = await _next(it)
        assert second.id != first.id
        assert 1.0 <= loop.time() - t0 <= 4.0
        assert metrics.certificate_not_after_seconds.labels("web-tls", second.id)._value.get() > 0
    finally:
        await it.aclose()
        await issuer.aclose()


async def test_issue_mode_takes_the_key_the_ca_made(openbao_pki: Pki, tmp_path: Path) -> None:
    issuer = _vault_issuer(openbao_pki, tmp_path, path=openbao_pki.issue_path, ttl="60s")
    it = issuer.watch("web-tls")
    try:
        first = await _next(it)
        got = _fields((await issuer.read("web-tls", first.id)).payload)
        assert "PRIVATE KEY" in got["private_key"]
        assert issuer.status()["key_made_here"] is False
    finally:
        await it.aclose()
        await issuer.aclose()


async def test_a_csr_the_role_rejects_keeps_the_current_certificate_and_retries(
    openbao_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = _vault_issuer(openbao_pki, tmp_path)
    errors: list[Any] = []
    it = issuer.watch("web-tls", on_status=errors.append)
    try:
        first = await _next(it)
        before = metrics.certificate_renewal_failures_total.labels("web-tls", "rejected")._value.get()
        # The operator narrows the role: web.example.test is no longer allowed.
        openbao_pki.role_config(allowed_domains="other.test", allow_localhost=False)
        with caplog.at_level(logging.INFO):
            pending = asyncio.ensure_future(_next(it, timeout=30))
            while metrics.certificate_renewal_failures_total.labels("web-tls", "rejected")._value.get() < before + 2:
                await asyncio.sleep(0.05)
            assert not pending.done()
            # The current one is still what read gives, and the status says why.
            assert (await issuer.read("web-tls")).id == first.id
            assert issuer.status()["failures"] >= 2 and issuer.status()["last_error"]
            assert errors and isinstance(errors[-1], CertificateError | Exception)
            openbao_pki.role_config()
            second = await pending
        assert second.id != first.id
        assert errors[-1] is None  # told the trouble is over
        text = caplog.text
        assert "certificate_not_renewed" in text
        assert "PRIVATE KEY" not in text and "CERTIFICATE REQUEST" not in text
    finally:
        await it.aclose()
        await issuer.aclose()


async def test_superseded_versions_are_retired_and_revoked_only_once_nothing_holds_them(
    openbao_pki: Pki, tmp_path: Path
) -> None:
    issuer = _vault_issuer(openbao_pki, tmp_path, ttl="60s", revoke_retired=True)
    it = issuer.watch("web-tls")
    try:
        v1 = await _next(it)
        issuer.renew_now.set()
        v2 = await _next(it)
        serial1 = _fields((await issuer.read("web-tls", v1.id)).payload)["serial_number"]
        holder = Holder(4242, "/usr/sbin/nginx", "nginx", "start-time", v1.id)
        # v2 not on disk yet: nothing older than the on-disk current may go.
        await issuer.observe(v1.id, {})
        assert not any(v.retired for v in await issuer.versions("web-tls"))
        await issuer.observe(v2.id, {v1.id: [holder]})
        assert not any(v.retired for v in await issuer.versions("web-tls"))
        assert serial1 not in openbao_pki.revoked()
        await issuer.observe(v2.id, {v1.id: []})
        states = {v.id: v for v in await issuer.versions("web-tls")}
        assert states[v1.id].retired and not states[v2.id].retired
        assert serial1 in openbao_pki.revoked()
        with pytest.raises(CertificateError):
            await issuer.read("web-tls", v1.id)
        # The retired version's key left the state file.
        state = json.loads(issuer.state_file.read_text())
        assert [v["private_key"] for v in state["versions"] if v["id"] == v1.id] == [""]
    finally:
        await it.aclose()
        await issuer.aclose()


async def test_a_restart_adopts_the_current_certificate_instead_of_issuing_anew(
    openbao_pki: Pki, tmp_path: Path
) -> None:
    issuer = _vault_issuer(openbao_pki, tmp_path, ttl="60s")
    it = issuer.watch("web-tls")
    first = await _next(it)
    serial = _fields((await issuer.read("web-tls")).payload)["serial_number"]
    await it.aclose()
    await issuer.aclose()
    again = _vault_issuer(openbao_pki, tmp_path, ttl="60s")
    it = again.watch("web-tls")
    try:
        adopted = await _next(it)
        assert adopted.id == first.id
        assert _fields((await again.read("web-tls")).payload)["serial_number"] == serial
    finally:
        await it.aclose()
        await again.aclose()


async def test_the_ca_unreachable_at_start_is_retried_until_it_answers(openbao_pki: Pki, tmp_path: Path) -> None:
    spec = _spec({"kind": "vault", "path": openbao_pki.sign_path, "url": "http://127.0.0.1:9"})
    client = VaultClient(url="http://127.0.0.1:9", env={"VAULT_TOKEN": "x"})
    assert spec.issuer.kind == "vault"
    issuer = CertificateIssuer(
        name="down",
        spec=spec,
        ca=VaultCA(spec.issuer, client, own_client=True),
        state_file=tmp_path / "down.json",
        retry_min=0.05,
        retry_max=0.2,
    )
    it = issuer.watch("down")
    try:
        pending = asyncio.ensure_future(_next(it, timeout=30))
        while issuer.failures < 3:
            await asyncio.sleep(0.05)
        assert not pending.done()
        assert metrics.certificate_renewal_failures_total.labels("down", "unavailable")._value.get() >= 3
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
    finally:
        await it.aclose()
        await issuer.aclose()


class _Hostile:
    """A CA that answers with what the test hands it (a real local CA underneath)."""

    makes_key = True

    def __init__(self, ca: LocalCa, answers: list[str]) -> None:
        self.ca = x509.LocalCA(cert_file=ca.cert_file, key_file=ca.key_file)
        self.answers = answers
        self.calls = 0

    async def obtain(self, *, csr: str | None, spec: CertificateConfig) -> Issued:
        self.calls += 1
        kind = self.answers.pop(0) if self.answers else "good"
        key = x509.new_key("ec")
        good_csr = x509.make_csr(key, common_name="web.example.test", alt_names=["localhost"], ip_sans=["127.0.0.1"])
        now = time.time()
        cert = self.ca.sign(good_csr, ttl=60, now=now)
        key_pem = x509.key_pem(key)
        chain = self.ca.ca_pem()
        if kind == "mismatch":
            key_pem = x509.key_pem(x509.new_key("ec"))
        elif kind == "truncated":
            cert = cert[: len(cert) // 2]
        elif kind == "badchain":
            chain = x509.self_signed_ca("Other", ttl=60, now=now)[0]
        elif kind == "expired":
            cert = self.ca.sign(good_csr, ttl=5, now=now - 100)
        elif kind == "future":
            cert = self.ca.sign(good_csr, ttl=600, now=now + 300)
        return Issued(certificate=cert, chain=(chain,), issuing_ca=chain, private_key=key_pem)

    async def revoke(self, serial: str) -> bool:
        return False

    def trust(self) -> list[str]:
        return [self.ca.ca_pem()]

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("mismatch", "key_mismatch"),
        ("truncated", "pem"),
        ("badchain", "chain"),
        ("expired", "expired"),
        ("future", "not_yet_valid"),
    ],
)
async def test_a_bad_answer_from_the_ca_is_never_taken(
    local_ca: LocalCa, tmp_path: Path, answer: str, reason: str
) -> None:
    spec = _spec(
        {"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)}, ttl="60s"
    )
    ca = _Hostile(local_ca, [answer, answer])
    issuer = CertificateIssuer(
        name=f"bad-{answer}", spec=spec, ca=ca, state_file=tmp_path / "s.json", retry_min=0.05, retry_max=0.1
    )
    it = issuer.watch("x")
    try:
        first = await _next(it)  # two refusals, then a good one
        assert ca.calls == 3
        assert metrics.certificate_renewal_failures_total.labels(f"bad-{answer}", reason)._value.get() == 2
        got = _fields((await issuer.read("x", first.id)).payload)
        x509.check_issued(
            certificate=got["certificate"], private_key=got["private_key"], chain=[got["ca_chain"]], now=time.time()
        )
    finally:
        await it.aclose()


async def test_the_local_ca_signs_a_csr_made_here(local_ca: LocalCa, tmp_path: Path) -> None:
    spec = _spec(
        {"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)},
        key={"type": "rsa", "bits": 2048},
    )
    ca = open_ca(spec)
    assert isinstance(ca, LocalCertificateAuthority)
    issuer = CertificateIssuer(name="local", spec=spec, ca=ca, state_file=tmp_path / "s.json")
    it = issuer.watch("local")
    try:
        v = await _next(it)
        got = _fields((await issuer.read("local", v.id)).payload)
        x509.check_issued(
            certificate=got["certificate"],
            private_key=got["private_key"],
            trust=[local_ca.pem],
            chain=[got["ca_chain"]],
            now=time.time(),
        )
        assert issuer.status()["versions"][v.id]["subject"] == "CN=web.example.test"
        assert "PRIVATE" not in json.dumps(issuer.status())
    finally:
        await it.aclose()


def _local_issuer(local_ca: LocalCa, tmp_path: Path, name: str = "local") -> CertificateIssuer:
    spec = _spec(
        {"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)}, ttl="60s"
    )
    return CertificateIssuer(name=name, spec=spec, ca=open_ca(spec), state_file=tmp_path / "state" / f"{name}.json")


async def test_a_damaged_or_tampered_state_file_is_not_adopted(local_ca: LocalCa, tmp_path: Path) -> None:
    issuer = _local_issuer(local_ca, tmp_path)
    it = issuer.watch("local")
    first = await _next(it)
    await it.aclose()
    # The key of the adopted version swapped for another: refused at adoption, a new one issued.
    state = json.loads(issuer.state_file.read_text())
    state["versions"][0]["private_key"] = x509.key_pem(x509.new_key("ec"))
    issuer.state_file.write_text(json.dumps(state))
    again = _local_issuer(local_ca, tmp_path)
    it = again.watch("local")
    try:
        second = await _next(it)
        assert second.id != first.id
        got = _fields((await again.read("local", second.id)).payload)
        x509.check_issued(certificate=got["certificate"], private_key=got["private_key"], now=time.time())
    finally:
        await it.aclose()
    # Not JSON at all: distrusted, started afresh.
    issuer.state_file.write_text("{not json")
    fresh = _local_issuer(local_ca, tmp_path)
    it = fresh.watch("local")
    try:
        assert (await _next(it)).id == "1"
    finally:
        await it.aclose()


async def test_baton_status_prints_subject_serial_and_not_after_never_key_material(
    local_ca: LocalCa, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon.rotation.status import _print_issuer

    issuer = _local_issuer(local_ca, tmp_path)
    it = issuer.watch("local")
    try:
        v = await _next(it)
        got = _fields((await issuer.read("local", v.id)).payload)
        _print_issuer(json.loads(json.dumps(issuer.status())))
    finally:
        await it.aclose()
    out = capsys.readouterr().out
    assert f"{v.id}: current certificate CN=web.example.test serial {got['serial_number']}" in out
    assert f"not after {got['not_after']}" in out and "renewal due" in out
    assert "PRIVATE" not in out and got["private_key"].splitlines()[1] not in out


async def test_a_damaged_local_ca_file_is_retried_not_a_crash(local_ca: LocalCa, tmp_path: Path) -> None:
    good = local_ca.cert_file.read_text()
    lines = good.splitlines()
    local_ca.cert_file.write_text("\n".join([lines[0], lines[1][::-1], *lines[2:]]) + "\n")  # a damaged body
    spec = _spec({"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)})
    issuer = CertificateIssuer(
        name="damaged-ca",
        spec=spec,
        ca=open_ca(spec),
        state_file=tmp_path / "s" / "d.json",
        retry_min=0.05,
        retry_max=0.1,
    )
    it = issuer.watch("damaged-ca")
    pending = asyncio.ensure_future(_next(it, timeout=30))
    try:
        while issuer.failures < 2:
            assert not pending.done()
            await asyncio.sleep(0.02)
        assert issuer.last_error and "BEGIN" not in issuer.last_error
        local_ca.cert_file.write_text(good)
        assert (await pending).id == "1"
    finally:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        await it.aclose()


class _FlakyRevoke(_Hostile):
    """A CA whose revocations fail ``failures`` times first."""

    def __init__(self, ca: LocalCa, failures: int) -> None:
        super().__init__(ca, [])
        self.failures, self.revokes = failures, 0

    async def revoke(self, serial: str) -> bool:
        self.revokes += 1
        if self.revokes <= self.failures:
            raise StoreUnavailable("vault pki revoke: cannot connect")
        return True


async def test_a_failed_revocation_is_retried_with_backoff_not_at_every_scan(local_ca: LocalCa, tmp_path: Path) -> None:
    spec = _spec(
        {"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)},
        ttl="60s",
        revoke_retired=True,
    )
    ca = _FlakyRevoke(local_ca, failures=2)
    now = [time.time()]
    issuer = CertificateIssuer(
        name="flaky", spec=spec, ca=ca, state_file=tmp_path / "s" / "f.json", clock=lambda: now[0]
    )
    it = issuer.watch("flaky")
    try:
        v1 = await _next(it)
        issuer.renew_now.set()
        v2 = await _next(it)
        await issuer.observe(v2.id, {})
        assert ca.revokes == 1 and next(v for v in await issuer.versions("flaky") if v.id == v1.id).retired
        for _ in range(5):  # scans in quick succession: the backoff holds
            await issuer.observe(v2.id, {})
        assert ca.revokes == 1
        now[0] += 1.5
        await issuer.observe(v2.id, {})
        assert ca.revokes == 2  # failed again: the next wait is longer
        now[0] += 1.5
        await issuer.observe(v2.id, {})
        assert ca.revokes == 2
        now[0] += 1.0
        await issuer.observe(v2.id, {})
        assert ca.revokes == 3 and issuer.status()["versions"][v1.id]["revoked"]
        await issuer.observe(v2.id, {})
        assert ca.revokes == 3
    finally:
        await it.aclose()
