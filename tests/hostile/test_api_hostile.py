"""The local endpoint against hostile local peers: slow or idle connections, floods, a full fd table.

Most tests run a real ``ApiServer`` in the test's loop with short timeouts and a
small cap, and talk raw HTTP over real sockets. The flooding peer is another
user (uid 65534 through ``setpriv``) running a small stdlib script, so what it
holds is really its own. The last test floods a real ``baton agent`` started
under a soft and hard limit of 1024 descriptors (no help from a unit's
LimitNOFILE=), and checks that /healthz answers, credentials are still
written, the agent's fd count stays bounded and its log stays short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.api import ApiServer
from tests.e2e.helpers import BATON, AgentProcess, agent_config, free_port, poll, store_put, write_config
from tests.helpers import until

pytestmark = [
    pytest.mark.hostile,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to another user)"),
]

NOBODY = 65534
HOSTILE = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "

# Opens N connections to a TCP "host:port" or a unix socket path, sends each half
# a request, prints one JSON line, then holds them all until its stdin closes.
FLOOD = r"""
import json, resource, socket, sys
target, n = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
conns, failed = [], 0
for _ in range(n):
    if target.startswith("/"):
        s = socket.socket(socket.AF_UNIX)
        addr = target
    else:
        s = socket.socket()
        host, port = target.rsplit(":", 1)
        addr = (host, int(port))
    s.settimeout(5)
    try:
        s.connect(addr)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        conns.append(s)
    except OSError:
        failed += 1
        s.close()
