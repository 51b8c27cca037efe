"""daemon.stores.local on a real SQLite file: stages, retirement, metadata merges, watch.

Concurrency is tested with real threads and real processes on one database
file; the watch is fed by ``baton store put`` run as another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from daemon.errors import PayloadError, StoreError, StoreNotFound
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, VersionId, VersionInfo
from daemon.stores.base import MAX_PAYLOAD, SecretStore
from daemon.stores.local import LocalStore

BATON = str(Path(sys.executable).with_name("baton"))
KEY = "app/db"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store" / "store.db"


@pytest.fixture
def store(db: Path) -> Iterator[LocalStore]:
    s = LocalStore(db, watch_files=False)
    try:
        yield s
    finally:
        s.close()


def _stages(store: LocalStore) -> dict[str, set[str]]:
    return {v.id: set(v.stages) for v in store.versions_sync(KEY)}


# ---------------------------------------------------------------- file and schema


def test_the_database_is_in_wal_mode_and_private(store: LocalStore, db: Path) -> None:
    store.put_sync(KEY, Secret("v1"))

    with contextlib.closing(sqlite3.connect(db)) as other:
        (mode,) = other.execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


def test_the_store_satisfies_the_secret_store_protocol(store: LocalStore) -> None:
    assert isinstance(store, SecretStore)


# ---------------------------------------------------------------- stages


def test_create_adds_a_pending_version_and_promote_makes_it_current(store: LocalStore) -> None:
    first = store.create_sync(KEY, Secret("one"))
    assert first.stages == {PENDING}
    with pytest.raises(StoreNotFound):
        store.read_sync(KEY)

    store.promote_sync(KEY, first.id)
    second = store.create_sync(KEY, Secret("two"))

    assert _stages(store) == {"1": {CURRENT}, "2": {PENDING}}
    assert store.read_sync(KEY).payload == Secret("one")

    store.promote_sync(KEY, second.id)
    assert _stages(store) == {"1": {PREVIOUS}, "2": {CURRENT}}
    assert store.read_sync(KEY).id == "2"


def test_put_creates_and_promotes_and_the_previous_stage_moves_on(store: LocalStore) -> None:
    ids = [store.put_sync(KEY, Secret(f"value-{i}")).id for i in range(3)]

    assert ids == ["1", "2", "3"]
    assert _stages(store) == {"1": set(), "2": {PREVIOUS}, "3": {CURRENT}}
    assert store.read_sync(KEY).payload == Secret("value-2")
    assert store.read_sync(KEY, VersionId("1")).payload == Secret("value-0")


def test_a_retried_create_of_the_same_pending_payload_returns_the_same_version(store: LocalStore) -> None:
    a = store.create_sync(KEY, Secret("same"))
    b = store.create_sync(KEY, Secret("same"))

    assert a.id == b.id
    assert len(store.versions_sync(KEY)) == 1


def test_a_new_create_replaces_the_pending_stage(store: LocalStore) -> None:
    store.create_sync(KEY, Secret("a"))
    store.create_sync(KEY, Secret("b"))

    assert _stages(store) == {"1": set(), "2": {PENDING}}


def test_promote_is_idempotent(store: LocalStore) -> None:
    store.put_sync(KEY, Secret("a"))
    info = store.put_sync(KEY, Secret("b"))

    store.promote_sync(KEY, info.id)

    assert _stages(store) == {"1": {PREVIOUS}, "2": {CURRENT}}


def test_versions_carry_the_content_digest_but_no_payload(store: LocalStore) -> None:
    store.put_sync(KEY, Secret("a"))

    (info,) = store.versions_sync(KEY)

    assert info.digest == Secret("a").digest()
    assert not hasattr(info, "payload")


def test_retire_erases_the_payload(store: LocalStore, db: Path) -> None:
    store.put_sync(KEY, Secret("old-secret"))
    store.put_sync(KEY, Secret("new-secret"))

    store.retire_sync(KEY, VersionId("1"))
    store.retire_sync(KEY, VersionId("1"))  # idempotent

    with pytest.raises(StoreNotFound, match="retired"):
        store.read_sync(KEY, VersionId("1"))
    (old,) = [v for v in store.versions_sync(KEY) if v.id == "1"]
    assert old.retired
    assert old.stages == frozenset()
    with contextlib.closing(sqlite3.connect(db)) as other:
        (payload,) = other.execute("SELECT payload FROM versions WHERE key=? AND id=1", (KEY,)).fetchone()
    assert payload is None


def test_the_current_version_cannot_be_retired_and_a_retired_one_cannot_be_promoted(store: LocalStore) -> None:
    store.put_sync(KEY, Secret("a"))
    store.put_sync(KEY, Secret("b"))
    store.retire_sync(KEY, VersionId("1"))

    with pytest.raises(StoreError, match="current"):
        store.retire_sync(KEY, VersionId("2"))
    with pytest.raises(StoreError, match="retired"):
        store.promote_sync(KEY, VersionId("1"))
    assert store.read_sync(KEY).payload == Secret("b")


def test_unknown_keys_and_versions_are_not_found(store: LocalStore) -> None:
    store.put_sync(KEY, Secret("a"))

    with pytest.raises(StoreNotFound):
        store.read_sync("nope")
    with pytest.raises(StoreNotFound):
        store.read_sync(KEY, VersionId("9"))
    with pytest.raises(StoreNotFound):
        store.read_sync(KEY, VersionId("abc"))
    with pytest.raises(StoreNotFound):
        store.retire_sync(KEY, VersionId("9"))


@pytest.mark.parametrize(
    ("payload", "message"),
    [("", "empty"), ("x" * (MAX_PAYLOAD + 1), "over the 1 MiB limit")],
)
def test_empty_and_oversized_payloads_are_refused(store: LocalStore, payload: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        store.put_sync(KEY, Secret(payload))

    assert store.versions_sync(KEY) == []


def test_a_payload_of_exactly_1_mib_is_accepted(store: LocalStore) -> None:
    store.put_sync(KEY, Secret("x" * MAX_PAYLOAD))

    assert len(store.read_sync(KEY).payload.reveal()) == MAX_PAYLOAD


# ---------------------------------------------------------------- metadata


def test_metadata_merges_and_none_deletes(store: LocalStore) -> None:
    store.merge_metadata_sync(KEY, {"node-a": "1", "node-b": "2"})
    store.merge_metadata_sync(KEY, {"node-b": "3", "node-c": "4"})
    store.merge_metadata_sync(KEY, {"node-a": None})

    assert store.read_metadata_sync(KEY) == {"node-b": "3", "node-c": "4"}
    assert store.read_metadata_sync("other") == {}


def test_concurrent_metadata_merges_from_threads_lose_no_key(db: Path) -> None:
    LocalStore(db).close()  # create the schema once

    def node(i: int) -> None:
        s = LocalStore(db, watch_files=False)  # one connection per node, as separate agents have
        try:
            for j in range(50):
                s.merge_metadata_sync(KEY, {f"thread-{i}-{j}": str(j)})
        finally:
            s.close()

    threads = [threading.Thread(target=node, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    s = LocalStore(db, watch_files=False)
    try:
        meta = s.read_metadata_sync(KEY)
    finally:
        s.close()
    assert len(meta) == 400
    assert meta["thread-7-49"] == "49"


WRITER_PROCESS = """
import sys
from daemon.stores.local import LocalStore
s = LocalStore(sys.argv[1], watch_files=False)
for j in range(50):
    s.merge_metadata_sync("app/db", {f"proc-{sys.argv[2]}-{j}": str(j)})
