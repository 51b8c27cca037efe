"""Exit watches on the processes that hold a superseded version: the tracker hears of an exit at once.

A pidfd per holder (``reload.processes.open_pidfd``) is registered with the
event loop; it turns readable when its process exits (a zombie included), and
``on_exit(pid)`` is called from the loop, so the tracker rescans the holders
and publishes the report without waiting for the next scan. A pidfd names one
process, so a recycled pid never reads as the old holder. Where the kernel or
sandbox has no pidfd_open nothing is watched and the tracker's quick rescan of
the holders (``agent.drain_rescan``) finds the exit instead.

Never signals anything, never blocks the loop; every fd it opens it closes
(``follow`` of a smaller set, ``close``), and it holds at most ``MAX_FOLLOWED``
at once (500 nginx workers draining must not use up the agent's descriptors):
holders beyond that are found by the quick rescan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Collection

from daemon.errors import ReloadError
from daemon.reload.processes import open_pidfd

MAX_FOLLOWED = 256


class ExitWatch:
    """Follows a set of pids; ``on_exit(pid)`` once for each that exits while followed."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._fds: dict[int, int] = {}  # pid -> pidfd
        self.exited: set[int] = set()  # followed pids seen to exit (until no longer followed)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def followed(self) -> frozenset[int]:
        return frozenset(self._fds)

    def follow(self, pids: Collection[int]) -> None:
        """Watch exactly ``pids`` (pid 0 and negative ones are skipped): new ones get a pidfd, others are dropped."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        wanted = {p for p in pids if p > 0}
        for pid in set(self._fds) - wanted:
            self._drop(pid)
        self.exited &= wanted
        for pid in sorted(wanted - set(self._fds) - self.exited):
            if len(self._fds) >= MAX_FOLLOWED:
                break
            try:
                fd = open_pidfd(pid)
            except ProcessLookupError:
                self._exit(pid)
                continue
            except ReloadError:
                continue
            if fd is None:
                continue  # no pidfds here: the quick rescan finds the exit
            self._fds[pid] = fd
            loop.add_reader(fd, self._ready, pid)

    def _ready(self, pid: int) -> None:
        self._drop(pid)
        self._exit(pid)

    def _exit(self, pid: int) -> None:
        self.exited.add(pid)
        self._on_exit(pid)

    def _drop(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        for pid in list(self._fds):
            self._drop(pid)
        self.exited.clear()
