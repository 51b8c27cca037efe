"""Attribution: which version of which credential each process holds, from one scan's sightings and start times.

Pure (no I/O): the agent's tracker gathers the inputs in a thread and calls ``attribute``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from daemon.config import ConsumerConfig
from daemon.model import CredentialName, VersionId
from daemon.report.base import Holder
from daemon.usage.consumers import START_SLACK
from daemon.usage.scan import Sighting


class Swapped(Protocol):
    """A version on disk and when it was swapped in (the writer's ``OnDisk``)."""

    @property
    def version(self) -> VersionId: ...
    @property
    def swapped_in(self) -> float: ...


@dataclass(frozen=True)
class Usage:
    """Who holds which version of one credential, from one scan."""

    holders: dict[VersionId, list[Holder]] = field(default_factory=dict)  # version -> holders

    def count(self, version: VersionId) -> int:
        return len(self.holders.get(version, ()))


def attribute(
    *,
    sightings: Sequence[Sighting],
    consumers: Mapping[str, ConsumerConfig],
    consumer_pids: Mapping[str, Sequence[int]],
    on_disk: Mapping[CredentialName, Sequence[Swapped]],
    current: Mapping[CredentialName, VersionId | None],
    started: Mapping[int, float],
    reloaded: Mapping[int, float],
    exes: Mapping[int, str],
    creds_of: Mapping[str, Sequence[CredentialName]],
) -> dict[CredentialName, Usage]:
    """Combine scans into per-credential holders (pure: easy to test).

    A process seen holding a version (fd, open event, env) holds it. A declared
    consumer that reads at start (or on reload) and is seen holding nothing
    holds the version that was current when it last (re)loaded: the newest
    version swapped in before its start or its last reload by us.
    """
    by_cred: dict[CredentialName, dict[VersionId, dict[int, Holder]]] = {}
    owner = {pid: name for name, pids in consumer_pids.items() for pid in pids}
    for s in sightings:
        holders = by_cred.setdefault(s.credential, {}).setdefault(s.version, {})
        holders.setdefault(s.pid, Holder(s.pid, s.exe, owner.get(s.pid), s.how, s.version))
    for name, consumer in consumers.items():
        if consumer.loads == "per-use":
            continue
        for cred in creds_of.get(name, ()):
            versions = sorted(on_disk.get(cred, ()), key=lambda d: d.swapped_in)
            seen = by_cred.get(cred, {})
            for pid in consumer_pids.get(name, ()):
                if any(pid in holders for holders in seen.values()):
                    continue
                # A start within the clock's slack of a swap counts as before it:
                # when unsure, a process holds the older version (and blocks).
                loaded_at = max(started.get(pid, 0.0) - START_SLACK, reloaded.get(pid, 0.0))
                held = None
                for d in versions:
                    if d.swapped_in <= loaded_at:
                        held = d.version
                if held is None:
                    # Started before any version we know: it holds the oldest we have.
                    held = versions[0].version if versions else current.get(cred)
                if held is None:
                    continue
                holder = Holder(pid, exes.get(pid, ""), name, "start-time", held)
                by_cred.setdefault(cred, {}).setdefault(held, {})[pid] = holder
    return {
        cred: Usage({v: sorted(h.values(), key=lambda x: x.pid) for v, h in versions.items()})
        for cred, versions in by_cred.items()
    }
