"""Open events on the credential directories through fanotify(7), when the kernel lets us.

An fd scan only sees processes that still hold the file open. A consumer that
reads its password at start and closes the file at once still uses that
version; fanotify tells us it opened it. ``OpenWatcher`` marks the version
directories (FAN_OPEN | FAN_CLOSE_NOWRITE | FAN_EVENT_ON_CHILD), reads events
in a daemon thread, fstat()s and closes each event fd, and remembers pid ->
(dev, ino) of the last file it opened, for as long as that pid lives (a zombie
has exited: it is gone). Every open and close is also handed to
``on_event(pid)`` (from the reader thread), so the tracker can rescan a
draining version's holders the moment one of them lets go of a file.

Must never: read the opened file (the event fd is only fstat()ed, then closed),
leak an event fd, block the caller's event loop, or be required: without
CAP_SYS_ADMIN (a sidecar without it, a rootless node) ``available()`` says why
and the scanner goes on with fd and environment scans.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from daemon.errors import FanotifyUnavailable

logger = logging.getLogger(__name__)

# <linux/fanotify.h>
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_ONLYDIR = 0x00000008
FAN_CLOSE_NOWRITE = 0x00000010
FAN_OPEN = 0x00000020
FAN_Q_OVERFLOW = 0x00004000
FAN_EVENT_ON_CHILD = 0x08000000
FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1
CAP_SYS_ADMIN = 21

# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
_META = struct.Struct("=IBBHQii")
_READ_SIZE = _META.size * 512
_MASK = FAN_OPEN | FAN_CLOSE_NOWRITE | FAN_EVENT_ON_CHILD


@dataclass(frozen=True)
class _Open:
    dev: int
    ino: int
    # Process start time in clock ticks, so a reused pid is not taken for the opener.
    start: int


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        init = libc.fanotify_init
        mark = libc.fanotify_mark
    except (OSError, AttributeError):
        return None
    init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    init.restype = ctypes.c_int
    mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    mark.restype = ctypes.c_int
    return libc


def _has_cap_sys_admin() -> bool:
    """Whether CAP_SYS_ADMIN is in this process's effective set."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in ticks); None if the pid is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # comm (field 2) may hold spaces and parens: split after its last ')'.
        rest = data[data.rindex(b")") + 2 :].split()
        if rest[0] in (b"Z", b"X"):  # exited, not yet reaped: it holds nothing any more
            return None
        return int(rest[19])
    except (OSError, ValueError, IndexError):
        return None


def _init_flags() -> tuple[int, int]:
    event_f_flags = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_LARGEFILE", 0)
    return FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, event_f_flags


