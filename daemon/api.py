"""The local endpoint: /healthz, /readyz, /v1/status, /metrics (aiohttp).

Bound to loopback or a unix socket by default. It shows names, version ids,
pids and times; it never has a secret value to show. Anything that changes
state needs the token from ``api.token_file``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from daemon import metrics

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


class ApiServer:
    """Serves a source that has ``status() -> dict`` and ``ready`` (an ``asyncio.Event``)."""

    def __init__(
        self,
        source: Any,
        *,
        token_file: Path | None = None,
        actions: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] | None = None,
    ) -> None:
        self.source = source
        self.token_file = token_file
        self.actions = actions or {}
        self.runner: web.AppRunner | None = None
        self.address: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/status", self.v1_status)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/actions/{name}", self.action)
        return app

    async def start(self, listen: str) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site: web.BaseSite
        if listen.startswith("unix:"):
            path = listen[5:]
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket of a previous run
            site = web.UnixSite(self.runner, path)
            await site.start()
            os.chmod(path, 0o660)
            self.address = listen
        else:
            host, _, port = listen.rpartition(":")
            site = web.TCPSite(self.runner, host.strip("[]"), int(port))
            await site.start()
            bound = self.runner.addresses[-1]  # the real port when port 0 was asked
            self.address = f"http://{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

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

    async def action(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "a valid bearer token is required"}, status=401)
        handler = self.actions.get(request.match_info["name"])
        if handler is None:
            return web.json_response({"error": "no such action"}, status=404)
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        return web.json_response(await handler(body if isinstance(body, dict) else {}))

    def _authorized(self, request: web.Request) -> bool:
        if self.token_file is None:
            return False  # no token configured: state-changing calls are off
        try:
            token = self.token_file.read_text().strip()
        except OSError:
            return False
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())
