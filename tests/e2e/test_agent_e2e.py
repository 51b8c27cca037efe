"""``baton agent`` end to end: real processes, a real SQLite store fed by ``baton store put``, real files.

Each test starts its own agent in a temp dir (tests/e2e/helpers.py) and every
one of them ends by searching everything the agent said (its log and every
HTTP body fetched) for the test's secret values.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import AgentProcess, agent_config, free_port, poll, start_agent, store_put, write_config

pytestmark = pytest.mark.e2e

KEY = "app/db"
SECRETS = ["e2e-Secret-One-9f2c1a", "e2e-Secret-Two-4b7d0e", "e2e-Secret-Three-77aa3c"]
FILES = {
    "password": "{{ password }}",
    "dsn": "postgresql://{{ username }}:{{ password }}@db:5432/app",
}


def payload(secret: str, **fields: str) -> str:
    return json.dumps({"username": "app", "password": secret, **fields})


def app_db(**overrides: Any) -> dict[str, Any]:
    cred: dict[str, Any] = {
        "name": "app-db",
        "key": KEY,
        "output": {"dir": "./out/app-db", "mode": "0440", "files": FILES},
    }
    cred.update(overrides)
    return cred


class Scene:
    """One test's temp dir, store, config file and agent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "store.db"
        self.port = free_port()
        self.config_path = root / "agent.yaml"
        self.agents: list[AgentProcess] = []

    def configure(self, *credentials: dict[str, Any], **extra: Any) -> Path:
        # An output dir must be absolute: the tests name theirs relative to the root.
        credentials = tuple(
            {**c, "output": {**c["output"], "dir": str(self.root / c["output"]["dir"])}} for c in credentials
        )
        return write_config(self.config_path, agent_config(port=self.port, credentials=credentials, **extra))

    def put(self, value: str, key: str = KEY) -> str:
        return store_put(self.db, key, value)

    def start(self) -> AgentProcess:
        agent = start_agent(self.config_path, cwd=self.root, port=self.port)
        self.agents.append(agent)
        return agent

    def file(self, name: str, cred: str = "app-db") -> Path:
        return self.root / "out" / cred / name

    def read(self, name: str, cred: str = "app-db") -> str | None:
        try:
            return self.file(name, cred).read_text()
        except FileNotFoundError:
            return None


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path)
    try:
        yield s
    finally:
        for agent in s.agents:
            agent.kill()


def _wait_file(scene: Scene, name: str, expected: str, *, timeout: float, cred: str = "app-db") -> float:
    """Seconds until ``name`` reads ``expected``."""
    started = time.monotonic()
    poll(lambda: scene.read(name, cred) == expected, timeout=timeout, what=f"{cred}/{name} to change")
    return time.monotonic() - started


# ---------------------------------------------------------------- delivery


def test_a_put_before_start_is_written_by_the_agent_and_it_becomes_ready(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))

    agent = scene.start()
    agent.wait_ready()

    assert scene.read("password") == SECRETS[0]
    assert scene.read("dsn") == f"postgresql://app:{SECRETS[0]}@db:5432/app"
    assert stat.S_IMODE(os.stat(scene.file("password")).st_mode) == 0o440
    assert os.readlink(scene.file("password")) == "..current/password"
    agent.assert_never_said(SECRETS)


def test_readyz_is_503_until_a_required_credential_is_written_then_200(scene: Scene) -> None:
    optional = {"name": "optional", "key": "never/put", "required": False, "output": {"dir": "./out/optional"}}
    scene.configure(app_db(), optional)

    agent = scene.start()

    assert agent.get("/healthz")[0] == 200
    assert agent.get("/readyz")[0] == 503
    assert agent.status()["ready"] is False
    assert scene.read("password") is None

    scene.put(payload(SECRETS[0]))

    poll(agent.ready, timeout=2.0, what="/readyz 200 after the first put")
    assert scene.read("password") == SECRETS[0]
    # A credential with required: false never held readiness back.
    assert agent.credential("optional")["written"] is False
    agent.assert_never_said(SECRETS)


