"""fdscan against real child processes: symlinked versions, copy mode, other mount namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.usage import fdscan
from daemon.usage.fdscan import list_pids, pid_fds, scan_fds


@pytest.fixture(autouse=True, params=["c", "python"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs against both walks: the C extension and the pure Python one."""
    if request.param == "c" and fdscan._fdscan is None:
        pytest.skip("daemon.usage._fdscan is not built (no C compiler at install)")
    monkeypatch.setattr(fdscan, "NATIVE", request.param == "c")
    return str(request.param)


# A child that opens (and reads) each path, keeps it open ("hold") or closes it
# at once ("peek"), says "ready", then obeys "open <path>" lines until stdin closes.
CHILD = r"""
import sys
mode, *paths = sys.argv[1:]
held = []
def take(path):
    f = open(path, "rb")
    f.read()
    if mode == "hold":
        held.append(f)
    else:
        f.close()
for p in paths:
    take(p)
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    if cmd == "open":
        take(arg)
        print("ok", flush=True)
"""


class Child:
    """A real process that opens files on request; talks over pipes, no sleeps."""

    def __init__(self, mode: str, *paths: str, env: dict[str, str] | None = None, argv: list[str] | None = None):
        cmd = argv if argv is not None else [sys.executable, "-c", CHILD, mode, *paths]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != "ready\n":
            self.stop()
            raise RuntimeError(f"child did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def open(self, path: str | Path) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"open {path}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Children:
    def __init__(self) -> None:
        self.all: list[Child] = []

    def __call__(self, mode: str, *paths: str | Path, **kw: object) -> Child:
        child = Child(mode, *(str(p) for p in paths), **kw)  # type: ignore[arg-type]
        self.all.append(child)
        return child


@pytest.fixture
def children() -> Iterator[Children]:
    spawned = Children()
    yield spawned
    for child in spawned.all:
        child.stop()


def inode(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def make_version(root: Path, label: str, text: str) -> Path:
    d = root / f"..{label}"
    d.mkdir()
    (d / "password").write_text(text)
    return d / "password"


def swap_current(root: Path, label: str) -> None:
    """Point ..current at a version by rename() of a temp symlink, as the writer does."""
    tmp = root / "..current.tmp"
    tmp.symlink_to(f"..{label}")
    tmp.rename(root / "..current")


@pytest.fixture
def versioned(tmp_path: Path) -> Path:
    root = tmp_path / "db"
    root.mkdir()
    make_version(root, "v7-3f2a", "seven\n")
    make_version(root, "v8-91c0", "eight\n")
    swap_current(root, "v7-3f2a")
    (root / "password").symlink_to("..current/password")
    return root


def test_a_process_that_opened_the_stable_path_is_matched_to_the_version_behind_the_symlink(
    versioned: Path, children: Children
) -> None:
    old = children("hold", versioned / "password")
    swap_current(versioned, "v8-91c0")
    new = children("hold", versioned / "password")
    unrelated = children("hold", "/etc/hostname")
    index = {inode(versioned / "..v7-3f2a/password"): "v7", inode(versioned / "..v8-91c0/password"): "v8"}

    found = scan_fds(index)

    assert found == {old.pid: {"v7"}, new.pid: {"v8"}}
    assert unrelated.pid not in found


def test_a_process_holding_a_replaced_copy_mode_file_still_matches_the_old_version(
    tmp_path: Path, children: Children
) -> None:
    path = tmp_path / "password"
    path.write_text("one\n")
    v1 = inode(path)
    old = children("hold", path)
    tmp = tmp_path / ".password.tmp"
    tmp.write_text("two\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(path)  # the old inode is now deleted, but still open in `old`
    v2 = inode(path)
    new = children("hold", path)
    assert v1 != v2

    found = scan_fds({v1: "v1", v2: "v2"})

    assert found == {old.pid: {"v1"}, new.pid: {"v2"}}
    # What makes this case hard: by path the old file no longer exists.
    targets = [os.readlink(f"/proc/{old.pid}/fd/{n}") for n in os.listdir(f"/proc/{old.pid}/fd")]
    assert f"{path} (deleted)" in targets


def test_a_process_that_holds_two_versions_maps_to_both(versioned: Path, children: Children) -> None:
    both = children("hold", versioned / "..v7-3f2a/password", versioned / "..v8-91c0/password")
    index = {inode(versioned / "..v7-3f2a/password"): "v7", inode(versioned / "..v8-91c0/password"): "v8"}

    assert scan_fds(index) == {both.pid: {"v7", "v8"}}


def test_a_process_that_read_and_closed_the_file_is_not_an_fd_holder(versioned: Path, children: Children) -> None:
    peek = children("peek", versioned / "password")
    assert scan_fds({inode(versioned / "..v7-3f2a/password"): "v7"}) == {}
    assert pid_fds(peek.pid, {inode(versioned / "..v7-3f2a/password"): "v7"}) == set()


def test_given_pids_limit_the_scan_and_vanished_pids_are_ignored(versioned: Path, children: Children) -> None:
    a = children("hold", versioned / "password")
    b = children("hold", versioned / "password")
    gone = children("hold", versioned / "password")
    gone.stop()  # exited and reaped: its pid is stale now
    index = {inode(versioned / "..v7-3f2a/password"): "v7"}

    assert scan_fds(index, pids=[b.pid, gone.pid, 2**22 + 7]) == {b.pid: {"v7"}}
    assert set(scan_fds(index)) == {a.pid, b.pid}


def test_the_thread_pool_and_the_single_thread_scan_agree(versioned: Path, children: Children) -> None:
    holders = {children("hold", versioned / "password").pid for _ in range(3)}
    index = {inode(versioned / "..v7-3f2a/password"): "v7"}
    pids = list_pids()
    assert len(pids) >= 64  # enough to take the pooled path

    pooled = scan_fds(index, pids=pids, workers=2)
    single = scan_fds(index, pids=pids, workers=1)

    assert pooled == single == {pid: {"v7"} for pid in holders}


def test_an_empty_index_matches_nothing_without_scanning() -> None:
    assert scan_fds({}) == {}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_a_process_in_another_mount_namespace_matches_by_inode_not_path(
    versioned: Path, tmp_path: Path, children: Children
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Inside its own mount namespace the child sees the credential dir at a path
    # that does not exist for us; only (dev, ino) can tie its fd to the version.
    script = f'mount --bind "{versioned}" "{elsewhere}" && exec "$0" -c "$1" hold "{elsewhere}/password"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable, CHILD]
    try:
        child = children("hold", argv=argv)
    except RuntimeError as e:
        pytest.skip(f"cannot make a mount namespace here: {e}")
    assert not (elsewhere / "password").exists()
    assert os.readlink(f"/proc/{child.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

    found = scan_fds({inode(versioned / "..v7-3f2a/password"): "v7"})

    assert found == {child.pid: {"v7"}}


def test_the_c_walk_is_built_where_a_compiler_is() -> None:
    # The extension is optional at install; where cc exists a missing one means a broken build.
    if shutil.which("cc") is None:
        pytest.skip("no C compiler here: the pure Python walk is the one in use")
    assert fdscan._fdscan is not None


def test_the_c_walk_reports_each_pid_and_file_once_and_checks_the_device(
    versioned: Path, tmp_path: Path, children: Children, walk: str
) -> None:
    if walk != "c":
        pytest.skip("about the C walk's own matching")
    assert fdscan._fdscan is not None
    path = versioned / "..v7-3f2a/password"
    many = children("hold", path, path, path)  # three fds on one file
    dev, ino = inode(path)
    pairs = fdscan._fdscan.scan([many.pid, -1, 0], [(dev + 1, ino), (dev, ino)])
    assert pairs == [(many.pid, 1)]  # once, and not for the same inode number on another device
    with pytest.raises(TypeError):
        fdscan._fdscan.scan(["1"], [(dev, ino)])
    with pytest.raises(TypeError):
        fdscan._fdscan.scan([many.pid], [(dev,)])
