"""A minimal inotify watch on one directory, read by the event loop (Linux).

Used by the local store to notice commits from other processes without
polling: the kernel wakes us when the database or its WAL changes, and an idle
agent spends no CPU at all. Returns None where inotify is unavailable; the
caller then falls back to a slow poll.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable, Collection

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class DirWatch:
    """Calls ``on_change()`` from the event loop when one of ``names`` in ``directory`` changes."""

    def __init__(self, fd: int, names: Collection[str], on_change: Callable[[], None]) -> None:
        self.fd = fd
        self.names = {n.encode() for n in names}
        self.on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    @classmethod
    def open(cls, directory: str, names: Collection[str], on_change: Callable[[], None]) -> DirWatch | None:
        path = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(path, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            os.close(fd)
            return None
        return cls(fd, names, on_change)

    def _readable(self) -> None:
        hit = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                return
            offset = 0
            while offset + _EVENT.size <= len(buf):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                name = buf[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                hit = hit or name in self.names
        if hit:
            self.on_change()

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
