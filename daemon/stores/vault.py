"""HashiCorp Vault KV v2 as a ``SecretStore``: Baton's stages kept in KV metadata.

Every call goes through ``daemon.clients.vault.VaultClient`` (sessions, auth,
error mapping: hvac is imported there only); this module owns the bookkeeping.

How stages map onto KV v2 (all bookkeeping lives in the key's ``custom_metadata``,
values are strings, lists are comma-separated version numbers):

    baton.current   the version readers use. KV v2 always makes the newest
                    version its ``current_version``, so ``create`` pins the old
                    one here before it writes; when absent, ``current_version``
                    is current (a key written by hand, never rotated). "0": the
                    key has no current version yet (created, never promoted).
    baton.pending   versions written by ``create`` and not yet promoted.
    baton.previous  versions that were current before, not yet retired
                    (every one of them may still be draining).
    baton.retired   versions retired by Baton (bounded to the last 32). A version
                    that KV reports deleted or destroyed counts as retired too.
    baton.node.*    node reports of ``reports: metadata`` (daemon/report/metadata.py).

- ``create`` records the version it is about to write pending (with ``cas`` =
  the current KV version, the new one is that plus one), then writes it with
  that ``cas``, so a concurrent writer makes it fail with ``StoreConflict`` and
  a write whose answer is lost is pending all the same. It refuses a write that
  would make KV's ``max_versions`` purge a version that is not retired.
- ``promote`` is one metadata PATCH (current, pending and previous together),
  which Vault applies atomically. Metadata has no check-and-set, so two
  rotators of one credential could race; the rotator's lease keeps it to one.
- The rotator's lease on ``key`` is the KV entry ``<lease_prefix>/<key>``,
  written with ``cas`` = the entry's version (its revision; 0 for a new one).
- ``retire`` destroys the version (``retire: destroy``) or soft-deletes it
  (``retire: delete``), then records it retired. The current version is never retired.
- ``watch`` polls metadata only (never a payload) and yields on a change of the
  current version id; a metadata-only change (a node report) yields nothing.
- A version written by hand (``vault kv put``) on a key that Baton rotates is
  neither current nor pending until someone promotes it.
- custom_metadata is limited by Vault to 64 keys (key <= 128, value <= 512
  bytes). ``merge_metadata`` checks before it writes and says to use
  ``reports: status_path`` (``daemon.report.vault_status``) when a fleet outgrows it.
  The server checks the 64 keys of a PATCH body only, not of the merged map, so
  concurrent merges can leave more; then only a merge that adds keys is refused.

Payloads: a KV data map ``{"value": "<str>"}`` is the payload string itself;
any other map is its JSON (so templates see the fields). ``create`` of a payload
that is a JSON object writes the object's fields as KV data.

Auth is the client's (token, token_file, approle, kubernetes; renewal, one re-login on a dead token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.clients.vault import (
    MAX_METADATA_KEY_LEN,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_LEN,
    VaultClient,
    parse_time,
)
from daemon.config import Config, VaultAuthConfig, VaultStoreConfig
from daemon.errors import (
    ConfigError,
    StoreConflict,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, SecretVersion, VersionId, VersionInfo
from daemon.stores.base import SecretStore, StatusHook, check_payload
from daemon.stores.lease import LeaseRecord

log = logging.getLogger(__name__)


KEEP_RETIRED = 32

K_CURRENT = "baton.current"
K_PENDING = "baton.pending"
K_PREVIOUS = "baton.previous"
K_RETIRED = "baton.retired"


# ---------------------------------------------------------------- metadata


def _numbers(text: str | None) -> frozenset[int]:
    out = set()
    for part in (text or "").split(","):
        part = part.strip()
        if part.isdigit():
            out.add(int(part))
    return frozenset(out)


def _join(numbers: set[int] | frozenset[int]) -> str | None:
    # Vault rejects an empty value, so an empty list deletes the entry.
    return ",".join(str(n) for n in sorted(numbers)) or None


@dataclass(frozen=True)
class _VersionMeta:
    created: float
    deleted: bool
    destroyed: bool


@dataclass(frozen=True)
class _Meta:
    """A parsed ``GET <mount>/metadata/<key>`` answer."""

    current_version: int
    versions: dict[int, _VersionMeta]
    custom: dict[str, str] = field(default_factory=dict)
    max_versions: int = 0  # the key's own setting; 0: the mount's

    @classmethod
    def parse(cls, resp: Any) -> _Meta:
        data = resp["data"]
        now = time.time()
        versions = {}
        for number, v in (data.get("versions") or {}).items():
            deletion = parse_time(v.get("deletion_time"))
            versions[int(number)] = _VersionMeta(
                created=parse_time(v.get("created_time")),
                deleted=bool(deletion) and deletion <= now,
                destroyed=bool(v.get("destroyed")),
            )
        custom = {str(k): str(v) for k, v in (data.get("custom_metadata") or {}).items()}
        return cls(
            current_version=int(data.get("current_version") or 0),
            versions=versions,
            custom=custom,
            max_versions=int(data.get("max_versions") or 0),
        )

    @property
    def current(self) -> int:
        pinned = self.custom.get(K_CURRENT, "").strip()
        return int(pinned) if pinned.isdigit() else self.current_version

    @property
    def pending(self) -> frozenset[int]:
        return _numbers(self.custom.get(K_PENDING))

    @property
    def previous(self) -> frozenset[int]:
        return _numbers(self.custom.get(K_PREVIOUS))

    @property
    def retired(self) -> frozenset[int]:
        return _numbers(self.custom.get(K_RETIRED))

    def gone(self, number: int) -> bool:
        v = self.versions.get(number)
        return v is None or v.deleted or v.destroyed

    def info(self, number: int) -> VersionInfo:
        v = self.versions.get(number)
        current = self.current
        stages: set[str] = set()
        if number == current:
            stages.add(CURRENT)
        elif number in self.pending:
            stages.add(PENDING)
        elif number in self.previous:
            stages.add(PREVIOUS)
        return VersionInfo(
            id=VersionId(str(number)),
            stages=frozenset(stages),
            created=v.created if v else 0.0,
            retired=number in self.retired or self.gone(number),
        )


def decode_payload(data: Any) -> str:
    """KV data -> payload text: ``{"value": s}`` is ``s``, anything else its JSON."""
    if isinstance(data, dict) and set(data) == {"value"} and isinstance(data["value"], str):
        return data["value"]
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def encode_payload(text: str) -> dict[str, Any]:
    """Payload text -> KV data: a JSON object's fields, else ``{"value": text}``."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj:
            return obj
    return {"value": text}


