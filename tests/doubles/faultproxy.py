"""A small HTTP fault-injecting proxy for tests: the faults a real server cannot make on demand.

``FaultProxy(host, port)`` listens on a free loopback port and forwards each
HTTP/1.1 request to the target on a connection of its own (it asks for
``Connection: close``, so every request is seen and judged apart). A ``Rule``
matches a method (``None``: any) and a path substring; what it does to a
matching request:

- ``status``: answer that status at once (``{"errors": [...]}``, as Vault
  does), the request never reaches the server: a sealed or overloaded Vault
  (503, 500, 502, 504, 429), which a dev server cannot be made to answer;
- ``delay``: the request reaches the server (the write lands), its answer is
  held back that long (or until ``release()``): a slow server or network;
- ``drop``: the request lands, the connection closes without an answer;
- ``truncate``: the request lands, only the first half of the answer is sent
  before the connection closes (a body cut short).

``times`` is how many matching requests a rule applies to (``None``: until it
is removed). ``seen`` lists every (method, path) the proxy got, ``count(method,
kind)`` counts them as Vault endpoint kinds (``("GET", "metadata")``,
``("LIST", "metadata")``, ``("POST", "auth/approle/login")``), answered or not.
``ThreadedFaultProxy`` runs one on a loop of its own in a thread, so a test may
block its own loop (hvac calls, ``kv put``) while the proxy keeps answering;
its hooks are safe to call from any thread. ``ProxyProcess`` runs one in a
process of its own (``python -m tests.doubles.faultproxy URL``), with no rules,
only counting, read over HTTP (``GET /_proxy/counts``, not forwarded, not
counted): how bench/fleet.py counts what its stores ask OpenBao. It never logs
a request or an answer: bodies carry secrets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COUNTS_PATH = "/_proxy/counts"
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class Rule:
    method: str | None
    path: str = ""  # a substring of the request path
    delay: float = 0.0
    drop: bool = False
    times: int | None = 1  # how many matching requests it applies to; then it is spent (None: never)
    status: int | None = None
    truncate: bool = False

    def matches(self, method: str, path: str) -> bool:
        return (self.times is None or self.times > 0) and self.method in (None, method) and self.path in path


def endpoint_kind(method: str, path: str) -> tuple[str, str]:
    """(method, kind) of a Vault request: ``LIST`` for ``?list=true``; ``auth/...`` whole, else the KV verb."""
    parts = urlsplit(path)
    if method == "GET" and "list=true" in parts.query:
        method = "LIST"
    tail = parts.path.removeprefix("/v1/").rstrip("/")
    if tail.startswith("auth/"):
        return method, tail
    pieces = tail.split("/", 2)
    return method, pieces[1] if len(pieces) > 1 else tail


def _answer(status: int) -> bytes:
    said = "Vault is sealed" if status == 503 else "injected failure"  # what Vault says; must stay out of errors
    body = json.dumps({"errors": [said]}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class FaultProxy:
    target_host: str
    target_port: int
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    serve_counts: bool = False  # answer GET /_proxy/counts itself (ProxyProcess)
    _wake: asyncio.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._wake = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Let answers still held back finish (cancelling a connection's task makes asyncio log an error).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for t in list(self._tasks):
            t.cancel()

    def counts(self) -> collections.Counter[tuple[str, str]]:
        with self._lock:
            return collections.Counter(self._counts)

    def count(self, method: str, kind: str) -> int:
        return self.counts()[(method, kind)]

    def _release(self) -> None:
        """Wake every held answer at once (on this proxy's loop)."""
        if self._wake is not None:
            self._wake.set()
            self._wake = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._one(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        method, path, _version = lines[0].decode("latin-1").split(" ", 2)
        headers = [line for line in lines[1:] if not line.lower().startswith((b"connection:", b"keep-alive:"))]
        length = 0
        for line in headers:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await reader.readexactly(length) if length else b""
        if self.serve_counts and method == "GET" and path == COUNTS_PATH:
            counts = {f"{m} {k}": n for (m, k), n in sorted(self.counts().items())}
            payload = json.dumps(counts).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, path)), None)
            if rule is not None and rule.times is not None:
                rule.times -= 1
            self.seen.append((method, path))
            self._counts[endpoint_kind(method, path)] += 1
        if rule is not None and rule.status is not None:
            writer.write(_answer(rule.status))
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        try:
            request = b"\r\n".join([lines[0], *headers, b"Connection: close"]) + b"\r\n\r\n" + body
            up_writer.write(request)
            await up_writer.drain()
            answer = await up_reader.read()  # to EOF: the server closes after one answer
        finally:
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()
        if rule is not None and rule.delay and self._wake is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), rule.delay)
        if rule is not None and rule.drop:
            return  # the write landed; its answer never comes
        if rule is not None and rule.truncate:
            answer = answer[: max(1, len(answer) // 2)]
        writer.write(answer)
        await writer.drain()


class ThreadedFaultProxy:
    """A ``FaultProxy`` on its own event loop in a daemon thread; hooks callable from any thread."""

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        assert parts.hostname is not None and parts.port is not None
        self.proxy = FaultProxy(parts.hostname, parts.port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def seen(self) -> list[tuple[str, str]]:
        with self.proxy._lock:
            return list(self.proxy.seen)

    def start(self) -> ThreadedFaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        self.clear()
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)
        self._loop.close()

    def add(self, rule: Rule) -> Rule:
        with self.proxy._lock:
            self.proxy.rules.append(rule)
        return rule

    def fail_with(self, status: int, *, times: int | None = None, method: str | None = None, path: str = "") -> Rule:
        """Answer ``status`` to every request (or the next ``times``) without forwarding it."""
        return self.add(Rule(method, path, status=status, times=times))

    def slow(self, seconds: float, *, method: str | None = None, path: str = "", times: int | None = None) -> Rule:
        """Hold back answers ``seconds`` (each request still reaches the server)."""
        return self.add(Rule(method, path, delay=seconds, times=times))

    def clear(self) -> None:
        """Remove every rule and send every held answer now: the server is healthy again."""
        with self.proxy._lock:
            self.proxy.rules.clear()
        self._loop.call_soon_threadsafe(self.proxy._release)

    def counts(self) -> collections.Counter[tuple[str, str]]:
        return self.proxy.counts()

    def count(self, method: str, kind: str) -> int:
        return self.proxy.count(method, kind)


def serve(target_url: str) -> None:
    """Forward to ``target_url`` until SIGTERM/SIGINT, counting; print ``{"url": ...}`` on stdout once listening."""

    async def main() -> None:
        parts = urlsplit(target_url)
        assert parts.hostname is not None and parts.port is not None
        proxy = await FaultProxy(parts.hostname, parts.port, serve_counts=True).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(json.dumps({"url": proxy.url}) + "\n")
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await proxy.stop()

    asyncio.run(main())


class ProxyProcess:
    """A counting ``FaultProxy`` in a child process, so it gets a core (and a GIL) of its own."""

    def __init__(self, target_url: str, *, python: str | None = None) -> None:
        self.target_url = target_url
        self.python = python or sys.executable
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> ProxyProcess:
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        self._proc = subprocess.Popen(
            [self.python, "-m", "tests.doubles.faultproxy", self.target_url],
            cwd=root,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(10)
            self._proc.stdout.close()
            raise RuntimeError(f"fault proxy process exited ({self._proc.returncode}) before listening")
        self.url = json.loads(line)["url"]
        return self

    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def counts(self) -> dict[str, int]:
        """Requests forwarded so far, as {"METHOD kind": n} (reading them is not counted)."""
        with urllib.request.urlopen(self.url + COUNTS_PATH, timeout=10) as resp:
            return {str(k): int(v) for k, v in json.loads(resp.read()).items()}

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    serve(sys.argv[1])
