"""The ``postgres`` provider: database roles as rotating credentials.

It owns the SQL that creates, re-passwords, locks and drops login roles, and the
mapping of psycopg errors into ``ProviderError``. It must never log, print or
put into an exception the admin DSN (read from ``admin_dsn_file`` at each use),
a minted password, or psycopg's own error text (which names host, port and user
and can echo a connection string): every error is rebuilt from a safe summary.

The payload is JSON: ``{"username", "password"}`` plus ``host``, ``port`` and
``database`` when configured. Strategies:

- ``alternating-users``: two roles ``<username>_a`` and ``<username>_b``; each
  rotation re-passwords the slot that is not current, so the current role keeps
  working, and only once pg_roles and pg_stat_activity say that slot is free
  (absent, or NOLOGIN without a session): a slot that can log in is never
  re-passworded, even when the store no longer names it. ``retire`` sets
  NOLOGIN (never DROP), and does nothing when the role's password has since
  changed (the old credential is already superseded, and the slot may be
  current again).
- ``role-per-version``: a new role ``<username>_v<N>`` per version (N: one more
  than every role of that pattern in pg_roles and than the current version's:
  a name is never minted twice), member of ``grant_role``; ``retire`` locks it
  (NOLOGIN), and drops it once it has no session left (REASSIGN OWNED to
  ``grant_role`` first).

``retire`` refuses a role named in ``keep`` (the current and newer versions'
roles), whatever the payload being retired says.
- ``single-user``: ``ALTER ROLE <username> PASSWORD`` in place. NOT zero-downtime:
  the old password stops working the moment ``apply`` runs, so consumers fail
  until they pick up the new version. ``retire`` has nothing left to do and
  ``sessions`` cannot tell old from new (one role), so it reports none.

``test`` logs in as the new role at the admin DSN's host and port (the payload's
``host`` is what consumers use and may not resolve here), in ``database`` when
set. Admin connections use ``database`` too, so REASSIGN/DROP OWNED at retire
act where the app's objects live.

Roles created by Baton carry ``COMMENT ON ROLE ... IS 'managed by baton'``; an
existing role without it is never altered, locked or dropped (except the one
role named by ``single-user``, which is by definition pre-existing).

Passwords never cross the wire in clear: the SCRAM-SHA-256 verifier is computed
client-side (libpq's ``PQencryptPasswordConn``, as psql's ``\\password`` does)
and sent as a literal, so even ``log_statement = all`` on the server shows no
password. Every step is idempotent: after a crash the rotator may call it again
with the same arguments and the database converges to the same state.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import string
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from daemon.config import ProviderConfig
from daemon.errors import ProviderBlocked, ProviderError
from daemon.model import Secret
from daemon.providers.base import AdminFile, Login, Provider, Session, login_name, parse_login

log = logging.getLogger(__name__)

MARK = "managed by baton"
CONNECT_TIMEOUT = 10
PASSWORD_LENGTH = 40
_ALPHABET = string.ascii_letters + string.digits

Conn = psycopg.AsyncConnection[TupleRow]


@dataclass(frozen=True)
class _RoleInfo:
    can_login: bool
    ours: bool


# ---------------------------------------------------------------- error mapping

_CONNECT_REASONS: tuple[tuple[str, str], ...] = (
    # (substring of libpq's message, lower-cased) -> safe reason. Order matters.
    ("password authentication failed", "login failed (wrong user name or password)"),
    ("no password supplied", "login failed (no password supplied)"),
    ("not permitted to log in", "login failed (the role may not log in)"),
    ("authentication failed", "login failed"),
    ("connection refused", "cannot connect to the database (connection refused)"),
    ("timeout expired", "cannot connect to the database (timed out)"),
    ("timed out", "cannot connect to the database (timed out)"),
    ("could not translate host name", "cannot connect to the database (host name not found)"),
    ("no route to host", "cannot connect to the database (no route to host)"),
    ("no pg_hba.conf entry", "login rejected by the server's pg_hba.conf"),
    ("too many connections", "cannot connect to the database (too many connections)"),
    ("the database system is starting up", "cannot connect to the database (server starting up)"),
    ("the database system is shutting down", "cannot connect to the database (server shutting down)"),
)


def _connect_failure(e: BaseException, *, who: str) -> ProviderError:
    text = str(e).lower()
    if "database" in text and "does not exist" in text:
        return ProviderError(f"{who}: cannot connect (the database does not exist)")
    if "role" in text and "does not exist" in text:
        return ProviderError(f"{who}: login failed (no such role)")
    for needle, reason in _CONNECT_REASONS:
        if needle in text:
            return ProviderError(f"{who}: {reason}")
    return ProviderError(f"{who}: cannot connect to the database ({type(e).__name__})")


_SQLSTATE_REASONS = {
    "42501": "permission denied (the admin role needs CREATEROLE and membership of grant_role)",
    "42704": "a role does not exist",
    "42710": "the role already exists (created concurrently?)",
    "2BP01": "the role still owns objects or holds privileges in another database",
    "55006": "the role is in use",
    "0LP01": "invalid grant (circular membership?)",
}


@contextmanager
def _step(what: str, *, carries_secret: bool = False) -> Iterator[None]:
    """Map psycopg errors of one SQL step into a ProviderError with a safe message.

    When the statement carries a password verifier the cause is dropped
    (``from None``): the server's text could quote a fragment of it.
    """
    try:
        yield
    except ProviderError:
        raise
    except psycopg.OperationalError as e:
        err = ProviderError(f"{what}: lost the connection to the database")
        if carries_secret:
            raise err from None
        raise err from e
    except psycopg.Error as e:
        state = e.sqlstate or ""
        reason = _SQLSTATE_REASONS.get(state, f"{type(e).__name__}")
        err = ProviderError(f"{what}: {reason} (SQLSTATE {state or '-'})")
        if carries_secret:
            raise err from None
        raise err from e


# ---------------------------------------------------------------- SCRAM


def _password_matches(stored: str | None, *, password: str, username: str) -> bool | None:
    """Whether ``stored`` (pg_authid.rolpassword) is a hash of ``password``; None if unknown."""
    if stored is None:
        return False
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", stored)
    if m:
        salt = base64.b64decode(m.group(2))
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, int(m.group(1)))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), base64.b64decode(m.group(3)))
    if stored.startswith("md5") and len(stored) == 35:
        digest = "md5" + hashlib.md5((password + username).encode(), usedforsecurity=False).hexdigest()
        return hmac.compare_digest(digest, stored)
    return None


# ---------------------------------------------------------------- the provider


class PostgresProvider(Provider):
    """Mint, apply, test and retire PostgreSQL login roles (see the module docstring)."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        # Two roles for alternating users: the rotator never starts a rotation
        # that would reuse the role of a version still draining.
        self.slots: int | None = 2 if config.strategy == "alternating-users" else None
        self._base = config.username
        self._admin_file = AdminFile(config.admin_dsn_file, "admin_dsn_file")
        if config.strategy == "role-per-version" and not config.grant_role:
            raise ProviderError("strategy role-per-version needs grant_role")
        if config.strategy == "single-user":
            log.warning(
                "postgres strategy single-user is not zero-downtime: the old password of role %s "
                "stops working as soon as the new one is applied",
                self._base,
                extra={"role": self._base},
            )

    # ------------------------------------------------------------ Provider protocol

    async def create(self, *, current: Secret | None) -> Secret:
        previous = self._parse_lenient(current)
        strategy = self.config.strategy
        if strategy == "alternating-users":
            username = await self._free_slot(previous)
        elif strategy == "role-per-version":
            username = await self._next_version_role(previous)
        else:
            username = self._base
        password = "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LENGTH))
        payload: dict[str, Any] = {"username": username, "password": password}
        if self.config.host is not None:
            payload["host"] = self.config.host
        if self.config.port is not None:
            payload["port"] = self.config.port
        if self.config.database is not None:
            payload["database"] = self.config.database
        log.info("minted a credential for role %s", username, extra={"role": username})
        return Secret(json.dumps(payload))

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        cred = self._parse(new)
        async with self._admin() as conn:
            if self.config.grant_role:
                await self._require_grant_role(conn)
            info = await self._role(conn, cred.username)
            if info is None:
                await self._create_role(conn, cred)
                log.info("created role %s", cred.username, extra={"role": cred.username})
                return
            if not info.ours and self.config.strategy != "single-user":
                raise self._not_ours(cred.username)
            await self._set_password(conn, cred)
            log.info("set a new password on role %s", cred.username, extra={"role": cred.username})

    async def test(self, new: Secret) -> None:
        cred = self._parse(new)
        params = await self._admin_params()
        params.update(user=cred.username, password=cred.password, application_name="baton-test")
        conn = await self._connect(params, who=f"role {cred.username}")
        try:
            with _step(f"testing role {cred.username}"):
                cur = await conn.execute("SELECT current_user")
                row = await cur.fetchone()
        finally:
            await conn.close()
        if row is None or row[0] != cred.username:
            raise ProviderError(f"role {cred.username}: logged in as someone else")

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        cred = self._parse(old)
        strategy = self.config.strategy
        if strategy == "single-user":
            # The password was replaced in place by apply(); nothing is left to revoke.
            return
        if cred.username in keep:
            raise ProviderError(
                f"refusing to retire role {cred.username}: the current or a newer version names it "
                "(the version being retired was not the last one to use it)"
            )
        async with self._admin() as conn:
            info = await self._role(conn, cred.username)
            if info is None:
                log.info("role %s is already gone", cred.username, extra={"role": cred.username})
                return
            if not info.ours:
                raise self._not_ours(cred.username)
            if strategy == "alternating-users":
                await self._lock_slot(conn, cred, info)
            else:
                await self._drop_version_role(conn, cred, info)

    async def sessions(self, old: Secret) -> list[Session]:
        cred = self._parse(old)
        if self.config.strategy == "single-user":
            # One role for old and new: its sessions cannot be told apart.
            return []
        async with self._admin() as conn:
            with _step(f"listing sessions of role {cred.username}"):
                cur = await conn.execute(
                    "SELECT count(*), host(client_addr), coalesce(application_name, '') "
                    "FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid() "
                    "GROUP BY 2, 3 ORDER BY 2, 3",
                    (cred.username,),
                )
                rows = await cur.fetchall()
        return [
            Session(principal=cred.username, client=f"{app or '-'}@{addr or 'local'}", count=int(n))
            for n, addr, app in rows
        ]

    async def live(self) -> list[str]:
        """Baton's roles of this credential that can log in or have sessions (pg_roles, pg_stat_activity)."""
        strategy = self.config.strategy
        if strategy == "single-user":
            return []  # one role for every version: always named by the current one
        pattern = f"^{self._base}_(a|b)$" if strategy == "alternating-users" else f"^{self._base}_v[0-9]+$"
        async with self._admin() as conn:
            with _step(f"listing live roles of {self._base}"):
                cur = await conn.execute(
                    "SELECT r.rolname FROM pg_roles r "
                    "WHERE r.rolname ~ %s AND coalesce(shobj_description(r.oid, 'pg_authid'), '') = %s "
                    "AND (r.rolcanlogin OR EXISTS (SELECT 1 FROM pg_stat_activity a "
                    "WHERE a.usename = r.rolname AND a.pid <> pg_backend_pid())) ORDER BY 1",
                    (pattern, MARK),
                )
                return [str(row[0]) for row in await cur.fetchall()]

    def principal(self, payload: Secret) -> str | None:
        try:
            return self._parse(payload).username
        except ProviderError:
            return None

    async def aclose(self) -> None:
        # Connections live for one step only: nothing to close.
        return None

    # ------------------------------------------------------------ payloads

    def _owns_name(self, username: str) -> bool:
        base = re.escape(self._base)
        pattern = {
            "alternating-users": rf"{base}_[ab]",
            "role-per-version": rf"{base}_v[0-9]+",
            "single-user": base,
        }[self.config.strategy]
        return re.fullmatch(pattern, username) is not None

    def _parse(self, payload: Secret) -> Login:
        return parse_login(
            payload,
            system="postgres",
            account="role",
            owns=self._owns_name,
            naming=f"strategy {self.config.strategy}, username {self._base}",
        )

    def _parse_lenient(self, current: Secret | None) -> str | None:
        return login_name(current, self._parse)

    # ------------------------------------------------------------ connections

    async def _admin_params(self) -> dict[str, Any]:
        path = self.config.admin_dsn_file
        text = await self._admin_file.read()
        text = text.strip()
        if not text:
            raise ProviderError(f"admin_dsn_file {path} is empty")
        try:
            params: dict[str, Any] = conninfo_to_dict(text)
        except psycopg.Error:
            # The parser's message may quote the DSN: say only where it is.
            raise ProviderError(f"admin_dsn_file {path} does not hold a valid connection string") from None
        if self.config.database is not None:
            params["dbname"] = self.config.database
        params.setdefault("connect_timeout", CONNECT_TIMEOUT)
        return params

    async def _connect(self, params: dict[str, Any], *, who: str) -> Conn:
        try:
            return await psycopg.AsyncConnection.connect(make_conninfo("", **params), autocommit=True)
        except psycopg.Error as e:
            # libpq's text names host, port and user, and sometimes more: keep none of it.
            raise _connect_failure(e, who=who) from None

    @asynccontextmanager
    async def _admin(self) -> AsyncIterator[Conn]:
        params = await self._admin_params()
        params.setdefault("application_name", "baton")
        conn = await self._connect(params, who="admin")
        try:
            yield conn
        finally:
            await conn.close()

    # ------------------------------------------------------------ SQL steps

    async def _role(self, conn: Conn, name: str) -> _RoleInfo | None:
        with _step(f"looking up role {name}"):
            cur = await conn.execute(
                "SELECT rolcanlogin, coalesce(shobj_description(oid, 'pg_authid'), '') = %s "
                "FROM pg_roles WHERE rolname = %s",
                (MARK, name),
            )
            row = await cur.fetchone()
        return None if row is None else _RoleInfo(can_login=bool(row[0]), ours=bool(row[1]))

    async def _require_grant_role(self, conn: Conn) -> None:
        grant = self.config.grant_role
        assert grant is not None
        if await self._role(conn, grant) is None:
            raise ProviderError(f"grant_role {grant} does not exist; create it (NOLOGIN) with the app's privileges")

    async def _is_member(self, conn: Conn, member: str, group: str) -> bool:
        with _step(f"checking membership of role {member} in {group}"):
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_auth_members m "
                "JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member "
                "WHERE g.rolname = %s AND u.rolname = %s)",
                (group, member),
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    def _verifier(self, conn: Conn, cred: Login) -> sql.Literal:
        # Runs on the loop: 4096 PBKDF2 rounds take about a millisecond, less than a thread hop.
        try:
            hashed = conn.pgconn.encrypt_password(cred.password.encode(), cred.username.encode(), b"scram-sha-256")
        except psycopg.Error:
            raise ProviderError(f"cannot hash the password of role {cred.username}") from None
        return sql.Literal(hashed.decode())

    async def _create_role(self, conn: Conn, cred: Login) -> None:
        role = sql.Identifier(cred.username)
        grant = self.config.grant_role
        with _step(f"creating role {cred.username}", carries_secret=True):
            # One transaction: a crash can never leave a role without our mark,
            # which the next attempt would then refuse to touch.
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD {}").format(role, self._verifier(conn, cred))
                )
                await conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(role, sql.Literal(MARK)))
                if grant:
                    await conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant), role))

    async def _set_password(self, conn: Conn, cred: Login) -> None:
        role = sql.Identifier(cred.username)
        grant = self.config.grant_role
        needs_grant = bool(grant) and not await self._is_member(conn, cred.username, grant or "")
        with _step(f"setting the password of role {cred.username}", carries_secret=True):
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(role, self._verifier(conn, cred))
                )
                if needs_grant:
                    await conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant or ""), role))

    async def _still_has_password(self, conn: Conn, cred: Login) -> bool:
        """Whether the role's password is still ``cred``'s; True when we cannot tell."""
        try:
            cur = await conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (cred.username,))
            row = await cur.fetchone()
        except psycopg.errors.InsufficientPrivilege:
            # Only superusers read pg_authid; without it, retire as asked.
            return True
        except psycopg.Error as e:
            raise ProviderError(f"reading the password hash of role {cred.username} failed") from e
        if row is None:
            return False
        matches = _password_matches(row[0], password=cred.password, username=cred.username)
        return matches is None or matches

    async def _lock_slot(self, conn: Conn, cred: Login, info: _RoleInfo) -> None:
        if not info.can_login:
            log.info("role %s is already NOLOGIN", cred.username, extra={"role": cred.username})
            return
        if not await self._still_has_password(conn, cred):
            # The slot was re-passworded by a later rotation: the old credential
            # is already dead, and locking the role would break the new one.
            log.info(
                "role %s has a newer password; the old credential is already superseded",
                cred.username,
                extra={"role": cred.username},
            )
            return
        with _step(f"locking role {cred.username}"):
            await conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN").format(sql.Identifier(cred.username)))
        log.info("role %s set NOLOGIN", cred.username, extra={"role": cred.username})

    async def _drop_version_role(self, conn: Conn, cred: Login, info: _RoleInfo) -> None:
        role = sql.Identifier(cred.username)
        if info.can_login:
            # Lock first, so no session can start between the check below and the drop.
            with _step(f"locking role {cred.username}"):
                await conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN").format(role))
        with _step(f"counting sessions of role {cred.username}"):
            cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (cred.username,))
            row = await cur.fetchone()
        live = int(row[0]) if row else 0
        if live:
            # DROP ROLE would succeed and leave those sessions running as a ghost role.
            raise ProviderError(
                f"role {cred.username} still has {live} session(s); it can no longer log in, "
                "and will be dropped once they end"
            )
        grant = self.config.grant_role
        assert grant is not None
        with _step(f"dropping role {cred.username}"):
            async with conn.transaction():
                # Objects the role created (tables...) go to the group role, not away.
                await conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(role, sql.Identifier(grant)))
                await conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
                await conn.execute(sql.SQL("DROP ROLE {}").format(role))
        log.info("dropped role %s", cred.username, extra={"role": cred.username})

    async def _sessions_of(self, conn: Conn, name: str) -> int:
        with _step(f"counting sessions of role {name}"):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()", (name,)
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _free_slot(self, previous: str | None) -> str:
        """The slot to re-password: the one ``previous`` does not name (either when it names
        none), and only if the database says nothing can use it (absent, or NOLOGIN without
        a session). Asks pg_roles and pg_stat_activity, which a CREATEROLE admin can read."""
        slot_a, slot_b = f"{self._base}_a", f"{self._base}_b"
        if previous == slot_a:
            candidates = [slot_b]
        elif previous == slot_b:
            candidates = [slot_a]
        else:
            candidates = [slot_a, slot_b]
        live: list[str] = []
        async with self._admin() as conn:
            for slot in candidates:
                info = await self._role(conn, slot)
                sessions = await self._sessions_of(conn, slot) if info is not None else 0
                if info is None or (not info.can_login and not sessions):
                    if live:
                        log.warning(
                            "role %s is live and no current version names it; it is left as it is",
                            live[0],
                            extra={"role": candidates[0], "event": "live_role_left"},
                        )
                    return slot
                said = "can log in" if info.can_login else "is locked"
                live.append(f"{slot} ({said}, {sessions} session(s))")
        raise ProviderBlocked(
            f"will not re-password a live role: {', '.join(live)}; no version still being retired names it, "
            "so the store may have lost the version that uses it. Restore that version, or set the role "
            "NOLOGIN once nothing uses it; the current credential is left as it is",
            live=tuple(candidates),
            action=f"restore the store's version that names {' or '.join(candidates)}, or once nothing "
            f"uses it set it NOLOGIN (ALTER ROLE {' / '.join(candidates)} NOLOGIN); the next rotation then goes on",
        )

    async def _next_version_role(self, previous: str | None) -> str:
        """A fresh role name ``<base>_v<N>``: one more than any role of that pattern in pg_roles
        (Baton's or not) and than ``previous``. A name is never minted twice: a stray copy
        of an earlier payload then never names the role a later version uses."""
        pattern = f"^{self._base}_v[0-9]+$"
        async with self._admin() as conn:
            with _step(f"listing roles {self._base}_v*"):
                cur = await conn.execute(
                    "SELECT rolname, rolcanlogin, coalesce(shobj_description(oid, 'pg_authid'), '') = %s "
                    "FROM pg_roles WHERE rolname ~ %s",
                    (MARK, pattern),
                )
                existing = {str(name): (bool(login), bool(ours)) for name, login, ours in await cur.fetchall()}

        def number(name: str) -> int:
            return int(name.rsplit("_v", 1)[1])

        if previous is None:
            live = sorted(name for name, (login, ours) in existing.items() if login and ours)
            if live:
                log.warning(
                    "no current version names a role, but Baton's roles %s can log in; they are left as they are",
                    ", ".join(live),
                    extra={"roles": live},
                )
        top = max([*map(number, existing), *([number(previous)] if previous else [])], default=0)
        return f"{self._base}_v{top + 1}"

    @staticmethod
    def _not_ours(name: str) -> ProviderError:
        return ProviderError(
            f"role {name} exists but is not managed by Baton (no comment {MARK!r}); refusing to change it"
        )
