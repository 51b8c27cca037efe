"""The ``mysql`` provider: MySQL 8 / MariaDB accounts as rotating credentials.

It owns the SQL that creates, re-passwords and locks accounts, and the mapping
of PyMySQL errors into ``ProviderError``. It must never log, print or put into an
exception the admin DSN (read from ``admin_dsn_file`` at each use), a minted
password, a password hash, or the server's own error text (which can quote the
statement, and so the hash): every error is rebuilt from the error code.

The payload is JSON: ``{"username", "password"}`` plus ``host``, ``port`` and
``database`` when configured. Strategies:

- ``alternating-users``: two accounts ``<username>_a`` and ``<username>_b`` (at
  ``account_host``); each rotation re-passwords the one that is not current, and
  only once the server says it is free (absent, or ACCOUNT LOCK without a thread
  in information_schema.PROCESSLIST). ``retire`` sets ACCOUNT LOCK (never DROP),
  and does nothing when the account's password has since changed.
- ``dual-password``: one account ``<username>``; ``apply`` sets the new password
  with RETAIN CURRENT PASSWORD, so the old one keeps working as the secondary, and
  ``retire`` sends DISCARD OLD PASSWORD. MySQL 8.0.14 or later only: MariaDB
  refuses the syntax (it has no secondary password), and so does an older MySQL.
  The provider asks the server (``VERSION()``) before it mints, and fails that
  rotation at ``create`` with an error that says so; the current credential is
  left as it is. Not tested here against MySQL 8 (the tests run Debian's MariaDB).
  One account for every version: PROCESSLIST cannot tell a thread of the old
  password from one of the new, so ``sessions`` reports none (the agents' node
  reports still gate retirement).

Accounts created by Baton are granted the role ``baton_managed`` (created when
missing, holding no privileges): MariaDB has no account comment. An existing
account without it is never altered or locked, unless its password hash is the
very payload being applied (a crash between CREATE USER and the GRANT that marks
it: nobody else knows that password), which is then marked and adopted.
``retire`` refuses an account named in ``keep``.

Passwords never cross the wire in clear: the mysql_native_password hash is
computed here and sent as ``IDENTIFIED WITH mysql_native_password AS '*...'``,
so the general log and PROCESSLIST show no password. PyMySQL is blocking: every
step runs its connection and statements in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import string
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import pymysql

from daemon.config import MysqlProviderConfig
from daemon.errors import ProviderBlocked, ProviderError
from daemon.model import Secret
from daemon.providers.base import AdminFile, Login, Provider, Session, login_name, parse_login

log = logging.getLogger(__name__)

MARK_ROLE = "baton_managed"
CONNECT_TIMEOUT = 10
IO_TIMEOUT = 30
PASSWORD_LENGTH = 40
_ALPHABET = string.ascii_letters + string.digits
_MARK_GRANT = re.compile(rf"^GRANT `{MARK_ROLE}`(@`%`)? TO ")
_NATIVE_HASH = re.compile(r"IDENTIFIED (?:BY PASSWORD|WITH '?mysql_native_password'? AS) '(\*[0-9A-F]{40})'")

T = TypeVar("T")
if TYPE_CHECKING:  # generic only in the stubs
    Conn = pymysql.connections.Connection[pymysql.cursors.Cursor]
else:
    Conn = pymysql.connections.Connection


@dataclass(frozen=True)
class _Server:
    host: str
    port: int
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class _Account:
    ours: bool
    locked: bool
    native_hash: str | None = field(repr=False)  # mysql_native_password hash; None for another plugin


def native_hash(password: str) -> str:
    """mysql_native_password's stored form: ``*`` + upper-case hex of SHA1(SHA1(password))."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()  # noqa: S324


# ---------------------------------------------------------------- error mapping

_LOGIN_CODES = {
    1045: "login failed (wrong user name or password)",
    1044: "login failed (no access to the database)",
    1049: "cannot connect (the database does not exist)",
    1040: "cannot connect (too many connections)",
    1129: "cannot connect (the host is blocked: FLUSH HOSTS)",
    1130: "login rejected (the host may not connect)",
    3118: "login failed (the account is locked)",
    4151: "login failed (the account is locked)",
}
_CONNECT_CODES = {2003, 2005, 2006, 2013}

