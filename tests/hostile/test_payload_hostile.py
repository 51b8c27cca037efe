"""Hostile payloads against real ``baton agent``, ``baton exec`` and ``baton rotator`` processes.

A payload that cannot be rendered, for whatever reason (a lone surrogate in
valid UTF-8 JSON, nesting past the recursion limit, over 1 MiB on disk, a
template that spins for ever on it), is that version's error: the last good
files stay, the process keeps running and keeps following, the other
credentials too, ``baton_payload_rejected_total{credential,reason}`` and a
``version_rejected`` event say so, and nothing of the value is said anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.agent.service import Agent
from daemon.config import Config, ProviderConfig
from daemon.errors import ProviderError
from daemon.files.render import render
from daemon.model import Secret, SecretVersion, VersionId
from daemon.providers.postgres import PostgresProvider
from daemon.stores.local import LocalStore
from tests.e2e.helpers import BATON, AgentProcess, agent_config, free_port, poll, start_agent, store_put, write_config
from tests.helpers import everything_logged, running_agent, until

pytestmark = pytest.mark.hostile

SECRETS = [f"hostile-Pay1oad-{i}-{os.urandom(4).hex()}" for i in range(8)]
# Spins 10^10 steps with no output when the payload has a "spin" field: only a kill stops it.
SPIN = (
    "{% if spin is defined %}{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{% endif %}"
)
APP_FILES = {"password": SPIN + "{{ password }}", "dsn": "postgresql://{{ username }}:{{ password }}@db/app"}


def good(secret: str) -> str:
    return json.dumps({"username": "app", "password": secret})


def surrogate(secret: str) -> str:
    # Valid UTF-8 JSON text; the \ud800 escape decodes to a lone surrogate.
    return '{"username": "app", "password": "' + secret + '\\ud800"}'


def deep(secret: str) -> str:
    return '{"username": "app", "password": "' + secret + '", "x": ' + "[" * 200_000 + "]" * 200_000 + "}"


def spin(secret: str) -> str:
    return json.dumps({"username": "app", "password": secret, "spin": 1})


def put_around_create(db: Path, key: str, value: str) -> None:
    """A current version written straight into the database (a tool, a bug), past create()'s checks."""
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as c:
        c.execute("BEGIN IMMEDIATE")
        (top,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM versions WHERE key=?", (key,)).fetchone()
        c.execute("UPDATE versions SET stage=NULL WHERE key=? AND stage='current'", (key,))
        c.execute(
            "INSERT INTO versions (key, id, payload, digest, stage, created) VALUES (?,?,?,?,?,?)",
            (key, top + 1, value, hashlib.sha256(value.encode()).hexdigest(), "current", time.time()),
        )
        c.execute("COMMIT")


class Scene:
    """A temp dir with a local store and an agent config: credential ``app`` (JSON fields) and ``other``."""

    def __init__(self, root: Path, *, render_timeout: str = "2s") -> None:
        self.root = root
        self.db = root / "store.db"
        self.port = free_port()
        self.app_dir = root / "out" / "app"
        self.other_dir = root / "out" / "other"
        credentials = [
            {"name": "app", "key": "app/db", "output": {"dir": str(self.app_dir), "files": APP_FILES}},
            {"name": "other", "key": "other/token", "output": {"dir": str(self.other_dir)}},
        ]
        config = agent_config(port=self.port, credentials=credentials, store=str(self.db))
        config["agent"]["render_timeout"] = render_timeout
        self.config = write_config(root / "baton.yaml", config)
        self.agent: AgentProcess | None = None

    def start(self) -> AgentProcess:
        self.agent = start_agent(self.config, cwd=self.root, port=self.port)
        return self.agent

    def app_files(self) -> tuple[str, str]:
        return (self.app_dir / "password").read_text(), (self.app_dir / "dsn").read_text()

    def rejected(self, after: int, reason: str) -> dict[str, Any]:
        assert self.agent is not None
        ev = self.agent.wait_event("version_rejected", after=after, timeout=20)
        assert ev.get("reason") == reason, ev
        assert ev.get("credential") == "app", ev
        return ev

    def close(self) -> None:
        if self.agent is not None:
            self.agent.kill()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path)
    try:
        yield s
    finally:
        s.close()


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    _, body = agent.get("/metrics")
    for line in body.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"  # exited, waiting to be reaped


