"""The ``redis`` provider: Redis ACL users as rotating credentials.

It owns the ACL commands that create, re-password and disable users, and the
mapping of redis-py errors into ``ProviderError``. It must never log, print or
put into an exception the admin URL (read from ``admin_url_file`` at each use),
a minted password, or the server's text of a refused command (``ACL SETUSER``'s
error quotes the rule it refused): errors keep only the server's error code.

The payload is JSON: ``{"username", "password"}`` plus ``host``, ``port`` and
``db`` when configured. Strategies:

- ``alternating-users``: two users ``<username>_a`` and ``<username>_b``; each
  rotation redefines the one that is not current (``reset on #<sha256> <rules>``),
  and only once the server says it is free (absent, or ``off`` with no client in
  CLIENT LIST). ``retire`` sets it ``off`` (clients already connected stay, as
  with a locked database role), and does nothing when its password has since
  changed.
- ``dual-password``: one user ``<username>`` that holds several passwords (Redis
  keeps any number): ``apply`` adds the new one, ``retire`` removes the old one
  (``!<sha256>``). CLIENT LIST does not say which password a client used, but a
  client that connected before any newer password was applied can only have
  used an older one: ``sessions`` reports those (client ids grow with each
  connection: the admin connection's id right after an apply is the line).
  The lines are this provider's memory; after a restart it counts every client
  that connected before its first admin connection (conservative: such a client
  holds retirement back until it reconnects). A client that logs in with the old
  password after the new one was applied (a consumer still reading the old
  file) is the agents' node reports to see. Removing a password does not end
  the connections made with it: they keep working.

Users created by Baton carry a selector that allows nothing,
``(%R~__baton_managed__ -@all)``: ACL users have no comment, and only an ACL
admin can set one. An existing user without it is never changed. ``retire``
refuses a user named in ``keep``. Passwords are sent as SHA-256 hashes
(``#<hex>``), never in clear, so ACL LOG and MONITOR show none. After each change
the provider asks the server to ``ACL SAVE`` (an ``aclfile`` keeps the users
across a restart); a server without an ACL file is warned about once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import string
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from daemon.config import RedisProviderConfig
from daemon.errors import ProviderBlocked, ProviderError
from daemon.model import Secret
from daemon.providers.base import AdminFile, Login, Provider, Session, login_name, parse_login

log = logging.getLogger(__name__)

MARK_KEYS = "%R~__baton_managed__"
MARK_SELECTOR = f"({MARK_KEYS} -@all)"
TIMEOUT = 10.0
PASSWORD_LENGTH = 40
_ALPHABET = string.ascii_letters + string.digits
_ERROR_CODE = re.compile(r"^[A-Z]{2,16}\b")

Client = aioredis.Redis


@dataclass(frozen=True)
class _Server:
    host: str
    port: int
    tls: bool
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class _User:
    ours: bool
    on: bool
    hashes: frozenset[str] = field(repr=False)


# ---------------------------------------------------------------- error mapping


def _connect_failure(e: BaseException, *, who: str) -> ProviderError:
    if isinstance(e, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
        return ProviderError(f"{who}: login failed (wrong user name or password, or the user is off)")
    if isinstance(e, rexc.TimeoutError):
        return ProviderError(f"{who}: cannot connect to the server (timed out)")
    if isinstance(e, rexc.ConnectionError | OSError):
        text = str(e).lower()
        if "refused" in text or "error 111 " in text or isinstance(e.__context__, ConnectionRefusedError):
            return ProviderError(f"{who}: cannot connect to the server (connection refused)")
        if "name or service" in text or "nodename" in text:
            return ProviderError(f"{who}: cannot connect to the server (host name not found)")
        return ProviderError(f"{who}: cannot connect to the server ({type(e).__name__})")
    return _refused(e, what=who)


def _refused(e: BaseException, *, what: str) -> ProviderError:
    """A command's failure: only the server's error code (NOPERM, ERR...) is kept, never its text."""
    if isinstance(e, rexc.NoPermissionError) or str(e).startswith("NOPERM"):
        return ProviderError(f"{what}: permission denied (the admin user needs +@admin, or +acl and +client)")
    if isinstance(e, rexc.ConnectionError | rexc.TimeoutError):
        return ProviderError(f"{what}: lost the connection to the server ({type(e).__name__})")
    m = _ERROR_CODE.match(str(e))
    return ProviderError(f"{what}: refused by the server ({m.group(0) if m else type(e).__name__})")


# ---------------------------------------------------------------- the provider


class RedisProvider(Provider):
    """Mint, apply, test and retire Redis ACL users (see the module docstring)."""

    def __init__(self, config: RedisProviderConfig) -> None:
        self.config = config
        # alternating-users: two users; dual-password: Redis keeps any number of passwords.
        self.slots: int | None = 2 if config.strategy == "alternating-users" else None
        self._base = config.username
        self._admin_file = AdminFile(config.admin_url_file, "admin_url_file")
        self._warned_no_aclfile = False
        # dual-password: the server's client id just after each password hash was applied, and
        # of this provider's first admin connection (see sessions()).
        self._applied: dict[str, int] = {}
        self._first_id: int | None = None

    # ------------------------------------------------------------ Provider protocol

    async def create(self, *, current: Secret | None) -> Secret:
        previous = self._parse_lenient(current)
        if self.config.strategy == "alternating-users":
            username = await self._free_slot(previous)
        else:
            username = self._base
        password = "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LENGTH))
        payload: dict[str, Any] = {"username": username, "password": password}
        if self.config.host is not None:
            payload["host"] = self.config.host
        if self.config.port is not None:
            payload["port"] = self.config.port
        if self.config.db is not None:
            payload["db"] = self.config.db
        log.info("minted a credential for user %s", username, extra={"user": username})
        return Secret(json.dumps(payload))

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        cred = self._parse(new)
        name = cred.username
        async with self._admin() as r:
            info = await self._user(r, name)
            if info is not None and not info.ours:
                raise self._not_ours(name)
            rules = list(self.config.acl_rules)
            if self.config.strategy == "dual-password" and info is not None:
                # Keep the passwords it has (the current one among them); restate the rest.
                spec = ["on", f"#{_hashed(cred)}", "resetkeys", "resetchannels", "-@all", "clearselectors"]
            else:
                spec = ["reset", "on", f"#{_hashed(cred)}"]
            await self._setuser(r, name, [*spec, *rules, MARK_SELECTOR], what=f"setting the password of user {name}")
            # An id taken after the change (safe: more clients count as old ones in sessions()).
            self._applied[_hashed(cred)] = await self._client_id(r)
            await self._save(r)
        log.info("set a new password on user %s", name, extra={"user": name})

    async def test(self, new: Secret) -> None:
        cred = self._parse(new)
        server = await self._admin_server()
        r = self._client(server, user=cred.username, password=cred.password, named=False)
        try:
            await r.ping()
        except rexc.NoPermissionError:
            pass  # logged in (AUTH is never refused by a rule); the user's rules forbid PING
        except rexc.RedisError as e:
            raise _connect_failure(e, who=f"user {cred.username}") from None
        finally:
            await r.aclose()

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        cred = self._parse(old)
        name = cred.username
        dual = self.config.strategy == "dual-password"
        if not dual and name in keep:
            raise ProviderError(
                f"refusing to retire user {name}: the current or a newer version names it "
                "(the version being retired was not the last one to use it)"
            )
        async with self._admin() as r:
            info = await self._user(r, name)
            if info is None:
                log.info("user %s is already gone", name, extra={"user": name})
                return
            if not info.ours:
                raise self._not_ours(name)
            if _hashed(cred) not in info.hashes:
                # Removed already, or (alternating) the slot was re-passworded since: nothing of old is left.
                log.info("user %s no longer holds the old password", name, extra={"user": name})
                return
            if dual:
                # One user for every version: only old's password goes, never the user.
                await self._setuser(r, name, [f"!{_hashed(cred)}"], what=f"removing the old password of user {name}")
            elif info.on:
                await self._setuser(r, name, ["off"], what=f"turning user {name} off")
            else:
                return
            await self._save(r)
        log.info("retired the old credential of user %s", name, extra={"user": name})

    async def sessions(self, old: Secret) -> list[Session]:
        cred = self._parse(old)
        async with self._admin() as r:
            clients = await self._clients(r, cred.username)
            info = await self._user(r, cred.username) if self.config.strategy == "dual-password" else None
        if info is not None:
            clients = self._older_than_newer_passwords(clients, info, cred)
        counts: dict[str, int] = {}
        for c in clients:
            addr = str(c.get("addr", "")).rpartition(":")[0] or "local"
            client = f"{c.get('name') or '-'}@{addr}"
            counts[client] = counts.get(client, 0) + 1
        return [Session(principal=cred.username, client=c, count=n) for c, n in sorted(counts.items())]

    def _older_than_newer_passwords(
        self, clients: list[dict[str, Any]], info: _User, cred: Login
    ) -> list[dict[str, Any]]:
        """dual-password: the clients that connected before any password other than ``cred``'s was
        applied (so with ``cred``'s or an even older one); every client when ``cred``'s is the only one."""
        others = [h for h in info.hashes if h != _hashed(cred)]
        if not others:
            return clients
        line = min(self._applied.get(h, self._first_id or 0) for h in others)
        return [c for c in clients if _client_number(c) < line]

    async def live(self) -> list[str]:
        """Baton's users of this credential that are on or have clients (alternating-users)."""
        if self.config.strategy == "dual-password":
            return []  # one user, named by every version
        found = []
        async with self._admin() as r:
            for slot in self._slot_names():
                info = await self._user(r, slot)
                if info is not None and info.ours and (info.on or await self._clients(r, slot)):
                    found.append(slot)
        return found

    def principal(self, payload: Secret) -> str | None:
        try:
            return self._parse(payload).username
        except ProviderError:
            return None

    async def aclose(self) -> None:
        return None  # connections live for one step only

    # ------------------------------------------------------------ payloads

    def _slot_names(self) -> tuple[str, str]:
        return f"{self._base}_a", f"{self._base}_b"

    def _owns_name(self, username: str) -> bool:
        if self.config.strategy == "alternating-users":
            return username in self._slot_names()
        return username == self._base

    def _parse(self, payload: Secret) -> Login:
        return parse_login(
            payload,
            system="redis",
            account="user",
            owns=self._owns_name,
            naming=f"strategy {self.config.strategy}, username {self._base}",
        )

    def _parse_lenient(self, current: Secret | None) -> str | None:
        return login_name(current, self._parse)

    # ------------------------------------------------------------ connections

    async def _admin_server(self) -> _Server:
        path = self.config.admin_url_file
        text = await self._admin_file.read()
        return _parse_url(text.strip(), path=path)

    @staticmethod
    def _client(server: _Server, *, user: str, password: str, named: bool = True) -> Client:
        # A tested user's rules may forbid CLIENT SETNAME: only the admin names its connection.
        return aioredis.Redis(
            host=server.host,
            port=server.port,
            ssl=server.tls,
            username=user,
            password=password,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            client_name="baton" if named else None,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),  # one attempt per step: the rotator retries at the next interval
        )

    @asynccontextmanager
    async def _admin(self) -> AsyncIterator[Client]:
        server = await self._admin_server()
        r = self._client(server, user=server.user, password=server.password)
        try:
            try:
                await r.ping()
            except rexc.RedisError as e:
                raise _connect_failure(e, who="admin") from None
            if self._first_id is None and self.config.strategy == "dual-password":
                self._first_id = await self._client_id(r)
            yield r
        finally:
            await r.aclose()

    # ------------------------------------------------------------ commands

    async def _user(self, r: Client, name: str) -> _User | None:
        try:
            raw = await _call(r, "ACL", "GETUSER", name)
        except rexc.RedisError as e:
            raise _refused(e, what=f"looking up user {name}") from None
        if raw is None:
            return None
        info = _pairs(raw)
        selectors = [_pairs(s) if isinstance(s, list) else s for s in info.get("selectors") or []]
        return _User(
            ours=any(isinstance(s, dict) and s.get("keys") == MARK_KEYS for s in selectors),
            on="on" in (info.get("flags") or []),
            hashes=frozenset(str(h) for h in info.get("passwords") or []),
        )

    async def _client_id(self, r: Client) -> int:
        try:
            return int(await _call(r, "CLIENT", "ID"))
        except (rexc.RedisError, TypeError, ValueError) as e:
            raise _refused(e, what="asking the server for a client id") from None

    async def _setuser(self, r: Client, name: str, rules: list[str], *, what: str) -> None:
        try:
            await _call(r, "ACL", "SETUSER", name, *rules)
        except rexc.RedisError as e:
            # The reply quotes the rule it refused, which may be a password hash: drop it, and the cause.
            raise _refused(e, what=what) from None

    async def _clients(self, r: Client, name: str) -> list[dict[str, Any]]:
        try:
            clients = await r.client_list()
        except rexc.RedisError as e:
            raise _refused(e, what=f"listing the clients of user {name}") from None
        return [c for c in clients if c.get("user") == name]

    async def _save(self, r: Client) -> None:
        try:
            await _call(r, "ACL", "SAVE")
        except rexc.ResponseError as e:
            if "not configured to use an ACL file" in str(e):
                if not self._warned_no_aclfile:
                    self._warned_no_aclfile = True
                    log.warning(
                        "the redis server has no aclfile: the users Baton sets are lost when it restarts "
                        "(configure aclfile, or persist them with CONFIG REWRITE)"
                    )
                return
            raise _refused(e, what="saving the ACL file") from None
        except rexc.RedisError as e:
            raise _refused(e, what="saving the ACL file") from None

    async def _free_slot(self, previous: str | None) -> str:
        """The user to redefine: the one ``previous`` does not name (either when it names none),
        and only if the server says nothing can use it (absent, or off with no client)."""
        slot_a, slot_b = self._slot_names()
        candidates = [slot_b] if previous == slot_a else [slot_a] if previous == slot_b else [slot_a, slot_b]
        live: list[str] = []
        async with self._admin() as r:
            for slot in candidates:
                info = await self._user(r, slot)
                clients = len(await self._clients(r, slot)) if info is not None else 0
                if info is None or (not info.on and not clients):
                    if live:
                        log.warning(
                            "user %s is live and no current version names it; it is left as it is",
                            candidates[0],
                            extra={"user": candidates[0], "event": "live_user_left"},
                        )
                    return slot
                said = "is off" if not info.on else "is on"
                live.append(f"{slot} ({said}, {clients} client(s))")
        raise ProviderBlocked(
            f"will not re-password a live user: {', '.join(live)}; no version still being retired names it, "
            "so the store may have lost the version that uses it. Restore that version, or turn the user off "
            "once nothing uses it; the current credential is left as it is",
            live=tuple(candidates),
            action=f"restore the store's version that names {' or '.join(candidates)}, or once nothing uses it "
            f"turn it off (ACL SETUSER <user> off); the next rotation then goes on",
        )

    @staticmethod
    def _not_ours(name: str) -> ProviderError:
        return ProviderError(
            f"user {name} exists but is not managed by Baton (no selector {MARK_SELECTOR}); refusing to change it"
        )


