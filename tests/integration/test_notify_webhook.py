"""Webhook notifications against a real HTTP server on a free loopback port (aiohttp, in this loop).

The server records every request (raw body, headers) and answers as the test
says: 200, 500 for the first N, or not at all until released (a hung hook).
A real rotator on the local store sends its events there; the bodies are
searched for every payload the store holds and for the signing key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from daemon.config import WebhookNotifyConfig, parse_config
from daemon.errors import ConfigError, NotifyError
from daemon.kit import metrics
from daemon.kit.logs import event
from daemon.notify import hub, webhook
from daemon.notify.base import Notice
from daemon.notify.hub import Notifier
from daemon.notify.webhook import SIGNATURE_HEADER, WebhookSink

pytestmark = pytest.mark.integration
log = logging.getLogger("tests.notify")
KEY = b"hook-signing-key-0123456789"


@dataclass
class Hook:
    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    fail_first: int = 0
    hang: asyncio.Event | None = None  # while set-able and not set, requests are held
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    dribble: asyncio.Event | None = None  # while not set, the answer's body trickles out a byte at a time

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        self.arrived.set()
        if self.dribble is not None:
            response = web.StreamResponse()
            await response.prepare(request)
            while not self.dribble.is_set():
                await response.write(b".")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.dribble.wait(), 0.2)
            return response
        if self.hang is not None:
            await self.hang.wait()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500, text="boom")
        return web.Response(text="ok")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(b) for b in self.bodies]


@pytest_asyncio.fixture
async def hook() -> AsyncIterator[Hook]:
    h = Hook()
    app = web.Application()
    app.router.add_post("/hooks/T000/secret-path", h.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    h.url = f"http://127.0.0.1:{port}/hooks/T000/secret-path"
    try:
        yield h
    finally:
        for held in (h.hang, h.dribble):
            if held is not None:
                held.set()
        await runner.cleanup()


async def until(cond: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)
    return value


def spec(hook: Hook, tmp_path: Path, **more: Any) -> WebhookNotifyConfig:
    key = tmp_path / "hook.key"
    key.write_bytes(KEY + b"\n")
    return WebhookNotifyConfig(kind="webhook", url=hook.url, secret_file=key, **more)


def counted(sink: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value("baton_notify_deliveries_total", {"sink": sink, "result": result}) or 0.0


async def test_an_event_is_posted_as_json_signed_with_the_key_and_other_events_are_not(
    hook: Hook, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    s = spec(hook, tmp_path)
    notifier = Notifier([(WebhookSink(s), s)], node="n1", role="rotator")
    notifier.start()
    try:
        event(log, "config_reloaded", credentials=["db"])  # not an event that notifies
        event(log, "rotated", credential="db", version="7", password="must-not-pass")
        await until(lambda: hook.bodies)
    finally:
        await notifier.aclose()
    assert len(hook.bodies) == 1
    body, headers = hook.bodies[0], hook.headers[0]
    expected = "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    assert headers["X-Baton-Event"] == "rotated" and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["event"] == "rotated" and data["credential"] == "db" and data["node"] == "n1"
    assert data["fields"] == {"version": "7"}  # a field named like a secret is dropped
    assert b"must-not-pass" not in body and KEY not in body
    # The hook's path (a Slack hook's secret) is in no log line of the sender, httpx's own included
    # (the test server's access log, aiohttp.access, is the receiver's).
    sent = [r.getMessage() for r in caplog.records if not r.name.startswith("aiohttp")]
    assert sent and not [m for m in sent if "secret-path" in m or "HTTP Request" in m]


async def test_a_hook_answering_500_is_retried_with_backoff_and_counted(
    hook: Hook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "RETRY_MIN", 0.01)
    hook.fail_first = 2
    s = spec(hook, tmp_path, format="slack")
    sink = WebhookSink(s)
    before = {r: counted(sink.name, r) for r in ("ok", "retry", "dropped")}
    notifier = Notifier([(sink, s)], node="n1", role="rotator")
    notifier.start()
    try:
        event(log, "rotation_failed", logging.ERROR, credential="db", step="apply", error="HTTP 500")
        await until(lambda: counted(sink.name, "ok") > before["ok"])
    finally:
        await notifier.aclose()
    assert len(hook.bodies) == 3  # two 500s, then the one that took it
    assert counted(sink.name, "retry") - before["retry"] == 2
    assert counted(sink.name, "dropped") == before["dropped"]
    assert all(b == hook.bodies[0] for b in hook.bodies)
    text = json.loads(hook.bodies[0])["text"]
    assert text.startswith("baton rotator on n1: rotation_failed db") and "step=apply" in text
    assert sink.name == f"webhook:127.0.0.1:{hook.url.split(':')[2].split('/')[0]}"  # no path in the label


async def test_a_full_queue_drops_new_notices_and_counts_them_without_waiting(hook: Hook, tmp_path: Path) -> None:
    hook.hang = asyncio.Event()
    s = spec(hook, tmp_path, queue=1, timeout=30)
    sink = WebhookSink(s)
    before = counted(sink.name, "queue_full")
    notifier = Notifier([(sink, s)], node="n1", role="rotator")
    notifier.start()
    try:
        event(log, "retired", credential="db", version="1")
        await asyncio.wait_for(hook.arrived.wait(), 15)  # the first is in flight, held by the hook
        started = time.monotonic()
        for v in range(2, 6):
            event(log, "retired", credential="db", version=str(v))
        assert time.monotonic() - started < 1.0  # nothing waited on the hung hook
        assert counted(sink.name, "queue_full") - before == 3  # one waits in the queue, three are dropped
    finally:
        hook.hang.set()
        await notifier.aclose()


def test_a_webhook_url_with_a_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(
            {"credentials": [], "notify": [{"kind": "webhook", "url": "https://u:hunter2-pw@hooks.example/x"}]}
        )
    assert "notify.0.webhook.url" in str(e.value) and "hunter2-pw" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"credentials": [], "notify": [{"kind": "webhook", "url": "https://h.example/", "events": ["x"]}]})
    assert "notify.0.webhook.events: unknown event(s) 'x'" in str(e.value)
    for port in ("99999", "abc"):  # urlsplit's .port raises on these: once in WebhookSink, a crash at start
        with pytest.raises(ConfigError) as e:
            parse_config(
                {"credentials": [], "notify": [{"kind": "webhook", "url": f"https://h.example:{port}/hook-pw"}]}
            )
        assert "notify.0.webhook.url: the port is a number from 0 to 65535" in str(e.value)
        assert "hook-pw" not in str(e.value)


def test_a_slack_body_escapes_what_slack_reads_as_mentions_and_links() -> None:
    # A caller's --reason user, an exe path or a command's error may carry <!channel> or <http://x|y>.
    notice = Notice(
        event="force_retired", node="n1", role="rotator", credential="db", fields={"user": "<!channel> & <http://x|y>"}
    )
    text = json.loads(webhook.body_of(notice, "slack"))["text"]
    assert "<" not in text and ">" not in text
    assert "&lt;!channel&gt; &amp; &lt;http://x|y&gt;" in text


async def test_a_host_httpx_cannot_encode_is_a_failed_attempt_not_the_end_of_the_sinks_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "xn--zz" passes the config's URL check; httpx's IDNA step raises a bare ValueError at each POST,
    # which ended the lane's task: that sink delivered nothing more, and nothing said so.
    monkeypatch.setattr(hub, "RETRY_MIN", 0.01)
    s = WebhookNotifyConfig(kind="webhook", url="https://xn--zz/hook-pw", retries=1)
    sink = WebhookSink(s)
    with pytest.raises(NotifyError) as e:
        await sink.send(Notice(event="rotated", node="n1", role="rotator"))
    assert "hook-pw" not in str(e.value)
    before = counted(sink.name, "dropped")
    notifier = Notifier([(sink, s)], node="n1", role="rotator")
    notifier.start()
    try:
        event(log, "rotated", credential="db", version="2")
        await until(lambda: counted(sink.name, "dropped") > before)
        lane = notifier.lanes[0]
        assert lane.task is not None and not lane.task.done()
    finally:
        await notifier.aclose()


async def test_an_attempt_ends_at_timeout_even_when_the_hook_keeps_trickling_its_answer(
    hook: Hook, tmp_path: Path
) -> None:
    # httpx's timeout is per read: a hook sending a byte every 0.2 s held one attempt (and the lane) forever.
    hook.dribble = asyncio.Event()
    sink = WebhookSink(spec(hook, tmp_path, timeout=1))
    try:
        with pytest.raises(NotifyError, match=r"^webhook:127\.0\.0\.1:\d+: timed out after 1s$"):
            await asyncio.wait_for(sink.send(Notice(event="rotated", node="n1", role="rotator")), 30)
    finally:
        hook.dribble.set()
        await sink.aclose()


async def test_a_sink_failing_with_an_unexpected_error_keeps_its_lane_and_its_text_out_of_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hub, "RETRY_MIN", 0.01)

    class Surprising:
        name = "surprising"
        sent: list[str] = []

        async def send(self, notice: Notice) -> None:
            if not self.sent:
                self.sent.append("failed")
                raise RuntimeError("https://hooks.example/T0/hook-pw")
            self.sent.append(notice.event)

        async def aclose(self) -> None:
            return None

    sink = Surprising()
    s = WebhookNotifyConfig(kind="webhook", url="https://hooks.example/x", retries=3)
    notifier = Notifier([(sink, s)], node="n1", role="rotator")
    notifier.start()
    try:
        event(log, "rotated", credential="db", version="2")
        await until(lambda: "rotated" in sink.sent)  # retried after the surprise, not the end of the lane
    finally:
        await notifier.aclose()
    said = [str(vars(r)) for r in caplog.records if r.name == "daemon.notify.hub"]
    assert said and all("hook-pw" not in x for x in said) and "'error': 'RuntimeError'" in said[0]