def render_children(pid: int) -> list[int]:
    """The agent's render worker(s): its children running daemon.files.render."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"daemon.files.render" in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out


def test_bad_payloads_are_rejected_by_reason_the_last_good_files_stay_and_every_credential_follows_on(
    scene: Scene,
) -> None:
    store_put(scene.db, "app/db", good(SECRETS[0]))
    store_put(scene.db, "other/token", SECRETS[5])
    agent = scene.start()
    agent.wait_ready()
    first = scene.app_files()
    assert first[0] == SECRETS[0]

    for i, (make, reason) in enumerate([(surrogate, "encoding"), (deep, "depth")], start=1):
        mark = len(agent.events())
        store_put(scene.db, "app/db", make(SECRETS[i]))
        scene.rejected(mark, reason)
        assert scene.app_files() == first, "a rejected payload touched the files"
        assert metric(agent, "baton_payload_rejected_total", credential="app", reason=reason) == 1.0

    # Over 1 MiB, written around the store's create() checks: refused on read.
    mark = len(agent.events())
    put_around_create(scene.db, "app/db", good(SECRETS[3]) + " " * (2 << 20))
    scene.rejected(mark, "size")
    assert scene.app_files() == first

    # The other credential was never held up, and the bad one takes the next good version.
    store_put(scene.db, "other/token", SECRETS[6])
    poll(lambda: (scene.other_dir / "value").read_text() == SECRETS[6], timeout=10, what="other's new version")
    store_put(scene.db, "app/db", good(SECRETS[4]))
    poll(lambda: scene.app_files()[0] == SECRETS[4], timeout=10, what="app's next good version")
    assert agent.status()["credentials"]["app"]["last_error"] is None

    # A restart with a bad version current neither exits nor loses the files.
    mark = len(agent.events())
    store_put(scene.db, "app/db", surrogate(SECRETS[7]))
    scene.rejected(mark, "encoding")
    code, _ = agent.stop()
    assert code == 0
    agent = scene.start()
    scene.rejected(0, "encoding")
    assert agent.get("/healthz")[0] == 200
    assert scene.app_files()[0] == SECRETS[4]
    assert agent.proc.poll() is None
    agent.assert_never_said(SECRETS)


def test_a_runaway_template_is_stopped_at_the_bound_while_healthz_answers_and_sigterm_still_stops_the_agent(
    scene: Scene,
) -> None:
    store_put(scene.db, "app/db", good(SECRETS[0]))
    store_put(scene.db, "other/token", SECRETS[5])
    agent = scene.start()
    agent.wait_ready()
    mark = len(agent.events())

    store_put(scene.db, "app/db", spin(SECRETS[1]))
    started = time.monotonic()
    # While the template spins in the worker, the agent's loop is free.
    slowest = 0.0
    while time.monotonic() - started < 1.5:
        t = time.monotonic()
        assert agent.get("/healthz", timeout=2)[0] == 200
        slowest = max(slowest, time.monotonic() - t)
    assert slowest < 0.5, f"/healthz took {slowest:.2f}s during a runaway render"
    store_put(scene.db, "other/token", SECRETS[6])

    scene.rejected(mark, "timeout")
    took = time.monotonic() - started
    assert took < 2 + 3, f"the runaway render was stopped after {took:.1f}s (bound 2s)"
    assert scene.app_files()[0] == SECRETS[0]
    assert metric(agent, "baton_payload_rejected_total", credential="app", reason="timeout") == 1.0
    # The other credential waited at most one bound for the worker, then was written.
    poll(lambda: (scene.other_dir / "value").read_text() == SECRETS[6], timeout=5, what="other's new version")

    # SIGTERM in the middle of the next runaway render: a prompt stop, the worker gone with it.
    store_put(scene.db, "app/db", spin(SECRETS[2]))
    workers = poll(lambda: render_children(agent.proc.pid), timeout=5, what="the render worker")
    code, stopped_in = agent.stop()
    assert code == 0
    assert stopped_in < 3, f"SIGTERM took {stopped_in:.1f}s during a runaway render"
    assert all(gone(pid) for pid in workers), "the render worker outlived the agent"
    agent.assert_never_said(SECRETS)


# ---------------------------------------------------------------- baton exec

CHILD = r"""
import hashlib, json, os, signal, sys, time
out = sys.argv[1]
def rec(**kw):
    with open(out, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **kw}) + "\n")
