"""Node reports for large fleets on Vault: one KV entry per node under the store's ``status_prefix``.

It goes through the store's ``VaultClient`` (never the store's own KV bookkeeping),
so a report write can never touch a credential's metadata.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from daemon.config import Config, VaultStoreConfig
from daemon.errors import ConfigError, StoreError, StoreNotFound
from daemon.model import CredentialName, NodeId
from daemon.report.base import NodeReport
from daemon.stores.base import SecretStore
from daemon.stores.vault import VaultStore

log = logging.getLogger(__name__)


class _Report(Protocol):
    """What the reporter needs of a node report (daemon.report.base.NodeReport)."""

    @property
    def node(self) -> str: ...

    @property
    def credential(self) -> str: ...

    def to_json(self) -> str: ...


R = TypeVar("R", bound=_Report)

_NODE = re.compile(r"^[A-Za-z0-9_.@:-]{1,253}$")


class VaultStatusReporter(Generic[R]):
    """Node reports for large fleets: one KV entry per node at ``<status_prefix>/<credential>/<node>``.

    Each node writes only its own path, so no two nodes ever touch the same
    object; ``collect`` lists the credential's folder and reads every entry.
    ``parse`` turns the stored JSON back into a report (``NodeReport.from_json``
    when built by ``from_config``). Each entry also records the store key it
    reports on, so ``forget(key, node)`` can find it without knowing the credential.
    """

    absent_means_gone = False

    def __init__(
        self,
        store: VaultStore,
        *,
        parse: Callable[[str], R],
        prefix: str | None = None,
        owns_store: bool = False,
        concurrency: int = 16,
    ) -> None:
        self.store = store
        self.client = store.client
        self.parse = parse
        self.prefix = (prefix if prefix is not None else store.status_prefix).strip("/")
        self.owns_store = owns_store
        self._sem = asyncio.Semaphore(concurrency)
        self._trimmed: set[str] = set()
        self._credential_of: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: Config, store: SecretStore) -> VaultStatusReporter[NodeReport]:
        """For ``daemon.report.open_reporter`` (``reports: status_path``); shares the agent's store."""
        sc = config.store
        if not isinstance(sc, VaultStoreConfig) or not isinstance(store, VaultStore):
            raise ConfigError(["store.reports: status_path on Vault needs the vault store"])
        return VaultStatusReporter(store, parse=NodeReport.from_json, prefix=sc.status_prefix)

    def _path(self, credential: str, node: str) -> str:
        for name, what in ((credential, "credential"), (node, "node")):
            if not _NODE.match(name):
                raise StoreError(f"vault status path: bad {what} name {name[:40]!r}")
        return f"{self.prefix}/{credential}/{node}"

    async def publish(self, key: str, report: R) -> None:
        path = self._path(report.credential, report.node)
        self._credential_of[key] = report.credential
        await self.client.write(path, {"report": report.to_json(), "key": key}, cas=None)
        if path not in self._trimmed:
            # A heartbeat writes a version each time; keep only the latest two.
            await self.client.call(
                f"set max_versions of {path}",
                lambda c: c.adapter.post(self.client.kv_url("metadata", path), json={"max_versions": 2}),
            )
            self._trimmed.add(path)

    async def _entry(self, path: str) -> dict[str, Any] | None:
        async with self._sem:
            try:
                resp = await self.client.read_version(path)
            except StoreNotFound:
                return None  # forgotten between list and read
        data = resp["data"]["data"]
        # An entry that is there but not an object is unreadable, not absent ({} has no report).
        return data if isinstance(data, dict) else {}

    async def _one(self, folder: str, node: NodeId, credential: CredentialName) -> R | None:
        """The node's report; None if the entry vanished since the listing (then the
        rotator's own memory of the node keeps it unknown); a stale stand-in if unreadable."""
        path = f"{folder}/{node}"
        data = await self._entry(path)
        if data is None:
            return None
        try:
            report = self.parse(str(data["report"]))
            if report.credential != credential:  # the folder says otherwise
                raise ValueError("report for another credential")
            if report.node != node:  # filed under another node's entry: it cannot speak for that node
                raise ValueError("report for another node")
            return report
        except (KeyError, TypeError, ValueError):
            log.warning("unreadable node report", extra={"path": path})
        # An unreadable report is an unknown node, and unknown blocks: stand in a
        # report that is stale from the start (heartbeat 0), made by the same parser.
        return self.parse(NodeReport(node=node, credential=credential, current=None).to_json())

    async def collect(self, key: str, credential: CredentialName) -> list[R]:
        folder = self._path(credential, "x").rpartition("/")[0]
        self._credential_of[key] = credential
        names = [NodeId(n) for n in await self.client.list(folder) if not n.endswith("/")]
        return await self._read_all(folder, names, credential)

    async def _read_all(self, folder: str, nodes: Sequence[NodeId], credential: CredentialName) -> list[R]:
        found = await asyncio.gather(*(self._one(folder, n, credential) for n in nodes))
        return [r for r in found if r is not None]

    async def collect_nodes(self, key: str, credential: CredentialName, nodes: Sequence[NodeId]) -> list[R]:
        """The reports of just ``nodes`` (one read each); a node without an entry is left out.

        For the rotator's quick check while a drain goes on (``CredentialRotator``):
        re-reading the few nodes that still block costs far less than ``collect``.
        """
        folder = self._path(credential, "x").rpartition("/")[0]
        for node in nodes:
            self._path(credential, node)  # validates the node name
        return await self._read_all(folder, nodes, credential)

    async def forget(self, key: str, node: NodeId) -> None:
        self._path("x", node)  # validates the node name
        credential = self._credential_of.get(key)
        if credential is not None:
            candidates = [self._path(credential, node)]
        else:
            # Not seen in this process: look for the node under every
            # credential folder and forget only the entries written for ``key``.
            folders = [f.rstrip("/") for f in await self.client.list(self.prefix) if f.endswith("/")]
            candidates = []
            for folder in folders:
                path = f"{self.prefix}/{folder}/{node}"
                data = await self._entry(path)
                if data is not None and data.get("key") == key:
                    candidates.append(path)
        for path in candidates:
            await self.client.delete_all(path)
            self._trimmed.discard(path)

    async def aclose(self) -> None:
        if self.owns_store:
            await self.store.aclose()
