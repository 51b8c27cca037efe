"""The local endpoint: /healthz, /readyz, /v1/status, /metrics (aiohttp).

Bound to loopback or a unix socket by default. It shows names, version ids,
pids and times; it never has a secret value to show. Anything that changes
state (``POST /v1/actions/NAME``: the rotator's rotate and retire) needs the token
from ``api.token_file``, or the one the rotator makes in ``api.runtime_dir``.

Every peer is assumed hostile, so the endpoint must never cost the agent more
than a fixed number of file descriptors: it accepts connections itself, holds
at most ``max_connections``, and when full closes the oldest connection with no
request in flight of the peer holding the most (a uid on a unix socket, from
SO_PEERCRED; an address over TCP), so one peer flooding it evicts itself. A
connection must finish its headers within ``header_timeout``, its body within
``body_timeout``, and start its next request within ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import resource
import socket
import stat
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from daemon.errors import ActionRefused, ListenError
from daemon.kit import metrics
from daemon.kit.logs import event

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
MAX_BODY = 64 * 1024
BACKLOG = 512
# Header limits: at most MAX_HEADERS * MAX_FIELD bytes buffered per connection.
MAX_LINE = MAX_FIELD = 4096
MAX_HEADERS = 32
LOG_EVERY = 10.0
# Out of descriptors (or kernel memory): wait a little before accepting again,
# the listening socket stays readable and would otherwise spin the loop.
ACCEPT_RETRY = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's soft default of 1024 is low for a daemon)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return  # e.g. a seccomp filter that denies @resources: the unit's LimitNOFILE= applies
    log.info("open files limit raised from %d to %d", soft, hard)


class Throttled:
    """One log line per ``every`` seconds at most; the next line says how many were held back."""

    def __init__(self, name: str, *, every: float = LOG_EVERY, level: int = logging.WARNING) -> None:
        self.name = name
        self.every = every
        self.level = level
        self._last = -float("inf")
        self._held = 0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return
        event(log, self.name, self.level, **fields, more_since_last=self._held)
        self._last, self._held = now, 0


class _Conn(asyncio.Protocol):
    """One accepted connection: admits it through the guard, then hands everything to aiohttp's handler."""

    def __init__(self, guard: _Guard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.busy = False  # a request is in a handler
        self.timer: asyncio.TimerHandle | None = None
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _peer(transport)
        if self.guard.admit(self):
            self._open = True
            self.inner.connection_made(transport)
        else:
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._open:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._open else None

    def pause_writing(self) -> None:
        if self._open:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.drop(self)
        if self._open:
            self._open = False
            self.inner.connection_lost(exc)

    def expire(self) -> None:
        """The header or idle deadline passed with no request in a handler: close it, buffers and all."""
        self.timer = None
        if not self.busy and self.transport is not None:
            self.guard.closed_timeout += 1
            self.guard.drop(self)
            self.transport.abort()


def _peer(transport: asyncio.BaseTransport) -> str:
    """Who is on the other end: a uid on a unix socket (the kernel's word), else an address."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return "uid:?"
        return f"uid:{struct.unpack('3i', creds)[1]}"
    peername = transport.get_extra_info("peername")
    return f"ip:{peername[0]}" if peername else "ip:?"


class _Guard:
    """The connections held, oldest first, and who holds how many."""

    def __init__(self, *, max_connections: int, header_timeout: float, idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.conns: dict[asyncio.BaseTransport, _Conn] = {}  # insertion order: oldest first
        self.per_peer: collections.Counter[str] = collections.Counter()
        self.evicted = 0
        self.refused = 0
        self.closed_timeout = 0
        self._at_cap = Throttled("api_connection_cap")

    def admit(self, conn: _Conn) -> bool:
        if len(self.conns) >= self.max_connections and not self._evict(conn.peer):
            self.refused += 1
            self._at_cap(max_connections=self.max_connections, evicted=self.evicted, refused=self.refused)
            return False
        assert conn.transport is not None
        self.conns[conn.transport] = conn
        self.per_peer[conn.peer] += 1
        conn.timer = asyncio.get_running_loop().call_later(self.header_timeout, conn.expire)
        return True

    def shed(self) -> bool:
        """Out of descriptors: close the biggest holder's oldest idle connection, if there is one."""
        return self._evict(None)

    def _evict(self, newcomer: str | None) -> bool:
        """Close the oldest idle connection of the peer holding the most (the newcomer counted in)."""
        counts = self.per_peer.copy()
        if newcomer is not None:
            counts[newcomer] += 1
        for peer, _ in counts.most_common():
            victim = next((c for c in self.conns.values() if c.peer == peer and not c.busy), None)
            if victim is not None:
                assert victim.transport is not None
                self.evicted += 1
                self.drop(victim)
                victim.transport.abort()
                self._at_cap(max_connections=self.max_connections, evicted=self.evicted, refused=self.refused)
                return True
        return False

    def drop(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.transport is not None and self.conns.pop(conn.transport, None) is not None:
            self.per_peer[conn.peer] -= 1
            if self.per_peer[conn.peer] <= 0:
                del self.per_peer[conn.peer]

    @web.middleware
    async def track(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        """A request in a handler is never evicted or timed out; after it, the idle clock runs."""
        conn = self.conns.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.busy = True
        if conn.timer is not None:
            conn.timer.cancel()
        try:
            return await handler(request)
        finally:
            conn.busy = False
            if request.transport in self.conns:
                conn.timer = asyncio.get_running_loop().call_later(self.idle_timeout, conn.expire)


class StatusSource(Protocol):
    """What the endpoint serves, for both roles (the agent and the rotator are ``Service``s that have both)."""

    ready: asyncio.Event  # /readyz answers 200 once it is set

    def status(self) -> dict[str, Any]:
        """The /v1/status document: never a secret value."""
        ...


class ApiServer:
    """Serves a ``StatusSource``: /healthz, /readyz, /v1/status, /metrics."""

    def __init__(
        self,
        source: StatusSource,
        *,
        token_file: Path | None = None,
        actions: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] | None = None,
        page: Callable[[], Awaitable[str]] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.source = source
        self.token_file = token_file
        self.actions = actions or {}
        self.page = page  # the rotator's fleet page at / (rotation/page.py)
        self.body_timeout = body_timeout
        self.guard = _Guard(max_connections=max_connections, header_timeout=header_timeout, idle_timeout=idle_timeout)
        self.runner: web.AppRunner | None = None
        self.address: str | None = None
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._unix: tuple[str, int] | None = None  # path and inode of our socket, removed at stop
        self._accept_failed = Throttled("api_accept_failed", level=logging.ERROR)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self.guard.track])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/status", self.v1_status)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/actions/{name}", self.action)
        if self.page is not None:
            app.router.add_get("/", self.fleet_page)
        return app

    async def start(self, listen: str) -> None:
        """Listen on ``listen``; a ``ListenError`` naming api.listen if that cannot be done."""
        if listen.startswith("unix:"):
            path = listen[5:]
            self._sockets = [_unix_socket(path)]
            self._unix = (path, os.stat(path).st_ino)
            self.address = listen
        else:
            host, _, port = listen.rpartition(":")
            self._sockets = await _tcp_sockets(host.strip("[]"), int(port))
            bound = self._sockets[0].getsockname()  # the real port when port 0 was asked
            self.address = f"http://{bound[0]}:{bound[1]}"
        self.runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.guard.idle_timeout,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            lingering_time=1.0,
            shutdown_timeout=2.0,
        )
        await self.runner.setup()
        for sock in self._sockets:
            task = asyncio.create_task(self._accept(sock), name=f"api-accept:{listen}")
            task.add_done_callback(_log_death)
            self._accepting.append(task)

    async def _accept(self, sock: socket.socket) -> None:
        """Accept one connection at a time: the loop runs between accepts, so a flood cannot starve it."""
        loop = asyncio.get_running_loop()
        assert self.runner is not None and self.runner.server is not None
        server = self.runner.server
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                self._accept_failed(error=f"{errno.errorcode.get(e.errno or 0, '?')}: {e.strerror}")
                if e.errno in _OUT_OF_RESOURCES:
                    # Give back a descriptor if we hold an idle one (its close runs at the next turn
                    # of the loop), else wait: the listening socket stays readable and would spin.
                    await asyncio.sleep(0 if self.guard.shed() else ACCEPT_RETRY)
                continue
            try:
                await loop.connect_accepted_socket(lambda: _Conn(self.guard, server()), sock=conn)
            except OSError:
                conn.close()

    async def stop(self) -> None:
        for task in self._accepting:
            task.cancel()
        for task in self._accepting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._accepting = []
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self._unix is not None:
            path, inode = self._unix
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)  # ours, not one a later run put there
            self._unix = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for conn in list(self.guard.conns.values()):
            self.guard.drop(conn)
            if conn.transport is not None:
                conn.transport.abort()  # a peer that never read its response

    # ------------------------------------------------------------ handlers

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.source.ready.is_set():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def v1_status(self, request: web.Request) -> web.Response:
        body = json.dumps(self.source.status(), indent=1, default=str)
        return web.Response(text=body, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def fleet_page(self, request: web.Request) -> web.Response:
        """The read-only fleet page: for loopback peers and the unix socket, or with the token."""
        if not (_local_peer(request) or self._authorized(request)):
            return web.Response(status=401, text="the fleet page is served to loopback, or with the bearer token\n")
        assert self.page is not None
        return web.Response(text=await self.page(), content_type="text/html", headers=PAGE_HEADERS)

    async def action(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "a valid bearer token is required"}, status=401)
        handler = self.actions.get(request.match_info["name"])
        if handler is None:
            return web.json_response({"error": "no such action"}, status=404)
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.json() if request.can_read_body else {}
        except TimeoutError:
            return web.json_response({"error": "the body took too long"}, status=408)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
            return web.json_response({"error": "body is not JSON"}, status=400)
        body = body if isinstance(body, dict) else {}
        # Who asks, as the kernel says (a uid on a unix socket, an address over TCP); a peer in the body is replaced.
        body["peer"] = _peer(request.transport) if request.transport is not None else "?"
        try:
            return web.json_response(await handler(body))
        except ActionRefused as e:
            return web.json_response({"error": str(e)}, status=e.status)

    def _authorized(self, request: web.Request) -> bool:
        if self.token_file is None:
            return False  # no token configured: state-changing calls are off
        try:
            token = self.token_file.read_text().strip()
        except OSError:
            return False
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())


