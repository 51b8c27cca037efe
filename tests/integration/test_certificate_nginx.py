"""A real agent renews a real nginx's certificate from OpenBao's PKI, under a client loop that never fails.

The agent (in-process) issues ``web-tls`` from ``pki/sign/web`` with a 10 s TTL
renewed at a fifth of it (OpenBao declines to revoke a certificate about to
expire, and superseded ones are revoked here), writes tls.crt/tls.key (0440) and
SIGHUPs nginx (the master, found by its pid file; ``children: true`` counts its
workers as holders). A thread opens a verified TLS connection to nginx every few
ms. Through >= 5 renewals: no handshake fails, each new serial is served within
a second of its swap, and a superseded version is retired (files removed, serial
revoked) only once the workers forked with it have exited: a worker kept busy by
an unfinished request keeps its version on disk until the request ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509 as cx509

from daemon.agent.service import Agent
from daemon.config import parse_config
from daemon.issuers.certificate import CertificateIssuer
from daemon.kit import x509
from tests.fixtures.nginx import Nginx, client_context, handshake, need_nginx
from tests.fixtures.pki import Pki

pytestmark = [pytest.mark.integration, pytest.mark.slow]
T = TypeVar("T")
RENEWALS = 5


async def until(cond: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


class ClientLoop(threading.Thread):
    """Handshakes one after another: (end time, serial) for each, and every failure."""

    def __init__(self, ctx: ssl.SSLContext, port: int) -> None:
        super().__init__(daemon=True)
        self.ctx, self.port = ctx, port
        self.served: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                der = handshake(self.ctx, self.port)
            except (OSError, ssl.SSLError, ConnectionError) as e:
                self.failures.append(f"{time.time():.3f} {type(e).__name__}: {e}")
            else:
                cert = cx509.load_der_x509_certificate(der)
                self.served.append((time.time(), x509.serial_text(cert)))
            self.stop.wait(0.005)


def _config(tmp_path: Path, pki: Pki, nginx: Nginx, token_file: Path) -> dict[str, Any]:
    return {
        "node_id": "n1",
        "store": {"kind": "local", "path": str(tmp_path / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "report": {"heartbeat": "1s"},
        "agent": {
            "scan_interval": "1s",
            "debounce": 0,
            "fanotify": "off",
            "state_dir": str(tmp_path / "state"),
            "retry_min": "0.2s",
            "retry_max": "1s",
        },
        "credentials": [
            {
                "name": "web-tls",
                "certificate": {
                    "issuer": {
                        "kind": "vault",
                        "path": pki.sign_path,
                        "url": pki.target.direct_url,
                        "auth": {"method": "token_file", "token_file": str(token_file)},
                    },
                    "common_name": "web.example.test",
                    "alt_names": ["localhost"],
                    "ip_sans": ["127.0.0.1"],
                    "ttl": "10s",
                    "renew_at": 0.2,
                    "jitter": 0.02,
                    "revoke_retired": True,
                },
                "output": {
                    "dir": str(tmp_path / "out"),
                    "mode": "0440",
                    "files": {"tls.crt": "{{ certificate }}\n{{ ca_chain }}\n", "tls.key": "{{ private_key }}\n"},
                },
                "consumers": [
                    {
                        "name": "nginx",
                        "match": {"pidfile": str(nginx.pidfile), "children": True},
                        "loads": "on-reload",
                        "reload": {"signal": "SIGHUP"},
                        "health": {"alive_for": 0},
                    }
                ],
            }
        ],
    }


def _busy_worker(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A connection with half a request sent: its worker stays until the request ends (not idle)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n")
    return tls


async def test_nginx_serves_every_renewal_with_no_failed_handshake_and_old_versions_retire_after_their_workers(
    openbao_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    need_nginx()
    token_file = tmp_path / "token"
    token = openbao_pki.token()  # only the PKI policy of docs/install.md
    token_file.write_text(token)
    token_file.chmod(0o600)
    out = tmp_path / "out"
    nginx = Nginx(dir=tmp_path / "nginx", cert=out / "tls.crt", key=out / "tls.key")
    cfg = parse_config(_config(tmp_path, openbao_pki, nginx, token_file))
    agent = Agent(cfg, install_signals=False)
    task = asyncio.create_task(agent.serve())
    client: ClientLoop | None = None
    caplog.set_level(logging.INFO)
    try:
        await asyncio.wait_for(agent.ready.wait(), 30)
        issuer = agent.issuers["web-tls"]
        assert isinstance(issuer, CertificateIssuer)
        nginx.start()
        state = agent.credentials["web-tls"]
        first = state.version
        assert first is not None
        # Keys 0440 by config, never more.
        assert stat.S_IMODE(os.stat(out / "tls.key").st_mode) == 0o440

        # An old worker kept busy: the first version must outlive the swap while it runs.
        ctx = client_context(openbao_pki.root_pem)
        busy = _busy_worker(nginx.port, ctx)
        busy_worker = next(iter(nginx.workers()))
        client = ClientLoop(ctx, nginx.port)
        client.start()

        swaps: dict[str, float] = {}

        # Which version each worker was forked with, and when it was last seen alive.
        generation: dict[int, str] = {}
        alive_at: dict[int, float] = {}

        async def watch_workers() -> None:
            while True:
                now, workers = time.time(), nginx.workers()
                for pid, cmd in workers.items():
                    if pid not in generation and "shutting down" not in cmd and state.version is not None:
                        generation[pid] = state.version
                    alive_at[pid] = now
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch_workers())
        seen = first
        while len(swaps) < RENEWALS:
            before = seen
            await until(lambda: state.version != before, 15, "a renewal")  # noqa: B023 (awaited here)
            seen = state.version
            assert seen is not None and state.last_change is not None
            swaps[seen] = state.last_change
            if len(swaps) == 1:
                # The busy worker started before this swap: it holds the first version.
                assert agent.tracker is not None
                await until(
                    lambda: any(
                        h["pid"] == busy_worker
                        for h in agent.tracker.version_states("web-tls").get(first, {}).get("holders", [])
                    ),
                    10,
                    "the busy worker seen holding the first version",
                )
        # Through every renewal the first version stayed: its worker is still there.
        assert busy_worker in nginx.workers() and "shutting down" in nginx.workers()[busy_worker]
        assert not next(v for v in await issuer.versions("web-tls") if v.id == first).retired
        assert any(d.version == first for d in state.writer.versions())
        serial_first = issuer.status()["versions"][first]["serial"]
        assert serial_first not in openbao_pki.revoked()

        # The request ends, the worker exits: the first version goes (retired, files removed, revoked).
        busy.sendall(b"\r\n")
        while busy.recv(4096):
            pass
        busy.close()
        await until(lambda: busy_worker not in nginx.workers(), 15, "the busy worker's exit")
        await until(lambda: not any(d.version == first for d in state.writer.versions()), 15, "v1's files removed")
        assert next(v for v in await issuer.versions("web-tls") if v.id == first).retired
        # The versions between went as soon as their workers left, before they expired: revoked at
        # the PKI (the first had expired by then, and an expired certificate is not revoked).
        retired = [v.id for v in await issuer.versions("web-tls") if v.retired and v.id != first]
        assert len(retired) >= RENEWALS - 2
        revoked = openbao_pki.revoked()
        assert {issuer.status()["versions"][v]["serial"] for v in retired} <= revoked
        assert serial_first not in revoked

        watcher.cancel()
        # Each version retired only after the last worker forked with it was gone.
        retired_at = {r.version: r.created for r in caplog.records if r.getMessage() == "certificate_retired"}
        assert set(retired) | {first} <= set(retired_at)
        for pid, version in generation.items():
            if version in retired_at:
                assert alive_at[pid] < retired_at[version], f"v{version} retired while worker {pid} lived"
        assert len({v for v in generation.values() if v in retired_at}) >= RENEWALS - 2

        # The last swap may be moments old (its reload just sent): let the client run until it
        # sees that serial, or past the second the assertion below allows.
        serial_last = issuer.status()["versions"][seen]["serial"]
        await until(
            lambda: any(s == serial_last for _, s in client.served) or time.time() > swaps[seen] + 1.0,
            10,
            "the last renewal served, or its second passed",
        )
        client.stop.set()
        client.join(10)
        # No handshake failed, and every renewal was served within a second of its swap.
        assert client.failures == []
        serials = {v: issuer.status()["versions"][v]["serial"] for v in swaps}
        for version, swapped in swaps.items():
            served = [t for t, s in client.served if s == serials[version]]
            assert served, f"version {version} was never served"
            assert min(served) - swapped < 1.0, f"version {version} served {min(served) - swapped:.3f}s after its swap"
        assert len(client.served) > 50

        # Status shows subject, serial, not-after and holders; never key material.
        status = json.dumps(agent.status())
        cur = issuer.status()["versions"][state.version]
        assert cur["subject"] == "CN=web.example.test" and cur["serial"] and cur["not_after"]
        assert '"holders"' in status
        assert "PRIVATE KEY" not in status
    finally:
        if client is not None:
            client.stop.set()
            client.join(10)
        agent.should_exit.set()
        await asyncio.wait_for(task, 30)
        nginx.stop()
    text = caplog.text
    assert "PRIVATE KEY" not in text and token not in text


async def test_a_ca_refusing_renewals_keeps_the_current_certificate_served_and_says_why(
    openbao_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    need_nginx()
    token_file = tmp_path / "token"
    token = openbao_pki.token()  # only the PKI policy of docs/install.md
    token_file.write_text(token)
    token_file.chmod(0o600)
    out = tmp_path / "out"
    nginx = Nginx(dir=tmp_path / "nginx", cert=out / "tls.crt", key=out / "tls.key")
    data = _config(tmp_path, openbao_pki, nginx, token_file)
    data["credentials"][0]["certificate"]["revoke_retired"] = False
    agent = Agent(parse_config(data), install_signals=False)
    task = asyncio.create_task(agent.serve())
    caplog.set_level(logging.INFO)
    try:
        await asyncio.wait_for(agent.ready.wait(), 30)
        nginx.start()
        state, issuer = agent.credentials["web-tls"], agent.issuers["web-tls"]
        assert isinstance(issuer, CertificateIssuer)
        held = state.version
        openbao_pki.role_config(allowed_domains="other.test", allow_localhost=False)
        await until(lambda: issuer.failures >= 3, 20, "three refused renewals")
        # The current certificate is still the one on disk and served; the status says why.
        assert state.version == held
        ctx = client_context(openbao_pki.root_pem)
        served = await asyncio.to_thread(handshake, ctx, nginx.port)
        assert x509.serial_text(cx509.load_der_x509_certificate(served)) == issuer.status()["versions"][held]["serial"]
        status = agent.status()["credentials"]["web-tls"]
        assert "request rejected" in status["issuer"]["issue_error"]
        assert "request rejected" in status["last_error"]  # the follower shows the issuer's trouble
        openbao_pki.role_config()
        await until(lambda: state.version != held, 20, "a renewal once the role allows it again")
    finally:
        agent.should_exit.set()
        await asyncio.wait_for(task, 30)
        nginx.stop()
    assert "PRIVATE KEY" not in caplog.text and token not in caplog.text
