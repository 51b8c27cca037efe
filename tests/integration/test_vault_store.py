"""VaultStore against a real OpenBao (each test on a KV mount of its own, requests counted by its proxy)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from daemon.errors import StoreConflict, StoreNotFound
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, VersionId, VersionInfo
from daemon.stores.base import SecretStore
from daemon.stores.vault import K_CURRENT, K_PENDING, VaultStore, _Meta
from tests.doubles.faultproxy import ThreadedFaultProxy
from tests.fixtures.vault import MakeStore, VaultTarget

pytestmark = pytest.mark.integration


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_the_store_satisfies_the_secret_store_protocol(vault_store: VaultStore) -> None:
    assert isinstance(vault_store, SecretStore)


async def test_read_returns_a_value_written_by_hand_as_the_current_version(
    vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "hunter2"})
    got = await vault_store.read(key)
    assert got.payload.reveal() == "hunter2"
    assert got.id == "1"
    assert got.info.is_current


async def test_a_multi_field_entry_reads_as_its_json(
    vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"username": "app", "password": "pw1"})
    got = await vault_store.read(key)
    assert json.loads(got.payload.reveal()) == {"username": "app", "password": "pw1"}


async def test_reading_a_missing_key_raises_store_not_found(vault_store: VaultStore, vault_prefix: str) -> None:
    with pytest.raises(StoreNotFound):
        await vault_store.read(f"{vault_prefix}/nothing-here")


async def test_create_stays_pending_and_readers_keep_the_old_version_until_promote(
    vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "old"})
    info = await vault_store.create(key, Secret("new"))
    assert info.id == "2" and info.stages == frozenset({PENDING})
    # KV v2 made version 2 its newest, but readers still get version 1.
    got = await vault_store.read(key)
    assert (got.id, got.payload.reveal()) == ("1", "old")
    assert (await vault_store.read(key, VersionId("2"))).payload.reveal() == "new"

    await vault_store.promote(key, info.id)
    got = await vault_store.read(key)
    assert (got.id, got.payload.reveal()) == ("2", "new")
    stages = {v.id: v.stages for v in await vault_store.versions(key)}
    assert stages == {"1": frozenset({PREVIOUS}), "2": frozenset({CURRENT})}


async def test_the_first_version_of_a_new_key_is_pending_not_current(
    vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/fresh"
    info = await vault_store.create(key, Secret("first"))
    assert info.id == "1"
    with pytest.raises(StoreNotFound):
        await vault_store.read(key)
    await vault_store.promote(key, info.id)
    assert (await vault_store.read(key)).payload.reveal() == "first"


async def test_create_of_a_json_object_writes_its_fields_as_kv_data(
    vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    info = await vault_store.create(key, Secret('{"username": "app", "password": "pw2"}'))
    c = vault_server.client()
    try:
        data = c.secrets.kv.v2.read_secret_version(
            path=key, version=int(info.id), mount_point=vault_server.mount, raise_on_deleted_version=True
        )["data"]["data"]
    finally:
        c.adapter.close()
    assert data == {"username": "app", "password": "pw2"}


async def test_promote_is_idempotent(vault_store: VaultStore, vault_prefix: str) -> None:
    key = f"{vault_prefix}/db"
    info = await vault_store.create(key, Secret("a"))
    await vault_store.promote(key, info.id)
    before = await vault_store.read_metadata(key)
    await vault_store.promote(key, info.id)
    assert await vault_store.read_metadata(key) == before
    assert before[K_CURRENT] == "1" and K_PENDING not in before


async def test_a_lost_check_and_set_race_raises_store_conflict(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v1"})
    a, b = make_vault_store(), make_vault_store()
    # Both rotators read metadata (current_version 1) before either writes:
    # the second write's cas=1 no longer matches.
    original = VaultStore._write
    gate = asyncio.Event()
    arrived = 0

    async def slow_write(self: VaultStore, key: str, data: dict[str, object], *, cas: int | None) -> object:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            gate.set()
        await gate.wait()
        return await original(self, key, data, cas=cas)

    VaultStore._write = slow_write  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(
            a.create(key, Secret("from-a")), b.create(key, Secret("from-b")), return_exceptions=True
        )
    finally:
        VaultStore._write = original  # type: ignore[method-assign]
    conflicts = [r for r in results if isinstance(r, StoreConflict)]
    created = [r for r in results if isinstance(r, VersionInfo)]
    assert len(conflicts) == 1 and len(created) == 1
    assert created[0].id == "2"
    assert (await a.read(key)).payload.reveal() == "v1"


async def test_retire_destroys_the_version_and_marks_it_retired(vault_store: VaultStore, vault_prefix: str) -> None:
    key = f"{vault_prefix}/db"
    v1 = await vault_store.create(key, Secret("one"))
    await vault_store.promote(key, v1.id)
    v2 = await vault_store.create(key, Secret("two"))
    await vault_store.promote(key, v2.id)
    await vault_store.retire(key, v1.id)
    await vault_store.retire(key, v1.id)  # idempotent
    infos = {v.id: v for v in await vault_store.versions(key)}
    assert infos["1"].retired and not infos["1"].stages
    assert infos["2"].is_current and not infos["2"].retired
    with pytest.raises(StoreNotFound):
        await vault_store.read(key, VersionId("1"))


async def test_retire_with_delete_soft_deletes_the_version(make_vault_store: MakeStore, vault_prefix: str) -> None:
    store = make_vault_store(retire="delete")
    key = f"{vault_prefix}/db"
    v1 = await store.create(key, Secret("one"))
    await store.promote(key, v1.id)
    v2 = await store.create(key, Secret("two"))
    await store.promote(key, v2.id)
    await store.retire(key, v1.id)
    assert {v.id: v.retired for v in await store.versions(key)} == {"1": True, "2": False}
    with pytest.raises(StoreNotFound):
        await store.read(key, VersionId("1"))


async def test_retiring_the_current_version_is_refused(vault_store: VaultStore, vault_prefix: str) -> None:
    key = f"{vault_prefix}/db"
    v1 = await vault_store.create(key, Secret("one"))
    await vault_store.promote(key, v1.id)
    with pytest.raises(StoreConflict):
        await vault_store.retire(key, v1.id)
    assert (await vault_store.read(key)).payload.reveal() == "one"


async def test_promoting_a_destroyed_version_raises_store_not_found(vault_store: VaultStore, vault_prefix: str) -> None:
    key = f"{vault_prefix}/db"
    v1 = await vault_store.create(key, Secret("one"))
    await vault_store.promote(key, v1.id)
    v2 = await vault_store.create(key, Secret("two"))
    await vault_store.retire(key, v2.id)
    with pytest.raises(StoreNotFound):
        await vault_store.promote(key, v2.id)


async def test_watch_yields_the_current_version_then_a_new_one_within_one_poll(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    store = make_vault_store(poll_interval=0.3)
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v1"})
    seen: list[VersionInfo] = []

    async def consume() -> None:
        async for info in store.watch(key):
            seen.append(info)

    task = asyncio.create_task(consume())
    try:
        await wait_for(lambda: len(seen) == 1)
        assert seen[0].id == "1" and seen[0].is_current
        written = time.monotonic()
        vault_server.write(key, {"value": "v2"})
        await wait_for(lambda: len(seen) == 2)
        # One poll interval plus slack for a loaded machine.
        assert time.monotonic() - written < 0.3 + 0.5
        assert seen[1].id == "2"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class PollCounter:
    """Counts a store's metadata reads, so a test can wait for N polls instead of sleeping."""

    def __init__(self, store: VaultStore) -> None:
        self.n = 0
        inner = store._metadata

        async def counted(key: str) -> _Meta:
            try:
                return await inner(key)
            finally:
                self.n += 1

        store._metadata = counted  # type: ignore[method-assign]

    async def wait_more(self, more: int) -> None:
        target = self.n + more
        await wait_for(lambda: self.n >= target)


