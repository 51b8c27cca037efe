"""The writer against a hostile local user and a hostile directory (issue 10, the output-dir half).

We run as root; the hostile user is ``nobody`` (uid 65534), acting through
``setpriv`` so that what it plants is really owned by it and limited by its
rights. Each test is one finding: the attack as it was reproduced on main,
then what must hold now: nothing outside the output dir is touched, the last
good version stays readable, and the writer says why it refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.agent.service import Agent
from daemon.config import OutputConfig, parse_config
from daemon.errors import WriteError
from daemon.files.writer import CURRENT_LINK, LOCK, STATE, Writer, content_digest
from daemon.model import Secret, VersionId
from daemon.stores.local import LocalStore
from tests.helpers import everything_logged, running_agent, until

pytestmark = pytest.mark.hostile

NOBODY = 65534
HOSTILE = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
V1 = {"password": b"hostile-test-secret-one"}
V2 = {"password": b"hostile-test-secret-two"}
V3 = {"password": b"hostile-test-secret-three"}
SECRETS = [b"hostile-test-secret-one", b"hostile-test-secret-two", b"hostile-test-secret-three"]


def as_nobody(script: str, *args: str) -> None:
    """Run a Python snippet as the hostile user; it fails the test if the snippet fails."""
    subprocess.run([*HOSTILE, sys.executable, "-c", textwrap.dedent(script), *args], check=True, timeout=30)


def output(out: Path, **kw: Any) -> OutputConfig:
    return OutputConfig(dir=out, files={"password": "{{ value }}"}, **kw)


def vdir(version: str, files: dict[str, bytes]) -> str:
    return f"..v{version}-{content_digest(files)[:8]}"


def bytes_under(root: Path) -> bytes:
    """Every regular file's content under ``root``, not following symlinks."""
    out = b""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out += p.read_bytes()
    return out


