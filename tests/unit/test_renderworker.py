"""daemon.files.renderworker: rendering in a child process that a runaway template cannot outlive.

Every test runs the real child (``python -I -c ...`` with ``daemon.files.render.serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.errors import PayloadError, RenderUnavailable
from daemon.files import renderworker
from daemon.files.render import render_version
from daemon.files.renderworker import RenderWorker, _parse_reply
from daemon.model import Secret

SECRET = "w0rker-Secr3t-9d1e"
FILES = {"password": "{{ password }}", "dsn": "postgresql://{{ username }}:{{ password }}@db/app"}
ENV = {"PGPASSWORD": "{{ password }}"}
PAYLOAD = Secret(json.dumps({"username": "app", "password": SECRET}))
# No output at all, 10^10 steps: only a kill stops it.
SPIN = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"


@pytest.fixture
async def worker() -> AsyncIterator[RenderWorker]:
    w = RenderWorker()
    try:
        yield w
    finally:
        await w.aclose()


async def _render(w: RenderWorker, files: dict[str, str], payload: Secret, *, limit: float = 5.0) -> object:
    return await w.render(files=files, env={}, payload=payload, time_limit=limit, max_bytes=1 << 20)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):  # a zombie waits to be reaped: as good as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


async def test_the_child_renders_what_the_in_process_renderer_does_and_is_reused(worker: RenderWorker) -> None:
    expected = render_version(FILES, ENV, PAYLOAD)

    for _ in range(3):
        got = await worker.render(files=FILES, env=ENV, payload=PAYLOAD, time_limit=5, max_bytes=1 << 20)
        assert (got.files, got.env) == (expected.files, expected.env)
    assert worker.starts == 1


async def test_a_runaway_template_is_stopped_at_the_time_limit_and_its_child_killed(worker: RenderWorker) -> None:
    await _render(worker, FILES, PAYLOAD)
    pid = worker.pid
    assert pid is not None

    started = time.monotonic()
    with pytest.raises(PayloadError) as info:
        await _render(worker, {"f": SPIN}, PAYLOAD, limit=0.5)
    took = time.monotonic() - started

    assert info.value.reason == "timeout"
    assert 0.5 <= took < 3.0
    assert _gone(pid), "the runaway child still runs"
    # The next version renders in a fresh child.
    got = await worker.render(files=FILES, env={}, payload=PAYLOAD, time_limit=5, max_bytes=1 << 20)
    assert got.files["password"] == SECRET.encode()
    assert worker.starts == 2


async def test_a_template_that_allocates_gigabytes_meets_the_memory_limit(worker: RenderWorker) -> None:
    with pytest.raises(PayloadError) as info:
        await _render(worker, {"f": "{{ 'x' * 4000000000 }}"}, PAYLOAD)

    assert info.value.reason == "memory"
    await _render(worker, FILES, PAYLOAD)
    assert worker.starts == 1, "a MemoryError should not cost the child"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (Secret('{"password": "x\\ud800y"}'), "encoding"),
        (Secret("x\udc00"), "encoding"),
        (Secret("[" * 100_000 + "]" * 100_000), "depth"),
        (Secret("y" * (2 << 20)), "size"),
    ],
)
async def test_hostile_payloads_are_rejected_by_reason_through_the_child(
    worker: RenderWorker, payload: Secret, reason: str
) -> None:
    with pytest.raises(PayloadError) as info:
        await _render(worker, {"f": "{{ password }}"}, payload)

    assert info.value.reason == reason
    assert worker.starts == 1


async def test_output_over_max_bytes_is_rejected_in_the_child(worker: RenderWorker) -> None:
    with pytest.raises(PayloadError) as info:
        await worker.render(files={"f": "{{ password * 1000 }}"}, env={}, payload=PAYLOAD, time_limit=5, max_bytes=4096)

    assert info.value.reason == "output_size"
    assert SECRET not in str(info.value)


async def test_a_cancelled_render_kills_the_child_at_once(worker: RenderWorker) -> None:
    await _render(worker, FILES, PAYLOAD)
    pid = worker.pid
    assert pid is not None
    task = asyncio.create_task(_render(worker, {"f": SPIN}, PAYLOAD, limit=60))
    await asyncio.sleep(0.2)  # let the request reach the child (nothing to wait on: it spins)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert _gone(pid)
    assert worker.pid is None


async def test_the_child_gets_no_environment_and_no_argv_secret(
    worker: RenderWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "agent-own-token-5b2c")
    await _render(worker, FILES, PAYLOAD)
    pid = worker.pid
    assert pid is not None

    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_the_child_dies_with_its_parent_even_mid_render(tmp_path: Path) -> None:
    # A parent that starts a runaway render, says the child's pid, and is SIGKILLed.
    program = f"""
