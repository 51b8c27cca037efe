"""AWS Secrets Manager store: versions, staging labels, per-node tags.

Owns the one Secrets Manager client of a process (a ``daemon.clients.aws``
client: created lazily in the running loop, closed in ``aclose``), the Secrets
Manager error codes that ``awsclient`` does not share, and the mapping of AWS
staging labels onto Baton stages. It must never put a payload or a response
body in a log line or an exception, never read-modify-write a shared object
(node reports are one tag set per node, merged by TagResource), and never
import another store.

Stages, as AWS's own rotation uses them::

    create   PutSecretValue(VersionStages=[AWSPENDING])        -> "pending"
    promote  <draining label> onto the old current version (AWS deprecates, then
             deletes, versions left without any label), then AWSCURRENT moved to
             the new one (AWS moves AWSPREVIOUS itself), AWSPENDING removed
    retire   Baton's labels removed; ``retired`` means "no staging label left"

A staging label is unique within a secret, so the draining label of a version is
``<draining_label>_<VersionId>``: several versions can drain at once and none of
them loses its label when the next rotation promotes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import uuid
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from daemon.clients.aws import AwsClient, ErrorRules, classify
from daemon.errors import PayloadError, StoreAuthError, StoreConflict, StoreError, StoreNotFound, StoreUnavailable
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, SecretVersion, VersionId, VersionInfo
from daemon.stores.base import SecretStore, StatusHook, check_payload
from daemon.stores.lease import LeaseRecord

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger(__name__)

AWSCURRENT = "AWSCURRENT"
AWSPREVIOUS = "AWSPREVIOUS"
AWSPENDING = "AWSPENDING"
DRAINING = "draining"
_STAGE_NAMES = {AWSCURRENT: CURRENT, AWSPREVIOUS: PREVIOUS, AWSPENDING: PENDING}
_LEASE_NAME_BAD = re.compile(r"[^A-Za-z0-9/_+=.@-]")  # what a secret name may not hold

# Secrets Manager's own codes; the ones every AWS API shares are in awsclient.
_RULES = ErrorRules(
    conflict=frozenset({"ResourceExistsException", "PreconditionNotMetException"}),
    explain=(
        (
            "InvalidRequestException",
            "delet",  # "... it was marked for deletion", "... currently marked deleted"
            "the secret is scheduled for deletion; restore it within its recovery window "
            "(aws secretsmanager restore-secret --secret-id <the secret>), or point the credential "
            "at another key",
        ),
    ),
)

# ---------------------------------------------------------------- tags
#
# Secrets Manager tags: at most 50 per secret, keys 1-128 and values 0-256
# characters of letters, digits, spaces and `_ . : / = + - @`, no `aws:` prefix.
# A value that does not fit is stored deflated + base64 (whose alphabet is
# allowed) in chunks: the head tag `<key>` holds `=z<n>=<chunk 0>` and tags
# `<key>:1` .. `<key>:<n-1>` the rest, all written in one TagResource call.
MAX_TAGS = 50
_MAX_KEY = 128
_MAX_VALUE = 256
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9 _.:/=+\-@]*")
_TAG_KEY = re.compile(r"[A-Za-z0-9 _.:/=+\-@]+")
_HEAD = re.compile(r"=z(\d+)=(.*)", re.DOTALL)
_CHUNK = re.compile(r"(.+):(\d+)")
_MARK = "=z"
# Node reports arrive as `baton.node.<node>` (the metadata reporter's keys);
# on AWS they are the tags `baton/node/<node>`.
_META_PREFIX = "baton.node."
_TAG_PREFIX = "baton/node/"


def _tag_key(meta_key: str) -> str:
    key = _TAG_PREFIX + meta_key[len(_META_PREFIX) :] if meta_key.startswith(_META_PREFIX) else meta_key
    if not _TAG_KEY.fullmatch(key) or key.lower().startswith("aws:"):
        raise StoreError(f"metadata key {meta_key!r} cannot be an AWS tag key (letters, digits, _.:/=+-@ only)")
    return key


def _meta_key(tag_key: str) -> str:
    return _META_PREFIX + tag_key[len(_TAG_PREFIX) :] if tag_key.startswith(_TAG_PREFIX) else tag_key


def encode_tag(key: str, value: str) -> dict[str, str]:
    """The tags that hold ``value`` under ``key``: one plain tag, or a head and chunks."""
    if len(value) <= _MAX_VALUE and _PLAIN_VALUE.fullmatch(value) and not value.startswith(_MARK):
        return {key: value}
    packed = base64.b64encode(zlib.compress(value.encode(), 9, wbits=-15)).decode()
    first = _MAX_VALUE - len(f"{_MARK}99=")
    chunks = [packed[:first]] + [packed[i : i + _MAX_VALUE] for i in range(first, len(packed), _MAX_VALUE)]
    if len(key) + len(f":{len(chunks)}") > _MAX_KEY:
        raise StoreError(f"tag key {key!r} is too long for a chunked value")
    tags = {key: f"{_MARK}{len(chunks)}={chunks[0]}"}
    tags.update({f"{key}:{i}": chunk for i, chunk in enumerate(chunks[1:], start=1)})
    return tags


def decode_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Tag key -> value, with chunked values joined and their chunk tags hidden."""
    out: dict[str, str] = {}
    consumed: set[str] = set()
    heads = {k: m for k, v in tags.items() if (m := _HEAD.fullmatch(v))}
    for key, m in heads.items():
        n = int(m.group(1))
        parts = [m.group(2)] + [tags.get(f"{key}:{i}") for i in range(1, n)]
        consumed.update(f"{key}:{i}" for i in range(1, n))
        if any(p is None for p in parts):
            log.warning("incomplete chunked tag skipped", extra={"tag": key})
            continue
        try:
            out[key] = zlib.decompress(base64.b64decode("".join(p for p in parts if p)), wbits=-15).decode()
        except (ValueError, zlib.error):
            log.warning("unreadable chunked tag skipped", extra={"tag": key})
    for key, value in tags.items():
        if key in heads or key in consumed:
            continue
        m = _CHUNK.fullmatch(key)
        if m and m.group(1) in heads:
            continue  # a chunk left over from a longer value; its owner removes it
        out[key] = value
    return out


