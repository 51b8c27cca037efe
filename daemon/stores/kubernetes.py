"""The Kubernetes store: a core/v1 Secret per key, through kubernetes_asyncio.

Owns the mapping of Secret data to a payload and a version id, and the
staging Secrets; every API call goes through ``daemon.clients.kube`` (which
maps errors and keeps response bodies out of messages). It never
read-modify-writes annotations: every metadata write is a merge patch of the
one key it owns.

Layout of a key ``db`` in the namespace:

- ``db``: the current version (what consumers get); annotations hold metadata
  such as node reports (``baton.io/node.<id>``).
- ``db-baton-pending``: a version created by the rotator, not yet promoted.
- ``db-baton-previous``: the version before the current one, until retired
  (then its data is cleared and ``baton.io/retired-version`` names it).

A version id is the first 16 hex digits of the SHA-256 of the canonical
payload: a Secret with the single key ``value`` gives that string, any other
Secret the compact, key-sorted JSON object of its decoded keys.

Secret type (automatic, no setting): the main Secret, when Baton creates it, is
``kubernetes.io/tls`` if the payload has both ``tls.crt`` and ``tls.key`` keys
(the certificate generator's payload; what Ingress controllers, charts and a
cert-manager user expect), else ``Opaque``. The API makes ``type`` immutable
and requires those two keys in a TLS Secret, so: an existing Secret keeps the
type it has (one created ``Opaque`` stays so; delete it once to have it created
as TLS); a new version without both keys is refused for a TLS Secret at
``create``, before anything is written; and the staging companions are always
``Opaque``, as their data is cleared at retire and they hold whatever version
comes (pods mount only the main Secret).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from daemon.clients.kube import (
    MERGE_PATCH,
    PROMOTED,
    KubeClient,
    Obj,
    annotation_key,
    default_namespace,
    generic_key,
    kube_call,
    kube_open,
    promoted_at,
    status_error,
)
from daemon.errors import (
    PayloadError,
    ResourceExpired,
    StoreConflict,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, SecretVersion, VersionId, VersionInfo
from daemon.stores.base import MAX_PAYLOAD, SecretStore, StatusHook, check_payload
from daemon.stores.lease import LeaseRecord

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger(__name__)


PENDING_SUFFIX = "-baton-pending"
PREVIOUS_SUFFIX = "-baton-previous"
CREATED = "baton.io/created"
RETIRED = "baton.io/retired-version"
COMPANION_OF = "baton.io/companion-of"
LEASE_SUFFIX = "-baton-lease"
LEASE_RECORD = "baton.io/lease"
OPAQUE = "Opaque"
TLS_TYPE = "kubernetes.io/tls"
TLS_KEYS = frozenset({"tls.crt", "tls.key"})


# ---------------------------------------------------------------- payloads


def _decode(data: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        try:
            out[k] = base64.b64decode(v, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise PayloadError(f"Secret key {k!r} is not valid base64 UTF-8 text") from None
    return out


def canonical(fields: Mapping[str, str]) -> str:
    """The payload of Secret data: the single ``value``, else the key-sorted JSON object."""
    if set(fields) == {"value"}:
        return fields["value"]
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def version_of(payload: str) -> VersionId:
    return VersionId(hashlib.sha256(payload.encode()).hexdigest()[:16])


def data_for(payload: str) -> dict[str, str]:
    """Secret keys for a payload: a JSON object of strings keeps its fields, anything else is ``value``."""
    try:
        loaded = json.loads(payload)
    except ValueError:
        loaded = None
    if (
        isinstance(loaded, dict)
        and loaded
        and all(isinstance(v, str) for v in loaded.values())
        and all(re.fullmatch(r"[-._a-zA-Z0-9]{1,253}", k) for k in loaded)
    ):
        return dict(loaded)
    return {"value": payload}


def secret_type(fields: Mapping[str, str]) -> str:
    """The type of a main Secret Baton creates for these keys (see the module docstring)."""
    return TLS_TYPE if set(fields) >= TLS_KEYS else OPAQUE


def _encode(fields: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in fields.items()}


def _created(obj: Obj) -> float:
    meta = obj.get("metadata", {})
    try:
        return float((meta.get("annotations") or {})[CREATED])
    except (KeyError, ValueError):
        pass
    stamp = meta.get("creationTimestamp")
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _payload(obj: Obj | None) -> str | None:
    """The canonical payload of a Secret object, None when it holds no data."""
    if obj is None or not obj.get("data"):
        return None
    return canonical(_decode(obj["data"]))


def _info(obj: Obj, stage: str | None) -> VersionInfo | None:
    payload = _payload(obj)
    if payload is None:
        return None
    return VersionInfo(
        id=version_of(payload),
        stages=frozenset({stage}) if stage else frozenset(),
        created=_created(obj),
        digest=hashlib.sha256(payload.encode()).hexdigest(),
    )


def _check_type(key: str, main: Obj | None, fields: Mapping[str, str]) -> None:
    """Refuse a version the API would refuse in the main Secret: a TLS Secret needs both keys."""
    if main is not None and main.get("type") == TLS_TYPE and not set(fields) >= TLS_KEYS:
        raise PayloadError(f"kubernetes secret {key} is of type {TLS_TYPE}: a new version needs tls.crt and tls.key")


# ---------------------------------------------------------------- the store


class KubernetesStore(SecretStore):
    """``SecretStore`` on Kubernetes Secrets. Create it anywhere; it connects on first use."""

    def __init__(
        self,
        *,
        namespace: str,
        kubeconfig: Path | None = None,
        request_timeout: float = 10.0,
        watch_timeout: int = 300,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.request_timeout = request_timeout
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self._kube = KubeClient(kubeconfig=kubeconfig)

    @classmethod
    def from_config(cls, config: Config) -> KubernetesStore:
        store = config.store
        assert store.kind == "kubernetes"
        return cls(namespace=default_namespace(store.namespace), kubeconfig=store.kubeconfig)

    async def _core(self) -> Any:
        return await self._kube.core()

    async def aclose(self) -> None:
        await self._kube.aclose()

    # ------------------------------------------------------------ plumbing

    async def _get(self, name: str) -> Obj | None:
        core = await self._core()
        try:
            return await kube_call(
                core.read_namespaced_secret(
                    name, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="get secret",
                what=name,
            )
        except StoreNotFound:
            return None

    async def _create_secret(
        self, name: str, fields: Mapping[str, str], annotations: Mapping[str, str], *, kind: str = OPAQUE
    ) -> Obj:
        core = await self._core()
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": kind,
            "metadata": {"name": name, "namespace": self.namespace, "annotations": dict(annotations)},
            "data": _encode(fields),
        }
        return await kube_call(
            core.create_namespaced_secret(
                self.namespace, body, _preload_content=False, _request_timeout=self.request_timeout
            ),
            op="create secret",
            what=name,
        )

    async def _replace(self, obj: Obj) -> Obj:
        """PUT with the object's resourceVersion: 409 (someone wrote first) -> StoreConflict."""
        core = await self._core()
        name = obj["metadata"]["name"]
        return await kube_call(
            core.replace_namespaced_secret(
                name, self.namespace, obj, _preload_content=False, _request_timeout=self.request_timeout
            ),
            op="replace secret",
            what=name,
        )

    async def _put_companion(
        self, name: str, old: Obj | None, fields: Mapping[str, str], annotations: Mapping[str, str]
    ) -> None:
        if old is None:
            await self._create_secret(name, fields, annotations)
            return
        new = dict(old)
        new["metadata"] = {**old["metadata"], "annotations": dict(annotations)}
        new["data"] = _encode(fields)
        await self._replace(new)

    async def _delete(self, name: str) -> None:
        core = await self._core()
        with contextlib.suppress(StoreNotFound):
            await kube_call(
                core.delete_namespaced_secret(
                    name, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="delete secret",
                what=name,
            )

    # ------------------------------------------------------------ reading

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        names = [(key, CURRENT)]
        if version is not None:
            names += [(key + PENDING_SUFFIX, PENDING), (key + PREVIOUS_SUFFIX, PREVIOUS)]
        for name, stage in names:
            obj = await self._get(name)
            payload = _payload(obj)
            if obj is None or payload is None:
                continue
            if version is None or version_of(payload) == version:
                info = _info(obj, stage)
                assert info is not None
                return SecretVersion(info=info, payload=Secret(payload))
        raise StoreNotFound(f"kubernetes secret {key}: no version {version or 'current'}")

    async def versions(self, key: str) -> list[VersionInfo]:
        main, pending, previous = await asyncio.gather(
            self._get(key), self._get(key + PENDING_SUFFIX), self._get(key + PREVIOUS_SUFFIX)
        )
        current = _info(main, CURRENT) if main is not None else None
        out: list[VersionInfo] = []
        if previous is not None:
            prev = _info(previous, PREVIOUS)
            retired = (previous["metadata"].get("annotations") or {}).get(RETIRED)
            if prev is not None and (current is None or prev.id != current.id):
                out.append(prev)
            elif prev is None and retired:
                out.append(VersionInfo(id=VersionId(retired), created=_created(previous), retired=True))
        if current is not None:
            out.append(current)
        if pending is not None:
            pend = _info(pending, PENDING)
            if pend is not None and (current is None or pend.id != current.id):
                out.append(pend)
        return out

    async def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        """Yield the current version now and on every content change; survive 410 and broken streams."""
        core = await self._core()
        last: VersionId | None = None
        rv: str | None = None
        delay = self.backoff[0]
        down = False
        while True:
            try:
                if rv is None:
                    listing = await kube_call(
                        core.list_namespaced_secret(
                            self.namespace,
                            field_selector=f"metadata.name={key}",
                            _preload_content=False,
                            _request_timeout=self.request_timeout,
                        ),
                        op="list secret",
                        what=key,
                    )
                    rv = str(listing["metadata"]["resourceVersion"])
                    if down:
                        down = False
                        if on_status is not None:
                            on_status(None)
                    items = listing.get("items") or []
                    info = _info(items[0], CURRENT) if items else None
                    if info is not None and info.id != last:
                        last = info.id
                        yield info
                started = time.monotonic()
                events = 0
                async with contextlib.aclosing(self._stream(core, key, rv)) as stream:
                    async for event in stream:
                        events += 1
                        if down:  # the stream opened: the store answers again
                            down = False
                            if on_status is not None:
                                on_status(None)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            code = obj.get("code")
                            raise status_error(int(code) if isinstance(code, int) else 500, op="watch", what=key)
                        rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
                        if kind in ("ADDED", "MODIFIED"):
                            info = _info(obj, CURRENT)
                            if info is not None and info.id != last:
                                last = info.id
                                yield info
                        elif kind == "DELETED":
                            log.warning("watched secret was deleted", extra={"key": key})
                        elif kind != "BOOKMARK":
                            raise StoreUnavailable(f"kubernetes watch {key}: unexpected event type")
                delay = self.backoff[0]
                if events == 0 and time.monotonic() - started < 1.0:
                    # A stream that ends at once, again and again, must not spin.
                    await asyncio.sleep(delay)
            except ResourceExpired:
                log.info("watch history expired (410); listing again", extra={"key": key})
                rv = None
            except StoreError as e:
                log.warning("watch failed; retrying", extra={"key": key, "error": str(e), "retry_in": round(delay, 2)})
                down = True
                if on_status is not None:
                    on_status(e)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.backoff[1])

    async def _stream(self, core: Any, key: str, rv: str) -> AsyncGenerator[Obj, None]:
        """The watch events of one stream, as dicts; mapped errors; always released."""
        resp = await kube_open(
            core.list_namespaced_secret(
                self.namespace,
                field_selector=f"metadata.name={key}",
                watch=True,
                resource_version=rv,
                timeout_seconds=self.watch_timeout,
                allow_watch_bookmarks=True,
                _preload_content=False,
                _request_timeout=(self.request_timeout, self.watch_timeout + self.request_timeout),
            ),
            op="watch",
            what=key,
        )
        try:
            buf = b""
            try:
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    # One event holds at most one Secret (1 MiB of data, base64) plus metadata.
                    if len(buf) > 4 * MAX_PAYLOAD:
                        raise StoreUnavailable(f"kubernetes watch {key}: event too large")
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield self._event(line, key)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise StoreUnavailable(f"kubernetes watch {key}: {type(e).__name__}") from e
        finally:
            resp.release()

    @staticmethod
    def _event(line: bytes, key: str) -> Obj:
        try:
            event = json.loads(line)
        except ValueError:
            raise StoreUnavailable(f"kubernetes watch {key}: malformed event") from None
        if not isinstance(event, dict):
            raise StoreUnavailable(f"kubernetes watch {key}: malformed event")
        return event

    # ------------------------------------------------------------ rotator side

    async def create(self, key: str, payload: Secret) -> VersionInfo:
        fields = data_for(check_payload(payload.reveal()))
        text = canonical(fields)
        vid = version_of(text)
        main = await self._get(key)
        _check_type(key, main, fields)
        current = _info(main, CURRENT) if main is not None else None
        if current is not None and current.id == vid:
            return current
        name = key + PENDING_SUFFIX
        pending = await self._get(name)
        info = _info(pending, PENDING) if pending is not None else None
        if info is not None and info.id == vid:
            return info
        now = time.time()
        await self._put_companion(name, pending, fields, {COMPANION_OF: key, CREATED: repr(now)})
        return VersionInfo(
            id=vid, stages=frozenset({PENDING}), created=now, digest=hashlib.sha256(text.encode()).hexdigest()
        )

    async def promote(self, key: str, version: VersionId) -> None:
        main, pending, previous = await asyncio.gather(
            self._get(key), self._get(key + PENDING_SUFFIX), self._get(key + PREVIOUS_SUFFIX)
        )
        current = _info(main, CURRENT) if main is not None else None
        if current is not None and current.id == version:
            # Already done (a retried promote): only the pending companion (and the stamp) may be left over.
            if pending is not None and (p := _info(pending, PENDING)) is not None and p.id == version:
                await self._delete(key + PENDING_SUFFIX)
            if not promoted_at(main, version):
                await self._stamp_promoted(key, version)
            return
        source = next(
            (o for o in (pending, previous) if o is not None and (i := _info(o, None)) is not None and i.id == version),
            None,
        )
        if source is None:
            raise StoreNotFound(f"kubernetes secret {key}: no pending or previous version {version}")
        new_data = dict(source["data"])
        new_created = (source["metadata"].get("annotations") or {}).get(CREATED, repr(time.time()))
        new_fields = _decode(new_data)
        _check_type(key, main, new_fields)
        if main is None:
            await self._create_secret(key, new_fields, {CREATED: new_created}, kind=secret_type(new_fields))
        else:
            if current is not None:
                # Keep the old value before it is replaced, so it is never lost.
                await self._put_companion(
                    key + PREVIOUS_SUFFIX,
                    previous,
                    _decode(main["data"]),
                    {COMPANION_OF: key, CREATED: repr(current.created)},
                )
            updated = dict(main)
            annotations = dict(main["metadata"].get("annotations") or {})
            annotations[CREATED] = new_created
            # The resourceVersion read above is the precondition: a concurrent writer makes this 409.
            updated["metadata"] = {**main["metadata"], "annotations": annotations}
            updated["data"] = new_data
            await self._replace(updated)
        await self._stamp_promoted(key, version)
        if source is pending:
            await self._delete(key + PENDING_SUFFIX)

    async def _stamp_promoted(self, key: str, version: VersionId) -> None:
        """``baton.io/promoted: <version> <time>``, stamped after the data write returned: an upper
        bound of when the Secret began to hold ``version``. The rotator's pod holders
        (``sidecar.podholders``) take a container started after it as one that read the new version."""
        await self.merge_metadata(key, {"baton.promoted": f"{version} {time.time()!r}"})

    async def retire(self, key: str, version: VersionId) -> None:
        main = await self._get(key)
        current = _info(main, CURRENT) if main is not None else None
        if current is not None and current.id == version:
            raise StoreConflict(f"kubernetes secret {key}: refusing to retire the current version {version}")
        for name in (key + PREVIOUS_SUFFIX, key + PENDING_SUFFIX):
            obj = await self._get(name)
            info = _info(obj, None) if obj is not None else None
            if obj is None or info is None or info.id != version:
                continue
            cleared = dict(obj)
            annotations = dict(obj["metadata"].get("annotations") or {})
            annotations[RETIRED] = version
            cleared["metadata"] = {**obj["metadata"], "annotations": annotations}
            cleared["data"] = {}
            await self._replace(cleared)
            log.info("retired version", extra={"key": key, "version": version})
            return
        # Not found anywhere: already retired (idempotent), or never existed.

    # ------------------------------------------------------------ rotator lease
    #
    # A coordination.k8s.io/v1 Lease ``<key>-baton-lease`` per key, as kubectl
    # shows leases (holderIdentity, renewTime, leaseDurationSeconds), with Baton's
    # exact record in an annotation. Its resourceVersion is the revision: a PUT
    # carrying it, or a POST of a new Lease, answers 409 to the second writer.

    async def _coord(self) -> Any:
        return await self._kube.coordination()  # the same client (and connection pool) as _core's

    async def read_lease(self, key: str) -> LeaseRecord | None:
        name = key + LEASE_SUFFIX
        coord = await self._coord()
        try:
            obj = await kube_call(
                coord.read_namespaced_lease(
                    name, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="get lease",
                what=name,
            )
        except StoreNotFound:
            return None
        text = (obj["metadata"].get("annotations") or {}).get(LEASE_RECORD, "")
        return LeaseRecord.from_json(text, revision=str(obj["metadata"]["resourceVersion"]))

    async def write_lease(self, key: str, record: LeaseRecord, *, expect: str | None) -> LeaseRecord | None:
        name = key + LEASE_SUFFIX
        coord = await self._coord()
        metadata: Obj = {"name": name, "namespace": self.namespace, "annotations": {LEASE_RECORD: record.to_json()}}
        if expect is not None:
            metadata["resourceVersion"] = expect
        renewed = datetime.fromtimestamp(record.renewed, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": record.holder or None,
                "leaseDurationSeconds": max(1, math.ceil(record.ttl)),
                "renewTime": renewed,
            },
        }
        kw = {"_preload_content": False, "_request_timeout": self.request_timeout}
        try:
            if expect is None:
                obj = await kube_call(
                    coord.create_namespaced_lease(self.namespace, body, **kw), op="create lease", what=name
                )
            else:
                obj = await kube_call(
                    coord.replace_namespaced_lease(name, self.namespace, body, **kw), op="replace lease", what=name
                )
        except StoreConflict:
            return None  # another contender wrote first
        return record.at(str(obj["metadata"]["resourceVersion"]))

    # ------------------------------------------------------------ metadata

    async def merge_metadata(self, key: str, entries: Mapping[str, str | None]) -> None:
        if not entries:
            return
        core = await self._core()
        # A merge patch of exactly these annotation keys: never a read-modify-write,
        # so two nodes patching their own keys cannot overwrite each other.
        patch = {"metadata": {"annotations": {annotation_key(k): v for k, v in entries.items()}}}
        await kube_call(
            core.patch_namespaced_secret(
                key,
                self.namespace,
                patch,
                _content_type=MERGE_PATCH,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            ),
            op="patch secret annotations",
            what=key,
        )

    @staticmethod
    def metadata_entry(key: str) -> str:
        """The name ``read_metadata`` gives an entry written as ``key`` (a long one comes back shortened)."""
        return generic_key(annotation_key(key)) or key

    async def read_metadata(self, key: str) -> dict[str, str]:
        """Baton's own annotations of the Secret (``baton.io/x`` returned as ``baton.x``)."""
        obj = await self._get(key)
        if obj is None:
            raise StoreNotFound(f"kubernetes secret {key}: not found")
        out: dict[str, str] = {}
        for name, value in (obj["metadata"].get("annotations") or {}).items():
            generic = generic_key(name)
            if generic is not None and name not in (CREATED, PROMOTED):
                out[generic] = value
        return out
