"""``baton rotate --wait`` and ``baton retire --force`` against a real rotator and a real agent on the local store.

Both roles run as real processes (``baton rotator``, ``baton agent``) on one SQLite
store; the rotator makes its action token in its runtime dir. A holder is a real
process keeping the credential file open. Every byte any command printed, and the
logs of both roles, are searched at the end for each version's value and the token.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.stores.local import LocalStore
from tests.e2e.helpers import BATON, AgentProcess, baton, free_port, poll, start_agent, store_put, write_config

pytestmark = pytest.mark.e2e

KEY = "app/db"
FIRST_VALUE = "first-sekrit-value-5be1a7"
HOLD = "import sys, time; f = open(sys.argv[1]); print('holding', flush=True); time.sleep(600)"


@dataclass
class Scene:
    root: Path
    agent: AgentProcess
    rotator: AgentProcess  # the same helper drives any baton role's endpoint and log
    rotator_config: Path
    outputs: list[str] = field(default_factory=list)
    values: set[str] = field(default_factory=set)  # every version's value seen in the store
    token: str = ""
    holders: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [BATON, *args, "--config", str(self.rotator_config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def hold(self) -> subprocess.Popen[bytes]:
        """A process that opens the credential file (the version current now) and keeps it open."""
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(self.root / "out" / "value")], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"holding\n"
        self.holders.append(proc)
        return proc

    def held_by(self, pid: int) -> str | None:
        """The version the agent reports ``pid`` holding, if it does."""
        for version, info in self.agent.credential("db").get("versions", {}).items():
            if any(h.get("pid") == pid for h in info.get("holders", [])):
                return str(version)
        return None

    def versions(self) -> dict[str, tuple[bool, str]]:
        """version id -> (retired, value), read from the store directly (the test may see values)."""

        async def go() -> dict[str, tuple[bool, str]]:
            store = LocalStore(self.root / "store.db", watch_files=False)
            try:
                out = {}
                for v in await store.versions(KEY):
                    value = (await store.read(KEY, v.id)).payload.reveal() if not v.retired else ""
                    out[v.id] = (v.retired, value)
                return out
            finally:
                await store.aclose()

        found = asyncio.run(go())
        self.values.update(value for _, value in found.values() if value)
        return found

    def metadata(self) -> dict[str, str]:
        async def go() -> dict[str, str]:
            store = LocalStore(self.root / "store.db", watch_files=False)
            try:
                return await store.read_metadata(KEY)
            finally:
                await store.aclose()

        return asyncio.run(go())


def _role_config(root: Path, *, node: str, port: int) -> dict[str, object]:
    return {
        "node_id": node,
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": f"127.0.0.1:{port}", "runtime_dir": str(root / "run")},
        "log": {"format": "json", "level": "info"},
        "agent": {"debounce": "50ms", "scan_interval": "200ms", "retry_min": "100ms", "retry_max": "1s"},
        "report": {"heartbeat": "1s"},
        "credentials": [
            {"name": "db", "key": KEY, "output": {"dir": str(root / "out")}, "rotation": {"every": "1h"}},
        ],
    }


def _start(config: Path, role: str, *, cwd: Path, port: int) -> AgentProcess:
    if role == "agent":
        return start_agent(config, cwd=cwd, port=port)
    log_path = cwd / f"rotator-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [BATON, "rotator", "--config", str(config)],
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    rotator = AgentProcess(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path)

    def ready() -> bool:
        rotator._check_alive()
        try:
            return rotator.ready()
        except OSError:
            return False  # not listening yet

    try:
        poll(ready, timeout=20, what="baton rotator /readyz", interval=0.05)
    except BaseException:
        rotator.kill()
        raise
    return rotator


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    assert store_put(tmp_path / "store.db", KEY, FIRST_VALUE) == "1"
    agent_port, rotator_port = free_port(), free_port()
    agent_config = write_config(tmp_path / "agent.yaml", _role_config(tmp_path, node="node-e2e", port=agent_port))
    rotator_config = write_config(
        tmp_path / "rotator.yaml", _role_config(tmp_path, node="rotator-e2e", port=rotator_port)
    )
    agent = _start(agent_config, "agent", cwd=tmp_path, port=agent_port)
    rotator: AgentProcess | None = None
    s: Scene | None = None
    try:
        agent.wait_ready(timeout=20)
        rotator = _start(rotator_config, "rotator", cwd=tmp_path, port=rotator_port)
        s = Scene(tmp_path, agent, rotator, rotator_config)
        s.token = (tmp_path / "run" / "rotator.token").read_text().strip()
        s.versions()
        yield s
    finally:
        for h in s.holders if s is not None else ():
            h.kill()
            h.wait()
            if h.stdout is not None:
                h.stdout.close()
        for role in (rotator, agent):
            if role is not None:
                role.stop()
    assert s is not None and s.token
    s.versions()
    secrets = [FIRST_VALUE, *s.values]
    said = "\n".join([*s.outputs, agent.log(), rotator.log() if rotator else ""])
    assert not [x for x in secrets if x in said], "a secret value is in the output"
    assert s.token not in said


def test_rotate_wait_follows_the_drain_and_retire_force_ends_it_despite_a_holder(scene: Scene) -> None:
    token_file = scene.root / "run" / "rotator.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert (scene.root / "run").stat().st_mode & 0o777 == 0o700

    # baton status shows when the next rotation is due: one interval after version 1.
    status = scene.cli("status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"db: leading.*next rotation \d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*\(in (59m|1h)", status.stdout)
    assert "schedule: every 1h" in status.stdout

    # Version 1 is held; the rotation to 2 goes through, the drain cannot finish within 3 s.
    first = scene.hold()
    poll(lambda: scene.held_by(first.pid) == "1", timeout=20, what="the agent to see the holder of version 1")
    timed_out = scene.cli("rotate", "db", "--wait", "--timeout", "3s")
    assert timed_out.returncode == 1, timed_out.stderr
    assert "db: rotation requested (current version 1)" in timed_out.stderr
    last = timed_out.stderr.strip().splitlines()[-1]
    assert last.startswith("baton: timed out after 3s: version 1 of db is still held (node-e2e pid ")
    assert f"pid {first.pid} " in last
    # The progress lines said where the drain stood: the new version on the node, the old one's holder.
    assert re.search(
        rf"db: version 2 on 1/1 node\(s\); version 1: 1 holder\(s\): node-e2e pid {first.pid} ", timed_out.stderr
    )
    assert scene.versions()["1"][0] is False  # still there: it is held
    # Another rotation now would only be postponed (max_draining 1): refused at once, saying why.
    busy = scene.cli("rotate", "db", "--wait")
    assert busy.returncode == 2
    assert "db cannot rotate now: version(s) 1 still draining (max_draining 1)" in busy.stderr

    # The current version cannot be retired by force.
    refused = scene.cli("retire", "db", "2", "--force", "--reason", "leaked")
    assert refused.returncode == 2
    assert "version 2 of db is current" in refused.stderr
    assert scene.versions()["2"][0] is False

    # The emergency path: version 1 goes now, its holder listed first, who and why recorded.
    forced = scene.cli("retire", "db", "1", "--force", "--reason", "pasted into a ticket")
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.splitlines()
    assert lines[0] == "db version 1: 1 holder(s) will lose it:"
    assert lines[1].startswith(f"  node-e2e: pid {first.pid} ")
    assert lines[-1].startswith("db: version 1 retired by force (asked by ")
    assert scene.versions()["1"][0] is True
    record = json.loads(scene.metadata()["baton.forced.1"])
    assert record["reason"] == "pasted into a ticket"
    assert record["peer"] == "ip:127.0.0.1" and record["holders"] == 1 and "@" in record["user"]
    forced_event = scene.rotator.wait_event("force_retired")
    assert forced_event["version"] == "1" and forced_event["reason"] == "pasted into a ticket"
    assert any(f"pid {first.pid} " in h for h in forced_event["holders"])

    # Now a holder of version 2: `rotate --wait` follows the drain live and ends once 2 is retired.
    second = scene.hold()
    poll(lambda: scene.held_by(second.pid) == "2", timeout=20, what="the agent to see the holder of version 2")
    err_path = scene.root / "rotate.err"
    with err_path.open("w") as err:
        waiting = subprocess.Popen(
            [BATON, "rotate", "db", "--wait", "--timeout", "60s", "--config", str(scene.rotator_config)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=scene.root,
        )
    try:
        poll(lambda: f"pid {second.pid} " in err_path.read_text(), timeout=30, what="a progress line naming the holder")
        assert waiting.poll() is None  # still waiting for the holder
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=10)
        out, _ = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    scene.outputs += [out, err_path.read_text()]
    assert waiting.returncode == 0, err_path.read_text()
    assert out.strip() == "db: version 2 retired; version 3 is current"
    assert scene.versions()["2"][0] is True and scene.versions()["3"][0] is False


def test_rotate_and_retire_exit_2_without_a_rotator_or_for_an_unknown_credential(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "rotator.yaml", _role_config(tmp_path, node="r", port=port))
    outputs: list[str] = []

    def run(*args: str) -> tuple[int, str]:
        r = baton(*args, "--config", str(config), cwd=tmp_path)
        outputs.extend([r.out, r.err])
        return r.code, r.err

    code, err = run("rotate", "nosuch")
    assert code == 2 and "unknown credential 'nosuch'" in err
    code, err = run("rotate", "db", "--wait")
    assert code == 2 and "cannot read the rotator's token" in err  # no rotator ever ran here
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "run" / "rotator.token").write_text("stale-token\n")
    code, err = run("rotate", "db")
    assert code == 2 and f"no rotator answers at 127.0.0.1:{port}" in err
    code, err = run("retire", "db", "1", "--reason", "x")
    assert code == 2 and "needs --force" in err
    code, err = run("retire", "db", "1", "--force")
    assert code == 2 and "--reason is required" in err
    code, err = run("rotate", "db", "--timeout", "soon")
    assert code == 2 and "--timeout" in err
    # A runtime dir the token cannot safely go in stops the rotator at start, naming the field.
    (tmp_path / "run" / "rotator.token").unlink()
    (tmp_path / "run").rmdir()
    (tmp_path / "run").write_text("not a dir")
    code, err = run("rotator")
    assert code == 2 and err.startswith("api.runtime_dir: "), err
    assert not any("stale-token" in o for o in outputs)


@pytest.mark.parametrize(
    ("rotation", "command", "problem"),
    [
        ({"cron": "0 0 31 2 *"}, "check-config", "credentials.0.rotation.cron: the schedule never fires"),
        ({"cron": "every day"}, "rotator", "credentials.0.rotation.cron: a cron expression has 5 fields"),
    ],
)
def test_a_schedule_that_never_fires_or_does_not_parse_exits_2_naming_the_field(
    tmp_path: Path, rotation: dict[str, object], command: str, problem: str
) -> None:
    config = _role_config(tmp_path, node="r", port=free_port())
    config["credentials"][0]["rotation"] = rotation  # type: ignore[index]
    path = write_config(tmp_path / "rotator.yaml", config)
    args = [command, str(path)] if command == "check-config" else [command, "--config", str(path)]
    r = baton(*args, cwd=tmp_path, timeout=20)
    assert r.code == 2, r.err
    assert r.err.startswith(problem), r.err
