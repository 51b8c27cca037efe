"""The ``Notifier``: takes the events that matter as they are logged and delivers them to each sink.

It listens to ``kit.logs.event`` (whatever the log level), so every room
that emits ``rotated``, ``retired``, ``force_retired``, ``lease_expiring``...
notifies without knowing this room; ``notify()`` is the same call for code
that has no logger of its own at hand. Each sink has its own bounded queue and
one delivery task: a full queue drops the new notice (counted in
``baton_notify_deliveries_total{result="queue_full"}``), a failed attempt is
retried with backoff (``retry``), and a notice out of attempts is dropped
(``dropped``). Nothing here ever waits on a sink in the caller's path: a
webhook that hangs or answers 500 never delays a rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from daemon.config import NOTIFY_EVENTS, Config, NotifyConfig
from daemon.errors import BatonError, PluginError
from daemon.kit import metrics, plugins
from daemon.kit.backoff import Backoff
from daemon.kit.logs import event, listen
from daemon.notify.base import Notice, Sink, clean_fields

log = logging.getLogger(__name__)

RETRY_MIN = 0.5
RETRY_MAX = 30.0
FLUSH_LIMIT = 2.0  # at a stop, queued notices get this long to go out


def notify(name: str, *, credential: str | None = None, level: int = logging.WARNING, **fields: Any) -> None:
    """Emit an event that the running role's notifier delivers (if ``name`` is one of NOTIFY_EVENTS).

    The same as ``kit.logs.event``; for example, about to expire:
    ``notify("lease_expiring", credential="db", lease_id_tail="…3f2a", expires_at=ts)``.
    Fields are names, ids, times and counts: never a secret value.
    """
    event(log, name, level, credential=credential, **fields)


def open_sinks(specs: Sequence[NotifyConfig]) -> list[tuple[Sink, NotifyConfig]]:
    """Each configured sink, its module imported only now (``kit.plugins.NOTIFIERS``)."""
    sinks = []
    for spec in specs:
        cls = plugins.load(plugins.NOTIFIERS, spec.kind, kind="notification sink")
        sinks.append((cls(spec), spec))
    return sinks


class _Lane:
    """One sink's queue and delivery task."""

    def __init__(self, sink: Sink, spec: NotifyConfig) -> None:
        self.sink = sink
        self.events = frozenset(spec.events or NOTIFY_EVENTS)
        self.retries = spec.retries
        self.queue: asyncio.Queue[Notice] = asyncio.Queue(maxsize=spec.queue)
        self.task: asyncio.Task[None] | None = None

    async def deliver(self) -> None:
        while True:
            notice = await self.queue.get()
            backoff = Backoff(RETRY_MIN, RETRY_MAX)
            for attempt in range(self.retries + 1):
                try:
                    await self.sink.send(notice)
                except Exception as e:  # a sink's surprise must not end its lane: nothing more would go
                    last = attempt == self.retries
                    metrics.notify_deliveries_total.labels(self.sink.name, "dropped" if last else "retry").inc()
                    # Only Baton's own errors are quoted: another's text could hold a hook URL's path.
                    error = str(e) if isinstance(e, BatonError) else type(e).__name__
                    log.warning(
                        "notification not delivered",
                        extra={"sink": self.sink.name, "notice": notice.event, "error": error, "attempt": attempt + 1},
                    )
                    if not last:
                        await asyncio.sleep(backoff.next())
                else:
                    metrics.notify_deliveries_total.labels(self.sink.name, "ok").inc()
                    break
            self.queue.task_done()


class Notifier:
    """Delivers the role's notable events to the configured sinks; ``start`` in the loop, ``aclose`` at the end."""

    def __init__(self, sinks: Sequence[tuple[Sink, NotifyConfig]], *, node: str, role: str) -> None:
        self.node = node
        self.role = role
        self.lanes = [_Lane(sink, spec) for sink, spec in sinks]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._unlisten: Any = None

    @classmethod
    def from_config(cls, config: Config, *, role: str) -> Notifier:
        """The notifier of ``config.notify``. A sink that cannot be built fails the start, never
        later: ``PluginError`` (the extra is not installed), ``ConfigError`` (its key file)."""
        try:
            return cls(open_sinks(config.notify), node=config.node_id, role=role)
        except PluginError as e:
            raise PluginError(f"notify: {e}") from e

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        for lane in self.lanes:
            lane.task = asyncio.create_task(lane.deliver(), name=f"notify:{lane.sink.name}")
        if self.lanes:
            self._unlisten = listen(self._on_event)

    def _on_event(self, name: str, level: int, fields: Mapping[str, Any]) -> None:
        if name not in NOTIFY_EVENTS or self._loop is None:
            return
        credential = fields.get("credential")
        notice = Notice(
            event=name,
            node=self.node,
            role=self.role,
            credential=str(credential) if credential is not None else None,
            level=logging.getLevelName(level).lower(),
            fields=clean_fields(fields),
        )
        if threading.get_ident() == self._thread:
            self.submit(notice)
        else:  # an event logged in a worker thread: handed to the loop
            with contextlib.suppress(RuntimeError):  # the loop has closed: the role is stopping
                self._loop.call_soon_threadsafe(self.submit, notice)

    def submit(self, notice: Notice) -> None:
        """Queue a notice for every sink that wants its event; never waits."""
        for lane in self.lanes:
            if notice.event not in lane.events:
                continue
            try:
                lane.queue.put_nowait(notice)
            except asyncio.QueueFull:
                metrics.notify_deliveries_total.labels(lane.sink.name, "queue_full").inc()

    async def aclose(self, limit: float = FLUSH_LIMIT) -> None:
        """Stop listening; give queued notices up to ``limit`` to go out, then stop the lanes and close the sinks."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        lanes = [lane for lane in self.lanes if lane.task is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await asyncio.gather(*(lane.queue.join() for lane in lanes))
        for lane in lanes:
            assert lane.task is not None
            lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in lanes if lane.task is not None), return_exceptions=True)
        for lane in self.lanes:
            try:
                await asyncio.wait_for(lane.sink.aclose(), limit)
            except (TimeoutError, BatonError, OSError) as e:
                log.warning("notification sink not closed", extra={"sink": lane.sink.name, "error": str(e)})
