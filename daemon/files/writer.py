"""The versioned, atomic file layout of one credential's output directory.

For output dir ``/run/baton/db``::

    ..v7-3f2a91c0/password     version 7, written in a temp dir, renamed into place
    ..current -> ..v7-3f2a91c0 swapped by rename() of a temp symlink
    password -> ..current/password
    ..baton.lock               flocked for the writer's life: one agent per dir
    ..baton-state.json         device+inode of every version's files (for the usage scanner)

so a reader always sees a complete old or new version. ``copy`` layout writes a
temp file, fsyncs it and renames it onto a plain ``password`` for programs that
refuse symlinks.

The directory is hostile ground. The writer works relative to a directory fd
it opened walking from ``/`` with O_NOFOLLOW on every component, each parent
owned by root, Baton or the configured owner. It creates, renames and removes
only entries named by its own patterns, by ``dir_fd``, never through a symlink
and never with a path. An existing directory is used as it is (never chmodded)
and only if it fits: owned by root or Baton's uid, not group- or
world-writable, and either marked Baton's by the lock file or holding nothing
Baton would not have made. A state file not Baton's (owner, mode 0600, shape)
is ignored and rebuilt from content, reading only regular files, non-blocking
and size-capped. Orphaned version dirs and temp leftovers are swept at start
and after each write. Blocking: call it in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import grp
import hashlib
import json
import logging
import math
import os
import pwd
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from daemon.config import OutputConfig
from daemon.errors import WriteError
from daemon.kit.logs import event
from daemon.model import VersionId, version_label

log = logging.getLogger(__name__)

STATE = "..baton-state.json"
LOCK = "..baton.lock"
CURRENT_LINK = "..current"
_TMP = ".tmp-"
# What version_label() makes, then the digest's first 8 hex digits: one path component.
_VDIR = re.compile(r"\.\.v[A-Za-z0-9_.-]{1,12}-[0-9a-f]{8}")
_TEMP = re.compile(r".+\.tmp-(?:[0-9a-f]{8}|[0-9a-f]{12})")
MAX_FILE = 16 * 1024 * 1024  # a rendered file; payloads are capped at 1 MiB
MAX_STATE = 4 * 1024 * 1024
_MAX_DEPTH = 8  # how deep a leftover tree is removed; ours are one level
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class OnDisk:
    """A version as it lies on disk."""

    version: VersionId
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


def _os_error(e: OSError, out_dir: Path | None = None) -> WriteError:
    where = f" ({e.filename})" if e.filename else ""
    hint = ""
    if out_dir is not None and e.errno in (errno.EROFS, errno.EACCES) and os.environ.get("INVOCATION_ID"):
        # Under systemd (INVOCATION_ID is set for every unit), ProtectSystem=strict makes all
        # but ReadWritePaths read-only: say which drop-in lets Baton write here.
        hint = (
            f"; {out_dir} is not in the unit's ReadWritePaths: add it in a drop-in,"
            f" /etc/systemd/system/baton.service.d/write-paths.conf with [Service] ReadWritePaths={out_dir}"
            " (or `systemctl edit baton`), then systemctl daemon-reload && systemctl restart baton"
        )
    return WriteError(f"{e.strerror or e}{where}{hint}")


def read_regular(dir_fd: int, name: str, cap: int) -> tuple[bytes, os.stat_result] | None:
    """A regular file's bytes and stat, or None for anything else (symlink, FIFO, device, too big).

    O_NONBLOCK so that opening a FIFO never waits for a writer; O_NOFOLLOW so a
    planted symlink to ``/dev/zero`` is not opened at all.
    """
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
            return None
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, cap + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                return None
        return b"".join(chunks), st
    except OSError:
        return None
    finally:
        os.close(fd)


def _remove_entry(dir_fd: int, name: str, depth: int = 0) -> None:
    """Remove ``name`` from the dir: a symlink or file is unlinked itself (never what it
    points to), a directory is opened O_NOFOLLOW and emptied by ``dir_fd``. Raises OSError."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if depth >= _MAX_DEPTH:
        raise OSError(errno.ENOTEMPTY, "leftover tree too deep", name)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=dir_fd)  # swapped for a symlink meanwhile: that link goes, not its target
        return
    try:
        for entry in os.listdir(fd):
            _remove_entry(fd, entry, depth + 1)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _locked(method: Callable[Concatenate[Writer, P], R]) -> Callable[Concatenate[Writer, P], R]:
    @functools.wraps(method)
    def wrapper(self: Writer, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            finally:
                if self._closed:
                    self._release()

    return wrapper


class _BadState(Exception):
    """Why a state file is not trusted (internal: becomes a ``state_ignored`` event)."""


class Writer:
    """Owns one output directory; one writer per directory, enforced by ``..baton.lock``.

    The public methods hold a lock, so the tracker may read ``versions()`` while
    the agent writes. ``current()`` and ``versions()`` never raise: a directory
    that is missing, refused or locked by another agent has no versions here,
    and ``write()`` says why. ``close()`` releases the directory and its lock.
    """

    def __init__(self, output: OutputConfig) -> None:
        self._dfd: int | None = None
        self._lockfd: int | None = None
        self._closed = False
        self.output = output
        self.dir = Path(output.dir)
        self.uid, self.gid = _uid_gid(output)
        self._euid = os.geteuid()
        self._ident: tuple[int, int] | None = None
        self._state: dict[VersionId, OnDisk] | None = None
        self._current: VersionId | None = None
        self._lock = threading.RLock()

    def close(self) -> None:
        """Release the directory and its lock. Never blocks: a write running in
        another thread finishes first and releases at its end."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._lock.release()

    def __del__(self) -> None:
        # A writer dropped without close() must not keep its directory locked.
        with contextlib.suppress(Exception):
            self._release()

    def _release(self) -> None:
        for name in ("_lockfd", "_dfd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._ident = None

    # ------------------------------------------------------------ the directory

    def _walk(self, *, create: bool) -> tuple[int, bool] | None:
        """An fd of the output dir, opened from ``/`` with O_NOFOLLOW on every component.

        Missing components are made (parents 0755, the dir 0750) when ``create``;
        returns (fd, made the dir now), or None when it is missing and not to be made.
        """
        parts = [p for p in os.path.abspath(self.dir).split("/") if p]
        if not parts:
            raise WriteError("the output dir cannot be /")
        parents_ok = {0, self._euid, self.uid}
        fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        made = False
        try:
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                where = "/" + "/".join(parts[: i + 1])
                # Parents by O_PATH: Baton needs to search them, not to read them.
                flags = _DIR_FLAGS if last else os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    nfd = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    try:
                        os.mkdir(name, 0o750 if last else 0o755, dir_fd=fd)
                        made = last
                    except FileExistsError:
                        pass  # made meanwhile by someone else: checked like any existing one
                    nfd = os.open(name, flags, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISLNK(st.st_mode):
                            raise WriteError(
                                f"refusing to follow a symlink at {where} (output.dir must be a real path)"
                            ) from None
                        raise WriteError(f"output path is not a directory: {where}") from None
                    raise WriteError(f"cannot open {where}: {e.strerror}") from None
                os.close(fd)
                fd = nfd
                if not last:
                    owner = os.fstat(fd).st_uid
                    if owner not in parents_ok:
                        raise WriteError(
                            f"parent dir {where} of the output dir is owned by uid {owner}, not root or Baton"
                        )
            return fd, made
        except BaseException:
            os.close(fd)
            raise

    def _open(self, *, create: bool) -> int | None:
        """The output dir's fd, checked and locked; None when it is missing and not to be made.

        Walked again on every call, so a dir replaced or loosened since is seen.
        """
        if self._closed:
            raise WriteError(f"the writer of {self.dir} is closed")
        walked = self._walk(create=create)
        if walked is None:
            self._release()
            return None
        fd, made = walked
        try:
            st = os.fstat(fd)
            self._check_dir(st)
            if self._dfd is not None and self._ident == (st.st_dev, st.st_ino):
                os.close(fd)
                return self._dfd
            self._release()  # first use, or the dir was replaced: start over on this one
            self._state = None
            marked = self._adopt(fd, st, made)
            self._take_lock(fd)
            if self.gid != -1 and st.st_gid != self.gid and (made or marked):
                os.fchown(fd, -1, self.gid)
        except OSError as e:
            os.close(fd)
            raise _os_error(e) from None
        except BaseException:
            os.close(fd)
            raise
        self._dfd, self._ident = fd, (st.st_dev, st.st_ino)
        return fd

    def _check_dir(self, st: os.stat_result) -> None:
        if st.st_uid not in (0, self._euid):
            raise WriteError(f"output dir {self.dir} is owned by another user (uid {st.st_uid})")
        if st.st_mode & 0o022:
            raise WriteError(
                f"output dir {self.dir} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}); "
                "Baton does not change an existing dir: make it 0750 or stricter"
            )

    def _adopt(self, fd: int, st: os.stat_result, made: bool) -> bool:
        """Whether the dir is marked Baton's (its lock file exists). A dir not marked is
        taken only when everything in it is something Baton would have made."""
        if made:
            os.fchmod(fd, 0o750)  # exactly, whatever the umask
            return False
        with contextlib.suppress(FileNotFoundError):
            os.stat(LOCK, dir_fd=fd, follow_symlinks=False)
            return True
        foreign = []
        for name in os.listdir(fd):
            with contextlib.suppress(FileNotFoundError):
                owner = os.stat(name, dir_fd=fd, follow_symlinks=False).st_uid
                if not self._ours(name) or owner not in (0, self._euid, self.uid):
                    foreign.append(name)
        if foreign:
            raise WriteError(
                f"output dir {self.dir} was not made by Baton and holds {len(foreign)} other "
                f"entries (e.g. {sorted(foreign)[0][:64]!r}); use an empty or new dir"
            )
        return False

    def _ours(self, name: str) -> bool:
        """A name Baton makes in an output dir."""
        return (
            name in (STATE, LOCK, CURRENT_LINK)
            or name in self.output.files
            or bool(_VDIR.fullmatch(name))
            or self._is_temp(name)
        )

    def _is_temp(self, name: str) -> bool:
        return bool(_TEMP.fullmatch(name)) and name not in self.output.files

    def _take_lock(self, fd: int) -> None:
        try:
            lfd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=fd)
        except OSError as e:
            raise WriteError(f"cannot open the lock file {self.dir / LOCK}: {e.strerror}") from None
        try:
            st = os.fstat(lfd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self._euid:
                raise WriteError(f"lock file {self.dir / LOCK} is not Baton's (uid {st.st_uid})")
            try:
                fcntl.flock(lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriteError(
                    f"output dir {self.dir} is in use by another Baton process (it holds {LOCK})"
                ) from None
        except BaseException:
            os.close(lfd)
            raise
        self._lockfd = lfd

    def _check_targets(self, dfd: int, names: list[str]) -> None:
        for name in names:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                if self.output.layout == "symlink" and os.readlink(name, dir_fd=dfd) == f"{CURRENT_LINK}/{name}":
                    continue
                raise WriteError(f"refusing to write through a symlink: {self.dir / name}")
            if not stat.S_ISREG(st.st_mode):
                raise WriteError(f"output path exists and is not a regular file: {self.dir / name}")

    def _current_target(self, dfd: int) -> str | None:
        try:
            return os.readlink(CURRENT_LINK, dir_fd=dfd)
        except OSError:
            return None

    # ------------------------------------------------------------ state

    def _load(self) -> dict[VersionId, OnDisk]:
        dfd = self._open(create=False)
        if dfd is None:
            self._state, self._current = None, None
            return {}
        if self._state is None:
            try:
                self._state, self._current = self._read_state(dfd)
            except _BadState as why:
                event(log, "state_ignored", logging.WARNING, output=str(self.dir), reason=str(why))
                self._state, self._current = self._rebuild(dfd)
            except FileNotFoundError:
                self._state, self._current = self._rebuild(dfd)
        return self._state

    def _read_state(self, dfd: int) -> tuple[dict[VersionId, OnDisk], VersionId | None]:
        got = read_regular(dfd, STATE, MAX_STATE)
        if got is None:
            st = os.stat(STATE, dir_fd=dfd, follow_symlinks=False)  # FileNotFoundError: no state yet
            if stat.S_ISLNK(st.st_mode):
                raise _BadState("a symlink")
            if not stat.S_ISREG(st.st_mode):
                raise _BadState("not a regular file")
            raise _BadState(f"unreadable or over {MAX_STATE} bytes")
        st = got[1]
        if st.st_uid != self._euid:
            raise _BadState(f"owned by uid {st.st_uid}, not Baton's uid {self._euid}")
        if stat.S_IMODE(st.st_mode) != 0o600:
            raise _BadState(f"mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
        try:
            doc = json.loads(got[0])
        except (ValueError, RecursionError):
            raise _BadState("not JSON") from None
        versions, current = self._parse_state(doc)
        if self.output.layout == "symlink":
            target = self._current_target(dfd)
            recorded = versions[current].dirname if current is not None else None
            if target != recorded:
                # A crash between the swap of ..current and the state save: the link is the truth.
                raise _BadState("..current does not point to the recorded current version")
        return versions, current

    def _parse_state(self, doc: Any) -> tuple[dict[VersionId, OnDisk], VersionId | None]:
        if not isinstance(doc, dict):
            raise _BadState("bad shape: not an object")
        current = doc.get("current")
        if current is not None and not isinstance(current, str):
            raise _BadState("bad shape: current")
        raw = doc.get("versions")
        if not isinstance(raw, dict):
            raise _BadState("bad shape: versions")
        versions: dict[VersionId, OnDisk] = {}
        for version, v in raw.items():
            at = f"bad shape: versions.{version[:64]}"
            if not isinstance(v, dict):
                raise _BadState(at)
            dirname = v.get("dir")
            if not (dirname is None or (isinstance(dirname, str) and _VDIR.fullmatch(dirname))):
                raise _BadState(f"{at}.dir")
            inodes = v.get("inodes")
            if not isinstance(inodes, list) or not all(
                isinstance(p, list)
                and len(p) == 2
                and all(type(n) is int and 0 <= n < 1 << 64 for n in p)  # bool is not an inode
                for p in inodes
            ):
                raise _BadState(f"{at}.inodes")
            digest = v.get("digest")
            if not isinstance(digest, str):
                raise _BadState(f"{at}.digest")
            swapped_in = v.get("swapped_in")
            if not isinstance(swapped_in, int | float) or isinstance(swapped_in, bool) or not math.isfinite(swapped_in):
                raise _BadState(f"{at}.swapped_in")
            versions[VersionId(version)] = OnDisk(
                version=VersionId(version),
                dirname=dirname,
                inodes=tuple((d, i) for d, i in inodes),
                digest=digest,
                swapped_in=float(swapped_in),
            )
        if current is not None and current not in versions:
            raise _BadState("bad shape: current is not among the versions")
        return versions, None if current is None else VersionId(current)

    def _read_vdir(self, dfd: int, name: str) -> tuple[dict[str, tuple[bytes, tuple[int, int]]], float] | None:
        """A version dir's regular files (name -> bytes, inode) and its mtime; None if not Baton's."""
        try:
            vfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        except OSError:
            return None
        try:
            st = os.fstat(vfd)
            if st.st_uid != self._euid:
                return None
            files = {}
            for fname in os.listdir(vfd):
                got = read_regular(vfd, fname, MAX_FILE)
                if got is not None:
                    files[fname] = (got[0], (got[1].st_dev, got[1].st_ino))
            return files, st.st_mtime
        except OSError:
            return None
        finally:
            os.close(vfd)

    def _rebuild(self, dfd: int) -> tuple[dict[VersionId, OnDisk], VersionId | None]:
        """Recover the state from the directory alone (lost, foreign or corrupt state file)."""
        versions: dict[VersionId, OnDisk] = {}
        current = None
        target = self._current_target(dfd)
        for name in sorted(os.listdir(dfd)):
            if not _VDIR.fullmatch(name):
                continue
            found = self._read_vdir(dfd, name)
            if found is None or not found[0]:
                continue  # not a version of ours: the sweep removes it
            files, mtime = found
            # The label may be a shortened id: the entry is found again by its
            # digest when the store names the version (see write()).
            label = VersionId(name[3:].rsplit("-", 1)[0])
            if label in versions and name != target:
                continue
            inodes = tuple(files[n][1] for n in sorted(files))
            digest = content_digest({n: data for n, (data, _) in files.items()})
            versions[label] = OnDisk(label, name, inodes, digest, mtime)
            if name == target:
                current = label
        return versions, current

    def _save(self, dfd: int) -> None:
        state = self._state or {}
        data = {
            "current": self._current,
            "versions": {
                k: {
                    "dir": v.dirname,
                    "inodes": [list(p) for p in v.inodes],
                    "digest": v.digest,
                    "swapped_in": v.swapped_in,
                }
                for k, v in state.items()
            },
        }
        tmp = f"{STATE}{_TMP}{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            try:
                os.fchmod(fd, 0o600)  # exactly: a state file of another mode is not trusted
                _write_all(fd, json.dumps(data).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(STATE, dir_fd=dfd, follow_symlinks=False).st_mode):
                    _remove_entry(dfd, STATE)  # planted under our name: rename() cannot replace a dir
            os.replace(tmp, STATE, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise

    def _record(self, dfd: int) -> None:
        """Save the state after a change already made on disk (a swap, a relabel, a removal).
        The change holds whatever happens here, so a failure (disk full) is said, not raised:
        the state in memory is right, the next save catches up, and a stale file disagrees
        with ``..current``, so it is rebuilt at the next start."""
        try:
            self._save(dfd)
        except OSError as e:
            event(log, "state_not_saved", logging.WARNING, output=str(self.dir), error=str(_os_error(e)))

    def _sweep(self, dfd: int) -> None:
        """Remove temp leftovers and version dirs that no state entry or ``..current`` names:
        a crash between a rename and the state save leaves them, with secrets in them."""
        keep = {v.dirname for v in (self._state or {}).values()} | {self._current_target(dfd)}
        removed, kept = [], []
        try:
            names = os.listdir(dfd)
        except OSError:
            return
        for name in names:
            if not (self._is_temp(name) or (_VDIR.fullmatch(name) and name not in keep)):
                continue
            try:
                _remove_entry(dfd, name)
                removed.append(name)
            except OSError as e:
                kept.append(f"{name}: {e.strerror}")
        if removed:
            event(log, "leftovers_removed", output=str(self.dir), entries=sorted(removed))
        if kept:
            event(log, "leftovers_kept", logging.WARNING, output=str(self.dir), entries=sorted(kept))

    # ------------------------------------------------------------ reading

    @_locked
    def current(self) -> VersionId | None:
        try:
            self._load()
        except (WriteError, OSError):
            return None
        return self._current

    @_locked
    def versions(self) -> list[OnDisk]:
        try:
            state = self._load()
        except (WriteError, OSError):
            return []
        return sorted(state.values(), key=lambda d: d.swapped_in)

    # ------------------------------------------------------------ writing

    @_locked
    def recover(self) -> None:
        """Remove leftovers of an interrupted write (kill -9 at any point): temp entries and
        orphaned version dirs. Quiet when the dir is missing or refused: ``write()`` says why."""
        try:
            dfd = self._open(create=False)
            if dfd is None:
                return
            self._load()
            self._sweep(dfd)
        except (WriteError, OSError):
            return

    def _write_file(self, dir_fd: int, name: str, data: bytes) -> tuple[int, int]:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            _write_all(fd, data)
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
        for name in files:
            check_name(name)
        try:
            dfd = self._open(create=True)
            if dfd is None:  # create=True makes it or raises
                raise WriteError(f"output dir {self.dir} vanished")
            try:
                return self._write(dfd, version, files)
            finally:
                self._sweep(dfd)
        except OSError as e:
            raise _os_error(e, self.dir) from None

    def _write(self, dfd: int, version: VersionId, files: Mapping[str, bytes]) -> bool:
        self._check_targets(dfd, list(files))
        state = self._load()
        digest = content_digest(files)
        cur = state.get(self._current) if self._current is not None else None
        if cur is not None and cur.digest == digest and self._stable_links_ok(dfd, cur, list(files)):
            if self._current != version:  # same content under a new id: relabel, do not rewrite
                state[version] = dataclasses.replace(state.pop(cur.version), version=version)
                self._current = version
                self._record(dfd)
            return False
        if self.output.layout == "copy":
            dirname, inodes = None, self._write_copy(dfd, files)
        else:
            dirname, inodes = self._write_versioned(dfd, version, files, digest)
        state[version] = OnDisk(version, dirname, tuple(inodes), digest, time.time())
        self._current = version
        self._record(dfd)
        return True

    def _stable_links_ok(self, dfd: int, cur: OnDisk, names: list[str]) -> bool:
        """The current files are really there: ``..current`` points at the recorded dir, which holds them."""

        def regular(name: str) -> bool:
            try:
                return stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
            except OSError:
                return False

        if self.output.layout == "copy":
            return all(regular(n) for n in names)
        if cur.dirname is None or self._current_target(dfd) != cur.dirname:
            return False

        def link(name: str) -> bool:  # _check_targets allows no symlink here but ``..current/<name>``
            try:
                return stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
            except OSError:
                return False

        return all(link(n) and regular(f"{cur.dirname}/{n}") for n in names)

    def _reusable(self, dfd: int, final: str, files: Mapping[str, bytes]) -> list[tuple[int, int]] | None:
        """The inodes of ``final`` when it already holds exactly this content (a complete dir
        from an interrupted run); None when it is missing or anything else."""
        found = self._read_vdir(dfd, final)
        if found is None or any(n not in found[0] or found[0][n][0] != data for n, data in files.items()):
            return None
        return [found[0][n][1] for n in sorted(files)]

    def _write_versioned(
        self, dfd: int, version: VersionId, files: Mapping[str, bytes], digest: str
    ) -> tuple[str, list[tuple[int, int]]]:
        final = f"..v{version_label(version)}-{digest[:8]}"
        inodes = self._reusable(dfd, final, files)
        if inodes is None:
            _remove_entry(dfd, final)  # a partial or foreign entry under our name
            inodes = []
            tmp = f"..v{_TMP}{secrets.token_hex(6)}"
            os.mkdir(tmp, 0o700, dir_fd=dfd)
            try:
                tfd = os.open(tmp, _DIR_FLAGS, dir_fd=dfd)
                try:
                    for name in sorted(files):
                        inodes.append(self._write_file(tfd, name, files[name]))
                    os.fsync(tfd)
                    if self.gid != -1:
                        os.fchown(tfd, -1, self.gid)
                    os.fchmod(tfd, 0o750)  # group may traverse; files carry their own mode
                finally:
                    os.close(tfd)
                os.rename(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                # A failed write (disk full) leaves nothing behind, however often it is retried.
                with contextlib.suppress(OSError):
                    _remove_entry(dfd, tmp)
                raise
        os.fsync(dfd)
        self._swap_link(dfd, CURRENT_LINK, final)
        for name in files:
            want = f"{CURRENT_LINK}/{name}"
            try:
                ok = os.readlink(name, dir_fd=dfd) == want
            except OSError:
                ok = False
            if not ok:
                self._swap_link(dfd, name, want)
        os.fsync(dfd)
        return final, inodes

    def _swap_link(self, dfd: int, name: str, target: str) -> None:
        tmp = f"{name}{_TMP}{secrets.token_hex(6)}"
        os.symlink(target, tmp, dir_fd=dfd)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise

    def _write_copy(self, dfd: int, files: Mapping[str, bytes]) -> list[tuple[int, int]]:
        inodes = []
        for name in sorted(files):
            tmp = f".{name}{_TMP}{secrets.token_hex(6)}"
            try:
                inodes.append(self._write_file(dfd, tmp, files[name]))
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        os.fsync(dfd)
        return inodes

    @_locked
    def remove(self, version: VersionId) -> None:
        """Delete a retired or superseded version's files. The current version is never removed."""
        try:
            state = self._load()
            if version == self._current:
                raise WriteError(f"refusing to remove the current version {version}")
            entry = state.pop(version, None)
            dfd = self._dfd
            if entry is None or dfd is None:
                return
            # Never delete a directory that another version (or ..current) still names.
            in_use = {e.dirname for e in state.values()} | {self._current_target(dfd)}
            if entry.dirname is not None and entry.dirname not in in_use:
                _remove_entry(dfd, entry.dirname)
            self._record(dfd)
        except OSError as e:
            raise _os_error(e) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