def _parse_version(version: VersionId | str) -> int:
    text = str(version).strip()
    if not text.isdigit() or int(text) <= 0:
        # The bad id is not echoed: callers pass ids through from elsewhere.
        raise StoreNotFound("not a Vault KV version number (expected a positive integer)")
    return int(text)


class VaultStore(SecretStore):
    """KV v2 behind the ``SecretStore`` Protocol."""

    # Vault refuses a custom_metadata value over this; reporters trim to fit.
    metadata_value_limit = MAX_METADATA_VALUE_LEN

    def __init__(
        self,
        *,
        url: str,
        auth: VaultAuthConfig | None = None,
        mount: str = "secret",
        namespace: str | None = None,
        poll_interval: float = 30.0,
        timeout: float = 10.0,
        verify: bool | str = True,
        retire: str = "destroy",
        status_prefix: str = "baton/status",
        lease_prefix: str = "baton/lease",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.mount = mount.strip("/")
        self.poll_interval = poll_interval
        self.retire_mode = retire
        self.status_prefix = status_prefix.strip("/")
        self.lease_prefix = lease_prefix.strip("/")
        # Sessions, auth and error mapping; the status-path reporter shares it.
        self.client = VaultClient(
            url=url, auth=auth, mount=mount, namespace=namespace, timeout=timeout, verify=verify, env=env
        )
        self._mount_max: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> VaultStore:
        sc = config.store
        if not isinstance(sc, VaultStoreConfig):
            raise ConfigError([f"store.kind: expected vault (got {sc.kind!r})"])
        return cls(
            url=sc.url,
            auth=sc.auth,
            mount=sc.mount,
            namespace=sc.namespace,
            poll_interval=sc.poll_interval,
            timeout=sc.timeout,
            verify=str(sc.verify) if isinstance(sc.verify, Path) else sc.verify,
            retire=sc.retire,
            status_prefix=sc.status_prefix,
            lease_prefix=sc.lease_prefix,
        )

    # ------------------------------------------------------------ raw KV helpers

    async def _metadata(self, key: str) -> _Meta:
        return _Meta.parse(await self.client.metadata(key))

    async def _patch(self, key: str, custom: Mapping[str, str | None]) -> None:
        await self.client.patch_metadata(key, custom)

    async def _write(self, key: str, data: dict[str, Any], *, cas: int | None) -> Any:
        return await self.client.write(key, data, cas=cas)

    # ------------------------------------------------------------ SecretStore

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        meta = await self._metadata(key)
        number = meta.current if version is None else _parse_version(version)
        if number == 0:
            raise StoreNotFound(f"vault {key}: no current version yet")
        resp = await self.client.read_version(key, number)
        payload = check_payload(decode_payload(resp["data"]["data"]))
        return SecretVersion(info=meta.info(number), payload=Secret(payload))

    async def versions(self, key: str) -> list[VersionInfo]:
        meta = await self._metadata(key)
        return [meta.info(n) for n in sorted(meta.versions)]

    async def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        """Poll metadata every ``poll_interval``; yield when the current version id changes.

        A store outage is logged and polled through (the last version stays in
        use), and so is a key that does not exist yet; an auth error ends the watch.
        """
        last: int | None = None
        missing_logged = False
        down = False
        while True:
            try:
                meta = await self._metadata(key)
            except StoreUnavailable as e:
                log.warning("vault watch: store unavailable, will poll again", extra={"key": key, "error": str(e)})
                down = True
                if on_status is not None:
                    on_status(e)
            except StoreNotFound:
                if not missing_logged:
                    log.info("vault watch: key does not exist yet, will poll again", extra={"key": key})
                    missing_logged = True
            else:
                if down:
                    down = False
                    if on_status is not None:
                        on_status(None)
                number = meta.current
                if number and number != last and not meta.gone(number):
                    last = number
                    yield meta.info(number)
            await asyncio.sleep(self.poll_interval)

    async def create(self, key: str, payload: Secret) -> VersionInfo:
        data = encode_payload(check_payload(payload.reveal()))
        try:
            meta: _Meta | None = await self._metadata(key)
        except StoreNotFound:
            meta = None
        if meta is None:
            # A new key: make it exist with no current version, so the first
            # version stays pending like any other.
            await self.client.call(
                f"create metadata of {key}",
                lambda c: c.adapter.post(
                    self.client.kv_url("metadata", key), json={"custom_metadata": {K_CURRENT: "0", K_PENDING: "1"}}
                ),
            )
            cas, pending = 0, frozenset({1})
        else:
            await self._check_room(key, meta)
            cas = meta.current_version
            # The version this write makes (cas: KV numbers versions one by one) is
            # recorded pending *before* the write, in the same PATCH that pins the
            # current one: a write whose answer is lost (slow, or the writer died)
            # is still pending, never a stray version nobody recorded.
            pending = frozenset({n for n in meta.pending if not meta.gone(n)} | {cas + 1})
            entries = {K_PENDING: _join(pending)}
            if K_CURRENT not in meta.custom:
                # Pin the current version before the write makes the new one KV's newest.
                entries[K_CURRENT] = str(meta.current_version)
            await self._patch(key, entries)
        try:
            resp = await self._write(key, data, cas=cas)
        except StoreConflict:
            # Someone else's write made that version: it is not pending.
            await self._patch(key, {K_PENDING: _join(pending - {cas + 1})})
            raise
        number = int(resp["data"]["version"])
        if number != cas + 1:  # not with cas; kept honest all the same
            await self._patch(key, {K_PENDING: _join((pending - {cas + 1}) | {number})})
        log.info("vault version created", extra={"key": key, "version": number})
        return VersionInfo(
            id=VersionId(str(number)),
            stages=frozenset({PENDING}),
            created=parse_time(resp["data"].get("created_time")),
        )

    async def _check_room(self, key: str, meta: _Meta) -> None:
        """Refuse a write that would make KV purge a version Baton has not retired.

        KV v2 keeps ``max_versions`` versions (the key's, else the mount's, 10 when
        unset) and permanently deletes the oldest on the next write, whatever it is.
        """
        limit = meta.max_versions or await self._mount_max_versions()
        numbers = sorted(meta.versions)
        over = len(numbers) + 1 - limit
        if over <= 0:
            return
        live = [n for n in numbers[:over] if not meta.info(n).retired]
        if live:
            raise StoreError(
                f"vault {key}: a new version would make KV purge version(s) {_join(set(live))}, which are not "
                f"retired (max_versions {limit}); nothing was written. Retire them, or raise max_versions of the key"
            )

    async def _mount_max_versions(self) -> int:
        if self._mount_max is None:
            try:
                url = f"/v1/{self.mount}/config"
                resp = await self.client.call(f"read config of {self.mount}", lambda c: c.adapter.get(url))
                self._mount_max = int((resp.get("data") or {}).get("max_versions") or 0) or 10
            except StoreError:
                self._mount_max = 10  # a token without read on <mount>/config: KV's default
        return self._mount_max

    async def promote(self, key: str, version: VersionId) -> None:
        number = _parse_version(version)
        meta = await self._metadata(key)
        if meta.gone(number):
            raise StoreNotFound(f"vault {key}: version {number} does not exist or is deleted")
        old = meta.current
        # Older pending versions (a write by hand, an abandoned attempt) are pending no more.
        pending = frozenset(n for n in meta.pending if n > number)
        previous = set(meta.previous)
        if old and old != number and not meta.gone(old):
            previous.add(old)
        previous = previous - {number} - meta.retired
        if meta.custom.get(K_CURRENT) == str(number) and pending == meta.pending and previous == meta.previous:
            return
        await self._patch(key, {K_CURRENT: str(number), K_PENDING: _join(pending), K_PREVIOUS: _join(previous)})
        log.info("vault version promoted", extra={"key": key, "version": number, "previous": old})

    async def retire(self, key: str, version: VersionId) -> None:
        number = _parse_version(version)
        meta = await self._metadata(key)
        if number == meta.current:
            raise StoreConflict(f"vault {key}: refusing to retire the current version {number}")
        v = meta.versions.get(number)
        if v is not None and not v.destroyed and not (self.retire_mode == "delete" and v.deleted):
            verb = "destroy" if self.retire_mode == "destroy" else "delete"
            await self.client.call(
                f"{verb} {key} version {number}",
                lambda c: c.adapter.post(self.client.kv_url(verb, key), json={"versions": [number]}),
            )
        retired = sorted((meta.retired & set(meta.versions)) | {number})[-KEEP_RETIRED:]
        await self._patch(
            key,
            {
                K_RETIRED: _join(set(retired)),
                K_PREVIOUS: _join(meta.previous - {number}),
                K_PENDING: _join(meta.pending - {number}),
            },
        )
        log.info("vault version retired", extra={"key": key, "version": number, "how": self.retire_mode})

    async def merge_metadata(self, key: str, entries: Mapping[str, str | None]) -> None:
        if not entries:
            return
        for k, v in entries.items():
            if not 0 < len(k.encode()) <= MAX_METADATA_KEY_LEN:
                raise StoreError(f"vault {key}: metadata key {k[:40]!r} must be 1..{MAX_METADATA_KEY_LEN} bytes")
            if v is not None and not 0 < len(v.encode()) <= MAX_METADATA_VALUE_LEN:
                raise StoreError(
                    f"vault {key}: metadata value of {k!r} is {len(v.encode())} bytes; Vault allows "
                    f"1..{MAX_METADATA_VALUE_LEN} (fewer holders per report, or `reports: status_path`)"
                )
        added = {k for k, v in entries.items() if v is not None}
        if added:
            meta = await self._metadata(key)
            removed = {k for k, v in entries.items() if v is None}
            total = len((set(meta.custom) | added) - removed)
            # Vault checks only a PATCH body, never the merged map: two nodes that each saw
            # 63 keys leave 65. Refuse only what grows the map past the limit, so the nodes
            # already in it keep heart-beating (and removals shrink it) once that happened.
            if total > MAX_METADATA_KEYS and total > len(meta.custom):
                raise StoreError(
                    f"vault {key}: merging would make {total} custom_metadata keys, over Vault's limit of "
                    f"{MAX_METADATA_KEYS}; use `reports: status_path` for a fleet this large"
                )
        await self._patch(key, entries)

    async def read_metadata(self, key: str) -> dict[str, str]:
        return dict((await self._metadata(key)).custom)

    # ------------------------------------------------------------ rotator lease

    async def read_lease(self, key: str) -> LeaseRecord | None:
        path = f"{self.lease_prefix}/{key}"
        try:
            resp = await self.client.read_version(path)
        except StoreNotFound:
            return None
        data = resp["data"]
        return LeaseRecord.from_json(str(data["data"].get("lease", "")), revision=str(data["metadata"]["version"]))

    async def write_lease(self, key: str, record: LeaseRecord, *, expect: str | None) -> LeaseRecord | None:
        """A KV v2 write with ``cas``: the lease entry's version is its revision, 0 for a new entry."""
        path = f"{self.lease_prefix}/{key}"
        try:
            resp = await self._write(path, {"lease": record.to_json()}, cas=int(expect) if expect else 0)
        except StoreConflict:
            return None
        return record.at(str(resp["data"]["version"]))

    async def aclose(self) -> None:
        await self.client.aclose()
