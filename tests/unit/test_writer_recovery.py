"""A lost state file never costs the current files: recovery finds versions again by content."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from daemon.config import OutputConfig
from daemon.files.writer import STATE, Writer
from daemon.model import VersionId

LONG_ID = VersionId("3f2a1b2c-1a2b-4c3d-9e8f-001122334455")  # an AWS-style id, longer than a dir label


def output(tmp_path: Path) -> OutputConfig:
    return OutputConfig(dir=tmp_path / "db", files={"password": "{{ value }}"})


def test_after_the_state_file_is_lost_the_same_version_is_not_duplicated_and_nothing_current_is_deleted(
    tmp_path: Path,
) -> None:
    first = Writer(output(tmp_path))
    assert first.write(LONG_ID, {"password": b"s3cret"})
    first.close()
    (tmp_path / "db" / STATE).unlink()

    again = Writer(output(tmp_path))
    assert again.write(LONG_ID, {"password": b"s3cret"}) is False  # same content: not rewritten
    assert [v.version for v in again.versions()] == [LONG_ID]
    assert again.current() == LONG_ID
    for stale in ("3f2a1b2c-1a2", "x"):
        again.remove(stale)  # what cleanup would do for an id the store does not know
    assert (tmp_path / "db" / "password").read_bytes() == b"s3cret"


def test_remove_keeps_a_directory_that_dot_dot_current_still_points_to(tmp_path: Path) -> None:
    w = Writer(output(tmp_path))
    w.write(VersionId("1"), {"password": b"one"})
    w.write(VersionId("2"), {"password": b"two"})
    state = w._load()
    state["ghost"] = dataclasses.replace(state["2"], version="ghost")  # a second record of the current dir
    w.remove("ghost")
    assert (tmp_path / "db" / "password").read_bytes() == b"two"
    w.remove("1")
    assert not any(p.name.startswith("..v1-") for p in (tmp_path / "db").iterdir())


def test_a_dangling_stable_link_is_repaired_by_the_next_write_of_the_same_content(tmp_path: Path) -> None:
    w = Writer(output(tmp_path))
    w.write(VersionId("1"), {"password": b"one"})
    current_dir = next(p for p in (tmp_path / "db").iterdir() if p.name.startswith("..v1-"))
    for f in current_dir.iterdir():
        f.unlink()
    current_dir.rmdir()
    w.close()
    assert Writer(output(tmp_path)).write(VersionId("1"), {"password": b"one"}) is True
    assert (tmp_path / "db" / "password").read_bytes() == b"one"
