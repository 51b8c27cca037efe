"""The fleet page in a real headless Chromium (Debian's ``chromium``), loaded during a rotation.

A real rotator (endpoint on a free loopback port) and agent on one local
store; a holder process keeps version 1 open while version 2 is current, and
a hostile node files a report whose holder names are markup. Chromium loads
``/`` (``--dump-dom``: the DOM after parsing) and takes a screenshot; the test
asserts from the DOM what the page shows, that the hostile strings are text
(no element was made of them), and that no payload value is on the page.
``BATON_FLEET_SCREENSHOT=path`` also saves the screenshot there (the README's).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from daemon.agent.service import Agent
from daemon.config import parse_config
from daemon.report.base import REPORT_PREFIX, Holder, NodeReport
from daemon.rotation.service import Rotator

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.integration, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]

HOLDER = """
import sys
held = open(sys.argv[1], "rb")
print("ready", flush=True)
sys.stdin.read()
"""
HOSTILE_EXE = "</code><script>document.title='pwned'</script><img src=x onerror=alert(1)>"
HOSTILE_CONSUMER = '"><b id="injected">bold</b>'


class Dom(HTMLParser):
    """The tags, attributes and text of a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


async def until(cond: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)
    return value


async def chromium(*args: str, profile: Path) -> bytes:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}"
    return out


async def test_the_fleet_page_shows_a_rotation_in_progress_in_chromium(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    config = parse_config(
        {
            "node_id": "n1",
            "store": {"kind": "local", "path": str(db)},
            "api": {"listen": "127.0.0.1:0"},
            "agent": {"debounce": 0, "fanotify": "off"},
            "credentials": [
                {"name": "db", "key": "k", "output": {"dir": str(tmp_path / "out")}, "rotation": {"every": "1d"}}
            ],
        }
    )
    rotator = Rotator(config, install_signals=False)
    rtask = asyncio.create_task(rotator.serve())
    agent = Agent(config, install_signals=False)
    atask = asyncio.create_task(agent.serve())
    holder = None
    try:
        await asyncio.wait_for(agent.ready.wait(), 60)
        r = rotator.rotators["db"]
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path / "out" / "value")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        # A hostile node: its report names a holder of version 1 in markup.
        evil = NodeReport(
            node="evil-node",
            credential="db",
            current="2",
            in_use={"1": 1},
            holders=(Holder(4242, HOSTILE_EXE, HOSTILE_CONSUMER, "fd", "1"),),
            heartbeat=time.time() + 3600,
        )
        await rotator.store.merge_metadata("k", {REPORT_PREFIX + "evil-node": evil.to_json()})
        rotator.rotate_now.set()
        await until(lambda: agent.credentials["db"].version == "2")
        assert agent.tracker is not None
        agent.tracker.poke()
        pid = holder.pid
        await until(lambda: any(h.pid == pid for d in r.last_decisions for hs in d.holders.values() for h in hs))
        assert rotator.api is not None and rotator.api.address is not None
        url = rotator.api.address + "/"

        dom_text = (await chromium("--dump-dom", url, profile=tmp_path / "profile-1")).decode()
        shot = tmp_path / "fleet.png"
        await chromium(f"--screenshot={shot}", "--window-size=1100,1500", url, profile=tmp_path / "profile-2")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
            for f in (holder.stdin, holder.stdout):
                if f is not None:
                    f.close()
        agent.should_exit.set()
        rotator.should_exit.set()
        await asyncio.gather(atask, rtask)

    dom = Dom()
    dom.feed(dom_text)
    text = " ".join(dom.text)
    # Versions and stages, the timeline's bars
    rows = {a["data-version"]: a for a in dom.having("tr") if a.get("data-version")}
    assert {"1", "2"} <= set(rows)
    assert "pending retirement" in text and "current" in text
    assert {a.get("data-version") for a in dom.having("rect")} >= {"1", "2"}
    assert dom.having("svg", **{"class": "timeline"})
    # Nodes with their current version and report age
    assert {a["data-node"] for a in dom.having("tr") if a.get("data-node")} == {"n1", "evil-node"}
    # The pending version's holders: this node's holder (pid, exe) and the hostile one, as text
    assert dom.having("div", **{"class": "pending-version", "data_version": "1"})
    assert dom.having("tr", data_pid=str(pid))
    assert sys.executable in text or os.path.realpath(sys.executable) in text
    assert "n1: 1 holder(s) of version 1" in text
    assert HOSTILE_EXE in text and HOSTILE_CONSUMER in text  # shown as text, exactly
    assert not dom.having("script") and not dom.having("img") and not dom.having("b")
    assert "pwned" not in "".join(a.get("title") or "" for _, a in dom.tags)
    # The last events and the page's own refresh
    assert "rotated" in text
    assert dom.having("meta", http_equiv="refresh")
    # Never a secret value
    store_values = _payloads(db)
    assert store_values and all(v not in dom_text for v in store_values)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("BATON_FLEET_SCREENSHOT"):
        shutil.copy(shot, target)


