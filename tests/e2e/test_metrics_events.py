"""Metrics and log events of a whole rotation loop: an agent and a rotator in this process, one real consumer.

Like ``baton demo``, but with one consumer that holds its credential file open
and re-opens it on SIGHUP. Two rotations run; then the test reads the agent's
``/metrics`` over HTTP, the rotator's metrics from ``daemon.kit.metrics.REGISTRY``
(both share it in one process), and the JSON log lines captured from the root
logger, and searches all of it for every secret value the store ever held.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.agent.service import Agent
from daemon.config import Config, parse_config
from daemon.kit import metrics
from daemon.kit.logs import JsonFormatter
from daemon.model import Secret
from daemon.rotation.service import Rotator
from daemon.stores.local import LocalStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "metrics-e2e/db"
CRED = "mx-db"
CONSUMER = "mx-hold"
ROTATIONS = 2
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def config_for(root: Path) -> Config:
    return parse_config(
        {
            "node_id": "node-metrics-e2e",
            "store": {"kind": "local", "path": str(root / "store.db")},
            "api": {"listen": "127.0.0.1:0"},
            "log": {"format": "json", "level": "info"},
            "report": {"heartbeat": 0.5},
            "agent": {"debounce": 0.05, "scan_interval": 0.25, "fanotify": "off"},
            "credentials": [
                {
                    "name": CRED,
                    "key": KEY,
                    "output": {"dir": str(root / "out"), "files": {"password": "{{ value }}"}},
                    "consumers": [
                        {
                            "name": CONSUMER,
                            "match": {"cmdline": f"demo[.]consumer hold .*{root}"},
                            "loads": "on-reload",
                            "reload": {"signal": "SIGHUP"},
                            "health": {"alive_for": 0.1},
                            "min_restart_interval": 0,
                        }
                    ],
                    "rotation": {"every": 1.0, "generator": {"kind": "password", "length": 32}},
                }
            ],
        }
    )


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """Every record of the daemon's loggers, as the JSON lines ``log.format: json`` writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    daemon_logger = logging.getLogger("daemon")
    old_level = daemon_logger.level
    root.addHandler(handler)
    daemon_logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        daemon_logger.setLevel(old_level)