import asyncio, sys
from daemon.model import Secret
from daemon.files.renderworker import RenderWorker
async def main():
    w = RenderWorker()
    task = asyncio.create_task(w.render(files={{"f": {SPIN!r}}}, env={{}}, payload=Secret("v"),
                                        time_limit=600, max_bytes=1024))
    while w.pid is None:
        await asyncio.sleep(0.01)
    print(w.pid, flush=True)
    await task
asyncio.run(main())
"""
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, cwd=root) as parent:
        try:
            assert parent.stdout is not None
            pid = int(parent.stdout.readline())
            assert not _gone(pid)
            parent.kill()
            parent.wait(timeout=10)
            # No event to wait on for another process's death: poll with a deadline.
            deadline = time.monotonic() + 5
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _gone(pid), "the render child outlived its parent"
        finally:
            parent.kill()


@pytest.mark.parametrize(
    "reply",
    [
        b"not json",
        b"[]",
        b'{"files": {"password": 1, "dsn": "x"}, "env": {}}',
        b'{"files": {"other": "x"}, "env": {}}',
        b'{"files": {"password": "x\\ud800", "dsn": "x"}, "env": {}}',
    ],
)
def test_a_malformed_reply_is_a_worker_rejection(reply: bytes) -> None:
    with pytest.raises(PayloadError) as info:
        _parse_reply(reply, files=FILES, env={})

    assert info.value.reason == "worker"


def test_an_error_reply_keeps_a_known_reason_and_maps_an_unknown_one_to_worker() -> None:
    with pytest.raises(PayloadError) as info:
        _parse_reply(b'{"error": "e", "reason": "depth"}', files=FILES, env={})
    assert info.value.reason == "depth"
    with pytest.raises(PayloadError) as info:
        _parse_reply(b'{"error": "e", "reason": "' + SECRET.encode() + b'"}', files=FILES, env={})
    assert info.value.reason == "worker"


# Grows by a fresh megabyte per step: RSS climbs fast, with no single huge allocation.
HOARD = (
    "{% set ns = namespace(l=[]) %}"
    "{% for i in range(99999) %}{% set _ = ns.l.append('x' * (1000000 + i)) %}{% endfor %}x"
)


async def test_without_rlimit_the_parent_kills_a_child_whose_rss_passes_the_limit() -> None:
    # As under baton.service, whose SystemCallFilter refuses setrlimit.
    worker = RenderWorker(memory_limit=200 << 20, use_rlimit=False)
    try:
        await _render(worker, FILES, PAYLOAD)
        assert worker.memory_limited is False
        started = time.monotonic()
        with pytest.raises(PayloadError) as info:
            await _render(worker, {"f": HOARD}, PAYLOAD, limit=30)

        assert info.value.reason == "memory"
        assert time.monotonic() - started < 10
        got = await worker.render(files=FILES, env={}, payload=PAYLOAD, time_limit=5, max_bytes=1 << 20)
        assert got.files["password"] == SECRET.encode()
    finally:
        await worker.aclose()


async def test_with_rlimit_the_same_hoard_is_a_memory_error_the_child_survives() -> None:
    worker = RenderWorker(memory_limit=200 << 20)
    try:
        await _render(worker, FILES, PAYLOAD)
        assert worker.memory_limited is True

        with pytest.raises(PayloadError) as info:
            await _render(worker, {"f": HOARD}, PAYLOAD, limit=30)

        assert info.value.reason == "memory"
        await _render(worker, FILES, PAYLOAD)
        assert worker.starts == 1
    finally:
        await worker.aclose()


async def test_a_child_that_cannot_start_is_unavailable_not_a_payload_rejection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(renderworker, "_BOOT", "import sys; sys.exit(3)")
    worker = RenderWorker()
    try:
        with pytest.raises(RenderUnavailable):
            await _render(worker, FILES, PAYLOAD)
        assert worker.pid is None
    finally:
        await worker.aclose()


async def test_aclose_kills_the_child_mid_render_and_starts_no_other() -> None:
    worker = RenderWorker()
    await _render(worker, FILES, PAYLOAD)
    pid = worker.pid
    assert pid is not None
    task = asyncio.create_task(_render(worker, {"f": SPIN}, PAYLOAD, limit=60))
    await asyncio.sleep(0.1)  # the render holds the lock (it spins: nothing to wait on)

    started = time.monotonic()
    await worker.aclose()

    assert time.monotonic() - started < 2
    assert _gone(pid)
    with pytest.raises((PayloadError, RenderUnavailable)):
        await task
    assert worker.pid is None and worker.starts == 1
