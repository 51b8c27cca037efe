"""Holders that run no agent: the ``HolderSource`` Protocol and ``open_holders``.

A node report says what one agent's node holds. Some holders run no agent at
all: a Kubernetes pod that reads the Secret as environment variables or a
mounted volume (``sidecar/podholders.py``). A holder source yields report-like
entries for them (a ``NodeReport`` per pod or workload, node ids like
``pod/web-1`` and ``Deployment/web``), which the retirement gate judges beside
the agents' reports (``rotation.reader.GateReader.decisions``). An entry it
cannot judge says so as a holder of the old version: unknown is in use.

The source is chosen by the store kind through ``daemon.kit.plugins.HOLDERS``;
a store with no entry there has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from daemon.kit import plugins
from daemon.model import CredentialName, VersionId

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.report.base import NodeReport


class HolderSource(Protocol):
    async def reports(
        self, key: str, credential: CredentialName, *, old: Sequence[VersionId], new: VersionId, now: float
    ) -> list[NodeReport]:
        """Entries for what holds ``old`` (and what already holds ``new``) of the credential stored at ``key``.

        A source opened with ``act=True`` (the leading rotator) may also act on the
        change first (roll the workloads annotated for the credential); opened
        without it (``baton status --pending``) it only looks.
        """
        ...

    async def aclose(self) -> None: ...


def open_holders(config: Config, *, act: bool) -> HolderSource | None:
    """The store's holder source, or None when its kind has none (or the config turns it off)."""
    name = config.store.kind
    if name not in plugins.HOLDERS:
        return None
    factory = plugins.load(plugins.HOLDERS, name, kind="holder source")
    source: HolderSource | None = factory(config, act=act)
    return source