@pytest.fixture
def tree() -> Iterator[Path]:
    # Not under tmp_path: pytest's base dir is 0700, and nobody must reach the tree to plant anything.
    root = Path(tempfile.mkdtemp(prefix="baton-hostile-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        if os.path.ismount(root / "small"):
            subprocess.run(["umount", str(root / "small")], check=False)
        shutil.rmtree(root)


@pytest.fixture
def victim(tree: Path) -> Path:
    victim = tree / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "data").write_text("precious")
    victim.chmod(0o777)
    return victim


def victim_intact(victim: Path) -> bool:
    return (victim / "keep" / "data").read_text() == "precious" and sorted(os.listdir(victim)) == ["keep"]


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


# ---------------------------------------------------------------- finding 2: a planted state file


@pytest.mark.parametrize("dirname", ["..vzz/keep", "..vzz-deadbeef", "..v1/../../victim/keep"])
def test_a_state_file_planted_by_another_user_never_makes_the_writer_delete_outside_its_dir(
    tree: Path, victim: Path, dirname: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = tree / "out"
    w = Writer(output(out))
    w.write(VersionId("1"), V1)
    w.write(VersionId("2"), V2)
    w.close()
    # Made shared for a while (an operator's mistake): nobody plants a symlink
    # with a version dir's name and a state file naming it.
    out.chmod(0o777)
    as_nobody(
        """
        import json, os, sys
        out, victim, dirname = sys.argv[1:]
        for link in ("..vzz", "..vzz-deadbeef"):
            os.symlink(victim, os.path.join(out, link))
        state = {"current": "2", "versions": {"zz": {"dir": dirname, "inodes": [], "digest": "", "swapped_in": 1}}}
        tmp = os.path.join(out, "planted")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.chmod(tmp, 0o600)
        os.rename(tmp, os.path.join(out, "..baton-state.json"))
        """,
        str(out),
        str(victim),
        dirname,
    )
    out.chmod(0o750)  # tightened again, with the planted entries left in it
    assert os.stat(out / STATE).st_uid == NOBODY

    caplog.set_level(logging.INFO, logger="daemon.files.writer")
    w = Writer(output(out))
    assert {v.version for v in w.versions()} == {"1", "2"}, "the planted state is ignored, rebuilt from content"
    w.remove("zz")
    w.remove("1")
    w.recover()

    assert victim_intact(victim)
    assert (out / "password").read_bytes() == V2["password"]
    reasons = [r.__dict__["reason"] for r in events(caplog, "state_ignored")]
    assert reasons and "uid 65534" in reasons[0]
    w.close()


def test_a_state_file_of_baton_naming_a_path_outside_is_ignored_for_its_shape(
    tree: Path, victim: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tree / "out"
    w = Writer(output(out))
    w.write(VersionId("1"), V1)
    w.close()
    os.symlink(victim, out / "..vzz")
    good = json.loads((out / STATE).read_text())
    good["versions"]["zz"] = {"dir": "..vzz/keep", "inodes": [], "digest": "", "swapped_in": 0}
    (out / STATE).write_text(json.dumps(good))  # Baton's own file (root, 0600), wrong shape

    caplog.set_level(logging.INFO, logger="daemon.files.writer")
    w = Writer(output(out))
    w.remove("zz")

    assert victim_intact(victim)
    assert [r.__dict__["reason"] for r in events(caplog, "state_ignored")] == ["bad shape: versions.zz.dir"]
    assert [v.version for v in w.versions()] == ["1"]
    w.close()


# ---------------------------------------------------------------- finding 3: a shared dir is not chmodded


def test_an_existing_shared_dir_is_refused_and_left_as_it_is(tree: Path) -> None:
    out = tree / "shared"
    out.mkdir()
    out.chmod(0o1777)
    as_nobody("import sys; open(sys.argv[1] + '/theirs', 'w').write('x')", str(out))

    with pytest.raises(WriteError, match=r"group- or world-writable \(mode 1777\)"):
        Writer(output(out)).write(VersionId("1"), V1)

    assert stat.S_IMODE(os.stat(out).st_mode) == 0o1777
    assert os.listdir(out) == ["theirs"]


def test_an_existing_dir_not_made_by_baton_with_foreign_entries_is_refused(tree: Path) -> None:
    out = tree / "out"
    out.mkdir()
    out.chmod(0o777)
    as_nobody("import os, sys; os.mkdir(sys.argv[1] + '/..vzz-deadbeef')", str(out))
    out.chmod(0o750)

    with pytest.raises(WriteError, match="not made by Baton"):
        Writer(output(out)).write(VersionId("1"), V1)

    assert os.listdir(out) == ["..vzz-deadbeef"]


def test_a_dir_baton_made_and_someone_loosened_is_refused_and_the_last_good_files_stay(tree: Path) -> None:
    out = tree / "out"
    w = Writer(output(out))
    w.write(VersionId("1"), V1)
    out.chmod(0o777)

    with pytest.raises(WriteError, match="world-writable"):
        w.write(VersionId("2"), V2)

    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777
    assert (out / "password").read_bytes() == V1["password"]
    out.chmod(0o750)
    assert w.write(VersionId("2"), V2) is True
    w.close()


# ---------------------------------------------------------------- finding 6: one agent per dir, orphans swept

HOLDER = """
import sys
from pathlib import Path
from daemon.config import OutputConfig
from daemon.model import VersionId
from daemon.files.writer import Writer
w = Writer(OutputConfig(dir=Path(sys.argv[1]), files={"password": "{{ value }}"}))
w.write(VersionId("9"), {"password": b"held-by-the-first-agent"})
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_second_agent_on_the_same_output_dir_is_refused_while_the_first_runs(tree: Path) -> None:
    out = tree / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "holding"
        second = Writer(output(out))

        with pytest.raises(WriteError, match="in use by another Baton process") as e:
            second.write(VersionId("1"), V1)
        second.recover()  # refused quietly: the write says why

        assert "held-by" not in str(e.value)
        assert (out / "password").read_bytes() == b"held-by-the-first-agent"
        held = {"password": b"held-by-the-first-agent"}
        assert sorted(n for n in os.listdir(out) if n.startswith("..v")) == [vdir("9", held)]
    finally:
        first.communicate("", timeout=10)
    assert second.write(VersionId("1"), V1) is True  # the first is gone: its lock went with it
    second.close()


def agent_config(tree: Path, name: str, **output: Any) -> Any:
    return parse_config(
        {
            "node_id": name,
            "store": {"kind": "local", "path": str(tree / "store.db")},
            "api": {"listen": f"unix:{tree / (name + '.sock')}"},
            "report": {"heartbeat": 0.2},
            "agent": {"scan_interval": 0.1, "fanotify": "off", "retry_min": 0.05, "retry_max": 0.2},
            "credentials": [
                {"name": "db", "key": "k", "required": False, "output": {"dir": str(tree / "out"), **output}}
            ],
        }
    )


async def test_two_agents_on_one_output_dir_the_second_is_refused_with_a_clear_error_and_writes_nothing(
    tree: Path,
) -> None:
    values = [f"hostile-test-secret-agents-{n}" for n in range(1, 21)]
    store = LocalStore(tree / "store.db", watch_files=False)
    store.put_sync("k", Secret(values[0]))
    out = tree / "out"
    try:
        async with running_agent(Agent(agent_config(tree, "a"), install_signals=False)) as first:
            await until(lambda: first.credentials["db"].written, timeout=10, what="the first agent's write")
            async with running_agent(Agent(agent_config(tree, "b"), install_signals=False)) as second:
                theirs = second.credentials["db"]
                await until(lambda: theirs.last_error, timeout=10, what="the second agent's error")
                for n in range(2, 21):  # on main the two raced: a version dir per write each
                    store.put_sync("k", Secret(values[n - 1]))
                    await until(lambda n=n: first.credentials["db"].version == str(n), timeout=10, what=f"v{n}")

                assert "in use by another Baton process" in str(theirs.last_error)
                assert theirs.written is False
                assert second.status()["credentials"]["db"]["last_error"] == theirs.last_error
                assert not any(v in str(second.status()) for v in values)
            await until(lambda: len(version_dirs(out)) <= 2, timeout=10, what="superseded versions removed")
            assert (out / "value").read_text() == values[-1]
    finally:
        store.close()


def test_version_dirs_orphaned_by_a_crash_are_swept_at_start_and_after_each_write(tree: Path) -> None:
    out = tree / "out"
    w = Writer(output(out))
    w.write(VersionId("1"), V1)
    w.close()
    # A kill -9 between the rename of a complete dir and the state save leaves
    # it named by nothing: no state entry, ..current still on version 1.
    orphan = out / vdir("2", V2)
    orphan.mkdir(mode=0o750)
    (orphan / "password").write_bytes(V2["password"])
    (out / "..v.tmp-0123456789ab").mkdir()
    (out / "..v.tmp-0123456789ab" / "password").write_bytes(V3["password"])

    w = Writer(output(out))
    w.recover()

    assert sorted(os.listdir(out)) == sorted([vdir("1", V1), CURRENT_LINK, LOCK, STATE, "password"])
    assert V2["password"] not in bytes_under(out) and V3["password"] not in bytes_under(out)

    orphan.mkdir(mode=0o750)  # the same leftover, while the writer runs
    (orphan / "password").write_bytes(V2["password"])
    w.write(VersionId("3"), V3)

    assert not orphan.exists()
    assert (out / "password").read_bytes() == V3["password"]
    w.close()


# ---------------------------------------------------------------- finding 7: malformed state and planted files

REBUILD = """
import sys
from pathlib import Path
from daemon.config import OutputConfig
from daemon.files.writer import Writer
w = Writer(OutputConfig(dir=Path(sys.argv[1]), files={"password": "{{ value }}"}))
print(w.current(), sorted(v.version for v in w.versions()), flush=True)
"""


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"[]", "bad shape: not an object"),
        (b'{"current": "1", "versions": {"1": {"dir": "..v1-00000000"}}}', "bad shape: versions.1.inodes"),
        (b'{"current": 1, "versions": {}}', "bad shape: current"),
        (b'{"current": null, "versions": []}', "bad shape: versions"),
        (b"\xff\xfe not json", "not JSON"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_a_malformed_state_file_is_ignored_with_a_reason_and_the_version_is_found_again(
    tree: Path, doc: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = tree / "out"
    Writer(output(out)).write(VersionId("1"), V1)
    (out / STATE).write_bytes(doc)

    caplog.set_level(logging.INFO, logger="daemon.files.writer")
    w = Writer(output(out))

    assert w.current() == "1"
    assert [v.version for v in w.versions()] == ["1"]
    assert w.write(VersionId("2"), V2) is True
    assert [r.__dict__["reason"] for r in events(caplog, "state_ignored")] == [reason]
    w.close()


def test_fifos_devices_and_symlinks_planted_as_version_files_do_not_block_the_rebuild(tree: Path) -> None:
    out = tree / "out"
    w = Writer(output(out))
    w.write(VersionId("1"), V1)
    w.write(VersionId("2"), V2)
    w.close()
    old = out / vdir("1", V1)
    (old / "password").unlink()
    os.mkfifo(old / "password")
    for name, make in {
        "..vfifo-00000000": lambda p: os.mkfifo(p),
        "..vzero-00000000": lambda p: os.symlink("/dev/zero", p),
        "..vchar-00000000": lambda p: os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5)),  # /dev/zero itself
    }.items():
        (out / name).mkdir()
        make(out / name / "password")
    (out / "..vhuge-00000000").mkdir()
    with open(out / "..vhuge-00000000" / "password", "wb") as f:
        f.truncate(1 << 34)  # sparse: 16 GiB to read, none on disk
    (out / STATE).unlink()

    done = subprocess.run([sys.executable, "-c", REBUILD, str(out)], capture_output=True, text=True, timeout=30)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2 ['2']"
    assert (out / "password").read_bytes() == V2["password"]


# ---------------------------------------------------------------- finding 8: symlinks above the output dir


def test_a_symlink_in_a_parent_of_the_output_dir_is_not_followed(tree: Path) -> None:
    elsewhere = tree / "elsewhere"
    elsewhere.mkdir()
    base = tree / "base"
    base.mkdir()
    base.chmod(0o777)
    as_nobody("import os, sys; os.symlink(sys.argv[1], sys.argv[2] + '/link')", str(elsewhere), str(base))

    with pytest.raises(WriteError, match=r"symlink at .*/base/link"):
        Writer(output(base / "link" / "db")).write(VersionId("1"), V1)

    assert os.listdir(elsewhere) == []


def test_a_parent_owned_by_another_user_is_refused(tree: Path) -> None:
    theirs = tree / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)

    with pytest.raises(WriteError, match="owned by uid 65534"):
        Writer(output(theirs / "db")).write(VersionId("1"), V1)

    assert os.listdir(theirs) == []


# ---------------------------------------------------------------- finding 9: disk full


@pytest.fixture
def small_fs(tree: Path) -> Iterator[Path]:
    mnt = tree / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)], check=True)
    yield mnt  # unmounted by the tree fixture


def test_a_full_disk_leaves_no_temp_dir_behind_however_often_it_is_retried(small_fs: Path) -> None:
    out = small_fs / "out"
    w = Writer(output(out))
    w.write(VersionId("1"), V1)
    big = {"password": b"x" * 200_000}

    for _ in range(5):
        with pytest.raises(WriteError, match="No space left"):
            w.write(VersionId("2"), big)
        assert [n for n in os.listdir(out) if ".tmp-" in n] == []

    assert (out / "password").read_bytes() == V1["password"]
    assert w.current() == "1"
    w.close()


# ---------------------------------------------------------------- finding 11: superseded versions leave the disk

HOLD_OPEN = """
import sys
f = open(sys.argv[1])           # holds version 1 by an open fd
print("holding", flush=True)
sys.stdin.read()
"""


def version_dirs(out: Path) -> set[str]:
    return {n for n in os.listdir(out) if n.startswith("..v")}


@pytest.mark.parametrize("keep", [1, 0])
async def test_superseded_versions_an_operator_put_leave_the_disk_once_nothing_holds_them(
    tree: Path, keep: int, caplog: pytest.LogCaptureFixture
) -> None:
    values = [f"hostile-test-secret-put-{n}" for n in range(1, 5)]
    store = LocalStore(tree / "store.db", watch_files=False)
    store.put_sync("k", Secret(values[0]))
    out = tree / "out"
    config = parse_config(
        {
            "node_id": "n1",
            "store": {"kind": "local", "path": str(tree / "store.db")},
            "api": {"listen": f"unix:{tree / 'api.sock'}"},
            "report": {"heartbeat": 0.2},
            "agent": {"scan_interval": 0.1, "fanotify": "off"},
            "credentials": [{"name": "db", "key": "k", "output": {"dir": str(out), "keep_previous": keep}}],
        }
    )
    holder = None
    try:
        async with running_agent(Agent(config, install_signals=False)) as agent:
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLD_OPEN, str(out / "value")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
            for n in (2, 3, 4):  # no rotator: nothing in the store is ever retired
                store.put_sync("k", Secret(values[n - 1]))
                await until(lambda n=n: agent.credentials["db"].version == str(n), timeout=10, what=f"version {n}")

            # Version 2 (and 3 when none is kept): superseded, held by nobody, older than
            # the kept ones: removed. Version 1 stays while a process holds it, however old.
            def gone(*labels: str) -> bool:
                return not any(d.startswith(labels) for d in version_dirs(out))

            await until(lambda: gone("..v2-") and (keep == 1 or gone("..v3-")), timeout=10, what="v2 (v3) gone")
            dirs = version_dirs(out)
            assert any(d.startswith("..v1-") for d in dirs)
            assert any(d.startswith("..v3-") for d in dirs) is (keep == 1)
            assert values[1].encode() not in bytes_under(out)

            holder.stdin.close()  # type: ignore[union-attr]
            holder.wait(5)
            await until(lambda: gone("..v1-"), timeout=10, what="v1 gone")
            assert {d.split("-")[0] for d in version_dirs(out)} == ({"..v3", "..v4"} if keep else {"..v4"})
            assert (out / "value").read_text() == values[3]
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder is not None:
            for pipe in (holder.stdin, holder.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        store.close()
    assert not any(v in everything_logged(caplog) for v in values)
