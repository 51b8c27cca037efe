"""``baton exec`` end to end: a real child process, a real store fed by ``baton store put``, real signals.

The child is a small Python program that records, as JSON lines appended to a
file, its pid, a digest of the credential it got in its environment (never the
value), and every SIGHUP/SIGTERM it receives. Each test ends by searching
everything baton printed for the secret values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import BATON, baton, poll, store_put, write_config

pytestmark = pytest.mark.e2e

KEY = "app/token"
SECRETS = ["exec-Secret-One-5e1f0a7c", "exec-Secret-Two-c4d92b18"]
BATON_OWN_TOKEN = "baton-own-vault-token-3a9c"

CHILD = r"""
import hashlib, json, os, signal, sys, time
out = sys.argv[1]
def rec(**kw):
    line = json.dumps({"pid": os.getpid(), **kw}) + "\n"
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
stop = False
def on_hup(s, f):
    rec(signal="SIGHUP")
def on_term(s, f):
    global stop
    rec(signal="SIGTERM")
    stop = True
signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, on_term)
rec(
    started=True,
    digest=hashlib.sha256(os.environ["APP_TOKEN"].encode()).hexdigest(),
    has_vault_token="VAULT_TOKEN" in os.environ,
)
while not stop:
    time.sleep(0.02)
"""


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class ExecScene:
    """One test's temp dir, store, config, the running ``baton exec`` and its child's records."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "store.db"
        self.records = root / "child.jsonl"
        self.out = root / "baton.out"
        self.config = write_config(
            root / "exec.yaml",
            {
                "node_id": "node-exec",
                "store": {"kind": "local", "path": str(self.db)},
                "log": {"format": "json", "level": "debug"},
                "agent": {"retry_min": "100ms", "retry_max": "1s"},
                "credentials": [
                    {
                        "name": "app",
                        "key": KEY,
                        "output": {
                            "dir": str(root / "out" / "app"),
                            "files": {"token": "{{ value }}"},
                            "env": {"APP_TOKEN": "{{ value }}"},
                        },
                        "consumers": [
                            {
                                "name": "child",
                                "match": {"cmdline": "never-matches-anything-e2e-exec"},
                                "reload": {"restart": {"stop_signal": "SIGTERM", "timeout": "5s"}},
                            }
                        ],
                    }
                ],
            },
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def put(self, value: str) -> str:
        return store_put(self.db, KEY, value)

    def start(self, *argv: str) -> subprocess.Popen[bytes]:
        command = list(argv) or [sys.executable, "-c", CHILD, str(self.records)]
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [BATON, "exec", "--config", str(self.config), "--credential", "app", "--", *command],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Baton's own store token must not reach the child.
                env={**os.environ, "PYTHONUNBUFFERED": "1", "VAULT_TOKEN": BATON_OWN_TOKEN},
            )
        return self.proc

    def child_records(self) -> list[dict[str, Any]]:
        try:
            text = self.records.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_record(self, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"baton exec exited with {self.proc.returncode}:\n{self.said()[-4000:]}")
            return next((r for r in self.child_records() if all(r.get(k) == v for k, v in match.items())), None)

        return poll(find, timeout=timeout, what=f"a child record {match}")

    def said(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.said().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # A child left behind by a failed test (it runs in its own process group).
        for r in self.child_records():
            if r.get("started"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r["pid"], signal.SIGKILL)


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[ExecScene]:
    s = ExecScene(tmp_path)
    try:
        yield s
    finally:
        s.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: it waits to be reaped (by baton, its parent).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def test_exec_gives_the_child_the_credential_restarts_it_on_a_new_version_forwards_sighup_and_stops_on_sigterm(
    scene: ExecScene,
) -> None:
    scene.put(SECRETS[0])
    proc = scene.start()

    first = scene.wait_record(started=True)
    assert first["digest"] == digest(SECRETS[0])
    assert first["has_vault_token"] is False, "baton passed its own VAULT_TOKEN to the child"
    # The files are written as the agent would write them.
    assert (scene.root / "out" / "app" / "token").read_text() == SECRETS[0]

    scene.put(SECRETS[1])
    second = scene.wait_record(started=True, digest=digest(SECRETS[1]))
    assert second["pid"] != first["pid"], "the child was not restarted"
    assert {"pid": first["pid"], "signal": "SIGTERM"} in scene.child_records(), "the old child was not asked to stop"
    poll(lambda: not alive(first["pid"]), timeout=10, what="the old child to be gone")
    assert (scene.root / "out" / "app" / "token").read_text() == SECRETS[1]
    assert alive(second["pid"])

    proc.send_signal(signal.SIGHUP)
    scene.wait_record(pid=second["pid"], signal="SIGHUP")
    assert proc.poll() is None, "SIGHUP must not stop baton exec"
    assert alive(second["pid"]), "SIGHUP must not stop the child"

    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=15)
    assert {"pid": second["pid"], "signal": "SIGTERM"} in scene.child_records()
    assert code == 0, f"baton exec should end with the child's status (0):\n{scene.said()[-4000:]}"
    assert not alive(second["pid"])

    started = [r for r in scene.child_records() if r.get("started")]
    assert [r["pid"] for r in started] == [first["pid"], second["pid"]], "exactly one restart was expected"
    names = [e.get("event") for e in scene.events()]
    assert names.count("exec_started") == 2
    assert names.count("exec_restart") == 1

    said = scene.said()
    assert said, "baton printed nothing: the log search below would prove nothing"
    leaked = [s for s in [*SECRETS, BATON_OWN_TOKEN] if s in said]
    assert not leaked, f"secret values in baton exec's output: {len(leaked)}"


def test_exec_ends_with_the_exit_status_of_a_child_that_exits_by_itself(scene: ExecScene) -> None:
    scene.put(SECRETS[0])
    proc = scene.start(sys.executable, "-c", "import os, sys; sys.exit(3 if os.environ['APP_TOKEN'] else 4)")
    assert proc.wait(timeout=20) == 3, scene.said()[-4000:]
    assert SECRETS[0] not in scene.said()


def test_exec_reports_a_child_killed_by_a_signal_as_128_plus_the_signal(scene: ExecScene) -> None:
    scene.put(SECRETS[0])
    proc = scene.start(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.wait(timeout=20) == 128 + signal.SIGKILL, scene.said()[-4000:]


def test_exec_refuses_an_unknown_credential_with_status_2_and_starts_nothing(scene: ExecScene) -> None:
    scene.put(SECRETS[0])
    r = baton("exec", "--config", str(scene.config), "--credential", "nope", "--", sys.executable, "-c", "pass")
    assert r.code == 2
    assert "nope" in r.err
    assert SECRETS[0] not in r.out + r.err
