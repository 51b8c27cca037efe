"""Hypothesis over the writer's state loading: whatever lies in the output dir, the writer holds.

Each example starts from a good version 1 on disk, then plants a state file
(arbitrary bytes, arbitrary JSON, or JSON close to the real shape naming
paths inside and outside the dir; any owner and mode, or a symlink or FIFO in
its place) and entries (symlinks to a sentinel dir outside and to
/dev/zero, FIFOs, dirs with odd names, files), in the output dir and in the
current version's dir. A fresh writer then recovers, reads, removes every
version it knows but the current one, and writes version 2.

The properties: nothing raises but a ``BatonError``; nothing outside the
output dir is written or deleted (the sentinel is byte for byte as it was);
the current version stays readable with its content until version 2
replaces it, and a refused write leaves version 1 in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.config import OutputConfig
from daemon.errors import BatonError
from daemon.files.writer import CURRENT_LINK, STATE, Writer, content_digest
from daemon.model import VersionId

pytestmark = pytest.mark.fuzz

V1 = {"password": b"fuzz-state-secret-one"}
V2 = {"password": b"fuzz-state-secret-two"}
V1_DIR = f"..v1-{content_digest(V1)[:8]}"
NOBODY = 65534

NAMES = [
    V1_DIR,
    "..vzz-deadbeef",
    "..v2-00000000",
    "..vzz",
    "..vzz/keep",
    "..v1/../../sentinel",
    "../sentinel",
    "/etc",
    CURRENT_LINK,
    "..baton.lock",
    "password",
    "..v.tmp-0123456789ab",
    "x.tmp-01234567",
    f"{STATE}.tmp-01234567",
    "password.tmp-0123456789ab",
    ".password.tmp-0123456789ab",
    "stray",
    "-",
]
plain_name = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40)
entry_name = st.sampled_from([n for n in NAMES if "/" not in n]) | plain_name.filter(lambda n: n not in (".", ".."))
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_any = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16,
)
version_key = st.sampled_from(["1", "2", "zz", ""]) | st.text(max_size=6)
near_entry = st.fixed_dictionaries(
    {
        "dir": st.none() | st.sampled_from(NAMES) | st.text(max_size=20),
        "inodes": st.lists(st.lists(st.integers(-1, 2**70), max_size=3), max_size=3) | json_any,
        "digest": st.just(content_digest(V1)) | st.text(max_size=8) | st.integers(),
        "swapped_in": st.floats() | st.integers(-(2**70), 2**70) | st.booleans() | st.text(max_size=3),
    }
)
near_state = st.fixed_dictionaries(
    {
        "current": st.none() | version_key | st.integers(),
        "versions": st.dictionaries(version_key, near_entry, max_size=4),
    }
)
state_bytes = (
    st.binary(max_size=300)
    | json_any.map(lambda v: json.dumps(v).encode())
    | near_state.map(lambda v: json.dumps(v).encode())
)
state_kind = st.sampled_from(["bytes", "bytes", "bytes", "bytes", "missing", "symlink", "fifo", "dir"])
KINDS = ["symlink-sentinel", "symlink-sentinel-file", "symlink-devzero", "fifo", "dir", "dir-with-fifo", "file"]
planted = st.lists(st.tuples(st.sampled_from(["out", "current"]), entry_name, st.sampled_from(KINDS)), max_size=6)


def snapshot(root: Path) -> dict[str, Any]:
    """Everything under ``root``: each entry's type, mode and owner, a file's bytes, a link's target."""
    seen: dict[str, Any] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st_ = os.lstat(p)
            body: Any = None
            if stat.S_ISREG(st_.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                body = os.readlink(p)
            seen[str(p.relative_to(root))] = (st_.st_mode, st_.st_uid, body)
    return seen


def plant(where: Path, name: str, kind: str, sentinel: Path) -> None:
    path = where / name
    if os.path.lexists(path):
        return  # planting never destroys what is there: the property is about the writer
    if kind == "symlink-sentinel":
        os.symlink(sentinel, path)
    elif kind == "symlink-sentinel-file":
        os.symlink(sentinel / "keep", path)
    elif kind == "symlink-devzero":
        os.symlink("/dev/zero", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind in ("dir", "dir-with-fifo"):
        path.mkdir()
        (path / "password").write_bytes(b"planted")
        if kind == "dir-with-fifo":
            os.mkfifo(path / "fifo")
        os.symlink(sentinel, path / "escape")
    else:
        path.write_bytes(b"planted")


def output(out: Path) -> OutputConfig:
    return OutputConfig(dir=out, files={"password": "{{ value }}"})


@contextlib.contextmanager
def example_dir(base: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(dir=base))
    try:
        yield root
    finally:
        shutil.rmtree(root)


@given(
    data=state_bytes,
    kind=state_kind,
    mode=st.sampled_from([0o600, 0o600, 0o644, 0o000]),
    owner=st.sampled_from([0, 0, NOBODY]),
    entries=planted,
)
def test_whatever_lies_in_the_dir_the_writer_raises_only_its_own_errors_stays_inside_and_keeps_the_last_good(
    tmp_path: Path, data: bytes, kind: str, mode: int, owner: int, entries: list[tuple[str, str, str]]
) -> None:
    with example_dir(tmp_path) as root:
        sentinel = root / "sentinel"
        (sentinel / "sub").mkdir(parents=True)
        (sentinel / "keep").write_text("precious")
        (sentinel / "sub" / "file").write_text("precious too")
        out = root / "out"
        first = Writer(output(out))
        first.write(VersionId("1"), V1)
        first.close()

        with contextlib.suppress(FileNotFoundError):
            (out / STATE).unlink()
        if kind == "bytes":
            (out / STATE).write_bytes(data)
            os.chmod(out / STATE, mode)
            os.chown(out / STATE, owner, owner)
        elif kind == "symlink":
            os.symlink(sentinel / "keep", out / STATE)
        elif kind == "fifo":
            os.mkfifo(out / STATE)
        elif kind == "dir":
            (out / STATE).mkdir()
        for where, name, what in entries:
            plant(out if where == "out" else out / V1_DIR, name, what, sentinel)
        before = snapshot(sentinel)

        writer = Writer(output(out))
        try:
            writer.recover()
            current = writer.current()
            known = [v.version for v in writer.versions()]
            for version in [*known, "zz", "2", ""]:
                if version != current:
                    with contextlib.suppress(BatonError):
                        writer.remove(version)
            assert (out / "password").read_bytes() == V1["password"], "the last good version is gone"
            try:
                wrote = writer.write(VersionId("2"), V2)
            except BatonError:
                assert (out / "password").read_bytes() == V1["password"], "a refused write cost the last good"
            else:
                assert wrote is True
                assert (out / "password").read_bytes() == V2["password"]
                assert writer.current() == "2"
            writer.recover()
        finally:
            writer.close()

        assert snapshot(sentinel) == before, "something outside the output dir changed"
        assert sorted(os.listdir(root)) == ["out", "sentinel"], "something was made outside the output dir"