def _owned(tags: Mapping[str, str], key: str) -> set[str]:
    """Tag keys that hold the value of ``key`` (head plus any chunk, leftovers included)."""
    found = {key} if key in tags else set()
    for k in tags:
        m = _CHUNK.fullmatch(k)
        if m and m.group(1) == key:
            found.add(k)
    return found


# ---------------------------------------------------------------- errors


def map_error(e: BaseException, *, op: str, key: str) -> StoreError:
    """A botocore error as a Baton store error: code and status only, never a body."""
    return classify(e, what=_what(op, key), rules=_RULES)


def _what(op: str, key: str) -> str:
    return f"AWS {op} on {key!r}"


def _stages(labels: list[str] | tuple[str, ...], draining_label: str) -> frozenset[str]:
    """AWS labels plus their Baton names (``current``, ``previous``, ``pending``, ``draining``)."""
    names = set(labels)
    for label in labels:
        if label in _STAGE_NAMES:
            names.add(_STAGE_NAMES[label])
        elif label.startswith(draining_label):
            names.add(DRAINING)
    return frozenset(names)


def _ts(value: Any) -> float:
    ts = getattr(value, "timestamp", None)
    if callable(ts):
        return float(ts())
    return float(value) if isinstance(value, int | float) else 0.0


class AwsStore(SecretStore):
    """``SecretStore`` on AWS Secrets Manager; ``key`` is the SecretId (name or ARN)."""

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        poll_interval: float = 30.0,
        draining_label: str = "BATON_DRAINING",
        timeout: float = 10.0,
        max_attempts: int = 3,
        lease_prefix: str = "baton-lease/",
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.poll_interval = poll_interval
        self.draining_label = draining_label
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.lease_prefix = lease_prefix
        self._aws = AwsClient(
            "secretsmanager",
            region=region,
            endpoint_url=endpoint_url,
            timeout=timeout,
            max_attempts=max_attempts,
            rules=_RULES,
        )

    @classmethod
    def from_config(cls, config: Config) -> AwsStore:
        store = config.store
        if store.kind != "aws":
            raise StoreError(f"AwsStore needs store.kind aws, not {store.kind!r}")
        return cls(
            region=store.region,
            endpoint_url=store.endpoint_url,
            poll_interval=store.poll_interval,
            draining_label=store.draining_label,
            timeout=store.timeout,
            max_attempts=store.max_attempts,
            lease_prefix=store.lease_prefix,
        )

    # ------------------------------------------------------------ plumbing

    async def _get_client(self) -> Any:
        # The raw aiobotocore client, for tools that hook its events (bench/fleet.py counts requests).
        return await self._aws.client()

    async def _call(self, op: str, key: str, **params: Any) -> dict[str, Any]:
        return await self._aws.call(op, what=_what(op, key), **params)

    async def aclose(self) -> None:
        await self._aws.aclose()

    async def _labels(self, key: str) -> dict[str, list[str]]:
        """VersionId -> staging labels (DescribeSecret: cheap, no payload)."""
        desc = await self._call("describe_secret", key, SecretId=key)
        return {vid: list(labels) for vid, labels in (desc.get("VersionIdsToStages") or {}).items()}

    def _info(self, vid: str, labels: list[str], created: Any = None, digest: str = "") -> VersionInfo:
        return VersionInfo(
            id=VersionId(vid),
            stages=_stages(labels, self.draining_label),
            created=_ts(created),
            retired=not labels,
            digest=digest,
        )

    def _draining_label(self, version: str) -> str:
        return f"{self.draining_label}_{version}"

    async def _move(self, key: str, label: str, *, to: str | None = None, off: str | None = None) -> None:
        params: dict[str, Any] = {"SecretId": key, "VersionStage": label}
        if to is not None:
            params["MoveToVersionId"] = to
        if off is not None:
            params["RemoveFromVersionId"] = off
        await self._call("update_secret_version_stage", key, **params)

    # ------------------------------------------------------------ reads

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        params: dict[str, Any] = {"SecretId": key}
        if version is None:
            params["VersionStage"] = AWSCURRENT
        else:
            params["VersionId"] = version
        resp = await self._call("get_secret_value", key, **params)
        if "SecretString" not in resp:
            raise PayloadError(f"secret {key!r} holds SecretBinary; Baton reads SecretString only")
        payload = Secret(check_payload(resp["SecretString"]))
        info = self._info(
            resp["VersionId"], list(resp.get("VersionStages") or []), resp.get("CreatedDate"), payload.digest()
        )
        return SecretVersion(info=info, payload=payload)

    async def versions(self, key: str) -> list[VersionInfo]:
        out: list[VersionInfo] = []
        params: dict[str, Any] = {"SecretId": key, "IncludeDeprecated": True, "MaxResults": 100}
        while True:
            resp = await self._call("list_secret_version_ids", key, **params)
            out.extend(
                self._info(v["VersionId"], list(v.get("VersionStages") or []), v.get("CreatedDate"))
                for v in resp.get("Versions") or []
            )
            token = resp.get("NextToken")
            if not token:
                break
            params["NextToken"] = token
        out.sort(key=lambda v: v.created)  # stable: ties keep the store's order
        return out

    async def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        """Poll DescribeSecret; yield when the AWSCURRENT VersionId changes.

        An outage (``StoreUnavailable``) while polling is logged and polled
        through, so the agent keeps its last good files; any other error ends
        the watch. The first poll's errors are raised as they are.
        """
        last: str | None = None
        first = True
        down = False
        while True:
            try:
                labels = await self._labels(key)
            except StoreUnavailable as e:
                if first:
                    raise
                if not down:
                    log.warning("store unreachable, still polling", extra={"key": key, "error": str(e)})
                    down = True
                if on_status is not None:
                    on_status(e)
                await asyncio.sleep(self.poll_interval)
                continue
            if down:
                log.info("store reachable again", extra={"key": key})
                down = False
                if on_status is not None:
                    on_status(None)
            first = False
            current = next((vid for vid, ls in labels.items() if AWSCURRENT in ls), None)
            if current is not None and current != last:
                last = current
                yield self._info(current, labels[current])
            await asyncio.sleep(self.poll_interval)

    # ------------------------------------------------------------ writes

    async def create(self, key: str, payload: Secret) -> VersionInfo:
        """PutSecretValue staged AWSPENDING; an identical pending version is reused.

        A retry after a lost answer finds its own version under AWSPENDING with
        the same content and returns it instead of adding a second one.
        """
        text = check_payload(payload.reveal())
        try:
            labels = await self._labels(key)
        except StoreNotFound:
            return await self._create_secret(key, payload, text)
        pending = next((vid for vid, ls in labels.items() if AWSPENDING in ls), None)
        if pending is not None:
            existing = await self.read(key, VersionId(pending))
            if hmac.compare_digest(existing.payload.reveal().encode(), text.encode()):
                log.info("identical pending version reused", extra={"key": key, "version": pending})
                return existing.info
        resp = await self._call(
            "put_secret_value",
            key,
            SecretId=key,
            SecretString=text,
            VersionStages=[AWSPENDING],
            ClientRequestToken=str(uuid.uuid4()),
        )
        log.info("pending version created", extra={"key": key, "version": resp["VersionId"]})
        return self._info(resp["VersionId"], list(resp.get("VersionStages") or [AWSPENDING]), digest=payload.digest())

    async def _create_secret(self, key: str, payload: Secret, text: str) -> VersionInfo:
        # The first version of a new secret: AWS makes it AWSCURRENT itself, and
        # there is nothing to drain, so promote() on it is a no-op.
        try:
            resp = await self._call(
                "create_secret", key, Name=key, SecretString=text, ClientRequestToken=str(uuid.uuid4())
            )
        except StoreConflict:
            return await self.create(key, payload)  # created concurrently: add a version to it
        log.info("secret created", extra={"key": key, "version": resp["VersionId"]})
        return self._info(resp["VersionId"], [AWSCURRENT], digest=payload.digest())

    async def promote(self, key: str, version: VersionId) -> None:
        labels = await self._labels(key)
        if version not in labels:
            raise StoreNotFound(f"AWS secret {key!r} has no version {version!r}")
        current = next((vid for vid, ls in labels.items() if AWSCURRENT in ls), None)
        if current != version:
            if current is not None:
                # Label the old current first: from this moment on, whatever
                # fails later, AWS never sees it without a label.
                drain = self._draining_label(current)
                if drain not in labels[current]:
                    await self._move(key, drain, to=current)
            await self._move(key, AWSCURRENT, to=version, off=current)
            log.info("version promoted", extra={"key": key, "version": version, "previous": current})
        if AWSPENDING in labels[version]:
            await self._move(key, AWSPENDING, off=version)

    async def retire(self, key: str, version: VersionId) -> None:
        labels = await self._labels(key)
        if version not in labels:
            # Without IncludeDeprecated DescribeSecret still lists every version
            # that has a label; a version absent here has none left, or never was.
            known = {v.id for v in await self.versions(key)}
            if version in known:
                return
            raise StoreNotFound(f"AWS secret {key!r} has no version {version!r}")
        mine = labels[version]
        if AWSCURRENT in mine:
            raise StoreConflict(f"version {version!r} of {key!r} is current; promote another one first")
        ours = [ls for ls in mine if ls in (AWSPREVIOUS, AWSPENDING) or ls.startswith(self.draining_label)]
        for label in ours:
            await self._move(key, label, off=version)
        left = [ls for ls in mine if ls not in ours]
        if left:
            log.warning("retired version keeps foreign labels", extra={"key": key, "version": version, "labels": left})
        log.info("version retired", extra={"key": key, "version": version})

    # ------------------------------------------------------------ rotator lease
    #
    # A lease is a secret of its own (``lease_prefix`` + the key), whose AWSCURRENT
    # version holds the record; its VersionId is the revision. Secrets Manager has
    # no conditional write, but it has one conditional move: UpdateSecretVersionStage
    # of AWSCURRENT with RemoveFromVersionId succeeds only while AWSCURRENT is still
    # on that version. A write puts the new record under a label of the writer's
    # own (so it is not current yet), then moves AWSCURRENT onto it off the
    # expected version: of two writers expecting one version, one move succeeds.
    # The label moves on with the writer's next put; versions left without a label
    # are deprecated, and deleted, by AWS itself.

    def _lease_name(self, key: str) -> str:
        return (self.lease_prefix + _LEASE_NAME_BAD.sub("_", key))[:512]

    async def read_lease(self, key: str) -> LeaseRecord | None:
        name = self._lease_name(key)
        try:
            resp = await self._call("get_secret_value", name, SecretId=name, VersionStage=AWSCURRENT)
        except StoreNotFound:
            return None
        return LeaseRecord.from_json(str(resp.get("SecretString", "")), revision=str(resp["VersionId"]))

    async def write_lease(self, key: str, record: LeaseRecord, *, expect: str | None) -> LeaseRecord | None:
        name = self._lease_name(key)
        text = record.to_json()
        if expect is None:
            try:
                resp = await self._call(
                    "create_secret",
                    name,
                    Name=name,
                    SecretString=text,
                    ClientRequestToken=str(uuid.uuid4()),
                    Description=f"Baton rotator lease of {key}"[:2048],
                )
            except StoreConflict:
                return None  # another contender created it first
            return record.at(str(resp["VersionId"]))
        label = "BATON_LEASE_" + hashlib.sha256(record.holder.encode()).hexdigest()[:16]
        put = await self._call(
            "put_secret_value",
            name,
            SecretId=name,
            SecretString=text,
            VersionStages=[label],
            ClientRequestToken=str(uuid.uuid4()),
        )
        vid = str(put["VersionId"])
        try:
            await self._move(name, AWSCURRENT, to=vid, off=expect)
        except StoreAuthError:
            raise
        except StoreError:
            # Lost the move, or won it and lost the answer (a retry then fails): the store says which.
            labels = await self._labels(name)
            if AWSCURRENT not in labels.get(vid, []):
                return None
        return record.at(vid)

    # ------------------------------------------------------------ metadata

    async def _tags(self, key: str) -> dict[str, str]:
        desc = await self._call("describe_secret", key, SecretId=key)
        return {t["Key"]: t.get("Value", "") for t in desc.get("Tags") or []}

    async def merge_metadata(self, key: str, entries: Mapping[str, str | None]) -> None:
        """Write only the given entries' tags (TagResource merges server-side).

        The DescribeSecret before is read for two things only: this writer's own
        chunk tags left from a longer value, and the 50-tag limit.
        """
        existing = await self._tags(key)
        put: dict[str, str] = {}
        drop: set[str] = set()
        for meta_key, value in entries.items():
            tag = _tag_key(meta_key)
            old = _owned(existing, tag)
            if value is None:
                drop |= old
                continue
            new = encode_tag(tag, value)
            put.update(new)
            drop |= old - set(new)
        total = len((set(existing) - drop) | set(put))
        if total > MAX_TAGS:
            raise StoreError(
                f"AWS secret {key!r} would carry {total} tags, over the limit of {MAX_TAGS}; "
                "use `reports: dynamodb` for a fleet this size"
            )
        if put:
            try:
                await self._call(
                    "tag_resource", key, SecretId=key, Tags=[{"Key": k, "Value": v} for k, v in put.items()]
                )
            except StoreError as e:
                if "LimitExceeded" in str(e) or "TooManyTags" in str(e):
                    raise StoreError(
                        f"AWS secret {key!r} is at its limit of {MAX_TAGS} tags; use `reports: dynamodb`"
                    ) from e
                raise
        if drop:
            await self._call("untag_resource", key, SecretId=key, TagKeys=sorted(drop))

    async def read_metadata(self, key: str) -> dict[str, str]:
        return {_meta_key(k): v for k, v in decode_tags(await self._tags(key)).items()}
