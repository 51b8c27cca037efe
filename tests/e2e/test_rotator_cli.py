"""`baton status --pending` and `baton node forget`, run as real processes on a real local store.

Versions are put with `baton store put`; two node reports are published into
the store's metadata the way an agent does (MetadataReporter), one of them
still holding the old version. No output of any command may carry a secret.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.report.base import REPORT_PREFIX, Holder, NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.stores.local import LocalStore

pytestmark = pytest.mark.e2e

BATON = str(Path(sys.executable).with_name("baton"))
KEY = "app/db"
OLD_VALUE = "old-sekrit-value-7f3a9c"
NEW_VALUE = "new-sekrit-value-91c0de"


class Cli:
    """Runs baton and keeps every byte it printed, to search for secrets at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = tmp_path / "store.db"
        self.config = tmp_path / "baton.yaml"
        self.outputs: list[str] = []

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [BATON, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=self.tmp, check=False
        )
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def put(self, value: str) -> str:
        proc = self("store", "--path", str(self.db), "put", KEY, "--value-file", "-", stdin=value)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    c.config.write_text(
        f"""\
node_id: rotator-test
store:
  kind: local
  path: {c.db}
report:
  heartbeat: 10s
credentials:
  - name: db
    key: {KEY}
    output:
      dir: {tmp_path / "out"}
    rotation:
      every: 1h
"""
    )
    yield c
    for text in c.outputs:
        assert OLD_VALUE not in text
        assert NEW_VALUE not in text


def publish(db: Path, *reports: NodeReport) -> None:
    async def go() -> None:
        store = LocalStore(db, watch_files=False)
        try:
            for r in reports:
                await MetadataReporter(store).publish(KEY, r)
        finally:
            await store.aclose()

    asyncio.run(go())


def node_report(node: str, *, current: str, holders: tuple[Holder, ...] = (), age: float = 0.0) -> NodeReport:
    in_use: dict[str, int] = {}
    for h in holders:
        in_use[h.version] = in_use.get(h.version, 0) + 1
    return NodeReport(
        node=node,
        credential="db",
        current=current,
        in_use=in_use,
        holders=holders,
        heartbeat=time.time() - age,
        agent_version="test",
    )


APP = Holder(pid=4242, exe="/usr/bin/app", consumer="app", how="fd", version="1")
STRAY = Holder(pid=777, exe="/usr/bin/cat", consumer=None, how="fanotify", version="1")


@pytest.fixture
def two_versions_one_held(cli: Cli) -> Cli:
    assert cli.put(OLD_VALUE) == "1"
    assert cli.put(NEW_VALUE) == "2"
    publish(
        cli.db,
        node_report("node-a", current="2", holders=(APP, STRAY)),
        node_report("node-b", current="2"),
    )
    return cli


def test_status_pending_shows_the_waiting_version_the_reason_and_its_holders(two_versions_one_held: Cli) -> None:
    cli = two_versions_one_held

    proc = cli("status", "--pending", "--config", str(cli.config))

    assert proc.returncode == 0, proc.stderr
    # Holders are listed in the order the node reported them.
    assert proc.stdout.splitlines() == [
        "db version 1: waiting",
        "  - node-a: 2 holder(s) of version 1",
        "    node-a: pid 4242 /usr/bin/app (app, via fd)",
        "    node-a: pid 777 /usr/bin/cat (unmanaged, via fanotify)",
    ]


def test_status_pending_json_parses_and_names_the_holders(two_versions_one_held: Cli) -> None:
    cli = two_versions_one_held

    proc = cli("status", "--pending", "--json", "--config", str(cli.config))

    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    [decision] = data["db"]
    assert decision["version"] == "1"
    assert decision["retire"] is False
    assert decision["reasons"] == ["node-a: 2 holder(s) of version 1"]
    assert sorted(decision["holders"]["node-a"], key=lambda h: h["pid"]) == [
        {"pid": 777, "exe": "/usr/bin/cat", "consumer": None, "how": "fanotify"},
        {"pid": 4242, "exe": "/usr/bin/app", "consumer": "app", "how": "fd"},
    ]
    assert decision["sessions"] == []


def test_status_pending_shows_a_stale_node_and_one_behind(cli: Cli) -> None:
    cli.put(OLD_VALUE)
    cli.put(NEW_VALUE)
    publish(cli.db, node_report("node-a", current="2", age=3600), node_report("node-b", current="1"))

    proc = cli("status", "--pending", "--config", str(cli.config))

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0] == "db version 1: waiting"
    assert re.fullmatch(r"  - node-a: report is stale \(36\d\ds old, ttl 30s\)", lines[1])
    assert lines[2] == "  - node-b: current version is 1, not 2"


def test_status_pending_with_one_version_says_nothing_waits(cli: Cli) -> None:
    cli.put(OLD_VALUE)

    proc = cli("status", "--pending", "--config", str(cli.config))

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no version is waiting for retirement"
    assert json.loads(cli("status", "--pending", "--json", "--config", str(cli.config)).stdout) == {"db": []}


def test_node_forget_removes_the_node_and_the_version_becomes_ready(two_versions_one_held: Cli) -> None:
    cli = two_versions_one_held

    proc = cli("node", "forget", "node-a", "--config", str(cli.config))

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "forgot node node-a"
    store = LocalStore(cli.db, watch_files=False)
    try:
        meta = store.read_metadata_sync(KEY)
    finally:
        store.close()
    assert REPORT_PREFIX + "node-a" not in meta
    assert REPORT_PREFIX + "node-b" in meta

    after = cli("status", "--pending", "--config", str(cli.config))

    assert after.returncode == 0, after.stderr
    assert after.stdout.splitlines() == ["db version 1: ready to retire"]


def test_status_pending_with_a_bad_config_exits_2_in_one_line(cli: Cli) -> None:
    cli.config.write_text("credentials: 3\n")

    proc = cli("status", "--pending", "--config", str(cli.config))

    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
