"""One usage scan: which live process holds which credential version, and how we know.

Combines three sources over one listing of /proc: open fds matched by
(dev, ino) (fdscan), environment fingerprints (environ), and the last file each
live process opened under a watched directory (fanotify, when a watcher is
given). Blocking; the agent calls ``scan`` through ``asyncio.to_thread``.

Must never: report Baton itself, read a credential file, or carry a secret
value: versions are described by inodes and keyed fingerprints only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from daemon.model import CredentialName, VersionId
from daemon.usage.environ import encode_names, pid_environ
from daemon.usage.fanotify import OpenWatcher
from daemon.usage.fdscan import PROC, list_pids, map_pids, scan_fds

logger = logging.getLogger(__name__)

FD = "fd"
FANOTIFY = "fanotify"
ENVIRON = "environ"

_Key = tuple[CredentialName, VersionId]


@dataclass(frozen=True)
class VersionFiles:
    """What identifies one version on this node, without its value."""

    credential: CredentialName
    version: VersionId
    # (st_dev, st_ino) of each file of the version as written on this node.
    inodes: tuple[tuple[int, int], ...]
    # environ.fingerprint() of each env var the version renders, under the agent's key.
    fingerprints: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
class Sighting:
    """A process seen using a version; ``how`` is "fd", "fanotify" or "environ"."""

    pid: int
    exe: str
    credential: CredentialName
    version: VersionId
    how: str


def exe_of(pid: int) -> str:
    """The executable of ``pid`` as /proc shows it; "" for kernel threads or when hidden."""
    try:
        return os.readlink(f"{PROC}/{pid}/exe")
    except OSError:
        return ""


def _indexes(versions: Sequence[VersionFiles]) -> tuple[dict[tuple[int, int], _Key], dict[str, _Key]]:
    inodes: dict[tuple[int, int], _Key] = {}
    prints: dict[str, _Key] = {}
    for v in versions:
        key = (v.credential, v.version)
        for inode in v.inodes:
            other = inodes.setdefault(inode, key)
            if other != key:
                # Two versions cannot share a live inode; a stale record can.
                logger.warning("inode %s is recorded for both %s and %s; keeping the first", inode, other, key)
        for fp in v.fingerprints:
            prints.setdefault(fp, key)
    return inodes, prints


def scan(
    versions: Sequence[VersionFiles],
    *,
    env_key: bytes,
    env_names: Collection[str],
    opens: OpenWatcher | None = None,
    exclude_pids: Collection[int] = (),
    only_pids: Collection[int] | None = None,
) -> list[Sighting]:
    """Every (pid, version, how) seen on this node, sorted; Baton's own pid never appears.

    ``only_pids``: look at just these processes (the tracker's quick rescan of a
    draining version's holders), not at every process in /proc.

    A pid seen by several means yields one Sighting per means, so a caller
    counting holders should count distinct pids.
    """
    inodes, prints = _indexes(versions)
    excluded = {os.getpid(), *exclude_pids}
    names = encode_names(env_names) if prints else frozenset()
    listed = list_pids() if only_pids is None else sorted(only_pids)
    pids = [p for p in listed if p not in excluded]

    seen: set[tuple[int, _Key, str]] = set()
    for pid, keys in scan_fds(inodes, pids=pids).items():
        seen.update((pid, key, FD) for key in keys)
    if names:
        for pid, keys in map_pids(lambda p: pid_environ(p, prints, key=env_key, names=names), pids):
            seen.update((pid, key, ENVIRON) for key in keys)
    if opens is not None and inodes:
        live = set(pids)
        for pid, inode in opens.opened().items():
            key = inodes.get(inode)
            if key is not None and pid in live:
                seen.add((pid, key, FANOTIFY))

    exes: dict[int, str] = {}
    out: list[Sighting] = []
    for pid, (credential, version), how in seen:
        if pid not in exes:
            exes[pid] = exe_of(pid)
        out.append(Sighting(pid=pid, exe=exes[pid], credential=credential, version=version, how=how))
    out.sort(key=lambda s: (s.credential, s.version, s.pid, s.how))
    return out