def _payloads(db: Path) -> list[str]:
    from daemon.stores.local import LocalStore

    store = LocalStore(db, watch_files=False)
    try:
        return [store.read_sync("k", v.id).payload.reveal() for v in store.versions_sync("k")]
    finally:
        store.close()


def _outside_address() -> str | None:
    """This host's address on a non-loopback interface, if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_a_peer_that_is_not_local_needs_the_token(tmp_path: Path) -> None:
    import aiohttp

    address = _outside_address()
    if address is None:
        pytest.skip("no non-loopback interface to connect from")
    token = tmp_path / "token"
    token.write_text("page-token-0123456789\n")
    token.chmod(0o600)
    config = parse_config(
        {
            "node_id": "n1",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "api": {"listen": f"{address}:0", "token_file": str(token)},
            "credentials": [
                {"name": "db", "key": "k", "output": {"dir": str(tmp_path / "out")}, "rotation": {"every": "1d"}}
            ],
        }
    )
    rotator = Rotator(config, install_signals=False)
    task = asyncio.create_task(rotator.serve())
    try:
        await asyncio.wait_for(rotator.ready.wait(), 30)
        assert rotator.api is not None and rotator.api.address is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(rotator.api.address + "/") as resp:
                assert resp.status == 401
                assert "Baton fleet" not in await resp.text()
            headers = {"Authorization": "Bearer page-token-0123456789"}
            async with http.get(rotator.api.address + "/", headers=headers) as resp:
                assert resp.status == 200 and "<h1>Baton fleet</h1>" in await resp.text()
                assert "script-src" not in resp.headers["Content-Security-Policy"]
                assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    finally:
        rotator.should_exit.set()
        await task


async def test_many_page_loads_at_once_read_the_store_once(tmp_path: Path) -> None:
    from daemon.rotation.page import FleetPage

    config = parse_config(
        {
            "node_id": "n1",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "credentials": [
                {"name": "db", "key": "k", "output": {"dir": str(tmp_path / "out")}, "rotation": {"every": "1d"}}
            ],
        }
    )
    rotator = Rotator(config, install_signals=False, serve_api=False)
    task = asyncio.create_task(rotator.serve())
    try:
        r = await until(lambda: rotator.rotators["db"].last_outcome is not None and rotator.rotators["db"])
        # The node reports: with nothing superseded, only the page reads them (the retire loop stops before).
        reads = 0
        real = r.reporter.collect

        async def counted(key: str, credential: Any) -> Any:
            nonlocal reads
            reads += 1
            return await real(key, credential)

        r.reporter.collect = counted
        page = FleetPage(rotator)
        pages = await asyncio.gather(*(page.html() for _ in range(20)))
        assert reads == 1 and len(set(pages)) == 1 and 'data-version="1"' in pages[0]
    finally:
        rotator.should_exit.set()
        await task