def test_a_second_put_changes_the_file_within_a_second(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()

    scene.put(payload(SECRETS[1]))
    took = _wait_file(scene, "password", SECRETS[1], timeout=1.0)

    assert took < 1.0
    assert scene.read("dsn") == f"postgresql://app:{SECRETS[1]}@db:5432/app"
    agent.assert_never_said(SECRETS)


def test_status_shows_versions_and_last_change_but_never_a_value(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    before = time.time()
    agent = scene.start()
    agent.wait_ready()
    scene.put(payload(SECRETS[1]))
    poll(lambda: agent.credential("app-db")["current"] == "2", timeout=2.0, what="status current 2")

    status = agent.status()

    assert status["node"] == "node-e2e"
    assert status["ready"] is True
    cred = status["credentials"]["app-db"]
    assert cred["key"] == KEY
    assert cred["current"] == "2"
    assert cred["written"] is True
    assert sorted(cred["on_disk"]) == ["1", "2"]
    assert before <= cred["last_change"] <= time.time()
    assert cred["last_error"] is None
    agent.assert_never_said(SECRETS)


def test_metrics_expose_version_writes_store_errors_and_last_change(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()

    code, text = agent.get("/metrics")

    assert code == 200
    assert 'baton_credential_version_info{credential="app-db",version="1"} 1.0' in text
    assert 'baton_writes_total{credential="app-db",result="ok"} 1.0' in text
    assert "# TYPE baton_store_errors_total counter" in text
    assert 'baton_last_change_timestamp_seconds{credential="app-db"}' in text

    scene.put(payload(SECRETS[1]))
    poll(
        lambda: 'baton_credential_version_info{credential="app-db",version="2"} 1.0' in agent.get("/metrics")[1],
        timeout=2.0,
        what="version 2 in the metrics",
    )
    _, text = agent.get("/metrics")
    shown = [line for line in text.splitlines() if line.startswith("baton_credential_version_info{")]
    assert shown == ['baton_credential_version_info{credential="app-db",version="2"} 1.0']
    assert 'baton_writes_total{credential="app-db",result="ok"} 2.0' in text
    agent.assert_never_said(SECRETS)


# ---------------------------------------------------------------- bad payloads


def test_a_payload_missing_a_template_field_is_rejected_and_the_last_good_file_stays(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()
    logged = len(agent.events())

    scene.put(json.dumps({"password": SECRETS[1]}))  # no username: the dsn template cannot render

    rejected = agent.wait_event("version_rejected", after=logged, timeout=3.0)
    assert rejected["version"] == "2"
    assert "username" in rejected["error"]
    cred = agent.credential("app-db")
    assert cred["current"] == "1"
    assert "version 2" in cred["last_error"]
    assert "username" in cred["last_error"]
    assert scene.read("password") == SECRETS[0]
    assert scene.read("dsn") == f"postgresql://app:{SECRETS[0]}@db:5432/app"
    assert 'baton_writes_total{credential="app-db",result="rejected"} 1.0' in agent.get("/metrics")[1]

    # The next good version goes through and clears the error.
    scene.put(payload(SECRETS[2]))
    _wait_file(scene, "password", SECRETS[2], timeout=2.0)
    poll(lambda: agent.credential("app-db")["last_error"] is None, timeout=2.0, what="last_error cleared")
    agent.assert_never_said(SECRETS)


# ---------------------------------------------------------------- signals


def test_sighup_with_a_bad_config_keeps_the_old_one_and_with_a_good_one_applies_it(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()
    good_text = scene.config_path.read_text()

    # Bad: the new file is refused as a whole, naming the field.
    scene.config_path.write_text(good_text.replace("'0440'", "'0777'"))
    logged = len(agent.events())
    agent.signal(signal.SIGHUP)
    rejected = agent.wait_event("config_rejected", after=logged)
    assert any("credentials.0.output.mode" in p for p in rejected["problems"])
    scene.put(payload(SECRETS[1]))
    _wait_file(scene, "password", SECRETS[1], timeout=2.0)
    assert stat.S_IMODE(os.stat(scene.file("password")).st_mode) == 0o440

    # Good: a second credential appears and is written.
    other = {"name": "api-token", "key": "api/token", "output": {"dir": "./out/api-token"}}
    scene.put("tok-" + SECRETS[2], key="api/token")
    scene.configure(app_db(), other)
    logged = len(agent.events())
    agent.signal(signal.SIGHUP)
    agent.wait_event("config_reloaded", after=logged)
    _wait_file(scene, "value", "tok-" + SECRETS[2], timeout=3.0, cred="api-token")
    assert set(agent.status()["credentials"]) == {"app-db", "api-token"}
    assert scene.read("password") == SECRETS[1]
    agent.wait_ready()

    code, _took = agent.stop()
    assert code == 0
    agent.assert_never_said([*SECRETS, "tok-" + SECRETS[2]])


def test_sighup_that_changes_the_store_is_refused_and_the_agent_keeps_its_store(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()

    scene.configure(app_db(), store="./other.db")
    logged = len(agent.events())
    agent.signal(signal.SIGHUP)

    rejected = agent.wait_event("config_rejected", after=logged)
    assert any(p.startswith("store:") for p in rejected["problems"])
    scene.put(payload(SECRETS[1]))
    _wait_file(scene, "password", SECRETS[1], timeout=2.0)
    agent.assert_never_said(SECRETS)


def test_sighup_with_a_template_that_does_not_compile_is_refused_naming_the_field(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()

    # A template may hold a literal secret: the refusal names the field, never the text.
    literal = "literal-" + SECRETS[2]
    broken = {**FILES, "password": "{{ password ~ '" + literal + "' }"}
    scene.configure(app_db(output={"dir": "./out/app-db", "mode": "0440", "files": broken}))
    logged = len(agent.events())
    agent.signal(signal.SIGHUP)

    rejected = agent.wait_event("config_rejected", after=logged)
    assert any(p.startswith("credentials.0.output.files.password:") for p in rejected["problems"])
    scene.put(payload(SECRETS[1]))
    _wait_file(scene, "password", SECRETS[1], timeout=2.0)  # the old templates go on rendering
    agent.assert_never_said([*SECRETS, literal])


def test_a_sighup_reload_keeps_what_status_knows_of_the_last_change(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()
    before = agent.credential("app-db")
    assert before["last_change"] is not None

    logged = len(agent.events())
    agent.signal(signal.SIGHUP)  # the same config again
    agent.wait_event("config_reloaded", after=logged)
    agent.wait_ready()

    after = agent.credential("app-db")
    assert after["current"] == before["current"]
    assert after["last_change"] == before["last_change"]
    agent.assert_never_said(SECRETS)


def test_readyz_does_not_drop_to_503_while_a_sighup_reload_applies(scene: Scene) -> None:
    """A readiness probe that lands during a reload must not take the node out of service."""
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()
    codes: list[int] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            codes.append(agent.get("/readyz")[0])

    prober = threading.Thread(target=probe, name="readyz-probe")
    prober.start()
    try:
        for _ in range(3):
            logged = len(agent.events())
            agent.signal(signal.SIGHUP)
            agent.wait_event("config_reloaded", after=logged)
            # Keep probing a while after the reload: the new generation writes its files then.
            seen = len(codes)
            poll(lambda seen=seen: len(codes) >= seen + 10, timeout=5.0, what="probes after the reload")
    finally:
        done.set()
        prober.join(timeout=10)

    assert len(codes) > 20
    assert codes.count(503) == 0, f"{codes.count(503)} of {len(codes)} probes said not ready during reloads"


def test_sigterm_stops_the_agent_within_10_seconds_with_status_0(scene: Scene) -> None:
    scene.configure(app_db())
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()

    code, took = agent.stop(timeout=10.0)

    assert code == 0
    assert took < 10.0
    assert any(e.get("event") == "agent_stopped" for e in agent.events())
    # The files stay for the consumers after the agent is gone.
    assert scene.read("password") == SECRETS[0]
    agent.assert_never_said(SECRETS)


# ---------------------------------------------------------------- nothing leaks, anywhere


def test_no_secret_appears_in_any_log_line_status_metrics_or_error_text(scene: Scene) -> None:
    """Drive every path that produces text (writes, rejections, reloads, stop) and search all of it."""
    scene.configure(app_db(), log_format="text", agent={"debounce": "100ms", "scan_interval": "200ms"})
    scene.put(payload(SECRETS[0]))
    agent = scene.start()
    agent.wait_ready()
    scene.put(payload(SECRETS[1]))
    _wait_file(scene, "password", SECRETS[1], timeout=2.0)
    # A rejected payload whose other fields carry a secret too.
    scene.put(json.dumps({"password": SECRETS[2], "note": SECRETS[2]}))
    poll(lambda: agent.credential("app-db")["last_error"], timeout=3.0, what="the rejection in status")
    agent.signal(signal.SIGHUP)  # a reload with the same config
    poll(lambda: "config_reloaded" in agent.log(), timeout=5.0, what="config_reloaded in the log")
    for path in ("/v1/status", "/metrics", "/healthz", "/readyz"):
        agent.get(path)

    code, _took = agent.stop()

    assert code == 0
    text = agent.captured()
    assert "version_rejected" in text  # the rejection was logged ...
    for secret in SECRETS:
        assert secret not in text  # ... without the value
    # And no state file beside the credential files holds one.
    state = (scene.root / "out" / "app-db" / "..baton-state.json").read_text()
    assert not [s for s in SECRETS if s in state]
