"""VaultStore under failure: 5xx, a slow server, a dropped or cut answer, no server; no secret in any log or error.

The server is the session's real OpenBao; the faults come from the test's proxy in front of it
(``vault_server.faults``), which also counts the requests the store makes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import traceback
from collections.abc import Callable

import pytest

from daemon.errors import StoreConflict, StoreError, StoreUnavailable
from daemon.model import Secret, VersionId
from daemon.stores.vault import VaultStore
from tests.doubles.faultproxy import Rule
from tests.fixtures.vault import MakeStore, VaultTarget

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("vault_faults")]

CANARY = "canary-S3cr3t-7f1e9a"


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_a_503_is_store_unavailable_and_the_store_recovers(
    vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    vault_server.faults.fail_with(503)
    with pytest.raises(StoreUnavailable) as err:
        await vault_store.read(key)
    assert "sealed" not in str(err.value)  # the response body stays out of the message
    vault_server.faults.clear()
    assert (await vault_store.read(key)).payload.reveal() == "v"


@pytest.mark.parametrize("status", [500, 502, 504, 429])
async def test_other_server_errors_are_store_unavailable(
    status: int, vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    vault_server.faults.fail_with(status, times=1)
    with pytest.raises(StoreUnavailable):
        await vault_store.versions(f"{vault_prefix}/db")


async def test_a_slow_server_times_out_as_store_unavailable(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    store = make_vault_store(timeout=0.2)
    await store.read(key)  # logged in while the server is fast
    vault_server.faults.slow(2.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="timed out"):
        await store.read(key)
    assert time.monotonic() - started < 1.5
    vault_server.faults.clear()


async def test_a_dropped_connection_is_store_unavailable_and_the_write_it_carried_landed(
    vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    await vault_store.promote(key, (await vault_store.create(key, Secret("one"))).id)
    vault_server.faults.add(Rule("POST", f"/{vault_server.mount}/data/{key}", drop=True))
    with pytest.raises(StoreUnavailable):
        await vault_store.create(key, Secret("two"))
    # The server took the write; the store recorded it pending first, so nothing is lost or current.
    infos = {v.id: v for v in await vault_store.versions(key)}
    assert sorted(infos) == ["1", "2"] and infos["1"].is_current and not infos["2"].is_current
    assert (await vault_store.read(key)).payload.reveal() == "one"


@pytest.mark.parametrize("kind", ["metadata", "data"])
async def test_a_truncated_answer_is_store_unavailable_not_a_parse_error(
    kind: str, vault_server: VaultTarget, vault_store: VaultStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": CANARY})
    vault_server.faults.add(Rule("GET", f"/{vault_server.mount}/{kind}/{key}", truncate=True))
    with pytest.raises(StoreUnavailable) as err:
        await vault_store.read(key)
    assert CANARY not in "".join(traceback.format_exception(err.value))
    assert (await vault_store.read(key)).payload.reveal() == CANARY  # the next answer is whole


async def test_no_server_listening_is_store_unavailable(make_vault_store: MakeStore, vault_prefix: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = make_vault_store(url=f"http://127.0.0.1:{port}", env={"VAULT_TOKEN": "t"})
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await store.read(f"{vault_prefix}/db")


async def test_watch_polls_through_an_outage_and_then_sees_the_new_version(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v1"})
    store = make_vault_store(poll_interval=0.02)
    seen: list[str] = []

    async def consume() -> None:
        async for info in store.watch(key):
            seen.append(info.id)

    task = asyncio.create_task(consume())
    try:
        await wait_for(lambda: seen == ["1"])
        vault_server.faults.fail_with(503)
        failed_from = vault_server.faults.count("GET", "metadata")
        await wait_for(lambda: vault_server.faults.count("GET", "metadata") >= failed_from + 3)
        vault_server.write(key, {"value": "v2"})  # behind the outage, like a write on another node
        vault_server.faults.clear()
        await wait_for(lambda: seen == ["1", "2"])
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_secret_never_appears_in_logs_or_errors(
    vault_server: VaultTarget,
    make_vault_store: MakeStore,
    vault_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = f"{vault_prefix}/db"
    a, b = make_vault_store(), make_vault_store()
    errors: list[BaseException] = []

    v1 = await a.create(key, Secret(CANARY))
    await a.promote(key, v1.id)
    got = await a.read(key)
    assert got.payload.reveal() == CANARY
    assert CANARY not in repr(got) and CANARY not in str(got.info)

    # A cas loss, an outage, a timeout, a refused token, a bad version, a metadata limit.
    vault_server.write(key, {"value": CANARY + "-by-hand"})
    meta_before = await b._metadata(key)
    vault_server.write(key, {"value": CANARY + "-again"})
    try:
        await b._write(key, {"value": CANARY}, cas=meta_before.current_version)
    except StoreConflict as e:
        errors.append(e)
    vault_server.faults.fail_with(503, times=1)
    try:
        await a.read(key)
    except StoreUnavailable as e:
        errors.append(e)
    vault_server.revoke(vault_server.baton_token())  # the token of store a (and b)
    try:
        await a.read(key)
    except StoreError as e:
        errors.append(e)
    c = make_vault_store(env={"VAULT_TOKEN": CANARY})
    try:
        await c.read(key)
    except StoreError as e:
        errors.append(e)
    try:
        await c.read(key, VersionId(CANARY))
    except StoreError as e:
        errors.append(e)
    try:
        await a.merge_metadata(key, {"baton.node.x": CANARY * 40})
    except StoreError as e:
        errors.append(e)

    assert len(errors) == 6
    for e in errors:
        text = "".join(traceback.format_exception(e))
        assert CANARY not in text, text
    assert CANARY not in caplog.text
    assert any(r.name == "daemon.stores.vault" for r in caplog.records)