s.close()
"""


def test_concurrent_metadata_merges_from_processes_lose_no_key(db: Path) -> None:
    LocalStore(db).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER_PROCESS, str(db), str(i)], stderr=subprocess.PIPE)
        for i in range(8)
    ]
    errors = []
    for p in procs:
        _out, err = p.communicate(timeout=60)
        if p.returncode:
            errors.append(err.decode())
    assert errors == []

    s = LocalStore(db, watch_files=False)
    try:
        meta = s.read_metadata_sync(KEY)
    finally:
        s.close()
    assert set(meta) == {f"proc-{i}-{j}" for i in range(8) for j in range(50)}


# ---------------------------------------------------------------- watch


class Watching:
    """Runs ``store.watch(key)`` in a task and queues what it yields."""

    def __init__(self, store: LocalStore, key: str) -> None:
        self.queue: asyncio.Queue[VersionInfo] = asyncio.Queue()
        self.gen = store.watch(key)
        self.task = asyncio.create_task(self._pump(), name="test-watch")

    async def _pump(self) -> None:
        async for info in self.gen:
            self.queue.put_nowait(info)

    async def next(self, timeout: float) -> VersionInfo:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.gen.aclose()


@pytest.fixture
async def watched(db: Path) -> AsyncIterator[tuple[LocalStore, Watching]]:
    seed = LocalStore(db, watch_files=False)
    seed.put_sync(KEY, Secret("v1"))
    seed.close()
    store = LocalStore(db)
    watching = Watching(store, KEY)
    try:
        yield store, watching
    finally:
        await watching.close()
        await store.aclose()


async def _baton_put(db: Path, key: str, value: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        BATON,
        "store",
        "--path",
        str(db),
        "put",
        key,
        "--value-file",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await proc.communicate(value.encode())
    assert proc.returncode == 0, err.decode()


async def test_watch_yields_the_current_version_at_once(watched: tuple[LocalStore, Watching]) -> None:
    _store, watching = watched

    first = await watching.next(timeout=2.0)

    assert first.id == "1"
    assert first.is_current


async def test_watch_sees_a_put_from_another_process_within_a_second(
    db: Path, watched: tuple[LocalStore, Watching]
) -> None:
    _store, watching = watched
    assert (await watching.next(timeout=2.0)).id == "1"

    await _baton_put(db, KEY, "v2")
    put_done = time.monotonic()
    second = await watching.next(timeout=1.0)

    assert second.id == "2"
    assert time.monotonic() - put_done < 1.0


async def test_watch_sees_its_own_writes_at_once(watched: tuple[LocalStore, Watching]) -> None:
    store, watching = watched
    assert (await watching.next(timeout=2.0)).id == "1"

    await store.put(KEY, Secret("v2"))

    assert (await watching.next(timeout=0.5)).id == "2"


async def test_watch_yields_nothing_for_a_metadata_only_change_or_another_key(
    db: Path, watched: tuple[LocalStore, Watching]
) -> None:
    store, watching = watched
    assert (await watching.next(timeout=2.0)).id == "1"

    await store.merge_metadata(KEY, {"node-a": "report"})
    other = LocalStore(db, watch_files=False)
    try:
        await asyncio.to_thread(other.merge_metadata_sync, KEY, {"node-b": "report"})
        await asyncio.to_thread(other.put_sync, "another/key", Secret("x"))
    finally:
        other.close()
    # A negative can only be shown by waiting: longer than the file watch's
    # debounce (100 ms) and step, shorter than the 5 s fallback re-check.
    with pytest.raises(TimeoutError):
        await watching.next(timeout=0.8)

    # The watch is still alive: a real change comes through after all that.
    await _baton_put(db, KEY, "v2")
    assert (await watching.next(timeout=1.0)).id == "2"


async def test_watch_of_a_key_without_versions_waits_for_the_first_put(db: Path) -> None:
    store = LocalStore(db)
    watching = Watching(store, "later/key")
    try:
        with pytest.raises(TimeoutError):
            await watching.next(timeout=0.3)
        await _baton_put(db, "later/key", "first")
        assert (await watching.next(timeout=1.0)).id == "1"
    finally:
        await watching.close()
        await store.aclose()


async def test_async_reads_match_the_sync_ones(store: LocalStore) -> None:
    await store.put(KEY, Secret("a"))
    await store.create(KEY, Secret("b"))

    assert (await store.read(KEY)).payload == Secret("a")
    assert [v.id for v in await store.versions(KEY)] == ["1", "2"]
    await store.promote(KEY, VersionId("2"))
    await store.retire(KEY, VersionId("1"))
    assert [(v.id, v.retired) for v in await store.versions(KEY)] == [("1", True), ("2", False)]