class OpenWatcher:
    """Remembers which file each live process opened last in the watched directories."""

    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "") when fanotify works here, else (False, why)."""
        if not sys.platform.startswith("linux"):
            return False, f"fanotify needs Linux, not {sys.platform}"
        libc = _libc()
        if libc is None:
            return False, "the C library has no fanotify_init/fanotify_mark"
        if not _has_cap_sys_admin():
            return False, "fanotify needs CAP_SYS_ADMIN, which this process does not have"
        flags, f_flags = _init_flags()
        fd = libc.fanotify_init(flags, f_flags)
        if fd < 0:
            err = ctypes.get_errno()
            return False, f"fanotify_init failed: {os.strerror(err)} ({errno.errorcode.get(err, err)})"
        os.close(fd)
        return True, ""

    def __init__(self, on_event: Callable[[int], None] | None = None) -> None:
        ok, why = self.available()
        if not ok:
            raise FanotifyUnavailable(why)
        libc = _libc()
        assert libc is not None  # available() checked it
        self._libc = libc
        flags, f_flags = _init_flags()
        fd = libc.fanotify_init(flags, f_flags)
        if fd < 0:
            raise FanotifyUnavailable(f"fanotify_init failed: {os.strerror(ctypes.get_errno())}")
        self._fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._last: dict[int, _Open] = {}
        # path -> (dev, ino) of the directory inode we marked at that path.
        self._marked: dict[str, tuple[int, int]] = {}
        self._self = os.getpid()
        self._closed = False
        self.overflows = 0
        self._on_event = on_event
        self._thread = threading.Thread(target=self._run, name="baton-fanotify", daemon=True)
        self._thread.start()

    # -- marks ---------------------------------------------------------------

    def _mark(self, flags: int, path: str) -> int:
        if self._libc.fanotify_mark(self._fd, flags | FAN_MARK_ONLYDIR, _MASK, -1, os.fsencode(path)) < 0:
            return ctypes.get_errno()
        return 0

    def watch(self, dirs: Iterable[str | os.PathLike[str]]) -> list[str]:
        """Watch exactly ``dirs`` (version directories, or a copy-mode output dir).

        Marks new ones, re-marks a path whose directory was replaced, unmarks
        ones no longer listed. Returns the directories that could not be
        marked (missing, not a directory), which the caller may log.
        """
        if self._closed:
            raise FanotifyUnavailable("the watcher is closed")
        wanted = {os.path.abspath(os.fspath(d)) for d in dirs}
        failed: list[str] = []
        for path in sorted(set(self._marked) - wanted):
            # A directory that is gone took its inode mark with it.
            self._mark(FAN_MARK_REMOVE, path)
            del self._marked[path]
        for path in sorted(wanted):
            try:
                st = os.stat(path)
            except OSError:
                failed.append(path)
                continue
            if self._marked.get(path) == (st.st_dev, st.st_ino):
                continue
            err = self._mark(FAN_MARK_ADD, path)
            if err:
                logger.warning("fanotify_mark %s failed: %s", path, os.strerror(err))
                failed.append(path)
                continue
            self._marked[path] = (st.st_dev, st.st_ino)
        return failed

    # -- events --------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                ready = poller.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if any(fd == self._wake_r for fd, _ in ready):
                return
            try:
                self._drain()
            except Exception:  # pragma: no cover - never let the reader die silently
                logger.exception("fanotify reader failed; open events are no longer recorded")
                return

    def _drain(self) -> None:
        """Read every queued event (non-blocking); the lock orders it with opened()."""
        with self._lock:
            if self._closed:
                return
            while True:
                try:
                    buf = os.read(self._fd, _READ_SIZE)
                except BlockingIOError:
                    return
                if not buf:
                    return
                self._parse(buf)

    def _parse(self, buf: bytes) -> None:
        off = 0
        while off + _META.size <= len(buf):
            event_len, vers, _, _, mask, fd, pid = _META.unpack_from(buf, off)
            if vers != FANOTIFY_METADATA_VERSION or event_len < _META.size:
                logger.error("unexpected fanotify metadata version %d; dropping events", vers)
                return
            off += event_len
            if mask & FAN_Q_OVERFLOW:
                self.overflows += 1
                logger.warning("fanotify queue overflowed: some opens were not recorded")
            if fd == FAN_NOFD or fd < 0:
                continue
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            finally:
                os.close(fd)
            if pid == self._self:
                continue
            if mask & FAN_OPEN:
                start = _start_time(pid)
                if start is not None:
                    self._last[pid] = _Open(st.st_dev, st.st_ino, start)
            if self._on_event is not None:
                self._on_event(pid)

    def opened(self) -> dict[int, tuple[int, int]]:
        """pid -> (dev, ino) of the last file it opened under a watched dir, live pids only.

        Reflects every open that completed before this call: queued events are
        read first.
        """
        self._drain()
        with self._lock:
            gone = [pid for pid, o in self._last.items() if _start_time(pid) != o.start]
            for pid in gone:
                del self._last[pid]
            return {pid: (o.dev, o.ino) for pid, o in self._last.items()}

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Stop the reader thread and close every fd; idempotent."""
        if self._closed:
            return
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with self._lock:
            self._closed = True
            for fd in (self._fd, self._wake_r, self._wake_w):
                os.close(fd)

    def __enter__(self) -> OpenWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
