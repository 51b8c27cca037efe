"""The processes of the agent crash campaign (tests/fuzz/test_agent_crash.py), run as
``python -m tests.fuzz.crash_procs ROLE ...``.

- ``reader``: opens every stable path in a tight loop and checks each read is one
  complete version of this run (self-checking contents: ``NONCE:SEQ:FILE:padding:sha256``);
  counts reads, torn / empty / missing ones and versions going back, reports on exit.
- ``writer``: puts new versions through the local store API as fast as told, and
  retires all but the newest few of each key, so the agent has versions to delete.
  Driven over stdin (``go`` / ``pause`` / ``stop``), answers on stdout.
- ``launcher``: imports the agent once, then forks ``baton agent`` (``daemon.cli.main``)
  on request, so a restart costs the agent's own start-up, not an interpreter's
  and the 0.4 s of imports. It reaps its children and reports their exit status.

Nothing here mocks a part of Baton: the agent is the real one, on a real SQLite store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import sys

FILES = ("a", "b")


def content(nonce: str, seq: int, name: str) -> str:
    """Distinct, self-checking content of version ``seq`` of file ``name``; 1 B to ~20 KiB of padding."""
    body = f"{nonce}:{seq}:{name}:" + "x" * ((seq * 7919) % 20_000)
    return f"{body}:{hashlib.sha256(body.encode()).hexdigest()}"


def check(data: bytes, nonce: str, name: str) -> int | None:
    """The version number of a complete content of this run's file ``name``, None when it is not one."""
    body, sep, digest = data.decode(errors="replace").rpartition(":")
    if not sep or hashlib.sha256(body.encode()).hexdigest() != digest:
        return None
    parts = body.split(":", 3)
    if len(parts) != 4 or parts[0] != nonce or parts[2] != name or not parts[1].isdigit():
        return None
    return int(parts[1])


# ---------------------------------------------------------------- reader


def reader(nonce: str, stop: str, paths: list[str]) -> None:
    with contextlib.suppress(OSError):
        os.nice(10)  # leave the cores to the agent under test (and to everyone else on the machine)
    reads = 0
    bad: dict[str, int] = {"torn": 0, "empty": 0, "missing": 0, "error": 0, "went_back": 0}
    examples: list[str] = []
    last: dict[str, int] = {}
    seen: dict[str, set[int]] = {p: set() for p in paths}
    first = True
    while True:
        for path in paths:
            name = os.path.basename(path)
            kind = None
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                kind = "missing"
            except OSError as e:
                kind, data = "error", str(e).encode()
            else:
                n = check(data, nonce, name)
                if not data:
                    kind = "empty"
                elif n is None:
                    kind = "torn"
                elif n < last.get(path, 0):
                    kind = "went_back"
                else:
                    last[path] = n
                    seen[path].add(n)
            reads += 1
            if kind is not None:
                bad[kind] += 1
                if len(examples) < 10:
                    examples.append(f"{kind} {path} ({len(data) if kind != 'missing' else 0} bytes)")
        if first:
            print("ready", flush=True)
            first = False
        if reads % (20 * len(paths)) == 0 and os.path.exists(stop):
            break
    summary = {"reads": reads, **bad, "examples": examples, "versions_seen": {p: len(s) for p, s in seen.items()}}
    print(json.dumps(summary), flush=True)


# ---------------------------------------------------------------- writer


def writer(db: str, nonce: str, seed: int, keep: int, max_gap: float, keys: list[str]) -> None:
    from daemon.model import Secret
    from daemon.stores.local import LocalStore

    store = LocalStore(db, watch_files=False)
    rng = random.Random(seed)
    seq = 0
    live: dict[str, list[str]] = {k: [] for k in keys}
    current: dict[str, tuple[str, int]] = {}  # key -> (version id, seq of its contents)
    puts = retired = 0

    def put(key: str) -> None:
        nonlocal seq, puts, retired
        seq += 1
        payload = json.dumps({name: content(nonce, seq, name) for name in FILES})
        info = store.put_sync(key, Secret(payload))
        current[key] = (info.id, seq)
        puts += 1
        live[key].append(info.id)
        while len(live[key]) > keep:
            store.retire_sync(key, live[key].pop(0))  # type: ignore[arg-type]
            retired += 1

    def say(message: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    for key in keys:
        put(key)
    say({"current": current})
    running = False
    pending = b""
    while True:
        # The gap between puts is the pacing of the rotations, and the wait for a command.
        timeout = rng.uniform(0.0, max_gap) if running else None
        ready, _, _ = select.select([0], [], [], timeout)
        if not ready:
            put(rng.choice(keys))
            continue
        chunk = os.read(0, 4096)
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        if not chunk:
            lines.append(b"stop")
        for line in lines:
            command = line.decode().strip()
            if command == "go":
                running = True
            elif command == "pause":
                running = False
                say({"current": current})
            elif command == "stop":
                say({"puts": puts, "retired": retired, "current": current})
                store.close()
                return


# ---------------------------------------------------------------- launcher


def launcher() -> None:
    # What `baton agent` imports on the way to serving, loaded once here.
    import daemon.agent.service
    import daemon.cli
    import daemon.report.metadata
    import daemon.stores.local

    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    say("ready")
    for line in sys.stdin:
        command, *args = line.split()
        if command == "start":
            config, cwd, log = args
            pid = os.fork()
            if pid == 0:  # the agent
                code = 1
                try:
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.dup2(devnull, 0)
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                    os.close(devnull)
                    os.close(out)
                    os.chdir(cwd)
                    daemon.cli.main(["agent", "--config", config])
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                finally:
                    os._exit(code)
            say(f"pid {pid}")
        elif command in ("poll", "wait"):
            pid = int(args[0])
            done, status = os.waitpid(pid, os.WNOHANG if command == "poll" else 0)
            say(f"status {os.waitstatus_to_exitcode(status)}" if done else "status -")


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "reader":
        reader(args[0], args[1], args[2:])
    elif role == "writer":
        db, nonce, seed, keep, max_gap, *keys = args
        writer(db, nonce, int(seed), int(keep), float(max_gap), keys)
    elif role == "launcher":
        launcher()
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
