"""daemon.kit.service: the one lifecycle, against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.kit.service import Service


class Notifications:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def next(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def _until(self, key: str) -> dict[str, str]:
        while True:
            got = self.next()
            if key in got:
                return got

    async def until(self, key: str) -> dict[str, str]:
        """The next datagram with ``key``; received in a thread so the service runs meanwhile."""
        return await asyncio.to_thread(self._until, key)


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notifications]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    try:
        yield Notifications(sock)
    finally:
        sock.close()


class Toy(Service):
    role = "toy"

    def __init__(self, **kw: object) -> None:
        super().__init__(install_signals=bool(kw.pop("install_signals", False)))
        self.reloads = 0
        self.closed = False
        self.job: object = kw.pop("job", None)
        self.hang_on_close = False

    async def startup(self) -> None:
        if self.job is not None:
            self.spawn("job", self.job)  # type: ignore[arg-type]
        self.announce_ready()

    async def reload(self) -> None:
        self.reloads += 1

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.hang_on_close:
            await asyncio.Event().wait()
        self.closed = True

    def status_line(self) -> str:
        return f"toy: {self.reloads} reloads"


async def test_ready_carries_the_status_line_and_stopping_comes_first_on_the_way_out(systemd: Notifications) -> None:
    toy = Toy()
    task = asyncio.create_task(toy.serve())
    assert await systemd.until("READY") == {"READY": "1", "STATUS": "toy: 0 reloads"}
    toy.request_stop()
    assert await task == 0
    assert await systemd.until("STOPPING") == {"STOPPING": "1"}
    assert toy.closed


async def test_sighup_reloads_between_reloading_and_ready_and_sigterm_stops(systemd: Notifications) -> None:
    toy = Toy(install_signals=True)
    task = asyncio.create_task(toy.serve())
    await systemd.until("READY")
    os.kill(os.getpid(), signal.SIGHUP)
    assert "RELOADING" in await systemd.until("RELOADING")
    assert await systemd.until("READY") == {"READY": "1", "STATUS": "toy: 1 reloads"}
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 10) == 0
    assert toy.reloads == 1


async def test_a_root_task_that_fails_stops_the_service_with_status_1(systemd: Notifications) -> None:
    async def broken() -> None:
        raise OSError("disk gone")

    toy = Toy(job=broken())
    assert await asyncio.wait_for(toy.serve(), 10) == 1
    assert isinstance(toy.failed, OSError) and toy.closed


async def test_a_root_task_that_ends_stops_the_service_unless_it_may_end(systemd: Notifications) -> None:
    async def done() -> None:
        return None

    toy = Toy(job=done())
    assert await asyncio.wait_for(toy.serve(), 10) == 1

    class OneShot(Toy):
        async def startup(self) -> None:
            self.once = self.spawn("once", done(), may_end=True)
            self.announce_ready()

    one = OneShot()
    task = asyncio.create_task(one.serve())
    await systemd.until("READY")
    await one.once  # its guard has run: a one-shot that ended must not stop the service
    assert not one.should_exit.is_set() and not task.done()
    one.request_stop()
    assert await task == 0


async def test_a_second_stop_request_forces_a_shutdown_that_hangs(systemd: Notifications) -> None:
    toy = Toy()
    toy.hang_on_close = True
    task = asyncio.create_task(toy.serve())
    await systemd.until("READY")
    toy.request_stop()
    await systemd.until("STOPPING")
    assert not task.done()
    toy.request_stop()
    assert await asyncio.wait_for(task, 2) == 0  # well before stop_timeout (10 s)
    assert toy.force_exit and not toy.closed


async def test_the_watchdog_pings_at_half_of_watchdog_usec(
    systemd: Notifications, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    toy = Toy()
    task = asyncio.create_task(toy.serve())
    loop = asyncio.get_running_loop()
    first = await systemd.until("WATCHDOG")
    t0 = loop.time()
    second = await systemd.until("WATCHDOG")
    gap = loop.time() - t0
    toy.request_stop()
    await task
    assert first == second == {"WATCHDOG": "1"}
    assert 0.05 < gap < 0.5
