"""The ``SecretStore`` Protocol every store implements, and nothing else.

Semantics every store keeps:

- ``read`` returns a payload; ``versions``/``watch`` never do.
- ``watch`` yields the current version's ``VersionInfo`` at once, then on every
  change of the current version id. A metadata-only change yields nothing.
  An outage it polls through is told to ``on_status`` (the error, then None).
- ``create`` adds a version staged ``pending``; ``promote`` makes it ``current``
  and the old current ``previous``; ``retire`` marks a version retired (and
  removes its payload where the store can). Each is idempotent.
- ``merge_metadata`` merges entries server-side, so two nodes writing their own
  keys never overwrite each other; a ``None`` value deletes the entry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol, runtime_checkable

from daemon.errors import StoreError
from daemon.model import Secret, SecretVersion, VersionId, VersionInfo

MAX_PAYLOAD = 1024 * 1024

# Told of each failed poll while a watch rides out an outage, and None once the
# store answers again: the watcher keeps its last good files, the agent shows it.
StatusHook = Callable[[StoreError | None], None]


@runtime_checkable
class SecretStore(Protocol):
    """A secret store. Its capabilities default here (a store subclasses this Protocol to inherit them)."""

    # The longest metadata value the store takes (Vault: 512 bytes); None: no limit of its own.
    metadata_value_limit: int | None = None

    def metadata_entry(self, key: str) -> str:
        """The name ``read_metadata`` gives an entry written as ``key`` (Kubernetes shortens long ones)."""
        return key

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        """The current version of ``key`` (or the given one), with its payload."""
        ...

    async def versions(self, key: str) -> list[VersionInfo]:
        """Every version the store still knows of, oldest first, without payloads."""
        ...

    def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        """Yield the current version now and whenever the current version changes.

        A store that polls rides out an outage inside the watch and reports it
        through ``on_status``; errors it cannot ride out end the watch.
        """
        ...

    async def create(self, key: str, payload: Secret) -> VersionInfo:
        """Add a version staged ``pending``."""
        ...

    async def promote(self, key: str, version: VersionId) -> None:
        """Make ``version`` current; the old current becomes previous."""
        ...

    async def retire(self, key: str, version: VersionId) -> None:
        """Mark ``version`` retired: no node may use it any more."""
        ...

    async def merge_metadata(self, key: str, entries: Mapping[str, str | None]) -> None:
        """Merge entries into the key's metadata server-side; ``None`` deletes."""
        ...

    async def read_metadata(self, key: str) -> dict[str, str]:
        """The key's metadata."""
        ...

    async def aclose(self) -> None: ...


def check_payload(raw: bytes | str) -> str:
    """Validate a payload: non-empty, UTF-8, at most 1 MiB. Returns it as text."""
    from daemon.errors import PayloadError

    try:
        data = raw.encode() if isinstance(raw, str) else raw
    except UnicodeEncodeError:  # a str holding lone surrogates
        raise PayloadError("payload is not valid UTF-8", reason="encoding") from None
    if not data:
        raise PayloadError("payload is empty", reason="empty")
    if len(data) > MAX_PAYLOAD:
        raise PayloadError(f"payload is {len(data)} bytes, over the 1 MiB limit", reason="size")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload is not valid UTF-8", reason="encoding") from None
