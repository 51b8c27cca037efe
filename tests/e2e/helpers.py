"""Shared helpers of the e2e tests: run ``baton`` as a real process and talk to it.

``start_agent`` runs ``baton agent --config FILE`` in a working dir, with its
stderr going to a file the tests read back (a pipe could fill up and block the
agent), and waits until /healthz answers. Every HTTP body fetched through an
``AgentProcess`` is kept, so a test can search everything the agent ever said
for a secret value. Waits are polls with a deadline, never bare sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

BATON = str(Path(sys.executable).with_name("baton"))
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(fn: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``fn`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def baton(*args: str, stdin: bytes | None = None, cwd: Path | None = None, timeout: float = 30) -> Result:
    """Run the ``baton`` CLI to completion; output decoded as text."""
    proc = subprocess.run([BATON, *args], input=stdin, capture_output=True, cwd=cwd, timeout=timeout, check=False)
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def store_put(db: Path, key: str, value: str | bytes) -> str:
    """``baton store --path DB put KEY --value-file -``; returns the new version id."""
    data = value.encode() if isinstance(value, str) else value
    proc = subprocess.run(
        [BATON, "store", "--path", str(db), "put", key, "--value-file", "-"],
        input=data,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


def agent_config(
    *,
    port: int,
    credentials: Sequence[dict[str, Any]],
    store: str = "./store.db",
    log_format: str = "json",
    **extra: Any,
) -> dict[str, Any]:
    """A config mapping for ``baton agent``: local store, loopback API, fast retries."""
    return {
        "node_id": "node-e2e",
        "store": {"kind": "local", "path": store},
        "api": {"listen": f"127.0.0.1:{port}"},
        "log": {"format": log_format, "level": "info"},
        "agent": {"debounce": "100ms", "retry_min": "100ms", "retry_max": "1s"},
        "credentials": list(credentials),
        **extra,
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class AgentProcess:
    """A running ``baton agent``, its log file and everything fetched from it."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    bodies: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ HTTP

    def get(self, path: str, *, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                status, body = e.code, e.read().decode()
        self.bodies.append(body)
        return status, body

    def status(self) -> dict[str, Any]:
        code, body = self.get("/v1/status")
        assert code == 200, body
        data: dict[str, Any] = json.loads(body)
        return data

    def credential(self, name: str) -> dict[str, Any]:
        cred: dict[str, Any] = self.status()["credentials"][name]
        return cred

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 10.0) -> None:
        poll(lambda: self.ready() or self._died(), timeout=timeout, what="/readyz 200")
        self._check_alive()

    # ------------------------------------------------------------ logs

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines (the agent is started with log.format json)."""
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def wait_event(self, name: str, *, timeout: float = 10.0, after: int = 0) -> dict[str, Any]:
        """The first event ``name`` among the log records from index ``after`` on."""

        def find() -> dict[str, Any] | None:
            self._check_alive()
            return next((e for e in self.events()[after:] if e.get("event") == name), None)

        return poll(find, timeout=timeout, what=f"log event {name!r}")

    def captured(self) -> str:
        """Everything the agent said: its log and every HTTP body fetched."""
        return "\n".join([self.log(), *self.bodies])

    def assert_never_said(self, secrets: Iterable[str]) -> None:
        text = self.captured()
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"secret values found in the agent's output: {len(leaked)}"

    # ------------------------------------------------------------ process

    def _died(self) -> bool:
        return self.proc.poll() is not None

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"baton agent exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, *, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit status, seconds it took)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_agent(config_path: Path, *, cwd: Path, port: int, timeout: float = 15.0) -> AgentProcess:
    """Start ``baton agent`` and wait until its API answers /healthz (not /readyz)."""
    log_path = cwd / f"agent-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [BATON, "agent", "--config", str(config_path)],
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    agent = AgentProcess(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path)

    def healthy() -> bool:
        agent._check_alive()
        try:
            return agent.get("/healthz", timeout=1.0)[0] == 200
        except OSError:
            return False

    try:
        poll(healthy, timeout=timeout, what="baton agent /healthz", interval=0.05)
    except BaseException:
        agent.kill()
        raise
    return agent
