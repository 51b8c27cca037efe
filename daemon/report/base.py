"""The node report value and the ``Reporter`` Protocol.

A report is small and bounded: per credential, the current version, holder
counts per version and at most ``max_holders`` holder summaries. It carries no
secret value: versions are ids, holders are pids, exes and names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

REPORT_PREFIX = "baton.node."


@dataclass(frozen=True)
class Holder:
    pid: int
    exe: str
    consumer: str | None  # None: an unmanaged holder
    how: str  # fd, fanotify, environ, start-time, provider
    version: str


@dataclass(frozen=True)
class NodeReport:
    node: str
    credential: str
    current: str | None
    in_use: dict[str, int] = field(default_factory=dict)  # version -> holder count
    holders: tuple[Holder, ...] = ()
    heartbeat: float = 0.0
    agent_version: str = ""
    errors: tuple[str, ...] = ()

    def to_json(self) -> str:
        data = asdict(self)
        data["holders"] = [asdict(h) for h in self.holders]
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NodeReport:
        """Parse a report; fields this version does not know are ignored.

        A newer agent may add fields, and an older rotator reading its report
        must still see the fields it gates on. A missing required field or a
        value that is not a JSON object still raises (TypeError, ValueError or
        KeyError), and the caller then treats the node as unknown.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"a node report is a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        holder_fields = {f.name for f in fields(Holder)}
        raw_holders = data.pop("holders", [])
        if not isinstance(raw_holders, list) or not all(isinstance(h, dict) for h in raw_holders):
            raise TypeError("report holders are a list of objects")
        holders = tuple(Holder(**{k: v for k, v in h.items() if k in holder_fields}) for h in raw_holders)
        errors = tuple(str(e) for e in data.pop("errors", []))
        raw_in_use = data.pop("in_use", {})
        if not isinstance(raw_in_use, dict):
            raise TypeError("report in_use is an object")
        in_use = {str(k): int(v) for k, v in raw_in_use.items()}
        report = cls(holders=holders, errors=errors, in_use=in_use, **data)
        # The gate keys and sorts on these and compares heartbeats: a wrong type is unreadable, not a crash later.
        if not isinstance(report.node, str) or not isinstance(report.credential, str):
            raise TypeError("report node and credential are strings")
        if report.current is not None and not isinstance(report.current, str):
            raise TypeError("report current is a string or null")
        if isinstance(report.heartbeat, bool) or not isinstance(report.heartbeat, int | float):
            raise TypeError("report heartbeat is a number")
        if not math.isfinite(report.heartbeat):
            # NaN would never compare as stale, so the gate would take it as fresh.
            raise ValueError("report heartbeat is a finite number")
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


class Reporter(Protocol):
    # True when a missing report means the node is known gone (a deleted Pod),
    # False when it means "unknown" (a store entry that vanished): unknown blocks.
    absent_means_gone: bool

    async def publish(self, key: str, report: NodeReport) -> None:
        """Write this node's report for the credential stored at ``key``."""
        ...

    async def collect(self, key: str, credential: str) -> list[NodeReport]:
        """Every node's latest report for the credential.

        A reporter that reads one store entry per node may also offer
        ``collect_nodes(key, credential, nodes) -> list[NodeReport]``, the reports of
        just those nodes: the rotator then re-reads only the nodes that still block
        a retirement while a drain goes on (``CredentialRotator._blockers_remain``).
        """
        ...

    async def forget(self, key: str, node: str) -> None:
        """Remove a node's report (the node is known gone)."""
        ...

    async def aclose(self) -> None: ...
