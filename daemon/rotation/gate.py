"""The retirement gate: may a superseded version be retired now? A pure function.

A version is retired only when all of these hold:

- at least one node has a fresh report (no report at all means "unknown");
- every known node has a report no older than ``ttl`` (stale or missing is
  unknown, and unknown blocks);
- every node reports the new version as its current one;
- no node reports a holder of the old version;
- the provider reports no session on the old credential;
- it was superseded at least ``min_drain`` ago (default 0).

The answer carries every reason it is not yet, and who still holds the version,
so ``baton status --pending`` can show it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from daemon.model import NodeId, VersionId
from daemon.providers.base import Session
from daemon.report.base import Holder, NodeReport


@dataclass(frozen=True)
class Decision:
    version: VersionId
    retire: bool
    reasons: tuple[str, ...] = ()
    holders: dict[NodeId, tuple[Holder, ...]] = field(default_factory=dict)  # node -> holders of the version
    sessions: tuple[Session, ...] = ()
    blocking: frozenset[NodeId] = frozenset()  # the nodes with a reason above

    def as_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "retire": self.retire,
            "reasons": list(self.reasons),
            "holders": {
                node: [{"pid": h.pid, "exe": h.exe, "consumer": h.consumer, "how": h.how} for h in hs]
                for node, hs in self.holders.items()
            },
            "sessions": [{"principal": s.principal, "client": s.client, "count": s.count} for s in self.sessions],
        }


def decide(
    *,
    old: VersionId,
    new: VersionId,
    reports: Sequence[NodeReport],
    known: Collection[NodeId],
    now: float,
    ttl: float,
    sessions: Sequence[Session] = (),
    superseded_for: float | None = None,
    min_drain: float = 0.0,
) -> Decision:
    reasons: list[str] = []
    if min_drain > 0 and superseded_for is not None and superseded_for < min_drain:
        reasons.append(f"superseded {superseded_for:.0f}s ago; min_drain is {min_drain:.0f}s")
    holders: dict[NodeId, tuple[Holder, ...]] = {}
    latest: dict[NodeId, NodeReport] = {}
    for r in reports:
        if r.node not in latest or r.heartbeat > latest[r.node].heartbeat:
            latest[r.node] = r
    blocking: set[NodeId] = set()
    for node in sorted(set(known) | set(latest)):
        said = _judge(node, latest.get(node), old=old, new=new, now=now, ttl=ttl, holders=holders)
        if said:
            reasons.extend(said)
            blocking.add(node)
    if not latest and not known:  # no node at all (a min_drain reason must not hide it)
        reasons.append("no node has reported yet (unknown)")
    if sessions:
        total = sum(s.count for s in sessions)
        reasons.append(f"provider: {total} session(s) still use version {old}")
    return Decision(
        version=old,
        retire=not reasons,
        reasons=tuple(reasons),
        holders=holders,
        sessions=tuple(sessions),
        blocking=frozenset(blocking),
    )


def _judge(
    node: NodeId,
    report: NodeReport | None,
    *,
    old: VersionId,
    new: VersionId,
    now: float,
    ttl: float,
    holders: dict[NodeId, tuple[Holder, ...]],
) -> list[str]:
    """One node's part of the gate: its reasons (none: it does not block); records its holders of ``old``."""
    if report is None:
        return [f"{node}: no report (unknown)"]
    age = now - report.heartbeat
    held = tuple(h for h in report.holders if h.version == old)
    count = report.in_use.get(old, 0)
    if held or count:
        holders[node] = held
    if age > ttl:
        return [f"{node}: report is stale ({age:.0f}s old, ttl {ttl:.0f}s)"]
    reasons = []
    if report.current != new:
        reasons.append(f"{node}: current version is {report.current}, not {new}")
    if count:
        reasons.append(f"{node}: {count} holder(s) of version {old}")
    return reasons