def _payloads(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT payload FROM versions WHERE key=? AND payload IS NOT NULL", (KEY,))
        return {r[0] for r in rows.fetchall()}


def _counts(db: Path) -> tuple[int, int]:
    """(versions, retired versions) of the key."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT COUNT(*), COUNT(retired) FROM versions WHERE key=?", (KEY,)).fetchone()
        return int(row[0]), int(row[1])


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels or {})
    return value if value is not None else 0.0


def _families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, []).extend((s.name, dict(s.labels), s.value) for s in fam.samples)
    return out


async def test_two_rotations_expose_agent_and_rotator_metrics_and_json_events_without_any_secret_value(
    tmp_path: Path, captured_log: io.StringIO
) -> None:
    db = tmp_path / "store.db"
    first = "mx-initial-" + secrets.token_urlsafe(16)
    seed = LocalStore(db, watch_files=False)
    seed.put_sync(KEY, Secret(first))
    seed.close()
    seen_values: set[str] = {first}

    propagation_before = _sample("baton_propagation_seconds_count")
    drain_before = _sample("baton_drain_seconds_count")

    config = config_for(tmp_path)
    agent = Agent(config, install_signals=False)
    rotator = Rotator(config, install_signals=False, serve_api=False)
    agent_task = asyncio.create_task(agent.serve(), name="mx-agent")
    rotator_task: asyncio.Task[int] | None = None
    consumer: asyncio.subprocess.Process | None = None
    try:
        await asyncio.wait_for(agent.ready.wait(), 15)
        consumer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon.demo.consumer",
            "hold",
            "--file",
            str(tmp_path / "out" / "password"),
            "--store",
            str(db),
            "--key",
            KEY,
            "--stats",
            str(tmp_path / "hold.json"),
            env={**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, *sys.path])},
            stdin=asyncio.subprocess.DEVNULL,
        )
        rotator_task = asyncio.create_task(rotator.serve(), name="mx-rotator")

        # Poll the store (reading each payload before its retirement erases it) until done.
        deadline = asyncio.get_running_loop().time() + 45
        while True:
            seen_values |= await asyncio.to_thread(_payloads, db)
            versions, retired = await asyncio.to_thread(_counts, db)
            if versions - 1 >= ROTATIONS:
                for r in rotator.rotators.values():  # enough: no further rotation
                    r.reschedule(3600.0)
            if retired >= ROTATIONS:
                break
            assert not agent_task.done(), "the agent stopped"
            assert not rotator_task.done(), "the rotator stopped"
            assert asyncio.get_running_loop().time() < deadline, f"{versions - 1} rotations, {retired} retired"
            await asyncio.sleep(0.05)
        # The consumer's reload of the last version may still be in its health gate.
        assert agent.reloader is not None
        await asyncio.wait_for(agent.reloader.wait_idle(), 10)

        assert agent.api is not None and agent.api.address is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(agent.api.address + "/metrics") as resp:
                assert resp.status == 200
                exposed = await resp.text()
            async with http.get(agent.api.address + "/v1/status") as resp:
                assert resp.status == 200
                status_body = await resp.text()
    finally:
        rotator.should_exit.set()
        agent.should_exit.set()
        tasks = [t for t in (agent_task, rotator_task) if t is not None]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if consumer is not None:
            with contextlib.suppress(ProcessLookupError):
                consumer.send_signal(signal.SIGTERM)
            await asyncio.wait_for(consumer.wait(), 10)
    assert results == [0] * len(tasks), results
    current = str((await asyncio.to_thread(_counts, db))[0])

    # ---- the agent's /metrics
    fams = _families(exposed)
    in_use = [(labels, v) for _, labels, v in fams.get("baton_versions_in_use", []) if labels["credential"] == CRED]
    assert in_use, "baton_versions_in_use has no sample for the credential"
    assert all(set(labels) == {"credential", "version"} for labels, _ in in_use)
    assert any(labels["version"] == current and v >= 1 for labels, v in in_use), in_use
    reloads = {
        labels["result"]: v
        for name, labels, v in fams.get("baton_reloads", [])
        if name == "baton_reloads_total" and labels.get("consumer") == CONSUMER
    }
    assert reloads.get("ok", 0) >= ROTATIONS, reloads
    assert "failure" not in reloads
    propagation = {name: v for name, _labels, v in fams.get("baton_propagation_seconds", [])}
    assert propagation["baton_propagation_seconds_count"] - propagation_before >= ROTATIONS
    assert propagation["baton_propagation_seconds_sum"] > 0

    # ---- the rotator's metrics (same process, same registry)
    assert _sample("baton_rotations_total", {"credential": CRED, "result": "success"}) >= ROTATIONS
    assert _sample("baton_rotations_total", {"credential": CRED, "result": "failure"}) == 0
    pending = metrics.REGISTRY.get_sample_value("baton_pending_retirements", {"credential": CRED})
    assert pending is not None and pending >= 0
    assert _sample("baton_drain_seconds_count") - drain_before >= ROTATIONS

    # ---- the log: JSON objects with an "event" field
    lines = [line for line in captured_log.getvalue().splitlines() if line.strip()]
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line is JSON
    events: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "event" in r:
            events.setdefault(r["event"], []).append(r)
    assert len(events.get("rotated", [])) >= ROTATIONS
    assert len(events.get("version_written", [])) >= ROTATIONS + 1  # the first version too
    ok_reloads = [e for e in events.get("reload", []) if e.get("consumer") == CONSUMER and e.get("result") == "ok"]
    assert len(ok_reloads) >= ROTATIONS
    assert all(isinstance(e.get("pid"), int) for e in ok_reloads)
    retired_events = events.get("retired", [])
    assert len(retired_events) >= ROTATIONS
    assert {e["version"] for e in retired_events} >= {"1", "2"}
    assert all(e.get("credential") == CRED for e in events["rotated"] + retired_events)

    # ---- the consumer never used a retired credential
    stats = json.loads((tmp_path / "hold.json").read_text())
    assert stats["errors"] == 0, stats
    assert stats["reopens"] >= ROTATIONS

    # ---- no secret value anywhere
    assert len(seen_values) >= ROTATIONS + 1, "not every version's value was captured for the search"
    everything = "\n".join([captured_log.getvalue(), exposed, status_body, metrics.render().decode()])
    leaked = [v for v in seen_values if v in everything]
    assert not leaked, f"{len(leaked)} secret value(s) found in logs, metrics or status"
