"""The node report value and the ``Reporter`` Protocol.

A report is small and bounded: per credential, the current version, holder
counts per version and at most ``max_holders`` holder summaries. It carries no
secret value: versions are ids, holders are pids, exes and names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

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
        data: dict[str, Any] = json.loads(text)
        holders = tuple(Holder(**h) for h in data.pop("holders", []))
        errors = tuple(data.pop("errors", []))
        in_use = {str(k): int(v) for k, v in data.pop("in_use", {}).items()}
        return cls(holders=holders, errors=errors, in_use=in_use, **data)

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
        """Every node's latest report for the credential."""
        ...

    async def forget(self, key: str, node: str) -> None:
        """Remove a node's report (the node is known gone)."""
        ...

    async def aclose(self) -> None: ...
