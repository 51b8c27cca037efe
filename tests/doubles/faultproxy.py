"""A small HTTP fault-injecting proxy for tests: delay or drop the answer to chosen requests.

``FaultProxy(host, port)`` listens on a free loopback port and forwards each
HTTP/1.1 request to the target on a connection of its own (it asks for
``Connection: close``, so every request is seen and judged apart). A ``Rule``
matches a method and a path substring; a matching request still reaches the
server (the write lands), but its answer is held back ``delay`` seconds or
never sent (``drop``): the client sees a timeout or a closed connection, as
with a slow or broken network. ``seen`` lists every (method, path) forwarded.
It never logs a request or an answer: bodies carry secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Rule:
    method: str
    path: str  # a substring of the request path
    delay: float = 0.0
    drop: bool = False
    times: int = 1  # how many matching requests it applies to; then it is spent

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and method == self.method and self.path in path


@dataclass
class FaultProxy:
    target_host: str
    target_port: int
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
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
        rule = next((r for r in self.rules if r.matches(method, path)), None)
        if rule is not None:
            rule.times -= 1
        self.seen.append((method, path))
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
        if rule is not None and rule.delay:
            await asyncio.sleep(rule.delay)
        if rule is not None and rule.drop:
            return  # the write landed; its answer never comes
        writer.write(answer)
        await writer.drain()
