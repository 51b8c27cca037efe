"""The embedded store: SQLite in WAL mode, one file, many readers and writers.

Owns the schema and every SQL statement on it. Change detection never reads a
payload: an inotify watch on the database file (daemon.kit.inotify) wakes one
watcher task, which reads the current version ids of all keys in one query
(only after ``PRAGMA data_version`` says another connection committed), so an
idle agent costs nothing and 100 credentials cost one query. Metadata entries are
merged in one transaction per call, so two nodes writing their own report
keys can never overwrite each other. A retired version's payload is erased.
A rotator lease (daemon.stores.lease) is one row per key in ``leases``, checked
and written in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.errors import StoreError, StoreNotFound, StoreUnavailable
from daemon.model import CURRENT, PENDING, Secret, SecretVersion, VersionId, VersionInfo
from daemon.stores.base import SecretStore, StatusHook, check_payload
from daemon.stores.lease import LeaseRecord

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    key      TEXT    NOT NULL,
    id       INTEGER NOT NULL,
    payload  TEXT,
    digest   TEXT    NOT NULL,
    stage    TEXT,
    created  REAL    NOT NULL,
    retired  REAL,
    PRIMARY KEY (key, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_stage_per_key ON versions (key, stage) WHERE stage IS NOT NULL;
CREATE TABLE IF NOT EXISTS metadata (
    key   TEXT NOT NULL,
    name  TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (key, name)
);
CREATE TABLE IF NOT EXISTS leases (
    key      TEXT    PRIMARY KEY,
    record   TEXT    NOT NULL,
    revision INTEGER NOT NULL
);
"""

# Look again even without a file event: covers file systems without inotify
# (a slow poll), and is the only cost of an idle watch.
_FALLBACK_RECHECK = 30.0
_POLL_WITHOUT_INOTIFY = 1.0


