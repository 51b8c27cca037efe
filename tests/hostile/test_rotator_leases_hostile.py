"""An operator starts ``baton rotator`` twice on one local store (issue 10, finding 5).

Two real ``baton rotator`` processes with ``every: 1s`` share one SQLite store,
and a node reporting in the test's own process lets each superseded version
retire. Before leases this made 9 versions in 5 s, in pairs 0-2 ms apart, and
both said ``rotator_leading``. Now exactly one leads, the other says
``rotator_standby`` once and shows it in ``baton status``; SIGKILL of the
leader hands the credential over within the lease ttl, and the versions stay
one per interval throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from daemon.errors import StoreError
from daemon.model import Secret
from daemon.report.base import NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.stores.local import LocalStore
from tests.e2e.helpers import BATON, free_port, poll

pytestmark = pytest.mark.hostile

KEY = "app/db"
EVERY = 1.0
TTL = 1.5


class RotatorProcess:
    def __init__(self, tmp: Path, name: str, db: Path) -> None:
        self.name = name
        self.port = free_port()
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(
            f"""\
node_id: {name}
store: {{kind: local, path: {db}}}
api: {{listen: "127.0.0.1:{self.port}"}}
log: {{format: json}}
report: {{heartbeat: 0.2}}
credentials:
  - name: db
    key: {KEY}
    output: {{dir: {tmp / "out"}}}
    rotation: {{every: {EVERY}s, lease_ttl: {TTL}s}}
"""
        )
        self.log_path = tmp / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [BATON, "rotator", "--config", str(self.config)], stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == name:
                    out.append(record)
        return out

    def status(self, *, as_json: bool = True) -> Any:
        args = [BATON, "status", "--config", str(self.config)] + (["--json"] if as_json else [])
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout) if as_json else proc.stdout

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        self._log.close()
        return code


@pytest.fixture
def rotators(tmp_path: Path) -> Iterator[list[RotatorProcess]]:
    started: list[RotatorProcess] = []
    yield started
    for r in started:
        with contextlib.suppress(Exception):
            r.stop(signal.SIGKILL)


async def node_and_watch(db: Path, seen: dict[str, float], seconds: float) -> None:
    """A node reporting the current version (nothing held), and a watch noting when each version appeared."""
    store = LocalStore(db, watch_files=False)
    reporter = MetadataReporter(store)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(StoreError):
                for v in await store.versions(KEY):
                    seen.setdefault(v.id, time.monotonic())
                current = (await store.read(KEY)).info.id
                await reporter.publish(
                    KEY, NodeReport(node="n1", credential="db", current=current, heartbeat=time.time())
                )
            await asyncio.sleep(0.05)
    finally:
        await store.aclose()


def gaps(seen: dict[str, float], skip: str) -> list[float]:
    times = sorted(t for v, t in seen.items() if v != skip)
    return [round(b - a, 3) for a, b in itertools.pairwise(times)]


async def test_two_baton_rotators_on_one_local_store_make_one_version_per_interval_and_hand_over_on_sigkill(
    tmp_path: Path, rotators: list[RotatorProcess]
) -> None:
    db = tmp_path / "store.db"
    seeder = LocalStore(db, watch_files=False)
    seed = await seeder.put(KEY, Secret("seed-value-0"))
    await seeder.aclose()
    rotators += [RotatorProcess(tmp_path, "rot-a", db), RotatorProcess(tmp_path, "rot-b", db)]
    a, b = rotators
    seen: dict[str, float] = {seed.id: time.monotonic()}
    watch = asyncio.create_task(node_and_watch(db, seen, seconds=60))
    try:
        await asyncio.to_thread(
            poll, lambda: a.events("rotator_leading") + b.events("rotator_leading"), timeout=20, what="a leader"
        )
        started = time.monotonic()
        await asyncio.sleep(4 * EVERY)
        leading = [r for r in rotators if r.events("rotator_leading")]
        assert len(leading) == 1, "both rotators said rotator_leading"
        leader = leading[0]
        standby = b if leader is a else a
        said = standby.events("rotator_standby")
        assert len(said) == 1 and said[0]["leader"] == leader.events("rotator_leading")[0]["holder"]
        made = [v for v, t in seen.items() if v != seed.id and t >= started - EVERY]
        assert 2 <= len(made) <= 5, seen  # 4-5 on an idle machine; never the 8-10 of two rotators
        assert min(gaps(seen, seed.id)) >= 0.7 * EVERY, gaps(seen, seed.id)

        # baton status, pointed at the standby's endpoint: standby, and who holds the lease until when.
        status = await asyncio.to_thread(standby.status)
        assert status["role"] == "rotator" and status["leadership"] == "standby"
        lease = status["credentials"]["db"]["lease"]
        assert lease["leading"] is False and lease["leader"] == said[0]["leader"]
        assert lease["expires"] > time.time() - 2 * TTL
        text = await asyncio.to_thread(standby.status, as_json=False)
        assert f"standing by: {said[0]['leader']} holds the lease until" in text
        assert "seed-value-0" not in json.dumps(status) + text

        # The leader is killed holding the lease: the standby takes the credential within the ttl (+ a round).
        leader.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(poll, lambda: standby.events("rotator_leading"), timeout=5 * TTL, what="takeover")
        took = time.monotonic() - killed
        assert took <= TTL + TTL / 3 + 1.0, f"took over after {took:.2f}s"
        count = len(seen)
        await asyncio.to_thread(poll, lambda: len(seen) > count + 1, timeout=5 * EVERY, what="rotations after it")
        assert min(gaps(seen, seed.id)) >= 0.7 * EVERY, gaps(seen, seed.id)
        assert standby.stop() == 0
        assert standby.events("rotator_released_lease"), "a clean stop releases the lease"
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
