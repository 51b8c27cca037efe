"""The writer's promise, tested with real processes: a reader sees a complete old or new version, always.

Every version's content is distinct and self-checking (``v<N>:<padding>:<sha256 of the rest>``,
with a length that varies by version), so an empty, torn or mixed read is caught
by the reader process itself. The kill -9 part forks writer processes from a
forkserver (daemon.files.writer preloaded, so a start costs milliseconds, not an
interpreter start-up), SIGKILLs each at a random moment, then checks the stable
path and that a fresh ``Writer`` recovers the directory and writes again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.config import OutputConfig
from daemon.files.writer import CURRENT_LINK, Writer
from daemon.model import VersionId

FILES = ("password", "dsn")


def content(n: int, name: str = "password") -> bytes:
    """Distinct, self-checking content of version ``n``; lengths vary from 1 to ~40 KiB."""
    body = f"v{n}:{name}:" + "x" * ((n * 7919) % 40_000)
    return f"{body}:{hashlib.sha256(body.encode()).hexdigest()}".encode()


def check(data: bytes) -> int | None:
    """The version number of a complete content, None when it is not one."""
    body, sep, digest = data.decode(errors="replace").rpartition(":")
    if not sep or not body.startswith("v") or hashlib.sha256(body.encode()).hexdigest() != digest:
        return None
    return int(body[1:].split(":", 1)[0])


def files_of(n: int) -> dict[str, bytes]:
    return {name: content(n, name) for name in FILES}


def output(out: Path, layout: str) -> OutputConfig:
    return OutputConfig(dir=out, layout=layout, files=dict.fromkeys(FILES, "{{ value }}"))  # type: ignore[arg-type]


# ---------------------------------------------------------------- a reader process against 200 writes

READER = r"""
import hashlib, json, os, sys
path, stop = sys.argv[1], sys.argv[2]
reads, bad, seen = 0, [], set()
def check(data):
    body, sep, digest = data.decode(errors="replace").rpartition(":")
    if not sep or not body.startswith("v") or hashlib.sha256(body.encode()).hexdigest() != digest:
        return None
    return int(body[1:].split(":", 1)[0])
first = True
while True:
    with open(path, "rb") as f:
        data = f.read()
    n = check(data)
    reads += 1
    if n is None:
        bad.append(len(data))
    else:
        seen.add(n)
    if first:
        print("ready", flush=True)
        first = False
    if reads % 20 == 0 and os.path.exists(stop):
        break
print(json.dumps({"reads": reads, "bad": bad[:10], "bad_count": len(bad), "seen": len(seen)}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["symlink", "copy"])
def test_a_reader_process_sees_only_complete_versions_while_200_are_written(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "out"
    writer = Writer(output(out, layout))
    writer.write(VersionId("0"), files_of(0))
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(out / "password"), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready"

        for n in range(1, 201):
            assert writer.write(VersionId(str(n)), files_of(n)) is True

        stop.touch()
        out_text, err_text = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate()
    assert reader.returncode == 0, err_text
    summary = json.loads(out_text.strip().splitlines()[-1])
    assert summary["bad_count"] == 0, summary
    # The reader really overlapped the writes: it saw many versions, not one.
    assert summary["seen"] > 10, summary
    assert check((out / "password").read_bytes()) == 200


# ---------------------------------------------------------------- kill -9 at random points


def write_forever(out: str, layout: str, start: int) -> None:
    """Target of a writer process: recover, then write versions until killed."""
    writer = Writer(output(Path(out), layout))
    writer.recover()
    n = start
    while True:
        writer.write(VersionId(str(n)), files_of(n))
        n += 1


def _forkserver() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["daemon.files.writer", __name__])
    return ctx


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "kills"), [("symlink", 80), ("copy", 40)])
def test_a_writer_killed_at_random_points_leaves_a_complete_version_and_recovers(
    tmp_path: Path, layout: str, kills: int
) -> None:
    out = tmp_path / "out"
    first = Writer(output(out, layout))
    first.write(VersionId("0"), files_of(0))
    first.close()  # the writer processes each take the dir's lock
    ctx = _forkserver()
    rng = random.Random(20240601)
    started = time.monotonic()
    versions_seen: set[int] = set()

    for i in range(1, kills + 1):
        proc = ctx.Process(target=write_forever, args=(str(out), layout, i * 10_000), name=f"writer-{i}")
        proc.start()
        time.sleep(rng.uniform(0.0, 0.06))  # the random point of death
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL
        proc.close()

        for name in FILES:
            n = check((out / name).read_bytes())
            assert n is not None, f"kill {i}: {name} is not a complete version"
            versions_seen.add(n)

        fresh = Writer(output(out, layout))
        fresh.recover()
        assert not [e for e in os.listdir(out) if ".tmp-" in e], f"kill {i}: temp leftovers after recover()"
        if layout == "symlink":  # a dir renamed in but never recorded is swept: no orphan keeps a secret
            named = {d.dirname for d in fresh.versions()} | {os.readlink(out / CURRENT_LINK)}
            assert {e for e in os.listdir(out) if e.startswith("..v")} <= named, f"kill {i}: orphaned version dirs"
        n = i * 10_000 + 9_999
        assert fresh.write(VersionId(str(n)), files_of(n)) is True
        assert check((out / "password").read_bytes()) == n
        assert fresh.current() == str(n)
        if layout == "symlink":
            assert os.readlink(out / CURRENT_LINK).startswith(f"..v{n}-")
        fresh.close()

    # The kills landed while writes were in flight, not only before the first one.
    assert len(versions_seen - {0}) > kills // 2
    assert time.monotonic() - started < 30
