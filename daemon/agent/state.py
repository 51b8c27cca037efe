"""What the agent knows of one credential it follows (its version, files, errors); the status API reads it.

A plain record: it does no I/O and never holds a secret value (only keyed fingerprints).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from daemon.config import CredentialConfig
from daemon.files.writer import Writer
from daemon.model import VersionId


@dataclass
class CredentialState:
    """What the agent knows of one credential; the status API reads it."""

    config: CredentialConfig
    writer: Writer
    version: VersionId | None = None
    written: bool = False
    last_change: float | None = None
    last_error: str | None = None
    # The store outage a watch is riding out, if any (shown before last_error).
    store_error: str | None = None
    # The change being propagated (baton_propagation_seconds): when the store
    # made it, and the consumers that have yet to take it.
    changed_at: float | None = None
    waiting_for: set[str] = field(default_factory=set)
    # Keyed fingerprints of each version's rendered env values (for ``baton exec``
    # holders), computed from the payload in hand when the version is written.
    fingerprints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    swapped: asyncio.Event = field(default_factory=asyncio.Event)

    def status(self, on_disk: list[str]) -> dict[str, Any]:
        return {
            "key": self.config.key,
            "current": self.version,
            "written": self.written,
            "on_disk": on_disk,
            "last_change": self.last_change,
            "last_error": self.store_error or self.last_error,
            "output": str(self.config.output.dir),
        }
