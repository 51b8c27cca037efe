"""Small value types shared by every layer: ids and version descriptions.

Nothing here does I/O. ``Secret`` wraps a payload so that it cannot leak
through ``repr``/``str`` into a log line or an exception by accident.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import NewType

CredentialName = NewType("CredentialName", str)
VersionId = NewType("VersionId", str)
NodeId = NewType("NodeId", str)

# Stages a version can carry. The names follow the local store; other stores
# map their own (AWSCURRENT, KV current_version, ...) onto these.
CURRENT = "current"
PREVIOUS = "previous"
PENDING = "pending"


class Secret:
    """A secret payload. ``str()`` and ``repr()`` never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself. Call only where the value is written or sent."""
        return self._value

    def digest(self) -> str:
        """SHA-256 of the value, hex; safe to log and compare."""
        return hashlib.sha256(self._value.encode()).hexdigest()

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class VersionInfo:
    """What a store says about one version, without its payload."""

    id: VersionId
    stages: frozenset[str] = frozenset()
    created: float = 0.0
    retired: bool = False
    # Content digest when the store can tell it cheaply (local store); else "".
    digest: str = ""

    @property
    def is_current(self) -> bool:
        return CURRENT in self.stages


@dataclass(frozen=True)
class SecretVersion:
    """One version with its payload."""

    info: VersionInfo
    payload: Secret = field(repr=False)

    @property
    def id(self) -> VersionId:
        return self.info.id


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def version_label(version: VersionId) -> str:
    """A short, path-safe label for a version id (``7``, ``3f2a1b2c``)."""
    cleaned = _UNSAFE.sub("", version).strip(".")
    return cleaned[:12] or "x"