# No script at all, no outside resource, not framed: a hostile string that got past the escaping still runs nothing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def _local_peer(request: web.Request) -> bool:
    """A loopback TCP peer, or a unix socket peer (the socket's mode decides who may connect)."""
    transport = request.transport
    if transport is None:
        return False
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple):
        sock = transport.get_extra_info("socket")
        return sock is not None and sock.family == socket.AF_UNIX
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return address.is_loopback


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        event(log, "api_accept_died", logging.ERROR, task=task.get_name(), error=repr(task.exception()))


def _listen_error(listen: str, e: OSError) -> ListenError:
    if e.errno == errno.EADDRINUSE:
        why = "the address is already in use (another agent or rotator with the same api.listen?)"
    else:
        why = e.strerror or str(e)
    return ListenError(f"api.listen: cannot listen on {listen}: {why}")


async def _tcp_sockets(host: str, port: int) -> list[socket.socket]:
    listen = f"{host}:{port}"
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"api.listen: cannot resolve {host!r}: {e.strerror}") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as e:
        for s in socks:
            s.close()
        raise _listen_error(listen, e) from None
    return socks


def _unix_socket(path: str) -> socket.socket:
    listen = f"unix:{path}"
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _listen_error(listen, e) from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"api.listen: {path} exists and is not a socket; remove it or choose another path")
        if _unix_in_use(path):
            raise _listen_error(listen, OSError(errno.EADDRINUSE, "in use"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise _listen_error(listen, e) from None
    try:
        os.chmod(path, 0o660)  # before listen(): nobody can connect in between
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        os.unlink(path)  # the socket we just made
        raise _listen_error(listen, e) from None
    return sock


def _unix_in_use(path: str) -> bool:
    """Does a process listen on this socket? A stale one refuses the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            return True  # its backlog is full: very much in use
        except OSError:
            return False
        return True