stop = False
def on_term(s, f):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
rec(started=True, digest=hashlib.sha256(os.environ["APP_PASSWORD"].encode()).hexdigest())
while not stop:
    time.sleep(0.02)
"""


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_baton_exec_keeps_its_child_through_bad_payloads_and_restarts_it_on_the_next_good_one(tmp_path: Path) -> None:
    db, records, out = tmp_path / "store.db", tmp_path / "child.jsonl", tmp_path / "exec.out"
    config = agent_config(
        port=free_port(),
        store=str(db),
        credentials=[
            {
                "name": "app",
                "key": "app/db",
                "output": {"dir": str(tmp_path / "out"), "files": APP_FILES, "env": {"APP_PASSWORD": "{{ password }}"}},
                "consumers": [
                    {"name": "child", "match": {"cmdline": "never-matches-e2e"}, "reload": {"restart": {}}},
                ],
            }
        ],
    )
    config["agent"]["render_timeout"] = "1s"
    path = write_config(tmp_path / "exec.yaml", config)

    def children() -> list[dict[str, Any]]:
        return [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []

    store_put(db, "app/db", good(SECRETS[0]))
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [
                BATON,
                "exec",
                "--config",
                str(path),
                "--credential",
                "app",
                "--",
                sys.executable,
                "-c",
                CHILD,
                str(records),
            ],
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        first = poll(lambda: next(iter(children()), None), timeout=15, what="the child")
        assert first["digest"] == sha(SECRETS[0])

        def rejections() -> list[dict[str, Any]]:
            said = [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]
            return [e for e in said if e.get("event") == "version_rejected"]

        for n, payload in enumerate([surrogate(SECRETS[1]), deep(SECRETS[2]), spin(SECRETS[3])], start=1):
            store_put(db, "app/db", payload)
            poll(lambda: len(rejections()) >= n, timeout=15, what=f"rejection {n}")  # noqa: B023
            assert proc.poll() is None, out.read_text()[-3000:]
            assert len(children()) == 1, "a bad payload restarted the child"
            os.kill(first["pid"], 0)
        assert [e["reason"] for e in rejections()] == ["encoding", "depth", "timeout"]

        store_put(db, "app/db", good(SECRETS[4]))
        second = poll(
            lambda: next((c for c in children() if c["digest"] == sha(SECRETS[4])), None), timeout=15, what="restart"
        )
        assert second["pid"] != first["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for c in children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c["pid"], signal.SIGKILL)
    said = out.read_text()
    assert not [s for s in SECRETS if s in said], "a secret value was printed by baton exec"


# ---------------------------------------------------------------- rotator


def too_deep(secret: str) -> str:
    # Past MAX_DEPTH, short of the recursion limit: parseable, so its good fields can be kept.
    return '{"username": "app", "password": "' + secret + '", "x": ' + "[" * 100 + "]" * 100 + "}"


@pytest.mark.parametrize(
    ("make", "kept"),
    [(surrogate, {"username": "app"}), (too_deep, {"username": "app"}), (deep, {})],
    ids=["surrogate", "too-deep", "past-the-recursion-limit"],
)
def test_a_rotator_with_a_generator_field_survives_a_bad_current_version_and_rotates_it_away(
    tmp_path: Path, make: Any, kept: dict[str, str]
) -> None:
    db, out = tmp_path / "store.db", tmp_path / "rotator.out"
    config = agent_config(
        port=free_port(),
        store=str(db),
        credentials=[
            {
                "name": "app",
                "key": "app/db",
                "output": {"dir": str(tmp_path / "out"), "files": APP_FILES},
                "rotation": {"every": "1s", "generator": {"kind": "password", "field": "password"}},
            }
        ],
    )
    path = write_config(tmp_path / "rotator.yaml", config)
    bad = store_put(db, "app/db", make(SECRETS[0]))

    def current() -> tuple[str, str] | None:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as c:
            row = c.execute("SELECT id, payload FROM versions WHERE key='app/db' AND stage='current'").fetchone()
        return None if row is None or str(row[0]) == bad else (str(row[0]), row[1])

    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [BATON, "rotator", "--config", str(path)], cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        _, payload = poll(current, timeout=30, what="a rotation past the bad version")
        assert proc.poll() is None, out.read_text()[-3000:]
        fields = json.loads(payload)
        # The bad part is gone, the fields fine on their own kept, the generated one new.
        new = fields.pop("password")
        assert fields == kept
        assert len(new) == 32 and new != SECRETS[0]
        if kept:  # what the agent's templates need survived: it renders
            assert render(APP_FILES, Secret(payload))["password"] == new.encode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    said = out.read_text()
    assert SECRETS[0] not in said and "generator_fields_dropped" in said


# ---------------------------------------------------------------- in process: an exception nobody planned for


class SurprisingStore(LocalStore):
    """The real local store, except that reading a payload marked "surprise" raises what no one catches by name
    (as a library might on a hostile payload), with the value in its message."""

    def read_sync(self, key: str, version: VersionId | None = None) -> SecretVersion:
        got = super().read_sync(key, version)
        if "surprise" in got.payload.reveal():
            raise RuntimeError(f"cannot handle {got.payload.reveal()}")
        return got


async def test_an_unexpected_exception_from_one_version_backs_off_and_never_stops_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = SurprisingStore(tmp_path / "store.db")
    await store.put("app/db", Secret(good(SECRETS[0])))
    await store.put("other/token", Secret(SECRETS[5]))
    config = Config.model_validate(
        {
            "node_id": "node-hostile",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "api": {"listen": f"127.0.0.1:{free_port()}"},
            "agent": {"fanotify": "off", "retry_min": 0.05, "retry_max": 0.2},
            "credentials": [
                {"name": "app", "key": "app/db", "output": {"dir": str(tmp_path / "app"), "files": APP_FILES}},
                {"name": "other", "key": "other/token", "output": {"dir": str(tmp_path / "other")}},
            ],
        }
    )
    try:
        async with running_agent(Agent(config, store=store, install_signals=False)) as agent:
            app, other = agent.credentials["app"], agent.credentials["other"]
            first = app.version
            await store.put("app/db", Secret(json.dumps({"username": "app", "password": SECRETS[1], "x": "surprise"})))
            await until(lambda: app.last_error == "unexpected RuntimeError", timeout=10, what="the surprise")
            # The other credential follows meanwhile; the surprised one keeps its files.
            v = await store.put("other/token", Secret(SECRETS[6]))
            await until(lambda: other.version == v.id, timeout=10, what="other's new version")
            assert app.version == first and (tmp_path / "app" / "password").read_text() == SECRETS[0]
            # Backing off and trying again, not stopped: the next good version is written.
            v = await store.put("app/db", Secret(good(SECRETS[2])))
            await until(lambda: app.version == v.id, timeout=10, what="app's next good version")
            assert not agent.should_exit.is_set()
    finally:
        await store.aclose()
    logged = everything_logged(caplog)
    assert "version not written; retrying" in logged
    assert not [s for s in SECRETS if s in logged]


@pytest.mark.parametrize("make", [surrogate, deep], ids=["surrogate", "deep"])
def test_the_postgres_provider_refuses_a_hostile_payload_as_a_provider_error(make: Any) -> None:
    provider = PostgresProvider(ProviderConfig(kind="postgres", admin_dsn_file=Path("/nonexistent"), username="app"))
    payload = Secret(make(SECRETS[0]).replace('"app"', '"app_a"'))

    with pytest.raises(ProviderError) as info:
        provider._parse(payload)

    assert SECRETS[0] not in str(info.value)
    # Lenient parsing (the current payload of a rotation) starts afresh instead.
    assert provider._parse_lenient(payload) is None
