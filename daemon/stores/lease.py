"""Rotator leases kept in the store itself: the record, and the one primitive a store offers.

A store that can hold a lease implements ``LeaseStore``: ``read_lease``, and a
``write_lease`` that succeeds only while the lease's revision is still the one
the caller read (``expect``; None: no lease recorded yet). Of two writers that
expect the same revision exactly one wins; the other gets None. Each store
says in its own docstring what makes that true for it (a SQLite transaction,
KV v2 ``cas``, a conditional staging-label move, a Lease resourceVersion).

Who may take a lease and when a holder steps down is decided in
daemon/rotation/leadership.py, never here. A lease record names its holder
and times; it never holds a secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from daemon.errors import StoreError


@dataclass(frozen=True)
class LeaseRecord:
    """A lease on one credential (key). ``holder`` is "" once released."""

    holder: str
    renewed: float  # the holder's wall clock at its last write: shown, never trusted for expiry
    ttl: float  # seconds the holder promises to renew within
    revision: str = ""  # assigned by the store; changes on every write

    @property
    def expires(self) -> float:
        """When the lease runs out by the holder's clock (for display)."""
        return self.renewed + self.ttl

    def to_json(self) -> str:
        return json.dumps({"holder": self.holder, "renewed": self.renewed, "ttl": self.ttl}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, revision: str) -> LeaseRecord:
        try:
            data = json.loads(text)
            return cls(str(data["holder"]), float(data["renewed"]), float(data["ttl"]), revision)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"unreadable lease record ({type(e).__name__})") from None

    def at(self, revision: str) -> LeaseRecord:
        return replace(self, revision=revision)


@runtime_checkable
class LeaseStore(Protocol):
    async def read_lease(self, key: str) -> LeaseRecord | None:
        """The lease on ``key``'s rotation, or None when none was ever written."""
        ...

    async def write_lease(self, key: str, record: LeaseRecord, *, expect: str | None) -> LeaseRecord | None:
        """Write ``record`` if the lease's revision is still ``expect``; the stored record, or None if not."""
        ...
