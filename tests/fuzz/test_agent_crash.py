"""Issue 10, safe on every node: kill -9 of the agent at random moments while versions
rotate fast and separate reader processes read every stable path.

The parts (tests/fuzz/crash_procs.py): a real agent on the local SQLite store with
two credentials, one in symlink layout and one in copy layout; a writer process
putting versions through the store API every 0-20 ms and retiring all but the
newest three; two reader processes opening the four stable paths in a tight loop,
each read checked to be one complete version of this run. The agent is killed
with SIGKILL at a random moment (seeded): during its start-up, right after a
``version_written`` line (so the kill lands in the next write), or at a random
delay. The writer pauses from just after the kill until the restarted agent has
been checked (so "caught up" names one version); the readers never pause. After
each restart it must get ready, catch up with the store, and leave
the output dirs clean once it has: no temp leftovers, no version dir that neither
the state file nor ``..current`` names, ``..current`` and the state file naming
the store's current version, and /v1/status saying so.

Most restarts fork the agent from a launcher that has imported it already (a
real ``daemon.cli.main(["agent", ...])`` process; an interpreter start costs
0.75 s here, which would make 100 kills take minutes); every tenth start, and
the first, runs the ``baton`` executable itself.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import AgentProcess, agent_config, free_port, poll, start_agent, write_config
from tests.fuzz import FUZZ, scale
from tests.fuzz.crash_procs import FILES, check

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KILLS = scale(ci=100, fuzz=1000)
SEED = 20250610
BINARY_EVERY = 10
KEEP = 3  # versions per key the writer leaves unretired
READERS = 2
STATE = "..baton-state.json"
CURRENT = "..current"
# credential name -> (store key, layout)
CREDS = {"sym": ("app/sym", "symlink"), "copy": ("app/copy", "copy")}
MOMENTS = ("startup", "after_write", "random")


def _module(role: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fuzz.crash_procs", role, *args],
        cwd=REPO,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        **kw,
    )


class Launcher:
    """The forking launcher process (crash_procs.launcher): start, poll and reap agents."""

    def __init__(self) -> None:
        self.proc = _module("launcher", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the launcher died (exit {self.proc.poll()})"
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.communicate(timeout=10)  # EOF on its stdin ends it


@dataclass
class Forked:
    """The ``Popen`` face of an agent the launcher forked, so ``AgentProcess`` can drive it."""

    launcher: Launcher
    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            answer = self.launcher.ask(f"poll {self.pid}").split()[1]
            self.returncode = None if answer == "-" else int(answer)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self.launcher.ask(f"wait {self.pid}").split()[1])
        return self.returncode


class Writer:
    """The store writer process, driven over its stdin."""

    def __init__(self, db: Path, nonce: str, seed: int) -> None:
        keys = [key for key, _ in CREDS.values()]
        self.proc = _module(
            "writer", str(db), nonce, str(seed), str(KEEP), "0.02", *keys, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.current = self._answer()["current"]

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the writer died (exit {self.proc.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def go(self) -> None:
        self._send("go")

    def pause(self) -> dict[str, list[Any]]:
        """Stop putting; the store's current (version id, seq) per key."""
        self._send("pause")
        self.current = self._answer()["current"]
        return self.current

    def stop(self) -> dict[str, Any]:
        self._send("stop")
        summary = self._answer()
        self.proc.communicate(timeout=10)
        return summary


