"""Which processes hold an open fd on which file, matched by (st_dev, st_ino).

Owns the hot loop of the usage scanner: list /proc once, stat every
``/proc/<pid>/fd/<n>`` magic link (which follows to the open file even when it
was deleted or lives in another mount namespace) and look the (dev, ino) up in
an index. Blocking; call it through ``asyncio.to_thread``.

The walk runs in C (``daemon.usage._fdscan``, built at install when a C
compiler is there) with the GIL released, on two threads: two cores, no Python
per fd. Without the extension the same walk runs in Python, a good deal slower
(bench/scan.py measures both); ``NATIVE`` says which one this process uses.

Must never: match by path (paths differ across mount namespaces and vanish on
delete), open or read the target files, or fail because a process or fd
disappeared mid-scan or refused access.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

try:
    from daemon.usage import _fdscan
except ImportError:  # built without a C compiler: the pure Python walk below
    _fdscan = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

NATIVE = _fdscan is not None

T = TypeVar("T")
R = TypeVar("R")

PROC = "/proc"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Two workers: stat() releases the GIL, so the kernel half of one worker's
# stat overlaps the Python half of the other's. More threads than that only
# adds GIL contention on a 2-core node (measured with bench/scan.py).
DEFAULT_WORKERS = 2
# Below this many pids a thread pool costs more than it saves.
_PARALLEL_MIN = 64


def list_pids() -> list[int]:
    """Every process id visible in /proc (thread-group leaders only)."""
    try:
        names = os.listdir(PROC)
    except OSError as e:  # pragma: no cover - /proc missing means no Linux
        logger.warning("cannot list %s: %s", PROC, e)
        return []
    return [int(n) for n in names if n.isdigit()]


def inode_numbers(index: Mapping[tuple[int, int], object]) -> frozenset[int]:
    """The st_ino half of the index keys: a cheap first test for every fd."""
    return frozenset(ino for _, ino in index)


def pid_fds(pid: int, index: Mapping[tuple[int, int], T], inos: Collection[int] | None = None) -> set[T]:
    """Values of ``index`` that ``pid`` holds open; empty if the process is gone or hidden.

    ``inos`` is ``inode_numbers(index)``; pass it when calling for many pids.
    """
    found: set[T] = set()
    try:
        # A directory fd makes each stat a one-component lookup instead of a
        # walk of /proc/<pid>/fd/<n> from the root: about a third cheaper.
        dfd = os.open(f"{PROC}/{pid}/fd", _DIR_FLAGS)
    except OSError:
        # Gone (ENOENT/ESRCH) or another user's process without privilege (EACCES).
        return found
    try:
        try:
            names = os.listdir(dfd)
        except OSError:
            return found
        stat = os.stat
        if inos is None:
            inos = inode_numbers(index)
        for name in names:
            try:
                st = stat(name, dir_fd=dfd)
            except OSError:
                # The fd was closed, the process exited, or the target is a
                # socket of a namespace we cannot see: nothing to attribute.
                continue
            # An int set lookup first: almost every fd misses, and this spares
            # building and hashing a tuple for each.
            if st.st_ino in inos:
                value = index.get((st.st_dev, st.st_ino))
                if value is not None:
                    found.add(value)
    finally:
        os.close(dfd)
    return found


def map_chunks(
    run: Callable[[list[int]], list[R]],
    pids: Iterable[int],
    *,
    workers: int = DEFAULT_WORKERS,
) -> Iterator[R]:
    """The items of ``run(chunk)`` over ``workers`` chunks of ``pids`` on a small thread pool,
    or of one ``run(all pids)`` when a pool does not pay."""
    todo = list(pids)
    if workers <= 1 or len(todo) < _PARALLEL_MIN:
        yield from run(todo)
        return
    # Interleaved chunks: neighbouring pids tend to be alike (forked workers),
    # so striding spreads the heavy ones across workers.
    chunks = [todo[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="baton-fdscan") as pool:
        for part in pool.map(run, chunks):
            yield from part


def map_pids(
    fn: Callable[[int], R],
    pids: Iterable[int],
    *,
    workers: int = DEFAULT_WORKERS,
) -> Iterator[tuple[int, R]]:
    """``(pid, fn(pid))`` for every pid, over a small thread pool when it pays."""
    return map_chunks(lambda chunk: [(pid, fn(pid)) for pid in chunk], pids, workers=workers)


def scan_fds(
    index: Mapping[tuple[int, int], T],
    *,
    pids: Iterable[int] | None = None,
    workers: int = DEFAULT_WORKERS,
    native: bool | None = None,
) -> dict[int, set[T]]:
    """pid -> values of ``index`` whose (st_dev, st_ino) the pid holds an open fd on.

    Only pids with at least one match appear. Deleted-but-open files match by
    their inode; processes in other mount namespaces match as well. ``native``
    picks the C walk (True) or the Python one (False); default: C when built.
    """
    if not index:
        return {}
    targets = list_pids() if pids is None else pids
    if NATIVE if native is None else native:
        return _scan_native(index, list(targets), workers=workers)
    result: dict[int, set[T]] = {}
    inos = inode_numbers(index)
    for pid, found in map_pids(lambda p: pid_fds(p, index, inos), targets, workers=workers):
        if found:
            result[pid] = found
    return result


def _scan_native(index: Mapping[tuple[int, int], T], pids: list[int], *, workers: int) -> dict[int, set[T]]:
    if _fdscan is None:
        raise RuntimeError("daemon.usage._fdscan is not built (no C compiler at install)")
    keys = list(index)
    result: dict[int, set[T]] = {}
    # The C walk releases the GIL, so the pool's threads really run on separate cores.
    for pid, i in map_chunks(lambda chunk: _fdscan.scan(chunk, keys), pids, workers=workers):
        result.setdefault(pid, set()).add(index[keys[i]])
    return result
