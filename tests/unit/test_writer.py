"""daemon.files.writer on real directories: the versioned layout, modes, refusals, removal, recovery.

The tests run as root (the machine's test user), which is what lets them
plant a directory owned by ``nobody`` and check that the writer refuses it.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path
from typing import Any

import pytest

from daemon.config import OutputConfig
from daemon.errors import WriteError
from daemon.files.writer import CURRENT_LINK, LOCK, STATE, Writer, content_digest
from daemon.model import VersionId

V1 = {"password": b"first-password", "dsn": b"postgresql://app:first-password@db/app"}
V2 = {"password": b"second-password", "dsn": b"postgresql://app:second-password@db/app"}


def _writer(out: Path, **output: Any) -> Writer:
    return Writer(OutputConfig(dir=out, files=dict.fromkeys(V1, "{{ value }}"), **output))


def _vdirs(out: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(out) if e.name.startswith("..v"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out" / "app-db"


# ---------------------------------------------------------------- symlink layout


def test_the_first_write_lays_out_a_version_dir_the_current_link_and_stable_links(out: Path) -> None:
    writer = _writer(out)

    assert writer.write(VersionId("1"), V1) is True

    digest = content_digest(V1)
    assert _vdirs(out) == [f"..v1-{digest[:8]}"]
    assert os.readlink(out / CURRENT_LINK) == f"..v1-{digest[:8]}"
    for name, data in V1.items():
        assert os.readlink(out / name) == f"{CURRENT_LINK}/{name}"
        assert (out / name).read_bytes() == data
    assert writer.current() == "1"


def test_a_new_version_swaps_the_current_link_and_keeps_the_old_dir(out: Path) -> None:
    writer = _writer(out)
    writer.write(VersionId("1"), V1)
    stable_before = os.lstat(out / "password").st_ino

    assert writer.write(VersionId("2"), V2) is True

    assert len(_vdirs(out)) == 2
    assert os.readlink(out / CURRENT_LINK).startswith("..v2-")
    assert (out / "password").read_bytes() == V2["password"]
    # The stable symlink itself is not replaced: only ..current moves.
    assert os.lstat(out / "password").st_ino == stable_before
    assert [v.version for v in writer.versions()] == ["1", "2"]


def test_file_mode_defaults_to_0400_and_directories_are_0750_or_stricter(out: Path) -> None:
    _writer(out).write(VersionId("1"), V1)

    (vdir,) = _vdirs(out)
    assert _mode(out / vdir / "password") == 0o400
    assert _mode(out / vdir / "dsn") == 0o400
    assert _mode(out / vdir) & 0o027 == 0
    assert _mode(out) & 0o027 == 0


def test_the_configured_file_mode_and_group_are_applied(out: Path) -> None:
    nogroup = pwd.getpwnam("nobody").pw_gid
    _writer(out, mode="0440", group=nogroup).write(VersionId("1"), V1)

    (vdir,) = _vdirs(out)
    st = os.stat(out / vdir / "password")
    assert stat.S_IMODE(st.st_mode) == 0o440
    assert st.st_gid == nogroup
    assert os.stat(out / vdir).st_gid == nogroup


def test_a_loose_existing_output_dir_is_refused_and_never_chmodded(out: Path) -> None:
    out.mkdir(parents=True)
    out.chmod(0o777)

    with pytest.raises(WriteError, match="world-writable"):
        _writer(out).write(VersionId("1"), V1)

    assert _mode(out) == 0o777
    assert list(out.iterdir()) == []


def test_an_existing_empty_dir_that_fits_is_used_as_it_is(out: Path) -> None:
    out.mkdir(parents=True)
    out.chmod(0o755)

    assert _writer(out).write(VersionId("1"), V1) is True

    assert _mode(out) == 0o755
    assert (out / "password").read_bytes() == V1["password"]


def test_a_second_writer_on_the_same_dir_is_refused_until_the_first_is_closed(out: Path) -> None:
    first = _writer(out)
    first.write(VersionId("1"), V1)
    second = _writer(out)

    with pytest.raises(WriteError, match="in use by another Baton process"):
        second.write(VersionId("2"), V2)
    assert second.versions() == [] and second.current() is None  # the reading side never raises

    first.close()
    assert second.write(VersionId("2"), V2) is True
    assert second.current() == "2"
    with pytest.raises(WriteError, match="closed"):
        first.write(VersionId("3"), V1)


def test_identical_content_is_not_rewritten(out: Path) -> None:
    writer = _writer(out)
    writer.write(VersionId("1"), V1)
    inode = os.stat(out / "password").st_ino
    dirs = _vdirs(out)

    assert writer.write(VersionId("1"), V1) is False
    assert writer.write(VersionId("7"), dict(V1)) is False

    assert os.stat(out / "password").st_ino == inode
    assert _vdirs(out) == dirs
    # Same content under a new id is a relabel: the agent reports the new id.
    assert writer.current() == "7"
    assert [v.version for v in writer.versions()] == ["7"]


def test_a_new_writer_on_the_dir_knows_the_current_version_and_the_inodes(out: Path) -> None:
    _writer(out).write(VersionId("1"), V1)
    _writer(out).write(VersionId("2"), V2)

    writer = _writer(out)

    assert writer.current() == "2"
    by_version = {v.version: v for v in writer.versions()}
    assert set(by_version) == {"1", "2"}
    real = os.stat(out / "password")
    assert (real.st_dev, real.st_ino) in by_version["2"].inodes
    assert by_version["2"].digest == content_digest(V2)
    assert by_version["2"].dirname == os.readlink(out / CURRENT_LINK)


def test_a_lost_state_file_is_rebuilt_from_the_directory(out: Path) -> None:
    _writer(out).write(VersionId("1"), V1)
    _writer(out).write(VersionId("2"), V2)
    (out / STATE).write_text("{not json")

    writer = _writer(out)

    assert writer.current() == "2"
    assert {v.version for v in writer.versions()} == {"1", "2"}
    # And it can write on.
    assert writer.write(VersionId("3"), {"password": b"third", "dsn": b"dsn3"}) is True
    assert (out / "password").read_bytes() == b"third"


def test_the_state_file_holds_no_secret_value(out: Path) -> None:
    _writer(out).write(VersionId("1"), V1)

    text = (out / STATE).read_text()

    assert b"first-password" not in text.encode()
    assert json.loads(text)["current"] == "1"


# ---------------------------------------------------------------- copy layout


def test_copy_layout_writes_plain_files_and_records_their_inodes(out: Path) -> None:
    writer = _writer(out, layout="copy")
    writer.write(VersionId("1"), V1)

    assert not (out / "password").is_symlink()
    assert (out / "password").read_bytes() == V1["password"]
    assert _mode(out / "password") == 0o400
    assert _vdirs(out) == []
    first = os.stat(out / "password")

    assert writer.write(VersionId("2"), V2) is True

    second = os.stat(out / "password")
    assert (out / "password").read_bytes() == V2["password"]
    assert second.st_ino != first.st_ino
    inodes = {v.version: v.inodes for v in writer.versions()}
    assert (first.st_dev, first.st_ino) in inodes["1"]
    assert (second.st_dev, second.st_ino) in inodes["2"]


def test_copy_layout_does_not_rewrite_identical_content(out: Path) -> None:
    writer = _writer(out, layout="copy")
    writer.write(VersionId("1"), V1)
    inode = os.stat(out / "password").st_ino

    assert writer.write(VersionId("1"), V1) is False
    assert os.stat(out / "password").st_ino == inode


# ---------------------------------------------------------------- refusals


def test_a_symlink_planted_at_the_output_dir_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.symlink_to(elsewhere)

    with pytest.raises(WriteError, match="symlink"):
        _writer(out).write(VersionId("1"), V1)

    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("layout", ["symlink", "copy"])
def test_a_symlink_planted_at_a_file_path_is_refused(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o750)
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (out / "password").symlink_to(victim)

    with pytest.raises(WriteError, match="symlink"):
        _writer(out, layout=layout).write(VersionId("1"), V1)

    assert victim.read_text() == "untouched"
    assert os.readlink(out / "password") == str(victim)


def test_a_directory_at_a_file_path_is_refused(out: Path) -> None:
    (out / "password").mkdir(parents=True)

    with pytest.raises(WriteError, match="not a regular file"):
        _writer(out, layout="copy").write(VersionId("1"), V1)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "..hidden", "nul\0byte"])
def test_file_names_that_could_escape_the_dir_are_refused(out: Path, name: str) -> None:
    with pytest.raises(WriteError, match="file name"):
        _writer(out).write(VersionId("1"), {name: b"x"})

    assert not (out.parent / "x").exists()


def test_a_dir_owned_by_another_non_root_user_is_refused(out: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a directory to nobody")
    nobody = pwd.getpwnam("nobody")
    out.mkdir(parents=True, mode=0o750)
    os.chown(out, nobody.pw_uid, nobody.pw_gid)

    with pytest.raises(WriteError, match="owned by another user"):
        _writer(out).write(VersionId("1"), V1)

    assert list(out.iterdir()) == []


def test_an_unknown_owner_is_refused_at_construction(out: Path) -> None:
    with pytest.raises(WriteError, match="unknown owner or group"):
        _writer(out, owner="no-such-user-baton")


# ---------------------------------------------------------------- removal and recovery


def test_old_version_dirs_stay_until_removed(out: Path) -> None:
    writer = _writer(out)
    writer.write(VersionId("1"), V1)
    writer.write(VersionId("2"), V2)
    writer.write(VersionId("3"), {"password": b"third", "dsn": b"dsn3"})
    assert len(_vdirs(out)) == 3

    writer.remove("1")
    writer.close()

    assert len(_vdirs(out)) == 2
    assert not any(d.startswith("..v1-") for d in _vdirs(out))
    assert [v.version for v in _writer(out).versions()] == ["2", "3"]
    assert (out / "password").read_bytes() == b"third"


def test_removing_the_current_version_is_refused(out: Path) -> None:
    writer = _writer(out)
    writer.write(VersionId("1"), V1)

    with pytest.raises(WriteError, match="current"):
        writer.remove("1")

    assert (out / "password").read_bytes() == V1["password"]
    assert len(_vdirs(out)) == 1


def test_removing_an_unknown_version_is_a_no_op(out: Path) -> None:
    writer = _writer(out)
    writer.write(VersionId("1"), V1)

    writer.remove("99")

    assert [v.version for v in writer.versions()] == ["1"]


def test_recover_cleans_temp_leftovers_and_keeps_the_versions(out: Path) -> None:
    writer = _writer(out)
    writer.write(VersionId("1"), V1)
    # What a kill -9 leaves at each step: a half-filled temp dir, a temp
    # symlink, a temp copy file, a temp state file.
    (out / "..v.tmp-0123456789ab").mkdir()
    (out / "..v.tmp-0123456789ab" / "password").write_bytes(b"half")
    os.symlink("..v1-xxxx", out / "..current.tmp-0123456789ab")
    (out / ".password.tmp-0123456789ab").write_bytes(b"half")
    (out / f"{STATE}.tmp-01234567").write_text("{")
    writer.close()

    Writer(writer.output).recover()

    assert sorted(os.listdir(out)) == sorted([*_vdirs(out), CURRENT_LINK, STATE, LOCK, *V1])
    assert (out / "password").read_bytes() == V1["password"]


def test_recover_on_a_missing_dir_does_nothing(out: Path) -> None:
    _writer(out).recover()

    assert not out.exists()
