"""The combined usage scan: fd holders, environment holders and open events, in one result."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.usage.environ import fingerprint
from daemon.usage.fanotify import OpenWatcher
from daemon.usage.scan import Sighting, VersionFiles, scan
from tests.unit import test_usage_fdscan as fds
from tests.unit.test_usage_fdscan import Children, inode, swap_current

# Shared fixtures, bound here so that pytest finds them in this module.
children = fds.children
versioned = fds.versioned

KEY = b"agent-key-for-tests"
SECRET_7 = "s3cret-seven-DO-NOT-LEAK"
SECRET_8 = "s3cret-eight-DO-NOT-LEAK"
OK, WHY = OpenWatcher.available()


def versions_of(root: Path) -> list[VersionFiles]:
    return [
        VersionFiles(
            credential="db",
            version="7",
            inodes=(inode(root / "..v7-3f2a/password"),),
            fingerprints=(fingerprint(KEY, "DB_PASSWORD", SECRET_7),),
        ),
        VersionFiles(
            credential="db",
            version="8",
            inodes=(inode(root / "..v8-91c0/password"),),
            fingerprints=(fingerprint(KEY, "DB_PASSWORD", SECRET_8),),
        ),
    ]


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DB_PASSWORD"}
    env.update(extra)
    return env


def triples(sightings: list[Sighting]) -> set[tuple[int, str, str]]:
    return {(s.pid, s.version, s.how) for s in sightings}


@pytest.fixture
def watcher(versioned: Path) -> Iterator[OpenWatcher | None]:
    if not OK:
        yield None
        return
    with OpenWatcher() as w:
        w.watch([versioned / "..v7-3f2a", versioned / "..v8-91c0"])
        yield w


def test_every_holder_is_attributed_to_its_version_by_the_right_means(
    versioned: Path,
    children: Children,
    watcher: OpenWatcher | None,
    tmp_path: Path,
) -> None:
    fd7 = children("hold", versioned / "password")
    env8 = children("hold", env=env_with(DB_PASSWORD=SECRET_8))
    peek7 = children("peek", versioned / "password")
    swap_current(versioned, "v8-91c0")
    fd8 = children("hold", versioned / "password")
    (tmp_path / "other").write_text("x")
    unrelated = children("hold", tmp_path / "other", env=env_with(DB_PASSWORD="not-a-version"))

    found = scan(versions_of(versioned), env_key=KEY, env_names={"DB_PASSWORD"}, opens=watcher)

    expected = {(fd7.pid, "7", "fd"), (env8.pid, "8", "environ"), (fd8.pid, "8", "fd")}
    if watcher is not None:
        # fd holders opened under a watched dir too; the peeker is seen only this way.
        expected |= {(fd7.pid, "7", "fanotify"), (peek7.pid, "7", "fanotify"), (fd8.pid, "8", "fanotify")}
    assert triples(found) == expected
    assert unrelated.pid not in {s.pid for s in found}
    assert all(s.credential == "db" for s in found)
    assert {s.exe for s in found} == {os.path.realpath(sys.executable)}
    assert found == sorted(found, key=lambda s: (s.credential, s.version, s.pid, s.how))


@pytest.mark.skipif(not OK, reason=f"fanotify unavailable here: {WHY}")
def test_a_process_that_read_the_file_and_closed_it_is_still_a_holder_while_it_lives(
    versioned: Path,
    children: Children,
    watcher: OpenWatcher | None,
) -> None:
    peek = children("peek", versioned / "password")
    before = scan(versions_of(versioned), env_key=KEY, env_names=(), opens=watcher)
    without = scan(versions_of(versioned), env_key=KEY, env_names=(), opens=None)
    peek.stop()
    after = scan(versions_of(versioned), env_key=KEY, env_names=(), opens=watcher)

    assert triples(before) == {(peek.pid, "7", "fanotify")}
    assert without == []
    assert after == []


def test_baton_itself_and_excluded_pids_never_appear(
    versioned: Path,
    children: Children,
    watcher: OpenWatcher | None,
) -> None:
    other = children("hold", versioned / "password")
    kept = children("hold", versioned / "password")
    with open(versioned / "password", "rb"):
        found = scan(versions_of(versioned), env_key=KEY, env_names=(), opens=watcher, exclude_pids=[other.pid])

    pids = {s.pid for s in found}
    assert kept.pid in pids
    assert os.getpid() not in pids and other.pid not in pids


async def test_the_scan_runs_in_a_thread_from_the_event_loop(
    versioned: Path,
    children: Children,
) -> None:
    holder = children("hold", versioned / "password")

    found = await asyncio.to_thread(scan, versions_of(versioned), env_key=KEY, env_names=("DB_PASSWORD",))

    assert triples(found) == {(holder.pid, "7", "fd")}


def test_no_secret_value_appears_in_sightings_or_logs(
    versioned: Path,
    children: Children,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    holder = children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    dup = VersionFiles(credential="db", version="7b", inodes=versions_of(versioned)[0].inodes)

    found = scan([*versions_of(versioned), dup], env_key=KEY, env_names={"DB_PASSWORD"})

    assert triples(found) == {(holder.pid, "7", "environ")}
    assert "recorded for both" in caplog.text  # the duplicate inode was logged...
    text = repr(found) + caplog.text + repr(versions_of(versioned))
    assert SECRET_7 not in text and SECRET_8 not in text  # ...without any value


def test_nothing_to_look_for_finds_nothing(children: Children) -> None:
    children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    assert scan([], env_key=KEY, env_names={"DB_PASSWORD"}) == []
