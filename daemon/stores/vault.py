"""HashiCorp Vault KV v2 as a ``SecretStore`` (hvac), and the status-path node reporter.

The only module that imports hvac. Every hvac call runs in ``asyncio.to_thread``;
hvac errors are mapped into ``daemon.errors`` here and a response body never
reaches an error message or a log line.

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
  ``reports: status_path`` (``VaultStatusReporter``) when a fleet outgrows it.

Payloads: a KV data map ``{"value": "<str>"}`` is the payload string itself;
any other map is its JSON (so templates see the fields). ``create`` of a payload
that is a JSON object writes the object's fields as KV data.

Auth: ``token`` (env ``VAULT_TOKEN``), ``token_file``, ``approle``, ``kubernetes``.
The token is renewed once two thirds of its TTL have passed (checked before
each call), and a 403 on a token that Vault no longer knows causes one fresh
login before ``StoreAuthError``; a 403 on a live token (a policy denial) is an
error at once, so a limited-use AppRole secret_id is never spent on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import hvac
import hvac.exceptions
import hvac.utils
import requests

from daemon.config import Config, VaultAuthConfig, VaultStoreConfig
from daemon.errors import (
    ConfigError,
    PayloadError,
    StoreAuthError,
    StoreConflict,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, SecretVersion, VersionId, VersionInfo
from daemon.report.base import NodeReport
from daemon.stores.base import SecretStore, StatusHook, check_payload
from daemon.stores.lease import LeaseRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_LEN = 128
MAX_METADATA_VALUE_LEN = 512
KEEP_RETIRED = 32

K_CURRENT = "baton.current"
K_PENDING = "baton.pending"
K_PREVIOUS = "baton.previous"
K_RETIRED = "baton.retired"

# Renew when this fraction of the token's TTL has passed.
RENEW_AT = 2 / 3


# ---------------------------------------------------------------- metadata


def _parse_time(text: str | None) -> float:
    if not text:
        return 0.0
    # Vault prints nanoseconds; datetime takes at most microseconds.
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return 0.0
    frac = (m.group(2) or "")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.fromisoformat(m.group(1) + frac + tz).timestamp()
    except ValueError:
        return 0.0


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
            deletion = _parse_time(v.get("deletion_time"))
            versions[int(number)] = _VersionMeta(
                created=_parse_time(v.get("created_time")),
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


# ---------------------------------------------------------------- errors


def _errors_of(e: hvac.exceptions.VaultError) -> str:
    # Used only to classify an error; never copied into a message.
    errors = getattr(e, "errors", None)
    if errors:
        return " ".join(str(x) for x in errors)
    return str(e.args[0]) if e.args else ""


def _mapped(e: BaseException, what: str) -> BaseException:
    """Map a client error onto daemon.errors; anything unknown is returned as is."""
    if isinstance(e, StoreError | PayloadError):
        return e
    if isinstance(e, requests.exceptions.Timeout):
        return StoreUnavailable(f"vault {what}: timed out")
    if isinstance(e, requests.exceptions.ConnectionError):
        return StoreUnavailable(f"vault {what}: cannot connect")
    if isinstance(e, requests.exceptions.RequestException):
        return StoreUnavailable(f"vault {what}: request failed ({type(e).__name__})")
    if isinstance(e, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
        return StoreAuthError(f"vault {what}: permission denied")
    if isinstance(e, hvac.exceptions.InvalidPath):
        return StoreNotFound(f"vault {what}: not found")
    if isinstance(
        e,
        hvac.exceptions.VaultDown
        | hvac.exceptions.InternalServerError
        | hvac.exceptions.BadGateway
        | hvac.exceptions.RateLimitExceeded
        | hvac.exceptions.VaultNotInitialized
        | hvac.exceptions.UnexpectedError,
    ):
        return StoreUnavailable(f"vault {what}: server unavailable ({type(e).__name__})")
    if isinstance(e, hvac.exceptions.InvalidRequest):
        said = _errors_of(e)
        if "check-and-set" in said:
            return StoreConflict(f"vault {what}: check-and-set lost, someone else wrote a version first")
        if "at most" in said and "custom_metadata" in said:
            return StoreError(
                f"vault {what}: custom_metadata would exceed Vault's {MAX_METADATA_KEYS} keys; "
                "use `reports: status_path` for a fleet this large"
            )
        if "custom_metadata" in said:
            return StoreError(
                f"vault {what}: custom_metadata rejected (limits: {MAX_METADATA_KEYS} keys, "
                f"key <= {MAX_METADATA_KEY_LEN}, value <= {MAX_METADATA_VALUE_LEN} bytes)"
            )
        return StoreError(f"vault {what}: request rejected (400)")
    if isinstance(e, hvac.exceptions.VaultError):
        return StoreError(f"vault {what}: {type(e).__name__}")
    return e


# ---------------------------------------------------------------- auth


@dataclass(frozen=True)
class _Grant:
    token: str
    ttl: float  # seconds; 0: does not expire
    renewable: bool


class VaultStore:
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
        self.url = url
        self.auth = auth or VaultAuthConfig()
        self.mount = mount.strip("/")
        self.namespace = namespace
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.verify = verify
        self.retire_mode = retire
        self.status_prefix = status_prefix.strip("/")
        self.lease_prefix = lease_prefix.strip("/")
        self._env = env if env is not None else os.environ
        # hvac clients wrap a requests.Session, which is not meant to be shared
        # between threads: each worker thread takes an idle client from the pool.
        self._idle: list[Any] = []
        self._all: list[Any] = []
        self._pool_lock = threading.Lock()
        self._auth_lock = asyncio.Lock()
        self._grant: _Grant | None = None
        self._renew_at: float | None = None
        self._closed = False
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

    # ------------------------------------------------------------ plumbing

    def _take(self) -> Any:
        with self._pool_lock:
            if self._closed:
                raise StoreUnavailable("vault store is closed")
            if self._idle:
                return self._idle.pop()
            client = hvac.Client(url=self.url, timeout=self.timeout, verify=self.verify, namespace=self.namespace)
            self._all.append(client)
            return client

    def _give(self, client: Any) -> None:
        with self._pool_lock:
            if self._closed:
                client.adapter.close()
            else:
                self._idle.append(client)

    def _run(self, fn: Callable[[Any], T], token: str | None) -> T:
        """In a worker thread: run ``fn(client)`` with ``token``."""
        client = self._take()
        try:
            client.token = token
            return fn(client)
        finally:
            client.token = None
            self._give(client)

    async def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run one hvac call in a thread, with a valid token, mapped errors, one re-login on 403."""
        try:
            token = await self._token()
            try:
                return await asyncio.to_thread(self._run, fn, token)
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
                # A 403 is either a dead token (expired, revoked: log in again) or a
                # policy that denies this path (a new login cannot help, and with a
                # limited-use AppRole secret_id each login spends one). The token's
                # own lookup tells which, and costs no login.
                if await self._token_alive(token):
                    raise StoreAuthError(
                        f"vault {what}: permission denied by policy (the token itself is valid)"
                    ) from None
                log.warning("vault refused the token; logging in again", extra={"auth_method": self.auth.method})
                token = await self._relogin(stale=token)
                return await asyncio.to_thread(self._run, fn, token)
        except Exception as e:
            mapped = _mapped(e, what)
            if mapped is e:
                raise
            raise mapped from e

    async def _token_alive(self, token: str) -> bool:
        """True when Vault still accepts ``token`` (``lookup-self`` answers)."""
        try:
            await asyncio.to_thread(self._run, lambda c: c.auth.token.lookup_self(), token)
        except Exception:
            return False  # refused (dead token, or no default policy) or unreachable: try a login
        return True

    async def _token(self) -> str:
        async with self._auth_lock:
            if self._grant is None:
                await self._login()
            elif self._renew_at is not None and time.monotonic() >= self._renew_at:
                await self._renew()
            assert self._grant is not None
            return self._grant.token

    async def _relogin(self, *, stale: str) -> str:
        async with self._auth_lock:
            # Another task may have logged in already while we waited.
            if self._grant is None or self._grant.token == stale:
                await self._login()
            assert self._grant is not None
            return self._grant.token

    def _set_grant(self, grant: _Grant) -> None:
        self._grant = grant
        self._renew_at = time.monotonic() + grant.ttl * RENEW_AT if grant.ttl > 0 else None

    async def _login(self) -> None:
        try:
            grant = await asyncio.to_thread(self._login_sync)
        except Exception as e:
            mapped = _mapped(e, f"login ({self.auth.method})")
            if isinstance(mapped, StoreNotFound | StoreConflict) or type(mapped) is StoreError:
                # A 400/404 from a login endpoint means bad credentials or a wrong mount.
                mapped = StoreAuthError(f"vault login ({self.auth.method}) failed: {type(e).__name__}")
            if mapped is e:
                raise
            raise mapped from e
        self._set_grant(grant)
        log.info("vault login", extra={"auth_method": self.auth.method, "ttl": grant.ttl})

    def _read_secret_file(self, path: Path | None, what: str) -> str:
        if path is None:
            raise StoreAuthError(f"vault auth {self.auth.method}: {what} is not configured")
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise StoreAuthError(f"vault auth {self.auth.method}: cannot read {what} {path}: {e.strerror}") from e

    def _login_sync(self) -> _Grant:
        a = self.auth
        mount = a.mount or a.method
        if a.method in ("token", "token_file"):
            if a.method == "token":
                token = self._env.get("VAULT_TOKEN", "").strip()
                if not token:
                    raise StoreAuthError("vault auth token: VAULT_TOKEN is not set")
            else:
                token = self._read_secret_file(a.token_file, "token_file")
            data = self._run(
                lambda c: c.auth.token.lookup_self(mount_point="token" if a.mount is None else mount), token
            )
            info = data["data"]
            # "ttl" is whole seconds left (0 also for a token about to expire);
            # "expire_time" is null only for a token that never expires.
            expires = _parse_time(info.get("expire_time"))
            ttl = max(float(info.get("ttl") or 0), expires - time.time()) if expires else 0.0
            return _Grant(token=token, ttl=max(ttl, 0.001) if expires else 0.0, renewable=bool(info.get("renewable")))
        if a.method == "approle":
            if not a.role_id:
                raise StoreAuthError("vault auth approle: role_id is not configured")
            secret_id = self._read_secret_file(a.secret_id_file, "secret_id_file")
            resp = self._run(
                lambda c: c.auth.approle.login(
                    role_id=a.role_id, secret_id=secret_id, use_token=False, mount_point=mount
                ),
                None,
            )
        else:
            if not a.role:
                raise StoreAuthError("vault auth kubernetes: role is not configured")
            jwt = self._read_secret_file(a.jwt_file, "jwt_file")
            resp = self._run(
                lambda c: c.auth.kubernetes.login(role=a.role, jwt=jwt, use_token=False, mount_point=mount), None
            )
        auth = resp["auth"]
        return _Grant(
            token=str(auth["client_token"]),
            ttl=float(auth.get("lease_duration") or 0),
            renewable=bool(auth.get("renewable")),
        )

    async def _renew(self) -> None:
        grant = self._grant
        assert grant is not None
        if grant.renewable:
            try:
                resp = await asyncio.to_thread(self._run, lambda c: c.auth.token.renew_self(), grant.token)
                ttl = float(resp["auth"].get("lease_duration") or 0)
            except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as e:
                log.warning("vault token renewal failed; logging in again", extra={"error": type(e).__name__})
            else:
                # Near the token's max TTL a renewal grants less than asked for;
                # once it drops below a third of the original, log in afresh
                # (a method that can) instead of renewing ever more often.
                if self.auth.method in ("approle", "kubernetes") and ttl < grant.ttl * (1 - RENEW_AT):
                    log.info("vault token near its max TTL; logging in again")
                else:
                    self._renew_at = time.monotonic() + ttl * RENEW_AT if ttl > 0 else None
                    log.debug("vault token renewed", extra={"ttl": ttl})
                    return
        await self._login()

    # ------------------------------------------------------------ raw KV helpers

    def _url(self, kind: str, key: str) -> str:
        return hvac.utils.format_url("/v1/{mount}/{kind}/{path}", mount=self.mount, kind=kind, path=key)  # type: ignore[no-any-return]

    async def _metadata(self, key: str) -> _Meta:
        resp = await self._call(f"read metadata of {key}", lambda c: c.adapter.get(self._url("metadata", key)))
        return _Meta.parse(resp)

    async def _patch(self, key: str, custom: Mapping[str, str | None]) -> None:
        await self._call(
            f"merge metadata of {key}",
            lambda c: c.adapter.request(
                "PATCH",
                self._url("metadata", key),
                json={"custom_metadata": dict(custom)},
                headers={"Content-Type": "application/merge-patch+json"},
            ),
        )

    async def _write(self, key: str, data: dict[str, Any], *, cas: int | None) -> Any:
        return await self._call(
            f"write {key}",
            lambda c: c.secrets.kv.v2.create_or_update_secret(path=key, secret=data, cas=cas, mount_point=self.mount),
        )

    async def _read_data(self, key: str, number: int) -> Any:
        return await self._call(
            f"read {key} version {number}",
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=key, version=number, mount_point=self.mount, raise_on_deleted_version=True
            ),
        )

    async def _list(self, prefix: str) -> list[str]:
        try:
            resp = await self._call(
                f"list {prefix}", lambda c: c.adapter.get(self._url("metadata", prefix), params={"list": "true"})
            )
        except StoreNotFound:
            return []
        return [str(k) for k in resp["data"].get("keys") or []]

    async def _delete_all(self, key: str) -> None:
        await self._call(f"delete {key}", lambda c: c.adapter.delete(self._url("metadata", key)))

    # ------------------------------------------------------------ SecretStore

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        meta = await self._metadata(key)
        number = meta.current if version is None else _parse_version(version)
        if number == 0:
            raise StoreNotFound(f"vault {key}: no current version yet")
        resp = await self._read_data(key, number)
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
            await self._call(
                f"create metadata of {key}",
                lambda c: c.adapter.post(
                    self._url("metadata", key), json={"custom_metadata": {K_CURRENT: "0", K_PENDING: "1"}}
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
            created=_parse_time(resp["data"].get("created_time")),
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
                resp = await self._call(f"read config of {self.mount}", lambda c: c.adapter.get(url))
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
            await self._call(
                f"{verb} {key} version {number}",
                lambda c: c.adapter.post(self._url(verb, key), json={"versions": [number]}),
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
            if total > MAX_METADATA_KEYS:
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
            resp = await self._call(
                f"read lease {path}",
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=self.mount, raise_on_deleted_version=True
                ),
            )
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
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._all = []
        # Clients still busy in a worker thread are closed when they come back (_give).
        for client in idle:
            client.adapter.close()


# ---------------------------------------------------------------- status path


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
        await self.store._write(path, {"report": report.to_json(), "key": key}, cas=None)
        if path not in self._trimmed:
            # A heartbeat writes a version each time; keep only the latest two.
            await self.store._call(
                f"set max_versions of {path}",
                lambda c: c.adapter.post(self.store._url("metadata", path), json={"max_versions": 2}),
            )
            self._trimmed.add(path)

    async def _entry(self, path: str) -> dict[str, Any] | None:
        async with self._sem:
            try:
                resp = await self.store._call(
                    f"read {path}",
                    lambda c: c.secrets.kv.v2.read_secret_version(
                        path=path, mount_point=self.store.mount, raise_on_deleted_version=True
                    ),
                )
            except StoreNotFound:
                return None  # forgotten between list and read
        data = resp["data"]["data"]
        # An entry that is there but not an object is unreadable, not absent ({} has no report).
        return data if isinstance(data, dict) else {}

    async def _one(self, folder: str, node: str, credential: str) -> R | None:
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
            return report
        except (KeyError, TypeError, ValueError):
            log.warning("unreadable node report", extra={"path": path})
        # An unreadable report is an unknown node, and unknown blocks: stand in a
        # report that is stale from the start (heartbeat 0), made by the same parser.
        return self.parse(NodeReport(node=node, credential=credential, current=None).to_json())

    async def collect(self, key: str, credential: str) -> list[R]:
        folder = self._path(credential, "x").rpartition("/")[0]
        self._credential_of[key] = credential
        names = [n for n in await self.store._list(folder) if not n.endswith("/")]
        return await self._read_all(folder, names, credential)

    async def _read_all(self, folder: str, nodes: Sequence[str], credential: str) -> list[R]:
        found = await asyncio.gather(*(self._one(folder, n, credential) for n in nodes))
        return [r for r in found if r is not None]

    async def collect_nodes(self, key: str, credential: str, nodes: Sequence[str]) -> list[R]:
        """The reports of just ``nodes`` (one read each); a node without an entry is left out.

        For the rotator's quick check while a drain goes on (``CredentialRotator``):
        re-reading the few nodes that still block costs far less than ``collect``.
        """
        folder = self._path(credential, "x").rpartition("/")[0]
        for node in nodes:
            self._path(credential, node)  # validates the node name
        return await self._read_all(folder, nodes, credential)

    async def forget(self, key: str, node: str) -> None:
        self._path("x", node)  # validates the node name
        credential = self._credential_of.get(key)
        if credential is not None:
            candidates = [self._path(credential, node)]
        else:
            # Not seen in this process: look for the node under every
            # credential folder and forget only the entries written for ``key``.
            folders = [f.rstrip("/") for f in await self.store._list(self.prefix) if f.endswith("/")]
            candidates = []
            for folder in folders:
                path = f"{self.prefix}/{folder}/{node}"
                data = await self._entry(path)
                if data is not None and data.get("key") == key:
                    candidates.append(path)
        for path in candidates:
            await self.store._delete_all(path)
            self._trimmed.discard(path)

    async def aclose(self) -> None:
        if self.owns_store:
            await self.store.aclose()
