"""The node report value and the ``Reporter`` Protocol.

A report is small and bounded: per credential, the current version, holder
counts per version and at most ``max_holders`` holder summaries. It carries no
secret value: versions are ids, holders are pids, exes and names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol, runtime_checkable

from daemon.model import CredentialName, NodeId, VersionId

REPORT_PREFIX = "baton.node."
# A report is a few KiB at most (max_holders <= 100 summaries): far larger text is not one.
MAX_REPORT_CHARS = 1 << 20


@dataclass(frozen=True)
class Holder:
    pid: int
    exe: str
    consumer: str | None  # None: an unmanaged holder
    how: str  # fd, fanotify, environ, start-time, provider
    version: VersionId


@dataclass(frozen=True)
class NodeReport:
    node: NodeId
    credential: CredentialName
    current: VersionId | None
    in_use: dict[VersionId, int] = field(default_factory=dict)  # version -> holder count
    holders: tuple[Holder, ...] = ()
    heartbeat: float = 0.0
    agent_version: str = ""
    errors: tuple[str, ...] = ()

    def to_json(self) -> str:
        data = asdict(self)
        data["holders"] = [asdict(h) for h in self.holders]
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, node: NodeId | None = None) -> NodeReport:
        """Parse a report; fields this version does not know are ignored.

        A newer agent may add fields, and an older rotator reading its report
        must still see the fields it gates on. Anything else that is not a
        report raises TypeError, ValueError or KeyError, never another error
        (the text may come from a hostile node), and the caller then treats the
        node as unknown. ``node``: the node whose record (entry, item) the text
        was read from; a report there naming another node is unreadable, so it
        cannot speak for that node (with a newer heartbeat it would hide that
        node's own report from the gate).
        """
        if len(text) > MAX_REPORT_CHARS:
            raise ValueError(f"a node report is at most {MAX_REPORT_CHARS} characters")
        try:
            data = json.loads(text)
        except RecursionError:
            # Nested deeper than the parser's stack: would escape every reporter's except.
            raise ValueError("a node report is not nested that deep") from None
        if not isinstance(data, dict):
            raise TypeError(f"a node report is a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        holder_fields = {f.name for f in fields(Holder)}
        raw_holders = data.pop("holders", [])
        if not isinstance(raw_holders, list) or not all(isinstance(h, dict) for h in raw_holders):
            raise TypeError("report holders are a list of objects")
        holders = tuple(Holder(**{k: v for k, v in h.items() if k in holder_fields}) for h in raw_holders)
        if not all(_holder_ok(h) for h in holders):
            raise TypeError("report holders have a pid, exe, consumer, how and version of their types")
        errors = data.pop("errors", [])
        if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
            raise TypeError("report errors are a list of strings")
        raw_in_use = data.pop("in_use", {})
        if not isinstance(raw_in_use, dict):
            raise TypeError("report in_use is an object")
        if not all(_count_ok(v) for v in raw_in_use.values()):
            # int() would truncate 0.5 to "no holder" and raise OverflowError on Infinity.
            raise TypeError("report in_use counts are non-negative integers")
        report = cls(holders=holders, errors=tuple(errors), in_use=dict(raw_in_use), **data)
        # The gate keys and sorts on these and compares heartbeats: a wrong type is unreadable, not a crash later.
        if not isinstance(report.node, str) or not isinstance(report.credential, str):
            raise TypeError("report node and credential are strings")
        if node is not None and report.node != node:
            raise ValueError("a report filed under another node's record")
        if report.current is not None and not isinstance(report.current, str):
            raise TypeError("report current is a string or null")
        if not isinstance(report.agent_version, str):
            raise TypeError("report agent_version is a string")
        if isinstance(report.heartbeat, bool) or not isinstance(report.heartbeat, int | float):
            raise TypeError("report heartbeat is a number")
        try:
            finite = math.isfinite(report.heartbeat)
        except OverflowError:  # an integer beyond any float: the gate's age arithmetic would raise it
            finite = False
        if not finite or report.heartbeat < 0:
            # NaN would never compare as stale, so the gate would take it as fresh.
            raise ValueError("report heartbeat is a finite, non-negative number")
        return report

    def same_state(self, other: NodeReport | None) -> bool:
        """True when only the heartbeat differs (no need to publish on change)."""
        if other is None:
            return False
        return (self.current, self.in_use, self.holders, self.errors) == (
            other.current,
            other.in_use,
            other.holders,
            other.errors,
        )


def _count_ok(v: object) -> bool:
    return type(v) is int and v >= 0


def _holder_ok(h: Holder) -> bool:
    return (
        _count_ok(h.pid)
        and isinstance(h.exe, str)
        and (h.consumer is None or isinstance(h.consumer, str))
        and isinstance(h.how, str)
        and isinstance(h.version, str)
    )


class Reporter(Protocol):
    # True when a missing report means the node is known gone (a deleted Pod),
    # False when it means "unknown" (a store entry that vanished): unknown blocks.
    absent_means_gone: bool

    async def publish(self, key: str, report: NodeReport) -> None:
        """Write this node's report for the credential stored at ``key``."""
        ...

    async def collect(self, key: str, credential: CredentialName) -> list[NodeReport]:
        """Every node's latest report for the credential (a reporter that can also read
        just some nodes says so by being a ``NodeReader`` as well)."""
        ...

    async def forget(self, key: str, node: NodeId) -> None:
        """Remove a node's report (the node is known gone)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class NodeReader(Protocol):
    """A reporter's second capability: the reports of just some nodes, one store entry each.

    The rotator then re-reads only the nodes that still block a retirement while
    a drain goes on (``CredentialRotator._blockers_remain``); a reporter without it
    is read whole (``collect``) every time.
    """

    async def collect_nodes(
        self, key: str, credential: CredentialName, nodes: Sequence[NodeId]
    ) -> list[NodeReport]: ...
