"""The ``aws-iam`` provider: the access keys of one IAM user as rotating credentials.

AWS allows two access keys per user, so a rotation needs one free place: the
current key stays Active while ``create`` mints the second (CreateAccessKey:
AWS, not Baton, draws the secret), ``test`` proves it with STS
GetCallerIdentity signed by the new key, and ``retire`` makes the old key
Inactive, then deletes it once it has been Inactive for ``delete_after`` (at
the retire call that finds it so, or at the next ``create``, which needs its
place). Usage is IAM's own GetAccessKeyLastUsed: a superseded key used after
the swap (the successor's creation) blocks retirement until it has been unused
for ``idle_for``. AWS reports last use with a delay of up to hours: on real AWS
give the rotation a ``min_drain`` that covers it.

Which keys are Baton's is recorded in tags of the user: ``baton:key:<id>`` =
``active`` or ``inactive:<epoch>``, and ``baton:creating`` = ``<epoch>`` while a
key is being minted, so a key minted by a create that crashed before it was
tagged is known again. A key without a tag is never deactivated or deleted; a
user with two keys neither of which is Baton's is refused. A Baton key that no
version names is deleted only when IAM says it was never used (its secret was
lost with the crashed create); one that was used is left as it is and blocks.

It must never log or raise a secret access key; AWS's error messages are not
quoted (``clients/aws.classify`` keeps code and status only). All IAM and STS
calls go through ``clients/aws.AwsClient``. The payload is exactly
``{"access_key_id", "secret_access_key"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from daemon.clients.aws import AwsClient, ErrorRules
from daemon.config import AwsIamProviderConfig
from daemon.errors import PayloadError, ProviderBlocked, ProviderError, StoreAuthError, StoreError, StoreNotFound
from daemon.model import Secret
from daemon.payload import payload_object
from daemon.providers.base import Provider, Session

log = logging.getLogger(__name__)

TAG = "baton:key:"
CREATING = "baton:creating"
ACTIVE = "active"
INACTIVE = "inactive:"
# A key minted by a crashed create is at most this much older than its ``baton:creating`` tag says.
_CLOCK_SLACK = 60.0
_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")
_RULES = ErrorRules(missing=frozenset({"NoSuchEntity"}), conflict=frozenset({"ConcurrentModification"}))


@dataclass(frozen=True)
class _Key:
    id: str
    active: bool
    created: float


@dataclass(frozen=True)
class _Credential:
    access_key_id: str
    secret_access_key: str = field(repr=False)


def _epoch(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


class AwsIamProvider(Provider):
    """Mint, test, deactivate and delete the access keys of one IAM user (see the module docstring)."""

    def __init__(self, config: AwsIamProviderConfig) -> None:
        self.config = config
        self.slots: int | None = 2  # AWS's limit of keys per user
        self._user = config.user_name
        self._iam = AwsClient(
            "iam",
            region=config.region,
            endpoint_url=config.endpoint_url,
            timeout=config.timeout,
            max_attempts=config.max_attempts,
            rules=_RULES,
        )

    # ------------------------------------------------------------ Provider protocol

    async def create(self, *, current: Secret | None) -> Secret:
        keep = self._key_id_lenient(current)
        keys, tags = await self._state()
        left = await self._clean(keys, tags, keep=keep)
        if len(left) >= 2:
            raise self._full(left, tags, keep=keep)
        now = time.time()
        await self._tag({CREATING: repr(now)})
        made = await self._call("CreateAccessKey", what=f"creating an access key of IAM user {self._user}")
        key = made.get("AccessKey") or {}
        key_id, secret = str(key.get("AccessKeyId") or ""), key.get("SecretAccessKey")
        if not _KEY_ID.fullmatch(key_id) or not isinstance(secret, str) or not secret:
            raise ProviderError(f"CreateAccessKey of IAM user {self._user} answered without a usable key")
        await self._tag({TAG + key_id: ACTIVE})
        await self._untag([CREATING])
        log.info("created access key %s of IAM user %s", key_id, self._user, extra={"access_key_id": key_id})
        return Secret(json.dumps({"access_key_id": key_id, "secret_access_key": secret}))

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        # CreateAccessKey made the key valid already; apply makes sure it still is (Active, Baton's).
        cred = self._parse(new)
        keys, tags = await self._state()
        key = next((k for k in keys if k.id == cred.access_key_id), None)
        if key is None:
            raise ProviderError(
                f"access key {cred.access_key_id} of IAM user {self._user} no longer exists (deleted outside "
                "Baton?); retire this pending version in the store, and the next rotation mints another"
            )
        if TAG + key.id not in tags:
            raise self._not_ours(key.id)
        if not key.active:
            await self._set_status(key.id, "Active")
            await self._tag({TAG + key.id: ACTIVE})
            log.info("access key %s made Active again", key.id, extra={"access_key_id": key.id})

    async def test(self, new: Secret) -> None:
        cred = self._parse(new)
        sts = AwsClient(
            "sts",
            region=self.config.region,
            endpoint_url=self.config.endpoint_url,
            timeout=self.config.timeout,
            max_attempts=self.config.max_attempts,
            credentials=(cred.access_key_id, Secret(cred.secret_access_key)),
        )
        deadline = time.monotonic() + self.config.propagation
        delay = 0.5
        try:
            while True:
                try:
                    who = await sts.call("get_caller_identity", what=f"testing access key {cred.access_key_id}")
                    break
                except StoreAuthError as e:
                    # A new key takes a few seconds to be accepted everywhere (IAM is eventually consistent).
                    if time.monotonic() + delay > deadline:
                        raise ProviderError(f"{e}: the key does not work") from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                except StoreError as e:
                    raise ProviderError(str(e)) from None
        finally:
            await sts.aclose()
        arn = str(who.get("Arn") or "")
        if not (arn.endswith(f":user/{self._user}") or arn.endswith(f"/{self._user}")):
            raise ProviderError(
                f"access key {cred.access_key_id} signs as {arn or 'nobody'}, not IAM user {self._user}"
            )

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        cred = self._parse(old)
        key_id = cred.access_key_id
        if key_id in keep:
            raise ProviderError(f"refusing to retire access key {key_id}: the current or a newer version names it")
        keys, tags = await self._state()
        key = next((k for k in keys if k.id == key_id), None)
        if key is None:
            log.info("access key %s is already deleted", key_id, extra={"access_key_id": key_id})
            await self._untag([t for t in (TAG + key_id,) if t in tags])
            return
        if TAG + key_id not in tags:
            raise self._not_ours(key_id)
        if key.active:
            stamp = INACTIVE + repr(time.time())
            await self._set_status(key_id, "Inactive")
            await self._tag({TAG + key_id: stamp})
            log.info("access key %s made Inactive", key_id, extra={"access_key_id": key_id})
            tags = {**tags, TAG + key_id: stamp}
        if self._deletable(tags.get(TAG + key_id, "")):
            await self._delete(key_id)

    def principal(self, payload: Secret) -> str | None:
        try:
            return self._parse(payload).access_key_id
        except ProviderError:
            return None

    async def sessions(self, old: Secret) -> list[Session]:
        key_id = self._parse(old).access_key_id
        keys = await self._keys()
        mine = next((k for k in keys if k.id == key_id), None)
        if mine is None:
            return []
        try:
            got = await self._call(
                "GetAccessKeyLastUsed", what=f"reading the last use of access key {key_id}", AccessKeyId=key_id
            )
        except ProviderError as e:
            if isinstance(e.__cause__, StoreNotFound):
                return []
            raise
        used = got.get("AccessKeyLastUsed") or {}
        last = _epoch(used.get("LastUsedDate"))
        # The swap: when the key that supersedes this one was made (none yet: this key is still current).
        swap = max((k.created for k in keys if k.id != key_id and k.created >= mine.created), default=mine.created)
        if not last or last < swap or time.time() - last >= self.config.idle_for:
            return []
        where = f"{used.get('ServiceName') or '?'} in {used.get('Region') or '?'}"
        return [Session(principal=key_id, client=f"last used {time.time() - last:.0f}s ago ({where})")]

    async def live(self) -> list[str]:
        keys, tags = await self._state()
        return [k.id for k in keys if k.active and TAG + k.id in tags]

    async def aclose(self) -> None:
        await self._iam.aclose()

    # ------------------------------------------------------------ IAM calls

    async def _call(self, op: str, *, what: str, **params: Any) -> dict[str, Any]:
        if op not in ("GetAccessKeyLastUsed",):
            params.setdefault("UserName", self._user)
        method = re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower()
        try:
            return await self._iam.call(method, what=what, **params)
        except StoreNotFound as e:
            raise ProviderError(f"{what}: IAM user {self._user} or the key does not exist") from e
        except StoreError as e:
            raise ProviderError(str(e)) from e

    async def _keys(self) -> list[_Key]:
        got = await self._call("ListAccessKeys", what=f"listing the access keys of IAM user {self._user}")
        return [
            _Key(id=str(k.get("AccessKeyId")), active=k.get("Status") == "Active", created=_epoch(k.get("CreateDate")))
            for k in got.get("AccessKeyMetadata") or []
        ]

    async def _state(self) -> tuple[list[_Key], dict[str, str]]:
        keys = await self._keys()
        got = await self._call("ListUserTags", what=f"listing the tags of IAM user {self._user}")
        tags = {str(t.get("Key")): str(t.get("Value")) for t in got.get("Tags") or []}
        return keys, tags

    async def _tag(self, tags: dict[str, str]) -> None:
        await self._call(
            "TagUser",
            what=f"tagging IAM user {self._user}",
            Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
        )

    async def _untag(self, names: list[str]) -> None:
        if names:
            await self._call("UntagUser", what=f"untagging IAM user {self._user}", TagKeys=names)

    async def _set_status(self, key_id: str, status: str) -> None:
        await self._call(
            "UpdateAccessKey", what=f"setting access key {key_id} {status}", AccessKeyId=key_id, Status=status
        )

    async def _delete(self, key_id: str) -> None:
        try:
            await self._call("DeleteAccessKey", what=f"deleting access key {key_id}", AccessKeyId=key_id)
        except ProviderError as e:
            if not isinstance(e.__cause__, StoreNotFound):
                raise
        await self._untag([TAG + key_id])
        log.info("deleted access key %s of IAM user %s", key_id, self._user, extra={"access_key_id": key_id})

    async def _never_used(self, key_id: str) -> bool:
        got = await self._call(
            "GetAccessKeyLastUsed", what=f"reading the last use of access key {key_id}", AccessKeyId=key_id
        )
        return not (got.get("AccessKeyLastUsed") or {}).get("LastUsedDate")

    # ------------------------------------------------------------ bookkeeping

    def _deletable(self, tag: str) -> bool:
        if not tag.startswith(INACTIVE):
            return False
        try:
            since = float(tag[len(INACTIVE) :])
        except ValueError:
            return False
        return time.time() - since >= self.config.delete_after

    async def _clean(self, keys: list[_Key], tags: dict[str, str], *, keep: str | None) -> list[_Key]:
        """Delete what a rotation may delete before it mints (see the module docstring); the keys left."""
        left: list[_Key] = []
        creating = tags.get(CREATING)
        for k in keys:
            ours = TAG + k.id in tags
            if k.id == keep:
                left.append(k)
            elif ours and not k.active and self._deletable(tags[TAG + k.id]):
                await self._delete(k.id)
            elif ours and k.active:
                if not await self._never_used(k.id):
                    raise ProviderBlocked(
                        f"access key {k.id} of IAM user {self._user} is Baton's, Active and has been used, but no "
                        "current version names it; it is left as it is",
                        live=(k.id,),
                        action=f"restore the store's version that names access key {k.id}, or make it Inactive "
                        "(aws iam update-access-key --status Inactive) once nothing uses it",
                    )
                log.warning("deleting access key %s: Baton minted it, no version names it, it was never used", k.id)
                await self._delete(k.id)
            elif not ours and creating is not None and self._minted_at(k, creating) and await self._never_used(k.id):
                log.warning("deleting access key %s: minted by an interrupted rotation, never used", k.id)
                await self._delete(k.id)
            else:
                left.append(k)
        stale = [t for t in tags if t.startswith(TAG) and t[len(TAG) :] not in {k.id for k in keys}]
        await self._untag(stale + ([CREATING] if creating is not None else []))
        return left

    @staticmethod
    def _minted_at(key: _Key, creating: str) -> bool:
        try:
            return key.created >= float(creating) - _CLOCK_SLACK
        except ValueError:
            return False

    def _full(self, left: list[_Key], tags: dict[str, str], *, keep: str | None) -> ProviderError:
        described = []
        for k in left:
            tag = tags.get(TAG + k.id, "")
            what = "current" if k.id == keep else ("Baton's" if tag else "not Baton's")
            if tag.startswith(INACTIVE):
                what += ", Inactive until delete_after has passed"
            described.append(f"{k.id} ({what})")
        if not any(TAG + k.id in tags for k in left):
            return ProviderError(
                f"IAM user {self._user} already has two access keys, neither created by Baton: "
                f"{', '.join(described)}; refusing to touch them. Delete one (or let Baton's current key be one "
                "of them, seeded in the store) and the next rotation goes on"
            )
        return ProviderError(
            f"IAM user {self._user} has no free place for a new access key (AWS allows two): "
            f"{', '.join(described)}; the rotation waits (rotation.every should exceed delete_after)"
        )

    # ------------------------------------------------------------ payloads

    def _parse(self, payload: Secret) -> _Credential:
        try:
            data = payload_object(payload)
        except PayloadError:
            data = None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("access_key_id"), str)
            or not isinstance(data.get("secret_access_key"), str)
            or not _KEY_ID.fullmatch(data["access_key_id"])
        ):
            raise ProviderError("payload is not an AWS access key (JSON with access_key_id and secret_access_key)")
        return _Credential(data["access_key_id"], data["secret_access_key"])

    def _key_id_lenient(self, current: Secret | None) -> str | None:
        if current is None:
            return None
        try:
            return self._parse(current).access_key_id
        except ProviderError:
            log.warning("the current payload is not an AWS access key; starting afresh")
            return None

    def _not_ours(self, key_id: str) -> ProviderError:
        return ProviderError(
            f"access key {key_id} of IAM user {self._user} was not created by Baton (no tag {TAG}{key_id}); "
            "refusing to change it"
        )