@dataclass
class Campaign:
    tmp: Path
    port: int
    config: Path
    nonce: str
    launcher: Launcher
    writer: Writer
    starts: int = 0
    binary_starts: int = 0
    settled: int = 0
    debris: dict[str, int] = field(default_factory=lambda: {"tmp": 0, "unrecorded_dir": 0, "mixed_copy": 0})
    kills_with_debris: int = 0
    problems: list[str] = field(default_factory=list)
    settle_seconds: list[float] = field(default_factory=list)

    def launch(self) -> AgentProcess:
        self.starts += 1
        if self.starts == 1 or self.starts % BINARY_EVERY == 0:
            self.binary_starts += 1
            return start_agent(self.config, cwd=self.tmp, port=self.port)
        log = self.tmp / "agent.log"
        answer = self.launcher.ask(f"start {self.config} {self.tmp} {log}")
        pid = int(answer.split()[1])
        proc = Forked(self.launcher, pid)
        return AgentProcess(proc=proc, url=f"http://127.0.0.1:{self.port}", log_path=log)  # type: ignore[arg-type]

    def out(self, name: str) -> Path:
        return self.tmp / "out" / name

    # ------------------------------------------------------------ after a kill

    def inspect_debris(self) -> None:
        """What the kill left behind (before any restart): proof that kills land mid-write."""
        found = False
        for name, (_, layout) in CREDS.items():
            d = self.out(name)
            entries = os.listdir(d)
            if any(".tmp-" in e for e in entries):
                self.debris["tmp"] += 1
                found = True
            if layout == "symlink":
                named = _state_dirs(d)
                if any(e.startswith("..v") and e not in named for e in entries):
                    self.debris["unrecorded_dir"] += 1
                    found = True
            else:
                seqs = {check((d / f).read_bytes(), self.nonce, f) for f in FILES}
                if len(seqs) > 1:
                    self.debris["mixed_copy"] += 1
                    found = True
        self.kills_with_debris += found

    # ------------------------------------------------------------ after a restart

    def settle(self, agent: AgentProcess, cycle: int) -> None:
        """Ready, caught up with the (paused) store, and the output dirs clean."""
        started = time.monotonic()

        def ready() -> bool:
            agent._check_alive()
            try:
                return agent.ready()
            except OSError:
                return False

        poll(ready, timeout=30, what=f"cycle {cycle}: /readyz 200", interval=0.01)
        want = {name: self.writer.current[key] for name, (key, _) in CREDS.items()}

        def caught_up() -> dict[str, Any] | None:
            creds = agent.status()["credentials"]
            return creds if all(creds[n]["current"] == want[n][0] for n in CREDS) else None

        creds = poll(caught_up, timeout=30, what=f"cycle {cycle}: status showing the store's current versions")
        self.settle_seconds.append(time.monotonic() - started)
        self.settled += 1
        for name, (_, layout) in CREDS.items():
            version, seq = want[name]
            where = f"cycle {cycle}: {name} ({layout})"
            if creds[name]["last_error"] is not None or not creds[name]["written"]:
                self.problems.append(f"{where}: status {creds[name]}")
            self.problems.extend(f"{where}: {p}" for p in self.clean_within(5.0, name, layout, version, seq))
        if self.nonce in agent.log():
            self.problems.append(f"cycle {cycle}: the agent logged a credential value")

    def clean_within(self, timeout: float, name: str, layout: str, version: str, seq: int) -> list[str]:
        """The dir's problems if it is not clean within ``timeout`` s: a retired version's
        removal may still be under way (its state file save in flight) when the agent has
        caught up, so a clean dir is waited for, not demanded at one instant."""
        deadline = time.monotonic() + timeout
        while (problems := self.check_dir(name, layout, version, seq)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return problems

    def check_dir(self, name: str, layout: str, version: str, seq: int) -> list[str]:
        d = self.out(name)
        problems = []
        entries = sorted(os.listdir(d))
        state = json.loads((d / STATE).read_text())
        if state["current"] != version:
            problems.append(f"state file current {state['current']}, store current {version}")
        tmp = [e for e in entries if ".tmp-" in e]
        if tmp:
            problems.append(f"temp leftovers {tmp}")
        for f in FILES:
            got = check((d / f).read_bytes(), self.nonce, f)
            if got != seq:
                problems.append(f"stable path {f} holds seq {got}, the store's current is seq {seq}")
        vdirs = [e for e in entries if e.startswith("..v")]
        if layout == "copy":
            if vdirs or os.path.islink(d / FILES[0]):
                problems.append(f"copy layout with version dirs or links: {entries}")
            return problems
        target = os.readlink(d / CURRENT)
        entry = state["versions"].get(version) or {}
        if entry.get("dir") != target:
            problems.append(f"..current -> {target}, the state file says {entry.get('dir')}")
        for f in FILES:
            if os.readlink(d / f) != f"{CURRENT}/{f}":
                problems.append(f"stable path {f} -> {os.readlink(d / f)}")
        named = _state_dirs(d)
        orphans = [v for v in vdirs if v not in named and v != target]
        if orphans:
            problems.append(f"orphan version dirs (in neither the state file nor ..current): {orphans}")
        return problems


def _state_dirs(d: Path) -> set[str]:
    try:
        state = json.loads((d / STATE).read_text())
    except FileNotFoundError:
        return set()
    return {v.get("dir") for v in state["versions"].values()}


def _say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(text, flush=True)


def test_agent_killed_at_random_moments_never_shows_a_reader_a_torn_empty_or_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    nonce = f"run{rng.getrandbits(32):08x}"
    port = free_port()
    credentials = [
        {
            "name": name,
            "key": key,
            "output": {
                "dir": str(tmp_path / "out" / name),
                "layout": layout,
                "files": {f: f"{{{{ {f} }}}}" for f in FILES},
            },
        }
        for name, (key, layout) in CREDS.items()
    ]
    config = agent_config(
        port=port,
        credentials=credentials,
        store=str(tmp_path / "store.db"),
        # Cleanup of retired versions runs at start and once per heartbeat; open
        # events (fanotify) would only add holders nobody here has.
        report={"heartbeat": "1s"},
        agent={"debounce": "50ms", "retry_min": "50ms", "retry_max": "200ms", "scan_interval": "1s", "fanotify": "off"},
    )
    config_path = write_config(tmp_path / "baton.yaml", config)
    stop = tmp_path / "stop-readers"
    launcher = Launcher()
    writer = Writer(tmp_path / "store.db", nonce, rng.getrandbits(32))
    run = Campaign(tmp=tmp_path, port=port, config=config_path, nonce=nonce, launcher=launcher, writer=writer)
    readers: list[subprocess.Popen[str]] = []
    agent: AgentProcess | None = None
    moments = {m: 0 for m in MOMENTS}
    began = time.monotonic()
    try:
        agent = run.launch()
        run.settle(agent, 0)
        paths = [str(run.out(name) / f) for name in CREDS for f in FILES]
        for _ in range(READERS):
            reader = _module("reader", nonce, str(stop), *paths, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            readers.append(reader)
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "ready"

        plan = [rng.choices(MOMENTS, weights=(2, 3, 5))[0] for _ in range(KILLS)]
        for cycle, moment in enumerate(plan, start=1):
            moments[moment] += 1
            writer.go()
            if moment == "after_write":
                seen = sum(e.get("event") == "version_written" for e in agent.events())
                k = rng.randint(1, 3)
                poll(
                    lambda a=agent, n=seen + k: sum(e.get("event") == "version_written" for e in a.events()) >= n,
                    timeout=30,
                    what=f"cycle {cycle}: {k} more version_written",
                    interval=0.002,
                )
                time.sleep(rng.uniform(0.0, 0.004))  # the point of death, in the next write
            elif moment == "startup":
                time.sleep(rng.uniform(0.0, 0.3))  # the point of death, during or just after start-up
            else:
                time.sleep(rng.uniform(0.0, 0.25))  # the point of death
            agent._check_alive()  # it ran until we killed it
            agent.kill()
            assert agent.proc.returncode == -signal.SIGKILL, agent.proc.returncode
            writer.pause()
            run.inspect_debris()
            agent = run.launch()
            if cycle == KILLS or plan[cycle] != "startup":
                run.settle(agent, cycle)
            if FUZZ and cycle % 100 == 0:
                _say(
                    capsys,
                    f"agent crash: {cycle}/{KILLS} kills, {run.kills_with_debris} mid-write, "
                    f"{time.monotonic() - began:.0f}s, problems {len(run.problems)}",
                )

        stop.touch()
        summaries = []
        for reader in readers:
            out, err = reader.communicate(timeout=60)
            assert reader.returncode == 0, err
            summaries.append(json.loads(out.strip().splitlines()[-1]))
        wrote = writer.stop()
    finally:
        if agent is not None:
            agent.kill()
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.communicate()
        if writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.communicate()
        launcher.close()

    elapsed = time.monotonic() - began
    total = {k: sum(s[k] for s in summaries) for k in ("reads", "torn", "empty", "missing", "error", "went_back")}
    settle = sorted(run.settle_seconds)
    _say(
        capsys,
        f"agent crash: {KILLS} kills ({moments}), {run.starts} starts ({run.binary_starts} of the baton executable), "
        f"{wrote['puts']} versions put, {wrote['retired']} retired; kills that left write debris "
        f"{run.kills_with_debris} ({run.debris}); {run.settled} restarts checked, settle p50 "
        f"{settle[len(settle) // 2]:.2f}s max {settle[-1]:.2f}s; reads {total['reads']}: torn {total['torn']}, "
        f"empty {total['empty']}, missing {total['missing']}, other errors {total['error']}, "
        f"went back {total['went_back']}; problems {len(run.problems)}; {elapsed:.0f}s",
    )
    assert all(total[k] == 0 for k in ("torn", "empty", "missing", "error", "went_back")), summaries
    assert not run.problems, "\n".join(run.problems[:20])
    # The campaign did what it claims: readers overlapped many versions, kills landed mid-write.
    for s in summaries:
        assert all(n > 10 for n in s["versions_seen"].values()), s
    assert run.kills_with_debris > 0, run.debris