async def _call(r: Client, *args: str) -> Any:
    """One raw command (redis-py types its helpers, not ``execute_command``)."""
    return await r.execute_command(*args)  # type: ignore[no-untyped-call]


def _client_number(client: dict[str, Any]) -> int:
    """CLIENT LIST's ``id``; an unreadable one counts as the oldest client."""
    try:
        return int(client.get("id", ""))
    except (TypeError, ValueError):
        return -1


def _pairs(raw: Any) -> dict[str, Any]:
    """ACL GETUSER's reply (a flat list of names and values under RESP2, a map under RESP3) as a dict."""
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    items = list(raw)
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _hashed(cred: Login) -> str:
    """The password as Redis ACLs hold it (``#<sha256>``): the only form sent to the server."""
    return hashlib.sha256(cred.password.encode()).hexdigest()


def _parse_url(text: str, *, path: Path) -> _Server:
    """``redis://user:password@host:port`` (or ``rediss://``). Errors name only the file."""
    bad = ProviderError(f"admin_url_file {path} does not hold a redis://user:password@host:port URL")
    if not text:
        raise ProviderError(f"admin_url_file {path} is empty")
    try:
        parts = urlsplit(text)
        port = parts.port or 6379
    except ValueError:
        raise bad from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or not parts.password:
        raise bad
    return _Server(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "rediss",
        user=unquote(parts.username or "default"),
        password=unquote(parts.password),
    )
