"""The Vault client (hvac): pooled sessions, auth (token, token_file, approle, kubernetes), error mapping, KV v2 calls.

The only module that imports hvac. Every hvac call runs in ``asyncio.to_thread``;
besides KV v2 it reads leased secrets and looks up, renews and revokes leases (``sys/leases``);
hvac errors are mapped into ``daemon.errors`` here and a response body never
reaches an error message or a log line. It knows KV v2's endpoints, never what
Baton keeps in them (that is ``daemon.stores.vault`` and ``daemon.report.vault_status``).

Auth: ``token`` (env ``VAULT_TOKEN``), ``token_file``, ``approle``, ``kubernetes``.
The token is renewed once two thirds of its TTL have passed (checked before
each call), and a 403 on a token that Vault no longer knows causes one fresh
login before ``StoreAuthError``; a 403 on a live token (a policy denial) is an
error at once, so a limited-use AppRole secret_id is never spent on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import hvac.utils
import requests

from daemon.config import VaultAuthConfig
from daemon.errors import (
    CertificateError,
    LeaseError,
    PayloadError,
    StoreAuthError,
    StoreConflict,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_LEN = 128
MAX_METADATA_VALUE_LEN = 512

# Renew when this fraction of the token's TTL has passed.
RENEW_AT = 2 / 3

_REFUSED = {
    "approle": "role_id or secret_id refused (wrong, or the secret_id expired or used up: issue a new one)",
    "kubernetes": "service account token refused (wrong role, audience, subject or signer)",
}


def parse_time(text: str | None) -> float:
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


class VaultClient:
    """One Vault address and identity: pooled hvac sessions, a token kept valid, mapped errors."""

    def __init__(
        self,
        *,
        url: str,
        auth: VaultAuthConfig | None = None,
        mount: str = "secret",
        namespace: str | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.auth = auth or VaultAuthConfig()
        self.mount = mount.strip("/")
        self.namespace = namespace
        self.timeout = timeout
        self.verify = verify
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

    @property
    def renew_at(self) -> float | None:
        """When (time.monotonic) the token is renewed next; None: it does not expire."""
        return self._renew_at

    # ------------------------------------------------------------ sessions

    def _take(self) -> Any:
        with self._pool_lock:
            if self._closed:
                raise StoreUnavailable("vault client is closed")
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

    async def call(self, what: str, fn: Callable[[Any], T]) -> T:
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
                # A 400/404 from a login endpoint means bad credentials or a wrong mount. Vault
                # says only "invalid role or secret ID" for a wrong, expired or used-up secret_id.
                mapped = StoreAuthError(
                    f"vault login ({self.auth.method}) failed: {_REFUSED.get(self.auth.method, 'refused')} "
                    f"({type(e).__name__})"
                )
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
            try:
                data = self._run(
                    lambda c: c.auth.token.lookup_self(mount_point="token" if a.mount is None else mount), token
                )
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
                # Vault's default policy is what lets a token look itself up (and renew itself).
                raise StoreAuthError(
                    f"vault auth {a.method}: the token was refused (expired, revoked, or created "
                    "without Vault's default policy, which lets it look itself up and renew)"
                ) from None
            info = data["data"]
            # "ttl" is whole seconds left (0 also for a token about to expire);
            # "expire_time" is null only for a token that never expires.
            expires = parse_time(info.get("expire_time"))
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

    # ------------------------------------------------------------ KV v2

    def kv_url(self, kind: str, key: str) -> str:
        return hvac.utils.format_url("/v1/{mount}/{kind}/{path}", mount=self.mount, kind=kind, path=key)  # type: ignore[no-any-return]

    async def metadata(self, key: str) -> Any:
        """The key's KV metadata response, as Vault sent it."""
        return await self.call(f"read metadata of {key}", lambda c: c.adapter.get(self.kv_url("metadata", key)))

    async def patch_metadata(self, key: str, custom: Mapping[str, str | None]) -> None:
        await self.call(
            f"merge metadata of {key}",
            lambda c: c.adapter.request(
                "PATCH",
                self.kv_url("metadata", key),
                json={"custom_metadata": dict(custom)},
                headers={"Content-Type": "application/merge-patch+json"},
            ),
        )

    async def write(self, key: str, data: dict[str, Any], *, cas: int | None) -> Any:
        """A new version of ``key``; ``cas`` None: whatever the current version is."""

        def fn(c: Any) -> Any:
            try:
                return c.secrets.kv.v2.create_or_update_secret(path=key, secret=data, cas=cas, mount_point=self.mount)
            except hvac.exceptions.InvalidRequest as e:
                if cas is not None or "check-and-set parameter required" not in _errors_of(e):
                    raise
            # The mount or the key has cas_required: an unconditional write is one at the
            # current version (a writer in between makes it a StoreConflict, as any cas loss).
            try:
                current = int(c.adapter.get(self.kv_url("metadata", key))["data"]["current_version"])
            except hvac.exceptions.InvalidPath:
                current = 0
            return c.secrets.kv.v2.create_or_update_secret(path=key, secret=data, cas=current, mount_point=self.mount)

        return await self.call(f"write {key}", fn)

    async def read_version(self, key: str, number: int | None = None) -> Any:
        """One version of ``key`` (the newest when ``number`` is None)."""
        what = f"read {key}" if number is None else f"read {key} version {number}"
        return await self.call(
            what,
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=key, version=number, mount_point=self.mount, raise_on_deleted_version=True
            ),
        )

    async def list(self, prefix: str) -> list[str]:
        try:
            resp = await self.call(
                f"list {prefix}", lambda c: c.adapter.get(self.kv_url("metadata", prefix), params={"list": "true"})
            )
        except StoreNotFound:
            return []
        return [str(k) for k in resp["data"].get("keys") or []]

    async def delete_all(self, key: str) -> None:
        await self.call(f"delete {key}", lambda c: c.adapter.delete(self.kv_url("metadata", key)))

    # ------------------------------------------------------------ PKI

    async def pki_write(self, path: str, data: Mapping[str, Any], *, needs_data: bool = True) -> dict[str, Any]:
        """POST to a PKI endpoint (``pki/sign/web``, ``pki/issue/web``, ``pki/revoke``); the response's ``data``.

        The request may carry a CSR and the response a certificate (and in issue mode
        a private key): neither reaches an error message, which names ``path`` only.
        """
        url = "/v1/" + "/".join(hvac.utils.format_url("{p}", p=part) for part in path.strip("/").split("/"))
        resp = await self.call(f"pki {path}", lambda c: c.adapter.post(url, json=dict(data)))
        body = resp if isinstance(resp, dict) else {}
        out = body.get("data")
        if not isinstance(out, dict):
            if not needs_data:  # a revoke of an expired certificate answers with a warning only
                return {}
            raise StoreError(f"vault pki {path}: the response holds no data")
        return out

    # ------------------------------------------------------------ leases (dynamic secrets)

    async def read_leased(self, path: str) -> Mapping[str, Any]:
        """GET /v1/<path>: the response of a path that issues a leased secret (lease_id, lease_duration, data).

        The caller checks that a lease came back; the response holds secrets and never reaches a message.
        """
        url = hvac.utils.format_url("/v1/{path}", path=path)
        resp = await self.call(f"read {path}", lambda c: c.adapter.get(url))
        if not isinstance(resp, Mapping):
            raise StoreError(f"vault read {path}: no JSON object in the response")
        return resp

    async def _lease_call(self, what: str, endpoint: str, body: dict[str, Any]) -> Mapping[str, Any]:
        url = f"/v1/sys/leases/{endpoint}"

        def fn(c: Any) -> Any:
            try:
                return c.adapter.put(url, json=body)
            except hvac.exceptions.InvalidRequest as e:
                # Vault says 400 for a lease it does not know (expired, revoked, a restarted dev
                # server) or one it will not renew: that lease is gone for good, not a retry.
                said = _errors_of(e).lower()
                if "past the max ttl" in said:
                    raise LeaseError(f"vault {what}: past its max TTL, cannot renew") from None
                if "not found" in said or "invalid lease" in said or "not renewable" in said or "expired" in said:
                    raise StoreNotFound(f"vault {what}: lease not found or not renewable") from None
                raise

        resp = await self.call(what, fn)
        return resp if isinstance(resp, Mapping) else {}

    async def lookup_lease(self, lease_id: str) -> Mapping[str, Any]:
        """sys/leases/lookup: the lease's ``data`` (ttl, expire_time, renewable); ``StoreNotFound`` if unknown."""
        return await self._lease_call("lookup lease", "lookup", {"lease_id": lease_id})

    async def renew_lease(self, lease_id: str, increment: float) -> Mapping[str, Any]:
        """sys/leases/renew: the granted ``lease_duration`` (capped at the max TTL); ``StoreNotFound`` if gone."""
        return await self._lease_call("renew lease", "renew", {"lease_id": lease_id, "increment": int(increment)})

    async def revoke_lease(self, lease_id: str) -> None:
        """sys/leases/revoke: the secret engine removes the credential (a database user is dropped)."""
        await self._lease_call("revoke lease", "revoke", {"lease_id": lease_id})

    async def pki_certificate(
        self,
        path: str,
        *,
        common_name: str,
        alt_names: Sequence[str],
        ip_sans: Sequence[str],
        ttl: float,
        csr: str | None,
    ) -> dict[str, Any]:
        """``<mount>/sign/<role>`` with ``csr``, or ``<mount>/issue/<role>`` without: the answer's
        ``certificate``, ``ca_chain`` (a list), ``issuing_ca`` and ``private_key`` (issue mode, else
        None), each checked to be text. ``CertificateError`` when the answer is out of shape."""
        body: dict[str, Any] = {"common_name": common_name, "ttl": f"{max(1, int(ttl))}s", "format": "pem"}
        alt = [a for a in alt_names if a != common_name]
        if alt:
            body["alt_names"] = ",".join(alt)
        if ip_sans:
            body["ip_sans"] = ",".join(ip_sans)
        if csr is not None:
            body["csr"] = csr
        else:
            body["private_key_format"] = "pkcs8"
        data = await self.pki_write(path, body)
        cert, chain, issuing, key = (data.get(k) for k in ("certificate", "ca_chain", "issuing_ca", "private_key"))
        if not isinstance(cert, str):
            raise CertificateError(f"vault {path}: the answer holds no certificate", reason="pem")
        if chain is None:
            chain = []
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise CertificateError(f"vault {path}: ca_chain is not a list of PEM texts", reason="pem")
        if csr is None and not isinstance(key, str):
            raise CertificateError(f"vault {path}: issue mode, but no private key came back", reason="pem")
        return {
            "certificate": cert,
            "ca_chain": chain,
            "issuing_ca": issuing if isinstance(issuing, str) else "",
            "private_key": key if csr is None else None,
        }

    async def aclose(self) -> None:
        """Close every idle session; one still busy in a thread is closed when it comes back."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._all = []
        # Clients still busy in a worker thread are closed when they come back (_give).
        for client in idle:
            client.adapter.close()
