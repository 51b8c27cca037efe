"""fanotify OpenWatcher with real processes that open a version's file and close it at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from daemon.errors import BatonError, FanotifyUnavailable
from daemon.usage import fanotify
from daemon.usage.fanotify import OpenWatcher
from tests.unit import test_usage_fdscan as fds
from tests.unit.test_usage_fdscan import Children, inode

# Shared fixtures, bound here so that pytest finds them in this module.
children = fds.children
versioned = fds.versioned

OK, WHY = OpenWatcher.available()
needs_fanotify = pytest.mark.skipif(not OK, reason=f"fanotify unavailable here: {WHY}")


@pytest.fixture
def watcher(versioned: Path) -> Iterator[OpenWatcher]:
    with OpenWatcher() as w:
        assert w.watch([versioned / "..v7-3f2a", versioned / "..v8-91c0"]) == []
        yield w


def own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@needs_fanotify
def test_a_process_that_read_and_closed_the_file_at_once_is_seen_with_that_version(
    versioned: Path,
    watcher: OpenWatcher,
    children: Children,
) -> None:
    peek = children("peek", versioned / "password")

    opened = watcher.opened()

    assert opened[peek.pid] == inode(versioned / "..v7-3f2a/password")
    # It holds no fd: only the open event tells us it uses v7.
    assert not any(
        os.stat(f"/proc/{peek.pid}/fd/{n}").st_ino == opened[peek.pid][1] for n in os.listdir(f"/proc/{peek.pid}/fd")
    )


@needs_fanotify
def test_the_last_opened_version_wins_and_unrelated_processes_do_not_appear(
    versioned: Path,
    watcher: OpenWatcher,
    children: Children,
    tmp_path: Path,
) -> None:
    peek = children("peek", versioned / "password")
    elsewhere = tmp_path / "not-watched"
    elsewhere.write_text("x")
    unrelated = children("peek", elsewhere)
    assert watcher.opened()[peek.pid] == inode(versioned / "..v7-3f2a/password")

    peek.open(versioned / "..v8-91c0/password")
    opened = watcher.opened()

    assert opened[peek.pid] == inode(versioned / "..v8-91c0/password")
    assert unrelated.pid not in opened


@needs_fanotify
def test_a_process_is_forgotten_once_it_exits(
    versioned: Path,
    watcher: OpenWatcher,
    children: Children,
) -> None:
    peek = children("peek", versioned / "password")
    assert peek.pid in watcher.opened()

    peek.stop()

    assert peek.pid not in watcher.opened()


@needs_fanotify
def test_opens_by_the_watching_process_itself_are_ignored(versioned: Path, watcher: OpenWatcher) -> None:
    (versioned / "password").read_text()
    assert os.getpid() not in watcher.opened()


@needs_fanotify
def test_watch_reports_missing_dirs_and_stops_watching_dirs_no_longer_listed(
    versioned: Path,
    watcher: OpenWatcher,
    children: Children,
) -> None:
    missing = versioned / "..v9-0000"
    assert watcher.watch([versioned / "..v8-91c0", missing]) == [str(missing)]

    seven = children("peek", versioned / "..v7-3f2a/password")
    eight = children("peek", versioned / "..v8-91c0/password")
    opened = watcher.opened()

    assert seven.pid not in opened
    assert opened[eight.pid] == inode(versioned / "..v8-91c0/password")


@needs_fanotify
def test_close_stops_the_reader_thread_and_closes_every_fd(versioned: Path) -> None:
    before = own_fds()
    w = OpenWatcher()
    w.watch([versioned / "..v7-3f2a"])
    assert any(t.name == "baton-fanotify" for t in threading.enumerate())
    (versioned / "password").read_text()

    w.close()
    w.close()

    assert own_fds() == before
    assert not any(t.name == "baton-fanotify" for t in threading.enumerate())
    with pytest.raises(FanotifyUnavailable):
        w.watch([versioned])


def test_without_cap_sys_admin_available_says_why_and_the_watcher_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanotify, "_has_cap_sys_admin", lambda: False)

    ok, why = OpenWatcher.available()

    assert not ok
    assert "CAP_SYS_ADMIN" in why
    with pytest.raises(FanotifyUnavailable, match="CAP_SYS_ADMIN") as err:
        OpenWatcher()
    assert isinstance(err.value, BatonError)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv(1)")
def test_a_process_really_lacking_cap_sys_admin_is_told_why() -> None:
    code = "from daemon.usage.fanotify import OpenWatcher; print(OpenWatcher.available())"
    out = subprocess.run(
        ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout

    assert out.startswith("(False, ") and "CAP_SYS_ADMIN" in out


def test_the_start_time_parser_survives_parentheses_and_spaces_in_the_command_name(
    children: Children,
) -> None:
    code = "open('/proc/self/comm', 'w').write('a) b (c d'); print('ready', flush=True); import sys; sys.stdin.read()"
    child = children("hold", argv=[sys.executable, "-c", code])
    assert Path(f"/proc/{child.pid}/comm").read_text() == "a) b (c d\n"

    start = fanotify._start_time(child.pid)

    assert start is not None
    ticks = os.sysconf("SC_CLK_TCK")
    assert abs(psutil.boot_time() + start / ticks - psutil.Process(child.pid).create_time()) < 1.0
    assert fanotify._start_time(2**22 + 7) is None