print(json.dumps({"connected": len(conns), "failed": failed}), flush=True)
sys.stdin.read()
"""


class Source:
    """What the endpoint serves: a status dict and a ready event (the agent's two attributes it reads)."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.ready.set()

    def status(self) -> dict[str, Any]:
        return {"node": "node-hostile"}


class Harness:
    """The servers a test starts and the client connections it opens; all closed at its end."""

    def __init__(self) -> None:
        self.servers: list[ApiServer] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, listen: str = "127.0.0.1:0", **kwargs: Any) -> ApiServer:
        server = ApiServer(Source(), **kwargs)
        await server.start(listen)
        self.servers.append(server)
        return server

    async def connect(self, server: ApiServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert server.address is not None
        if server.address.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(server.address[5:])
        else:
            host, _, port = server.address.removeprefix("http://").rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for w in self.writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        for s in self.servers:
            await s.stop()


@pytest.fixture
async def api() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    await harness.close()


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/healthz") -> int:
    """One keep-alive GET on an open connection; returns the status."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closes the connection; fails if it is still open after ``seconds``."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while await reader.read(4096):
            pass
    return time.monotonic() - started


# ---------------------------------------------------------------- timeouts


async def test_a_client_trickling_its_headers_is_closed_at_the_header_timeout(api: Harness) -> None:
    server = await api.serve(header_timeout=0.5)
    reader, writer = await api.connect(server)
    started_at = time.monotonic()

    async def trickle() -> None:
        for _ in range(50):  # one byte every 50 ms: always "making progress", never done
            writer.write(b"a")
            await asyncio.sleep(0.05)

    writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    trickler = asyncio.create_task(trickle())
    try:
        await closed_within(reader, 3.0)
    finally:
        trickler.cancel()
    took = time.monotonic() - started_at
    assert 0.4 < took < 2.0, took
    assert server.guard.conns == {}


async def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(api: Harness) -> None:
    server = await api.serve(idle_timeout=0.5)
    reader, writer = await api.connect(server)
    assert await request(reader, writer) == 200
    assert await request(reader, writer) == 200  # still open: keep-alive works

    took = await closed_within(reader, 3.0)

    assert 0.4 < took < 2.0, took


async def test_a_body_that_never_arrives_gets_408_at_the_body_timeout(api: Harness, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    called: list[dict[str, Any]] = []

    async def action(body: dict[str, Any]) -> dict[str, Any]:
        called.append(body)
        return {}

    server = await api.serve(token_file=token, actions={"poke": action}, body_timeout=0.5)
    reader, writer = await api.connect(server)
    writer.write(
        b"POST /v1/actions/poke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    started_at = time.monotonic()
    async with asyncio.timeout(3):
        status_line = await reader.readline()

    assert status_line.split()[1] == b"408"
    assert 0.4 < time.monotonic() - started_at < 2.0
    assert called == []


# ---------------------------------------------------------------- the cap


async def test_at_the_cap_a_newcomer_is_served_and_the_oldest_idle_connection_closed(
    api: Harness,
) -> None:
    server = await api.serve(max_connections=8)
    held = [await api.connect(server) for _ in range(8)]
    for _, w in held:
        w.write(HALF_REQUEST)
    await until(lambda: len(server.guard.conns) == 8, timeout=5, what="8 connections held")

    reader, writer = await api.connect(server)
    assert await request(reader, writer) == 200

    await closed_within(held[0][0], 2.0)  # the oldest went
    assert len(server.guard.conns) == 8
    assert server.guard.evicted == 1
    for r, _ in held[1:]:
        assert not r.at_eof()


async def test_connections_in_a_handler_are_never_evicted_and_a_newcomer_is_closed_at_once(
    api: Harness, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken")
    release = asyncio.Event()
    entered: list[int] = []

    async def slow(body: dict[str, Any]) -> dict[str, Any]:
        entered.append(1)
        await release.wait()
        return {"done": True}

    server = await api.serve(token_file=token, actions={"slow": slow}, max_connections=2)
    busy = [await api.connect(server) for _ in range(2)]
    for _, w in busy:
        w.write(
            b"POST /v1/actions/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\nContent-Length: 0\r\n\r\n"
        )
    await until(lambda: len(entered) == 2, timeout=5, what="both requests in the handler")

    reader, _ = await api.connect(server)
    await closed_within(reader, 1.0)
    assert server.guard.refused == 1

    release.set()
    for r, _ in busy:
        async with asyncio.timeout(5):
            assert (await r.readline()).split()[1] == b"200"


# ---------------------------------------------------------------- another user floods it


@pytest.fixture
def hostile_flood() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.stdin is not None:
            p.stdin.close()
        if p.stdout is not None:
            p.stdout.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def request_cleanup() -> Iterator[list[Callable[[], object]]]:
    cleanups: list[Callable[[], object]] = []
    yield cleanups
    for c in cleanups:
        c()


def flood(procs: list[subprocess.Popen[str]], target: str, n: int) -> subprocess.Popen[str]:
    """Start the flood as uid 65534 (prlimit gives it room for n descriptors)."""
    proc = subprocess.Popen(
        ["prlimit", f"--nofile={n + 64}:{n + 64}", *HOSTILE, "/usr/bin/python3", "-c", FLOOD, target, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def flood_report(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, int]:
    """The flood's JSON line, printed once all its connections are made (or failed)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the flood did not report"
    line = proc.stdout.readline()
    assert line, f"the flood exited with {proc.wait()}"
    report: dict[str, int] = json.loads(line)
    return report


async def test_on_a_unix_socket_a_flooding_user_evicts_only_its_own_connections(
    api: Harness, hostile_flood: list[subprocess.Popen[str]], request_cleanup: list[Callable[[], object]]
) -> None:
    # Not under tmp_path: pytest's base dir is 0700, and nobody must reach the socket.
    root = Path(tempfile.mkdtemp(prefix="baton-hostile-api-", dir="/tmp"))
    root.chmod(0o755)
    request_cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))
    sock = root / "api.sock"
    server = await api.serve(f"unix:{sock}", max_connections=16)
    os.chmod(sock, 0o666)  # as if nobody were in the group baton
    mine = await api.connect(server)
    assert await request(*mine) == 200  # now idle on a keep-alive connection, the oldest of all

    proc = flood(hostile_flood, str(sock), 64)
    report = await asyncio.to_thread(flood_report, proc)
    assert report["connected"] + report["failed"] == 64
    await until(lambda: server.guard.evicted >= 64 - 15, timeout=10, what="the flood's connections accepted")

    assert await request(*mine) == 200  # root's idle connection was never the one to go
    assert server.guard.per_peer[f"uid:{NOBODY}"] <= 15
    assert len(server.guard.conns) <= 16


# ---------------------------------------------------------------- out of descriptors

# An ApiServer with a cap far above its fd limit: accept() runs out of descriptors.
OUT_OF_FDS = r"""
import asyncio, logging, resource, sys
from daemon.kit import logs
from daemon.api import ApiServer
logs.setup("json", "info")

class Source:
    def __init__(self):
        self.ready = asyncio.Event()
    def status(self):
        return {}

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    server = ApiServer(Source(), max_connections=10_000)
    await server.start(sys.argv[1])
    print("listening", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()

asyncio.run(main())
"""


async def test_out_of_descriptors_the_accept_error_is_logged_once_per_period_and_healthz_still_answers(
    hostile_flood: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-c", OUT_OF_FDS, f"127.0.0.1:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=Path(__file__).resolve().parents[2],
        )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == b"listening\n"
        report = await asyncio.to_thread(flood_report, flood(hostile_flood, f"127.0.0.1:{port}", 300))
        assert report["connected"] > 64

        took = await asyncio.to_thread(healthz_seconds, f"http://127.0.0.1:{port}")

        assert took < 1.0
        failed = [e for e in json_lines(log_path) if e.get("event") == "api_accept_failed"]
        assert 1 <= len(failed) <= 2, failed  # one line per 10 s, however many accepts failed
        assert failed[0]["error"].startswith("EMFILE")
    finally:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.close()
        server.stdout.close()
        server.wait(timeout=10)


