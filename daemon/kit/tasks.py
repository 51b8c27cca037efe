"""Stopping in bounded time: closing resources and cancelling tasks, for the agent and the rotator.

Owns the two rules every stop follows (SIGTERM, a systemd stop, a config
reload): each close gets a time limit and a failing close is logged, never
allowed to skip the closes after it; a task is cancelled again until it ends,
because on Python 3.11 ``asyncio.wait_for`` can swallow a cancel that lands as
its inner wait completes. Must never: wait without a limit, or raise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_EVERY = 0.2


async def close_bounded(coro: Coroutine[Any, Any, None], what: str, limit: float = 5.0) -> None:
    """Await one close for at most ``limit`` s; a timeout or an error is logged, not raised."""
    try:
        await asyncio.wait_for(coro, limit)
    except TimeoutError:
        log.error("closing took too long; going on", extra={"what": what})
    except Exception as e:
        log.warning("closing failed; going on", extra={"what": what, "error": str(e)})


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], limit: float = 5.0) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``limit`` s, cancelling again whatever lives on.

    Returns the tasks still running at the end (each is logged). Results and
    errors of the finished ones are retrieved: a task's own failure is logged
    where it happened, not again as "never retrieved". A cancel of the caller
    meanwhile (its own stop) is held until these tasks have ended or ``limit``
    has passed, then raised: otherwise the caller would end while its children
    still run, and what the caller's owner closes next (a store) would be
    closed under them (a rotator's lease release was cut short that way).
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + limit
    cancelled = False
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for t in pending:
            t.cancel()
        try:
            _done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY, left))
        except asyncio.CancelledError:
            cancelled = True
            pending = {t for t in pending if not t.done()}
    for t in pending:
        log.error("task did not stop in time", extra={"task": t.get_name()})
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()
    if cancelled:
        raise asyncio.CancelledError
    return pending
