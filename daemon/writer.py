"""The versioned, atomic file layout of one credential's output directory.

For output dir ``/run/baton/db``::

    ..v7-3f2a91c0/password     version 7, written in a temp dir, renamed into place
    ..current -> ..v7-3f2a91c0 swapped by rename() of a temp symlink
    password -> ..current/password

so a reader always sees a complete old or new version. ``copy`` layout writes a
temp file, fsyncs it and renames it onto a plain ``password`` for programs that
refuse symlinks. Either way the device+inode of every version's files is kept
in ``..baton-state.json`` so the usage scanner can tell versions apart.

The writer never writes through a symlink, never into a directory owned by
another non-root user, and never deletes a version directory unless told the
version is retired. Blocking: call it in a thread.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from daemon.config import OutputConfig
from daemon.errors import WriteError
from daemon.model import VersionId, version_label

STATE = "..baton-state.json"
CURRENT_LINK = "..current"
_TMP = ".tmp-"
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class OnDisk:
    """A version as it lies on disk."""

    version: str
    dirname: str | None  # None in copy layout
    inodes: tuple[tuple[int, int], ...]
    digest: str
    swapped_in: float


def content_digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def check_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", "..") or name.startswith(".."):
        raise WriteError(f"refusing file name {name!r}: no '/', no leading '..'")


def _uid_gid(output: OutputConfig) -> tuple[int, int]:
    uid = gid = -1
    try:
        if isinstance(output.owner, int):
            uid = output.owner
        elif output.owner:
            uid = pwd.getpwnam(output.owner).pw_uid
        if isinstance(output.group, int):
            gid = output.group
        elif output.group:
            gid = grp.getgrnam(output.group).gr_gid
    except KeyError as e:
        raise WriteError(f"unknown owner or group {e}") from None
    return uid, gid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _locked(method: Callable[Concatenate[Writer, P], R]) -> Callable[Concatenate[Writer, P], R]:
    @functools.wraps(method)
    def wrapper(self: Writer, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Writer:
    """Owns one output directory; one writer per directory. The public methods
    hold a lock, so the tracker may read ``versions()`` while the agent writes."""

    def __init__(self, output: OutputConfig) -> None:
        self.output = output
        self.dir = Path(output.dir)
        self.uid, self.gid = _uid_gid(output)
        self._state: dict[str, dict[str, object]] | None = None
        self._current: str | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------ checks

    def _check_dir(self) -> None:
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.dir, 0o750)
            st = os.lstat(self.dir)
        if stat.S_ISLNK(st.st_mode):
            raise WriteError(f"refusing to write through a symlink: {self.dir}")
        if not stat.S_ISDIR(st.st_mode):
            raise WriteError(f"output path is not a directory: {self.dir}")
        if st.st_uid not in (0, os.geteuid()):
            raise WriteError(f"output dir {self.dir} is owned by another user (uid {st.st_uid})")
        if st.st_mode & 0o027:
            os.chmod(self.dir, stat.S_IMODE(st.st_mode) & 0o750)
        if self.gid != -1 and st.st_gid != self.gid:
            os.chown(self.dir, -1, self.gid)

    def _check_targets(self, names: list[str]) -> None:
        for name in names:
            check_name(name)
            path = self.dir / name
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    if self.output.layout == "symlink" and os.readlink(path) == f"{CURRENT_LINK}/{name}":
                        continue
                    raise WriteError(f"refusing to write through a symlink: {path}")
                if not stat.S_ISREG(st.st_mode):
                    raise WriteError(f"output path exists and is not a regular file: {path}")

    # ------------------------------------------------------------ state

    def _load(self) -> dict[str, dict[str, object]]:
        if self._state is None:
            try:
                data = json.loads((self.dir / STATE).read_text())
                self._state = dict(data.get("versions", {}))
                self._current = data.get("current")
            except (OSError, ValueError):
                self._state, self._current = self._rebuild()
        return self._state

    def _rebuild(self) -> tuple[dict[str, dict[str, object]], str | None]:
        """Recover the state from the directory alone (lost or corrupt state file)."""
        versions: dict[str, dict[str, object]] = {}
        current = None
        if not self.dir.is_dir():
            return versions, None
        target = None
        with contextlib.suppress(OSError):
            target = os.readlink(self.dir / CURRENT_LINK)
        for entry in os.scandir(self.dir):
            if entry.name.startswith("..v") and entry.is_dir(follow_symlinks=False):
                # The label may be a shortened id: the entry is found again by its
                # digest when the store names the version (see write()).
                label = entry.name[3:].rsplit("-", 1)[0]
                files = {f.name: Path(f.path).read_bytes() for f in os.scandir(entry.path)}
                inodes = [[s.st_dev, s.st_ino] for s in (os.stat(f.path) for f in os.scandir(entry.path))]
                versions[label] = {
                    "dir": entry.name,
                    "inodes": inodes,
                    "digest": content_digest(files),
                    "swapped_in": entry.stat(follow_symlinks=False).st_mtime,
                }
                if entry.name == target:
                    current = label
        return versions, current

    def _save(self) -> None:
        data = {"current": self._current, "versions": self._state}
        tmp = self.dir / f"{STATE}{_TMP}{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / STATE)

    @_locked
    def current(self) -> str | None:
        self._load()
        return self._current

    @_locked
    def versions(self) -> list[OnDisk]:
        state = self._load()
        out = []
        for version, v in state.items():
            inodes = tuple((int(d), int(i)) for d, i in v["inodes"])  # type: ignore[attr-defined]
            out.append(
                OnDisk(
                    version=version,
                    dirname=v.get("dir"),  # type: ignore[arg-type]
                    inodes=inodes,
                    digest=str(v.get("digest", "")),
                    swapped_in=float(v["swapped_in"]),  # type: ignore[arg-type]
                )
            )
        return sorted(out, key=lambda d: d.swapped_in)

    # ------------------------------------------------------------ writing

    @_locked
    def recover(self) -> None:
        """Remove temp leftovers of an interrupted write (kill -9 at any point)."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            if _TMP in entry.name:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def _write_file(self, path: Path, data: bytes) -> tuple[int, int]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.uid != -1 or self.gid != -1:
                os.fchown(fd, self.uid, self.gid)
            os.fchmod(fd, self.output.mode)
            os.fsync(fd)
            st = os.fstat(fd)
            return st.st_dev, st.st_ino
        finally:
            os.close(fd)

    @_locked
    def write(self, version: VersionId, files: Mapping[str, bytes]) -> bool:
        """Lay ``version`` down and swap it in. False when the content is already current."""
        self._check_dir()
        self._check_targets(list(files))
        state = self._load()
        digest = content_digest(files)
        cur = state.get(self._current or "")
        if cur is not None and cur.get("digest") == digest and self._stable_links_ok(list(files)):
            if self._current != version:  # same content under a new id: relabel, do not rewrite
                state[version] = state.pop(self._current or "")
                self._current = version
                self._save()
            return False
        if self.output.layout == "copy":
            entry = self._write_copy(files)
        else:
            entry = self._write_versioned(version, files, digest)
        entry["digest"] = digest
        entry["swapped_in"] = time.time()
        state[version] = entry
        self._current = version
        self._save()
        return True

    def _stable_links_ok(self, names: list[str]) -> bool:
        """The current files are really there: links resolve, ``..current`` points at the recorded dir."""
        if self.output.layout == "copy":
            return all((self.dir / n).is_file() for n in names)
        entry = (self._state or {}).get(self._current or "", {})
        try:
            target = os.readlink(self.dir / CURRENT_LINK)
        except OSError:
            return False
        return target == entry.get("dir") and all((self.dir / n).is_file() for n in names)

    def _write_versioned(self, version: VersionId, files: Mapping[str, bytes], digest: str) -> dict[str, object]:
        final = self.dir / f"..v{version_label(version)}-{digest[:8]}"
        inodes: list[list[int]] = []
        if final.is_dir():
            # A complete dir from an interrupted run (renamed in whole): reuse it.
            inodes = [[s.st_dev, s.st_ino] for s in (os.stat(final / n) for n in sorted(files))]
        else:
            tmp = self.dir / f"..v{_TMP}{secrets.token_hex(6)}"
            os.mkdir(tmp, 0o700)
            for name in sorted(files):
                inodes.append(list(self._write_file(tmp / name, files[name])))
            _fsync_dir(tmp)
            if self.gid != -1:
                os.chown(tmp, -1, self.gid)
            os.chmod(tmp, 0o750)  # noqa: S103 (group may traverse; files carry their own mode)
            os.rename(tmp, final)
        _fsync_dir(self.dir)
        self._swap_link(CURRENT_LINK, final.name)
        for name in files:
            path = self.dir / name
            want = f"{CURRENT_LINK}/{name}"
            if not (path.is_symlink() and os.readlink(path) == want):
                self._swap_link(name, want)
        _fsync_dir(self.dir)
        return {"dir": final.name, "inodes": inodes}

    def _swap_link(self, name: str, target: str) -> None:
        tmp = self.dir / f"{name}{_TMP}{secrets.token_hex(6)}"
        os.symlink(target, tmp)
        os.rename(tmp, self.dir / name)

    def _write_copy(self, files: Mapping[str, bytes]) -> dict[str, object]:
        inodes = []
        for name in sorted(files):
            tmp = self.dir / f".{name}{_TMP}{secrets.token_hex(6)}"
            inodes.append(list(self._write_file(tmp, files[name])))
            os.rename(tmp, self.dir / name)
        _fsync_dir(self.dir)
        return {"dir": None, "inodes": inodes}

    @_locked
    def remove(self, version: str) -> None:
        """Delete a retired version's files. The current version is never removed."""
        state = self._load()
        if version == self._current:
            raise WriteError(f"refusing to remove the current version {version}")
        entry = state.pop(version, None)
        if entry is None:
            return
        dirname = entry.get("dir")
        in_use = {e.get("dir") for e in state.values()}
        with contextlib.suppress(OSError):
            in_use.add(os.readlink(self.dir / CURRENT_LINK))
        # Never delete a directory that another version (or ..current) still names.
        if isinstance(dirname, str) and dirname.startswith("..v") and dirname not in in_use:
            shutil.rmtree(self.dir / dirname, ignore_errors=True)
        self._save()
