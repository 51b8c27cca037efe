"""Which processes carry which credential value in their environment, by keyed fingerprint.

A consumer that was started with ``DB_PASSWORD=...`` holds that version for as
long as it lives, with no fd to show for it. We read ``/proc/<pid>/environ``
(the environment as it was at exec), hash only the entries whose NAME is one
we rendered, and look the HMAC up in an index built from the versions we wrote.
Blocking; call it through ``asyncio.to_thread``.

Must never: keep, return, log or compare a value in clear. Only HMAC-SHA256
digests under the agent's own key leave this module, so a digest in a report
or a log cannot be brute-forced offline without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from typing import TypeVar

from daemon.usage.fdscan import PROC, list_pids, map_pids

logger = logging.getLogger(__name__)

T = TypeVar("T")

_READ = 1 << 16
# An environment larger than this is not a consumer we render for; reading it
# all would only cost memory.
MAX_ENVIRON = 8 << 20


def fingerprint(key: bytes, name: str, value: str) -> str:
    """HMAC-SHA256 of ``NAME=value`` (UTF-8) under ``key``, hex."""
    return hmac.new(key, f"{name}={value}".encode(), hashlib.sha256).hexdigest()


def read_environ(pid: int) -> bytes | None:
    """The raw NUL-separated environment of ``pid``; None if gone or not readable."""
    try:
        fd = os.open(f"{PROC}/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks: list[bytes] = []
        size = 0
        while size < MAX_ENVIRON:
            chunk = os.read(fd, _READ)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        # EACCES for another user's process, ESRCH/EIO once it has exited.
        return None
    finally:
        os.close(fd)


def environ_fingerprints(raw: bytes, *, key: bytes, names: Collection[bytes]) -> set[str]:
    """Fingerprints of the entries of ``raw`` whose NAME is in ``names`` (bytes)."""
    found: set[str] = set()
    for entry in raw.split(b"\0"):
        name, sep, _ = entry.partition(b"=")
        if sep and name in names:
            # The raw entry is exactly the "NAME=value" bytes fingerprint()
            # hashes, so we never decode (or hold on to) the value itself.
            found.add(hmac.new(key, entry, hashlib.sha256).hexdigest())
    return found


def pid_environ(pid: int, index: Mapping[str, T], *, key: bytes, names: Collection[bytes]) -> set[T]:
    """Values of ``index`` whose fingerprint appears in the environment of ``pid``."""
    raw = read_environ(pid)
    if not raw:
        return set()
    matched: set[T] = set()
    for fp in environ_fingerprints(raw, key=key, names=names):
        value = index.get(fp)
        if value is not None:
            matched.add(value)
    return matched


def encode_names(names: Collection[str]) -> frozenset[bytes]:
    """Variable names as the bytes /proc shows them."""
    return frozenset(os.fsencode(n) for n in names)


def scan_environ(
    index: Mapping[str, T],
    *,
    key: bytes,
    names: Collection[str],
    pids: Iterable[int] | None = None,
) -> dict[int, set[T]]:
    """pid -> values of ``index`` (fingerprint -> value) found in that pid's environment.

    Only pids with at least one match appear. The environment is the one the
    process was started with: a later setenv() inside it is not visible.
    """
    if not index or not names:
        return {}
    bnames = encode_names(names)
    targets = list_pids() if pids is None else pids
    result: dict[int, set[T]] = {}
    for pid, found in map_pids(lambda p: pid_environ(p, index, key=key, names=bnames), targets):
        if found:
            result[pid] = found
    return result