# ---------------------------------------------------------------- a real agent, 1,500 connections


def healthz_seconds(url: str) -> float:
    """Seconds for a fresh connection from root to get /healthz 200."""
    import urllib.request

    started = time.monotonic()
    with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
        assert r.status == 200
    return time.monotonic() - started


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
async def test_1500_idle_connections_from_another_user_do_not_stop_an_agent_limited_to_1024_fds(
    hostile_flood: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    port = free_port()
    db = tmp_path / "store.db"
    store_put(db, "app/db", json.dumps({"password": "hostile-api-Secret-One-5d1e"}))
    credential = {
        "name": "app-db",
        "key": "app/db",
        "output": {"dir": str(tmp_path / "out/app-db"), "files": {"password": "{{ password }}"}},
    }
    config = write_config(tmp_path / "agent.yaml", agent_config(port=port, credentials=[credential], store=str(db)))
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            ["prlimit", "--nofile=1024:1024", BATON, "agent", "--config", str(config)],
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    agent = AgentProcess(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path)
    try:

        def healthy() -> bool:
            agent._check_alive()
            try:
                return agent.get("/healthz", timeout=1.0)[0] == 200
            except OSError:
                return False

        poll(healthy, timeout=20, what="baton agent /healthz", interval=0.05)
        agent.wait_ready(timeout=20)
        assert (tmp_path / "out/app-db/password").read_text() == "hostile-api-Secret-One-5d1e"
        before = open_fds(proc.pid)
        lines_before = len(log_path.read_text().splitlines())

        report = await asyncio.to_thread(flood_report, flood(hostile_flood, f"127.0.0.1:{port}", 1500))
        assert report["connected"] >= 1400, report

        times = [await asyncio.to_thread(healthz_seconds, agent.url) for _ in range(5)]
        held = open_fds(proc.pid)
        store_put(db, "app/db", json.dumps({"password": "hostile-api-Secret-Two-8a2f"}))
        await asyncio.to_thread(
            poll,
            lambda: (tmp_path / "out/app-db/password").read_text() == "hostile-api-Secret-Two-8a2f",
            timeout=15,
            what="the new version written during the flood",
        )

        assert max(times) < 1.0, times
        assert held <= before + 256 + 16, (before, held)
        assert proc.poll() is None, agent.log()[-3000:]
        assert len(log_path.read_text().splitlines()) - lines_before < 30, agent.log()[-3000:]
        code, took = agent.stop(timeout=15)  # with 256 hostile connections still open
        assert code == 0
        assert took < 10
        agent.assert_never_said(["hostile-api-Secret-One-5d1e", "hostile-api-Secret-Two-8a2f"])
        print(
            f"fds before {before}, during the flood {held}; /healthz {max(times) * 1000:.0f} ms max; stop {took:.1f} s"
        )
    finally:
        agent.kill()


def test_the_units_give_the_daemons_room_well_beyond_the_endpoints_cap() -> None:
    from daemon.api import MAX_CONNECTIONS

    units = Path(__file__).resolve().parents[2] / "systemd"
    for name in ("baton.service", "baton-rotator.service"):
        limits = [line for line in (units / name).read_text().splitlines() if line.startswith("LimitNOFILE=")]
        assert len(limits) == 1, name
        soft_hard = limits[0].removeprefix("LimitNOFILE=").split(":")
        assert all(int(n) >= 16 * MAX_CONNECTIONS for n in soft_hard), limits


def test_the_agent_raises_its_soft_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    port = free_port()
    credential = {"name": "app-db", "key": "app/db", "output": {"dir": str(tmp_path / "out")}}
    config = write_config(
        tmp_path / "agent.yaml", agent_config(port=port, credentials=[credential], store=str(tmp_path / "store.db"))
    )
    proc = subprocess.Popen(
        ["prlimit", "--nofile=1024:4096", BATON, "agent", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:

        def limits() -> str | None:
            assert proc.poll() is None, proc.returncode
            text = Path(f"/proc/{proc.pid}/limits").read_text()
            line = next(line for line in text.splitlines() if line.startswith("Max open files"))
            return line if line.split()[3] == "4096" else None

        assert poll(limits, timeout=15, what="the soft limit raised").split()[3:5] == ["4096", "4096"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
