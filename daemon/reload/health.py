"""Health gates after a reload: the consumer's processes are alive (and replaced, when the action replaces them),
its HTTP check answers, within the configured time. It never reloads anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from yarl import URL

from daemon.config import HealthConfig, MatchConfig
from daemon.errors import ReloadError
from daemon.reload.processes import (
    first_exit,
    is_alive,
    wait_exit,
)

log = logging.getLogger(__name__)

_POLL = 0.05  # interval for the few things that cannot be awaited (pidfile, /proc)


async def check_http(url: str, *, within: float) -> None:
    """GET ``url`` until it answers 2xx; ReloadError after ``within`` seconds.

    Only the status is looked at; the body and the URL's userinfo never reach
    a message.
    """
    shown = str(URL(url).with_user(None))
    deadline = time.monotonic() + within
    last = "no answer"
    delay = _POLL
    async with aiohttp.ClientSession() as session:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReloadError(f"health check {shown} failed: {last}")
            try:
                req_timeout = aiohttp.ClientTimeout(total=min(left, 5.0))
                async with session.get(url, timeout=req_timeout, allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        return
                    last = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = type(e).__name__
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, 0.5)


async def _find_replacement(
    match: MatchConfig, *, old: set[int], find: Callable[[MatchConfig], list[int]], within: float
) -> int:
    deadline = time.monotonic() + within
    while True:
        fresh = [p for p in await asyncio.to_thread(find, match) if p not in old and is_alive(p)]
        if fresh:
            return fresh[0]
        if time.monotonic() >= deadline:
            raise ReloadError(f"no replacement process appeared within {within:.1f}s")
        await asyncio.sleep(_POLL)


async def check_health(
    health: HealthConfig,
    *,
    pid: int,
    new_pid: int | None,
    replaced: bool,
    match: MatchConfig,
    old: set[int],
    find: Callable[[MatchConfig], list[int]],
) -> int | None:
    """Raise ReloadError unless the reloaded process is healthy.

    Returns the pid that now serves (the replacement when one was found).
    ``alive_for``: that process stays alive that long. ``http``: the URL answers 2xx.
    """
    target: int | None = new_pid
    if target is None and replaced:
        if health.http is not None:
            await check_http(health.http, within=health.timeout)
            return None
        target = await _find_replacement(match, old=old, find=find, within=health.timeout)
    if target is None:
        target = pid
    if health.http is not None:
        if not is_alive(target):
            raise ReloadError(f"pid {target} is not running")
        await check_http(health.http, within=health.timeout)
        return target
    assert health.alive_for is not None
    started = time.monotonic()
    if await wait_exit(target, health.alive_for):
        raise ReloadError(f"pid {target} exited {time.monotonic() - started:.2f}s after the reload")
    return target


async def check_consumer_health(
    health: HealthConfig,
    *,
    match: MatchConfig,
    had_processes: bool,
    find: Callable[[MatchConfig], list[int]],
) -> None:
    """Health after a per-consumer action: the consumer's processes are back and stay up."""
    if health.http is not None:
        await check_http(health.http, within=health.timeout)
        return
    if not had_processes:
        return
    assert health.alive_for is not None
    deadline = time.monotonic() + health.timeout
    pids = [p for p in await asyncio.to_thread(find, match) if is_alive(p)]
    while not pids:
        if time.monotonic() >= deadline:
            raise ReloadError(f"no process running within {health.timeout:.1f}s")
        await asyncio.sleep(_POLL)
        pids = [p for p in await asyncio.to_thread(find, match) if is_alive(p)]
    gone = await first_exit(pids, health.alive_for)
    if gone is not None:
        raise ReloadError(f"pid {gone} exited within {health.alive_for:.1f}s of the reload")
