"""Stops end in bounded time: a hanging or failing close, a task that swallows a cancel."""

from __future__ import annotations

import asyncio
import logging

import pytest

from daemon.kit.tasks import cancel_all, close_bounded


async def test_a_hanging_close_is_abandoned_after_its_limit(caplog: pytest.LogCaptureFixture) -> None:
    never = asyncio.Event()
    await close_bounded(never.wait(), "store", limit=0.05)  # returns: that is the test
    assert any(r.levelno == logging.ERROR and r.__dict__.get("what") == "store" for r in caplog.records)


async def test_a_failing_close_is_logged_and_the_next_close_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []

    async def broken() -> None:
        raise OSError("socket already gone")

    async def fine() -> None:
        closed.append("store")

    await close_bounded(broken(), "reporter")
    await close_bounded(fine(), "store")
    assert closed == ["store"]
    (warning,) = [r for r in caplog.records if r.__dict__.get("what") == "reporter"]
    assert "socket already gone" in warning.__dict__["error"]


async def test_a_task_that_swallows_a_cancel_is_cancelled_again() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # carries on, as a 3.11 wait_for can make a task do
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # let it start waiting
    left = await cancel_all([task], limit=5.0)
    assert left == set()
    assert swallowed.is_set() and task.cancelled()


async def test_a_task_that_never_stops_is_returned_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    left = await cancel_all([task], limit=0.3)
    assert left == {task}
    assert any(r.__dict__.get("task") == "immortal" for r in caplog.records)
    release.set()
    await task


async def test_finished_tasks_errors_are_retrieved_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("already logged where it happened")

    task = asyncio.create_task(fails())
    await asyncio.wait([task])
    assert await cancel_all([task]) == set()
