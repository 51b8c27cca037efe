"""A list-then-watch cache of one kind of object in one namespace, as client-go's informers keep.

One list, then one watch from its resourceVersion, re-opened from the last
event's; a 410 (history compacted) lists again. While the cache follows the
API, ``error`` is None; after a failure it holds the error (the cache may miss
changes until the next list), and readers take that as unknown. A kind the
API does not serve (404 on the list: a CRD not installed) is ``absent``, and
looked for again now and then. Never logs an object (a pod spec may carry a
literal value in its environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp

from daemon.clients.kube import Obj, kube_call, kube_open, status_error
from daemon.errors import ResourceExpired, StoreError, StoreNotFound, StoreUnavailable

log = logging.getLogger(__name__)

# The list (or watch) call of the kind: keyword arguments in, the call's awaitable out.
Lister = Callable[..., Awaitable[Any]]

MAX_EVENT = 8 << 20  # one watch event holds one object; a pod or workload is far smaller


class Informer:
    """``start()``, then ``objects`` (name -> object), ``synced``, ``error``, ``absent``; ``aclose()``."""

    def __init__(
        self,
        what: str,
        lister: Lister,
        *,
        request_timeout: float = 10.0,
        watch_timeout: int = 300,
        backoff: tuple[float, float] = (0.5, 30.0),
        absent_retry: float = 60.0,
    ) -> None:
        self.what = what
        self.lister = lister
        self.request_timeout = request_timeout
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.absent_retry = absent_retry
        self.objects: dict[str, Obj] = {}
        self.synced = asyncio.Event()  # set once a list has answered (or said the kind is absent)
        self.error: str | None = None
        self.absent = False
        self.changes = 0  # bumped on every change of the cache (tests wait on it)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"informer:{self.what}")

    async def wait_synced(self, limit: float) -> bool:
        """Start if not started; True once listed, False if not within ``limit`` seconds."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.synced.wait(), limit)
        return self.synced.is_set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _set(self, objects: dict[str, Obj]) -> None:
        self.objects = objects
        self.changes += 1

    async def _run(self) -> None:
        rv: str | None = None
        delay = self.backoff[0]
        while True:
            try:
                if rv is None:
                    listing = await kube_call(
                        self.lister(_preload_content=False, _request_timeout=self.request_timeout),
                        op="list",
                        what=self.what,
                    )
                    items = listing.get("items") or []
                    self._set({o["metadata"]["name"]: o for o in items if _named(o)})
                    rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                    self.error, self.absent = None, False
                    self.synced.set()
                started, events = asyncio.get_running_loop().time(), 0
                async with contextlib.aclosing(self._stream(rv)) as stream:
                    async for event in stream:
                        events += 1
                        rv = self._apply(event) or rv
                delay = self.backoff[0]
                if events == 0 and asyncio.get_running_loop().time() - started < 1.0:
                    await asyncio.sleep(delay)  # a stream that ends at once, again and again, must not spin
            except ResourceExpired:
                log.info("watch history expired (410); listing again", extra={"what": self.what})
                rv = None
            except StoreNotFound:
                # The kind is not served (a CRD not installed): none exist; look again later.
                if not self.absent:
                    log.info("kind not served by the API; none exist", extra={"what": self.what})
                self._set({})
                self.error, self.absent = None, True
                self.synced.set()
                rv = None
                await asyncio.sleep(self.absent_retry)
            except StoreError as e:
                if self.error != str(e):
                    log.warning("list/watch failed; retrying", extra={"what": self.what, "error": str(e)})
                self.error = str(e)
                rv = None  # the cache may have missed changes: list again
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.backoff[1])

    def _apply(self, event: Obj) -> str | None:
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            raise StoreUnavailable(f"kubernetes watch {self.what}: malformed event")
        if kind == "ERROR":
            code = obj.get("code")
            raise status_error(int(code) if isinstance(code, int) else 500, op="watch", what=self.what)
        rv = _meta(obj).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED") and _named(obj):
            self._set({**self.objects, obj["metadata"]["name"]: obj})
        elif kind == "DELETED" and _named(obj):
            self._set({k: v for k, v in self.objects.items() if k != obj["metadata"]["name"]})
        elif kind != "BOOKMARK":
            raise StoreUnavailable(f"kubernetes watch {self.what}: unexpected event")
        return str(rv) if rv else None

    async def _stream(self, rv: str) -> AsyncGenerator[Obj, None]:
        resp = await kube_open(
            self.lister(
                watch=True,
                resource_version=rv,
                timeout_seconds=self.watch_timeout,
                allow_watch_bookmarks=True,
                _preload_content=False,
                _request_timeout=(self.request_timeout, self.watch_timeout + self.request_timeout),
            ),
            op="watch",
            what=self.what,
        )
        self.error = None  # the watch is open from the listed state: the cache follows again
        try:
            buf = b""
            try:
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    if len(buf) > MAX_EVENT:
                        raise StoreUnavailable(f"kubernetes watch {self.what}: event too large")
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield self._event(line)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise StoreUnavailable(f"kubernetes watch {self.what}: {type(e).__name__}") from e
        finally:
            resp.release()

    def _event(self, line: bytes) -> Obj:
        try:
            event = json.loads(line)
        except ValueError:
            raise StoreUnavailable(f"kubernetes watch {self.what}: malformed event") from None
        if not isinstance(event, dict):
            raise StoreUnavailable(f"kubernetes watch {self.what}: malformed event")
        return event


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _named(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(_meta(obj).get("name"), str)