_STATEMENT_CODES = {
    1044: "permission denied (the admin account lacks a privilege on a database)",
    1142: "permission denied (the admin account lacks a table privilege)",
    1227: "permission denied (the admin account needs CREATE USER and the roles WITH ADMIN OPTION)",
    1410: "permission denied (the admin account may not grant that)",
    1396: "the account changed concurrently (created or dropped by someone else?)",
    1959: "the role does not exist (create grant_role first)",
    3523: "the role does not exist (create grant_role first)",
    1064: "the server refused the statement's syntax",
}


def _code(e: BaseException) -> int:
    args = getattr(e, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def _connect_failure(e: BaseException, *, who: str) -> ProviderError:
    code = _code(e)
    if code in _LOGIN_CODES:
        return ProviderError(f"{who}: {_LOGIN_CODES[code]}")
    if code in _CONNECT_CODES or isinstance(e, OSError):
        text = str(e).lower()
        if "refused" in text:
            return ProviderError(f"{who}: cannot connect to the server (connection refused)")
        if "timed out" in text or "timeout" in text:
            return ProviderError(f"{who}: cannot connect to the server (timed out)")
        if "name or service" in text or "nodename" in text:
            return ProviderError(f"{who}: cannot connect to the server (host name not found)")
        return ProviderError(f"{who}: cannot connect to the server (error {code or '-'})")
    return ProviderError(f"{who}: cannot connect to the server ({type(e).__name__}, error {code or '-'})")


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Map PyMySQL errors of one SQL step into a ProviderError with a safe message.

    Neither the server's text nor the cause is kept (``from None``): it can quote the
    statement, and so a password hash (``near '*A1B2...'``).
    """
    try:
        yield
    except ProviderError:
        raise
    except pymysql.err.OperationalError as e:
        code = _code(e)
        if code in _CONNECT_CODES:
            err = ProviderError(f"{what}: lost the connection to the server (error {code})")
        else:
            err = ProviderError(f"{what}: {_STATEMENT_CODES.get(code, 'refused by the server')} (error {code or '-'})")
        raise err from None
    except pymysql.err.MySQLError as e:
        code = _code(e)
        reason = _STATEMENT_CODES.get(code, f"refused by the server ({type(e).__name__})")
        raise ProviderError(f"{what}: {reason} (error {code or '-'})") from None


# ---------------------------------------------------------------- the provider


class MysqlProvider(Provider):
    """Mint, apply, test and retire MySQL / MariaDB accounts (see the module docstring)."""

    def __init__(self, config: MysqlProviderConfig) -> None:
        self.config = config
        # alternating-users: two accounts; dual-password: a primary and a secondary password.
        # Either way the rotator never starts a rotation that would overwrite one still draining.
        self.slots: int | None = 2
        self._base = config.username
        self._admin_file = AdminFile(config.admin_dsn_file, "admin_dsn_file")

    # ------------------------------------------------------------ Provider protocol

    async def create(self, *, current: Secret | None) -> Secret:
        previous = self._parse_lenient(current)
        if self.config.strategy == "alternating-users":
            username = await self._run("choosing a free account", lambda c: self._free_slot(c, previous))
        else:
            await self._run("checking the server", self._require_dual_password)
            username = self._base
        password = "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LENGTH))
        payload: dict[str, Any] = {"username": username, "password": password}
        if self.config.host is not None:
            payload["host"] = self.config.host
        if self.config.port is not None:
            payload["port"] = self.config.port
        if self.config.database is not None:
            payload["database"] = self.config.database
        log.info("minted a credential for account %s", username, extra={"account": username})
        return Secret(json.dumps(payload))

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        cred = self._parse(new)
        await self._run(f"applying account {cred.username}", lambda c: self._apply(c, cred))

    async def test(self, new: Secret) -> None:
        cred = self._parse(new)
        server = await self._admin_server()
        who = f"account {cred.username}"

        def check() -> str:
            conn = self._connect(server, user=cred.username, password=cred.password, who=who, database=True)
            try:
                with _step(f"testing account {cred.username}"), conn.cursor() as cur:
                    cur.execute("SELECT CURRENT_USER()")
                    row = cur.fetchone()
            finally:
                conn.close()
            return str(row[0]) if row else ""

        got = await asyncio.to_thread(check)
        if got.rpartition("@")[0] != cred.username:
            raise ProviderError(f"account {cred.username}: logged in as someone else")

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        cred = self._parse(old)
        if self.config.strategy == "dual-password":
            # One account for every version: only old's password goes, never the account.
            await self._run(f"retiring the old password of {cred.username}", lambda c: self._discard_old(c, cred))
            return
        if cred.username in keep:
            raise ProviderError(
                f"refusing to retire account {cred.username}: the current or a newer version names it "
                "(the version being retired was not the last one to use it)"
            )
        await self._run(f"retiring account {cred.username}", lambda c: self._lock(c, cred))

    async def sessions(self, old: Secret) -> list[Session]:
        cred = self._parse(old)
        if self.config.strategy == "dual-password":
            return []  # one account for old and new: its threads cannot be told apart
        rows = await self._run(
            f"listing sessions of account {cred.username}", lambda c: self._threads(c, cred.username)
        )
        counts: dict[str, int] = {}
        for host, db in rows:
            client = f"{db or '-'}@{_address(host)}"
            counts[client] = counts.get(client, 0) + 1
        return [Session(principal=cred.username, client=c, count=n) for c, n in sorted(counts.items())]

    async def live(self) -> list[str]:
        """Baton's accounts of this credential that can log in or have threads (alternating-users)."""
        if self.config.strategy == "dual-password":
            return []  # one account, named by every version

        def find(conn: Conn) -> list[str]:
            found = []
            for slot in self._slot_names():
                info = self._account(conn, slot)
                if info is not None and info.ours and (not info.locked or self._threads(conn, slot)):
                    found.append(slot)
            return found

        return await self._run(f"listing live accounts of {self._base}", find)

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
            system="mysql",
            account="account",
            owns=self._owns_name,
            naming=f"strategy {self.config.strategy}, username {self._base}",
        )

    def _parse_lenient(self, current: Secret | None) -> str | None:
        return login_name(current, self._parse)

    # ------------------------------------------------------------ connections

    async def _admin_server(self) -> _Server:
        path = self.config.admin_dsn_file
        text = await self._admin_file.read()
        return _parse_dsn(text.strip(), path=path)

    def _connect(self, server: _Server, *, user: str, password: str, who: str, database: bool = False) -> Conn:
        try:
            return pymysql.connect(
                host=server.host,
                port=server.port,
                user=user,
                password=password,
                database=self.config.database if database else None,
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=IO_TIMEOUT,
                write_timeout=IO_TIMEOUT,
                autocommit=True,
                charset="utf8mb4",
                program_name="baton",
            )
        except (pymysql.err.MySQLError, OSError) as e:
            # The driver's text names host, port and user: keep none of it.
            raise _connect_failure(e, who=who) from None

    async def _run(self, what: str, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` on a fresh admin connection in a thread; the connection ends with it."""
        server = await self._admin_server()

        def work() -> T:
            conn = self._connect(server, user=server.user, password=server.password, who="admin")
            try:
                with _step(what):
                    return fn(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(work)

    # ------------------------------------------------------------ SQL steps (in a thread)

    def _account(self, conn: Conn, name: str) -> _Account | None:
        host = self.config.account_host
        with _step(f"looking up account {name}"), conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM mysql.user WHERE User = %s AND Host = %s", (name, host))
            row = cur.fetchone()
            if not row or not row[0]:
                return None
            cur.execute("SHOW CREATE USER %s@%s", (name, host))
            created = str((cur.fetchone() or ("",))[0])
            cur.execute("SHOW GRANTS FOR %s@%s", (name, host))
            grants = [str(r[0]) for r in cur.fetchall()]
        m = _NATIVE_HASH.search(created)
        return _Account(
            ours=any(_MARK_GRANT.match(g) for g in grants),
            locked=" ACCOUNT LOCK" in created,
            native_hash=m.group(1) if m else None,
        )

    def _threads(self, conn: Conn, name: str) -> list[tuple[str, str | None]]:
        with _step(f"counting sessions of account {name}"), conn.cursor() as cur:
            cur.execute(
                "SELECT HOST, DB FROM information_schema.PROCESSLIST WHERE USER = %s AND ID <> CONNECTION_ID()",
                (name,),
            )
            return [(str(h or ""), None if d is None else str(d)) for h, d in cur.fetchall()]

    def _is_mariadb(self, conn: Conn) -> tuple[bool, str]:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            version = str((cur.fetchone() or ("",))[0])
        return "mariadb" in version.lower(), version

    def _require_dual_password(self, conn: Conn) -> None:
        mariadb, version = self._is_mariadb(conn)
        shown = re.sub(r"[^0-9A-Za-z.+-]", "", version)[:40]
        if mariadb:
            raise ProviderError(
                f"strategy dual-password needs MySQL 8.0.14 or later (ALTER USER ... RETAIN CURRENT PASSWORD); "
                f"this server is MariaDB {shown}, which refuses it (it keeps one password per account): "
                "use strategy alternating-users"
            )
        m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
        if m is None or tuple(map(int, m.groups())) < (8, 0, 14):
            raise ProviderError(
                f"strategy dual-password needs MySQL 8.0.14 or later (RETAIN CURRENT PASSWORD); "
                f"this server is {shown or 'of an unknown version'}: use strategy alternating-users"
            )

    def _free_slot(self, conn: Conn, previous: str | None) -> str:
        """The account to re-password: the one ``previous`` does not name (either when it names
        none), and only if the server says nothing can use it (absent, or locked with no thread)."""
        slot_a, slot_b = self._slot_names()
        candidates = [slot_b] if previous == slot_a else [slot_a] if previous == slot_b else [slot_a, slot_b]
        live: list[str] = []
        for slot in candidates:
            info = self._account(conn, slot)
            threads = len(self._threads(conn, slot)) if info is not None else 0
            if info is None or (info.locked and not threads):
                if live:
                    log.warning(
                        "account %s is live and no current version names it; it is left as it is",
                        candidates[0],
                        extra={"account": candidates[0], "event": "live_account_left"},
                    )
                return slot
            said = "is locked" if info.locked else "can log in"
            live.append(f"{slot} ({said}, {threads} session(s))")
        raise ProviderBlocked(
            f"will not re-password a live account: {', '.join(live)}; no version still being retired names it, "
            "so the store may have lost the version that uses it. Restore that version, or lock the account "
            "once nothing uses it; the current credential is left as it is",
            live=tuple(candidates),
            action=f"restore the store's version that names {' or '.join(candidates)}, or once nothing uses it "
            f"lock it (ALTER USER ... ACCOUNT LOCK); the next rotation then goes on",
        )

    def _mark(self, conn: Conn, name: str) -> None:
        host = self.config.account_host
        with _step(f"marking account {name} as Baton's"), conn.cursor() as cur:
            cur.execute(f"CREATE ROLE IF NOT EXISTS `{MARK_ROLE}`")
            cur.execute(f"GRANT `{MARK_ROLE}` TO %s@%s", (name, host))

    def _grant_role(self, conn: Conn, name: str) -> None:
        role = self.config.grant_role
        if role is None:
            return
        host = self.config.account_host
        mariadb, _ = self._is_mariadb(conn)
        with _step(f"granting role {role} to account {name}"), conn.cursor() as cur:
            cur.execute(f"GRANT `{role}` TO %s@%s", (name, host))
            # A role is only in effect once it is the account's default (or SET ROLE).
            cur.execute(f"SET DEFAULT ROLE `{role}` {'FOR' if mariadb else 'TO'} %s@%s", (name, host))

    def _apply(self, conn: Conn, cred: Login) -> None:
        name, host = cred.username, self.config.account_host
        hashed = native_hash(cred.password)
        dual = self.config.strategy == "dual-password"
        if dual:
            self._require_dual_password(conn)
        info = self._account(conn, name)
        if info is None:
            with _step(f"creating account {name}"), conn.cursor() as cur:
                cur.execute("CREATE USER %s@%s IDENTIFIED WITH mysql_native_password AS %s", (name, host, hashed))
            log.info("created account %s", name, extra={"account": name})
            info = _Account(ours=False, locked=False, native_hash=hashed)
        if not info.ours:
            if info.native_hash is None or not hmac.compare_digest(info.native_hash, hashed):
                raise self._not_ours(name)
            # Created by this very payload (a crash before the mark): nobody else knows its password.
            self._mark(conn, name)
        elif info.native_hash is not None and hmac.compare_digest(info.native_hash, hashed):
            # Applied already (a crash after this step): RETAIN again would push the old password out.
            pass
        else:
            retain = " RETAIN CURRENT PASSWORD" if dual else ""
            with _step(f"setting the password of account {name}"), conn.cursor() as cur:
                cur.execute(
                    f"ALTER USER %s@%s IDENTIFIED WITH mysql_native_password AS %s{retain}", (name, host, hashed)
                )
            log.info("set a new password on account %s", name, extra={"account": name})
        if info.locked:
            with _step(f"unlocking account {name}"), conn.cursor() as cur:
                cur.execute("ALTER USER %s@%s ACCOUNT UNLOCK", (name, host))
        self._grant_role(conn, name)

    def _lock(self, conn: Conn, cred: Login) -> None:
        name = cred.username
        info = self._account(conn, name)
        if info is None:
            log.info("account %s is already gone", name, extra={"account": name})
            return
        if not info.ours:
            raise self._not_ours(name)
        if info.locked:
            log.info("account %s is already locked", name, extra={"account": name})
            return
        if info.native_hash is not None and not hmac.compare_digest(info.native_hash, native_hash(cred.password)):
            # Re-passworded by a later rotation: the old credential is already dead, and
            # locking the account would break the new one.
            log.info("account %s has a newer password; the old credential is already superseded", name)
            return
        with _step(f"locking account {name}"), conn.cursor() as cur:
            cur.execute("ALTER USER %s@%s ACCOUNT LOCK", (name, self.config.account_host))
        log.info("account %s locked", name, extra={"account": name})

    def _discard_old(self, conn: Conn, cred: Login) -> None:
        name = cred.username
        info = self._account(conn, name)
        if info is None:
            return
        if not info.ours:
            raise self._not_ours(name)
        if info.native_hash is not None and hmac.compare_digest(info.native_hash, native_hash(cred.password)):
            raise ProviderError(
                f"refusing to discard the password of account {name}: it is still the primary one "
                "(the version being retired was never superseded on the server)"
            )
        with _step(f"discarding the old password of account {name}"), conn.cursor() as cur:
            cur.execute("ALTER USER %s@%s DISCARD OLD PASSWORD", (name, self.config.account_host))
        log.info("discarded the old password of account %s", name, extra={"account": name})

    @staticmethod
    def _not_ours(name: str) -> ProviderError:
        return ProviderError(
            f"account {name} exists but is not managed by Baton (no role {MARK_ROLE}); refusing to change it"
        )


def _address(host: str) -> str:
    """PROCESSLIST's HOST (``10.0.0.5:51234``, ``localhost``) without the client's port."""
    if host.count(":") == 1:
        return host.rpartition(":")[0]
    return host or "local"


def _parse_dsn(text: str, *, path: Path) -> _Server:
    """``mysql://user:password@host:port`` (user and password percent-encoded). Errors name only the file."""
    bad = ProviderError(f"admin_dsn_file {path} does not hold a mysql://user:password@host:port URL")
    if not text:
        raise ProviderError(f"admin_dsn_file {path} is empty")
    try:
        parts = urlsplit(text)
        port = parts.port or 3306
    except ValueError:
        raise bad from None
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname or parts.username is None:
        raise bad
    return _Server(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username),
        password=unquote(parts.password or ""),
    )