class LocalStore(SecretStore):
    """SQLite-backed ``SecretStore``. Safe to share between tasks of one loop."""

    def __init__(self, path: str | Path, *, watch_files: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._watch_files = watch_files
        # One watcher task serves every watched key: it reads the current
        # version of all keys in one query when the database changed, and
        # wakes the per-key watches through ``_changed`` (replaced on each use).
        self._currents: dict[str, VersionInfo] = {}
        self._changed: asyncio.Event | None = None
        self._poke: asyncio.Event | None = None
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: Config) -> LocalStore:
        assert config.store.kind == "local"
        return cls(config.store.path)

    # ------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.path.parent.exists():
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            try:
                self._setup(conn)
            except BaseException:
                conn.close()
                raise
            # The database and its WAL hold payloads; SQLite creates the WAL and
            # shm files with the umask's mode. They exist now (WAL mode is on, the
            # schema was read): make all three private, by path. Never open and
            # close them here: closing any fd of a file drops this process's POSIX
            # locks on it, SQLite's included (shm truncated under others: SIGBUS).
            for suffix in ("", "-wal", "-shm"):
                path = f"{self.path}{suffix}"
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(path).st_mode):
                        os.chmod(path, 0o600)
            self._conn = conn
        return self._conn

    @staticmethod
    def _setup(conn: sqlite3.Connection) -> None:
        """WAL mode and the schema. While another connection opens or closes the
        database (WAL recovery, the last close's checkpoint), SQLite can answer
        "locked" at once, without waiting on the busy timeout: try again briefly."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
                if str(mode).lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=10000")
                conn.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._connect())
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"local store {self.path}: {e}") from e
            except sqlite3.DatabaseError as e:
                raise StoreError(f"local store {self.path}: {e}") from e

    def _bump(self) -> None:
        if self._poke is not None:
            self._poke.set()

    async def _write(self, fn: Callable[[], T]) -> T:
        result = await asyncio.to_thread(fn)
        self._bump()  # our own writes wake our own watchers at once
        return result

    @staticmethod
    def _info(row: tuple[Any, ...]) -> VersionInfo:
        vid, digest, stage, created, retired = row
        return VersionInfo(
            id=VersionId(str(vid)),
            stages=frozenset([stage]) if stage else frozenset(),
            created=created,
            retired=retired is not None,
            digest=digest,
        )

    # ------------------------------------------------------------ reads

    def read_sync(self, key: str, version: VersionId | None = None) -> SecretVersion:
        def q(c: sqlite3.Connection) -> tuple[Any, ...] | None:
            # As bytes: SQLite's own decode error quotes the text (the secret), and
            # the payload is checked here like any store's (size, UTF-8), since a
            # row written around create() never met check_payload.
            cols = "id, digest, stage, created, retired, CAST(payload AS BLOB)"
            if version is None:
                sql = f"SELECT {cols} FROM versions WHERE key=? AND stage='current'"  # noqa: S608
                row: tuple[Any, ...] | None = c.execute(sql, (key,)).fetchone()
            else:
                sql = f"SELECT {cols} FROM versions WHERE key=? AND id=?"  # noqa: S608
                row = c.execute(sql, (key, _int_id(version))).fetchone()
            return row

        row = self._run(q)
        if row is None:
            what = f"version {version} of {key!r}" if version else f"a current version of {key!r}"
            raise StoreNotFound(f"no {what}")
        if row[5] is None:
            raise StoreNotFound(f"version {row[0]} of {key!r} is retired")
        return SecretVersion(self._info(row[:5]), Secret(check_payload(row[5])))

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        return await asyncio.to_thread(self.read_sync, key, version)

    def versions_sync(self, key: str) -> list[VersionInfo]:
        def q(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
            sql = "SELECT id, digest, stage, created, retired FROM versions WHERE key=? ORDER BY id"
            return c.execute(sql, (key,)).fetchall()

        return [self._info(r) for r in self._run(q)]

    async def versions(self, key: str) -> list[VersionInfo]:
        return await asyncio.to_thread(self.versions_sync, key)

    def _all_current(self) -> tuple[int, dict[str, VersionInfo]]:
        """``PRAGMA data_version`` and the current version of every key, in one go."""

        def q(c: sqlite3.Connection) -> tuple[int, list[tuple[Any, ...]]]:
            (data_version,) = c.execute("PRAGMA data_version").fetchone()
            sql = "SELECT key, id, digest, stage, created, retired FROM versions WHERE stage='current'"
            return int(data_version), c.execute(sql).fetchall()

        data_version, rows = self._run(q)
        return data_version, {r[0]: self._info(r[1:]) for r in rows}

    def _data_version(self) -> int:
        (value,) = self._run(lambda c: c.execute("PRAGMA data_version").fetchone())
        return int(value)

    # ------------------------------------------------------------ writes

    def create_sync(self, key: str, payload: Secret) -> VersionInfo:
        text = check_payload(payload.reveal())
        digest = hashlib.sha256(text.encode()).hexdigest()

        def tx(c: sqlite3.Connection) -> tuple[Any, ...]:
            c.execute("BEGIN IMMEDIATE")
            try:
                # Idempotent: a retried create of the same pending payload returns it.
                same = c.execute(
                    "SELECT id, digest, stage, created, retired FROM versions "
                    "WHERE key=? AND stage='pending' AND digest=?",
                    (key, digest),
                ).fetchone()
                if same:
                    c.execute("COMMIT")
                    return tuple(same)
                c.execute("UPDATE versions SET stage=NULL WHERE key=? AND stage='pending'", (key,))
                (top,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM versions WHERE key=?", (key,)).fetchone()
                now = time.time()
                c.execute(
                    "INSERT INTO versions (key, id, payload, digest, stage, created) VALUES (?,?,?,?,?,?)",
                    (key, top + 1, text, digest, PENDING, now),
                )
                c.execute("COMMIT")
                return (top + 1, digest, PENDING, now, None)
            except BaseException:
                c.execute("ROLLBACK")
                raise

        return self._info(self._run(tx))

    async def create(self, key: str, payload: Secret) -> VersionInfo:
        return await self._write(lambda: self.create_sync(key, payload))

    def promote_sync(self, key: str, version: VersionId) -> None:
        vid = _int_id(version)

        def tx(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute("SELECT stage, retired FROM versions WHERE key=? AND id=?", (key, vid)).fetchone()
                if row is None:
                    raise StoreNotFound(f"no version {vid} of {key!r}")
                if row[1] is not None:
                    raise StoreError(f"version {vid} of {key!r} is retired and cannot be promoted")
                if row[0] != CURRENT:
                    c.execute("UPDATE versions SET stage=NULL WHERE key=? AND stage='previous'", (key,))
                    c.execute("UPDATE versions SET stage='previous' WHERE key=? AND stage='current'", (key,))
                    c.execute("UPDATE versions SET stage='current' WHERE key=? AND id=?", (key, vid))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        self._run(tx)

    async def promote(self, key: str, version: VersionId) -> None:
        await self._write(lambda: self.promote_sync(key, version))

    def put_sync(self, key: str, payload: Secret) -> VersionInfo:
        """Operator put: a new version, current at once. A rotation's pending version
        stays pending (a put in the middle of a rotation must not un-stage it, or the
        retire loop would take it for a superseded one and retire it)."""
        text = check_payload(payload.reveal())
        digest = hashlib.sha256(text.encode()).hexdigest()

        def tx(c: sqlite3.Connection) -> tuple[int, float]:
            c.execute("BEGIN IMMEDIATE")
            try:
                (top,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM versions WHERE key=?", (key,)).fetchone()
                now = time.time()
                c.execute(
                    "INSERT INTO versions (key, id, payload, digest, stage, created) VALUES (?,?,?,?,NULL,?)",
                    (key, top + 1, text, digest, now),
                )
                c.execute("COMMIT")
                return top + 1, now
            except BaseException:
                c.execute("ROLLBACK")
                raise

        vid, created = self._run(tx)
        self.promote_sync(key, VersionId(str(vid)))
        return VersionInfo(id=VersionId(str(vid)), stages=frozenset([CURRENT]), created=created, digest=digest)

    async def put(self, key: str, payload: Secret) -> VersionInfo:
        return await self._write(lambda: self.put_sync(key, payload))

    def retire_sync(self, key: str, version: VersionId) -> None:
        vid = _int_id(version)

        def tx(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute("SELECT stage FROM versions WHERE key=? AND id=?", (key, vid)).fetchone()
                if row is None:
                    raise StoreNotFound(f"no version {vid} of {key!r}")
                if row[0] == CURRENT:
                    raise StoreError(f"version {vid} of {key!r} is current and cannot be retired")
                c.execute(
                    "UPDATE versions SET retired=COALESCE(retired, ?), payload=NULL, stage=NULL WHERE key=? AND id=?",
                    (time.time(), key, vid),
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        self._run(tx)

    async def retire(self, key: str, version: VersionId) -> None:
        await self._write(lambda: self.retire_sync(key, version))

    def merge_metadata_sync(self, key: str, entries: Mapping[str, str | None]) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                for name, value in entries.items():
                    if value is None:
                        c.execute("DELETE FROM metadata WHERE key=? AND name=?", (key, name))
                    else:
                        c.execute(
                            "INSERT INTO metadata (key, name, value) VALUES (?,?,?) "
                            "ON CONFLICT (key, name) DO UPDATE SET value=excluded.value",
                            (key, name, value),
                        )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        self._run(tx)

    async def merge_metadata(self, key: str, entries: Mapping[str, str | None]) -> None:
        await asyncio.to_thread(self.merge_metadata_sync, key, entries)

    def read_metadata_sync(self, key: str) -> dict[str, str]:
        rows = self._run(lambda c: c.execute("SELECT name, value FROM metadata WHERE key=?", (key,)).fetchall())
        return {name: value for name, value in rows}

    async def read_metadata(self, key: str) -> dict[str, str]:
        return await asyncio.to_thread(self.read_metadata_sync, key)

    # ------------------------------------------------------------ rotator lease

    def read_lease_sync(self, key: str) -> LeaseRecord | None:
        row = self._run(lambda c: c.execute("SELECT record, revision FROM leases WHERE key=?", (key,)).fetchone())
        return None if row is None else LeaseRecord.from_json(row[0], revision=str(row[1]))

    async def read_lease(self, key: str) -> LeaseRecord | None:
        return await asyncio.to_thread(self.read_lease_sync, key)

    def write_lease_sync(self, key: str, record: LeaseRecord, *, expect: str | None) -> LeaseRecord | None:
        """Check and write in one BEGIN IMMEDIATE transaction: of two writers expecting one revision, one wins."""

        def tx(c: sqlite3.Connection) -> int | None:
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute("SELECT revision FROM leases WHERE key=?", (key,)).fetchone()
                if (None if row is None else str(row[0])) != expect:
                    c.execute("ROLLBACK")
                    return None
                revision = 1 if row is None else int(row[0]) + 1
                c.execute(
                    "INSERT INTO leases (key, record, revision) VALUES (?,?,?) "
                    "ON CONFLICT (key) DO UPDATE SET record=excluded.record, revision=excluded.revision",
                    (key, record.to_json(), revision),
                )
                c.execute("COMMIT")
                return revision
            except BaseException:
                c.execute("ROLLBACK")
                raise

        revision = self._run(tx)
        return None if revision is None else record.at(str(revision))

    async def write_lease(self, key: str, record: LeaseRecord, *, expect: str | None) -> LeaseRecord | None:
        return await asyncio.to_thread(self.write_lease_sync, key, record, expect=expect)

    # ------------------------------------------------------------ watch

    async def _follow(self) -> None:
        """The one watcher task: re-read the current versions when the database changed."""
        from daemon.kit.inotify import DirWatch

        assert self._poke is not None and self._changed is not None
        poke = self._poke
        await asyncio.to_thread(self._run, lambda c: None)  # the file must exist to be watched
        names = (self.path.name, self.path.name + "-wal")
        inotify = DirWatch.open(str(self.path.resolve().parent), names, poke.set) if self._watch_files else None
        idle = _FALLBACK_RECHECK if inotify is not None else _POLL_WITHOUT_INOTIFY
        seen_version = -1
        try:
            while True:
                # data_version changes only when another connection committed; our
                # own commits poke us directly. Either way one query serves all keys.
                data_version = await asyncio.to_thread(self._data_version)
                if data_version != seen_version or poke.is_set():
                    poke.clear()
                    seen_version, currents = await asyncio.to_thread(self._all_current)
                    if currents != self._currents:
                        self._currents = currents
                        changed, self._changed = self._changed, asyncio.Event()
                        changed.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poke.wait(), idle)
        finally:
            if inotify is not None:
                inotify.close()
            if self._changed is not None:
                self._changed.set()  # watches wake, see this task ended, and end too

    async def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        # A local database error is not an outage to poll through: it ends the watch.
        if self._watcher is None or self._watcher.done():
            # Set up without an await in between: many watches start at once, and
            # they must all share this one watcher.
            self._poke = asyncio.Event()
            self._changed = asyncio.Event()
            self._currents = {}
            self._watcher = asyncio.create_task(self._follow(), name="local-store-watch")
        last: VersionInfo | None = None
        while True:
            changed = self._changed
            assert changed is not None
            current = self._currents.get(key)
            if current is not None and (last is None or current.id != last.id):
                last = current
                yield current
            watcher = self._watcher
            if watcher is None or watcher.cancelled():
                return  # the store was closed
            if watcher.done():
                watcher.result()  # a database error ends every watch, as it should
            await changed.wait()

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        self._poke = self._changed = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def close(self) -> None:
        """Synchronous close for CLI use (no watcher running)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _int_id(version: VersionId | str) -> int:
    try:
        return int(version)
    except ValueError:
        raise StoreNotFound(f"no version {version!r} (local versions are numbers)") from None
