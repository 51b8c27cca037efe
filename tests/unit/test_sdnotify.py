"""daemon.kit.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.kit import sdnotify


def _receive(sock: socket.socket, *, timeout: float = 5.0) -> dict[str, str]:
    sock.settimeout(timeout)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"baton-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield sock
    finally:
        sock.close()


def test_ready_sends_ready_1_to_a_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert _receive(path_socket) == {"READY": "1"}


def test_ready_with_status_sends_both_fields_in_one_datagram(path_socket: socket.socket) -> None:
    assert sdnotify.ready("2 credentials written")
    assert _receive(path_socket) == {"READY": "1", "STATUS": "2 credentials written"}


def test_an_at_sign_address_reaches_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.notify(STATUS="hello", EXTEND_TIMEOUT_USEC=5_000_000)
    assert _receive(abstract_socket) == {"STATUS": "hello", "EXTEND_TIMEOUT_USEC": "5000000"}


def test_status_folds_newlines_into_one_line(path_socket: socket.socket) -> None:
    assert sdnotify.status("db: v8 written\nconsumers: 3 reloaded")
    assert _receive(path_socket) == {"STATUS": "db: v8 written consumers: 3 reloaded"}


def test_watchdog_stopping_and_reloading_send_their_fields(path_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.watchdog()
    assert _receive(path_socket) == {"WATCHDOG": "1"}
    assert sdnotify.reloading()
    msg = _receive(path_socket)
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.stopping()
    assert _receive(path_socket) == {"STOPPING": "1"}


def test_a_newline_in_a_raw_field_is_refused_because_it_would_forge_another_field(
    path_socket: socket.socket,
) -> None:
    with pytest.raises(ValueError, match="newline"):
        sdnotify.notify(STATUS="ok\nREADY=1")
    with pytest.raises(ValueError, match="field name"):
        sdnotify.notify(ready=1)
    path_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        path_socket.recv(4096)


def test_every_call_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.status("x") is False
    assert sdnotify.watchdog() is False
    assert sdnotify.stopping() is False


def test_a_missing_socket_is_logged_and_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING, logger="daemon.kit.sdnotify"):
        assert sdnotify.ready() is False
    assert "sd_notify failed" in caplog.text


def test_a_relative_notify_socket_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative.sock")
    assert sdnotify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
        ("30000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval_reads_watchdog_usec_for_this_process_only(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            resolved = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, resolved)
    assert sdnotify.watchdog_interval() == expected


async def test_watchdog_loop_pings_repeatedly_until_cancelled(path_socket: socket.socket) -> None:
    task = asyncio.create_task(sdnotify.watchdog_loop(0.02))
    try:
        pings = [await asyncio.to_thread(_receive, path_socket) for _ in range(3)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pings == [{"WATCHDOG": "1"}] * 3


async def test_watchdog_loop_returns_at_once_when_the_watchdog_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(sdnotify.watchdog_loop(), timeout=1)