async def test_watch_yields_on_promote_but_not_on_create(make_vault_store: MakeStore, vault_prefix: str) -> None:
    writer, watcher = make_vault_store(), make_vault_store(poll_interval=0.02)
    polls = PollCounter(watcher)
    key = f"{vault_prefix}/db"
    await writer.promote(key, (await writer.create(key, Secret("one"))).id)
    seen: list[str] = []

    async def consume() -> None:
        async for info in watcher.watch(key):
            seen.append(info.id)

    task = asyncio.create_task(consume())
    try:
        await wait_for(lambda: seen == ["1"])
        v2 = await writer.create(key, Secret("two"))
        await polls.wait_more(3)
        assert seen == ["1"]
        await writer.promote(key, v2.id)
        await wait_for(lambda: seen == ["1", "2"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_watch_ignores_a_metadata_only_change(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    writer, watcher = make_vault_store(), make_vault_store(poll_interval=0.02)
    polls = PollCounter(watcher)
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v1"})
    seen: list[str] = []

    async def consume() -> None:
        async for info in watcher.watch(key):
            seen.append(info.id)

    task = asyncio.create_task(consume())
    try:
        await wait_for(lambda: seen == ["1"])
        await writer.merge_metadata(key, {"baton.node.n1": '{"current":"1"}'})
        await polls.wait_more(3)
        assert seen == ["1"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_watch_polls_metadata_and_never_reads_a_payload(
    vault_server: VaultTarget, vault_faults: ThreadedFaultProxy, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    watcher = make_vault_store(poll_interval=0.02)
    polls = PollCounter(watcher)
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v1"})
    before = vault_faults.count("GET", "data")
    agen = watcher.watch(key)
    try:
        assert (await anext(agen)).id == "1"
        task = asyncio.create_task(anext(agen))
        await polls.wait_more(5)
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await agen.aclose()
    assert vault_faults.count("GET", "data") == before
    assert vault_faults.count("GET", "metadata") >= 6


async def test_watch_of_a_key_that_does_not_exist_yet_waits_for_its_first_current_version(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    watcher = make_vault_store(poll_interval=0.02)
    polls = PollCounter(watcher)
    key = f"{vault_prefix}/later"
    agen = watcher.watch(key)
    try:
        first = asyncio.create_task(anext(agen))
        await polls.wait_more(2)
        assert not first.done()
        vault_server.write(key, {"value": "v1"})
        assert (await asyncio.wait_for(first, 5)).id == "1"
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await agen.aclose()


async def test_read_metadata_of_a_missing_key_raises_store_not_found(
    vault_store: VaultStore, vault_prefix: str
) -> None:
    with pytest.raises(StoreNotFound):
        await vault_store.read_metadata(f"{vault_prefix}/missing")


async def test_merge_metadata_merges_and_none_deletes(vault_store: VaultStore, vault_prefix: str) -> None:
    key = f"{vault_prefix}/db"
    await vault_store.promote(key, (await vault_store.create(key, Secret("one"))).id)
    await vault_store.merge_metadata(key, {"baton.node.a": "1", "baton.node.b": "2"})
    await vault_store.merge_metadata(key, {"baton.node.a": None, "baton.node.c": "3"})
    meta = await vault_store.read_metadata(key)
    assert {k: v for k, v in meta.items() if k.startswith("baton.node.")} == {"baton.node.b": "2", "baton.node.c": "3"}
    assert meta[K_CURRENT] == "1"


async def test_versions_read_metadata_only_and_never_a_payload(
    vault_server: VaultTarget, vault_faults: ThreadedFaultProxy, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v1"})
    vault_server.write(key, {"value": "v2"})
    before = vault_faults.count("GET", "data")
    infos = await vault_store.versions(key)
    assert [v.id for v in infos] == ["1", "2"]
    assert infos[0].created <= infos[1].created and infos[0].created > 1e9
    assert vault_faults.count("GET", "data") == before
    assert vault_faults.count("GET", "metadata") >= 1  # the store's requests do pass the proxy
