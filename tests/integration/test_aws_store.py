"""AwsStore against a real moto_server: every SecretStore method, stages, tags, outage, no leaks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from daemon.config import parse_config
from daemon.errors import PayloadError, StoreConflict, StoreError, StoreNotFound, StoreUnavailable
from daemon.model import Secret, VersionId, VersionInfo
from daemon.report.base import Holder, NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.stores import open_store
from daemon.stores.aws import AwsStore, decode_tags, encode_tag
from tests.fixtures.moto import MotoServer

pytestmark = pytest.mark.integration

POLL = 0.2
KEY = "app/db"


def make_store(moto: MotoServer, **kw: Any) -> AwsStore:
    params: dict[str, Any] = {"endpoint_url": moto.url, "poll_interval": POLL, "timeout": 1.0, "max_attempts": 2}
    params.update(kw)
    return AwsStore(**params)


@pytest.fixture
async def store(moto: MotoServer) -> AsyncIterator[AwsStore]:
    async with contextlib.aclosing(make_store(moto)) as s:
        yield s


@pytest.fixture
def sm(moto: MotoServer) -> Iterator[Any]:
    """A plain boto3 client to look at the server from outside the store."""
    with moto.client("secretsmanager") as client:
        yield client


def labels(sm: Any, key: str = KEY) -> dict[str, list[str]]:
    return {k: sorted(v) for k, v in sm.describe_secret(SecretId=key)["VersionIdsToStages"].items()}


async def rotated(store: AwsStore, key: str = KEY) -> tuple[VersionInfo, VersionInfo]:
    """A secret with a current v1 and a pending v2."""
    v1 = await store.create(key, Secret("first-value"))
    v2 = await store.create(key, Secret("second-value"))
    return v1, v2


# ---------------------------------------------------------------- reads and creates


async def test_first_create_makes_the_secret_and_its_version_current(store: AwsStore) -> None:
    v1 = await store.create(KEY, Secret("first-value"))
    assert v1.is_current and "AWSCURRENT" in v1.stages
    got = await store.read(KEY)
    assert got.id == v1.id
    assert got.payload.reveal() == "first-value"
    assert got.info.digest == Secret("first-value").digest()


async def test_create_on_an_existing_secret_stages_the_version_pending(store: AwsStore, sm: Any) -> None:
    v1, v2 = await rotated(store)
    assert "pending" in v2.stages and "AWSPENDING" in v2.stages and not v2.is_current
    assert labels(sm) == {v1.id: ["AWSCURRENT"], v2.id: ["AWSPENDING"]}
    assert (await store.read(KEY)).payload.reveal() == "first-value"
    assert (await store.read(KEY, v2.id)).payload.reveal() == "second-value"


async def test_create_retried_with_the_same_payload_adds_no_second_version(store: AwsStore, sm: Any) -> None:
    _, v2 = await rotated(store)
    again = await store.create(KEY, Secret("second-value"))
    assert again.id == v2.id
    assert len(await store.versions(KEY)) == 2
    assert len(sm.list_secret_version_ids(SecretId=KEY, IncludeDeprecated=True)["Versions"]) == 2


async def test_create_with_a_different_payload_moves_pending_to_the_new_version(store: AwsStore, sm: Any) -> None:
    v1, v2 = await rotated(store)
    v3 = await store.create(KEY, Secret("third-value"))
    assert v3.id not in (v1.id, v2.id)
    stages = labels(sm)
    assert stages[v3.id] == ["AWSPENDING"] and stages[v2.id] == []


async def test_versions_lists_every_version_oldest_first_without_payloads(store: AwsStore) -> None:
    v1, v2 = await rotated(store)
    got = await store.versions(KEY)
    assert [v.id for v in got] == [v1.id, v2.id]
    assert got[0].is_current and "pending" in got[1].stages
    assert all(v.digest == "" for v in got)


async def test_reading_a_missing_key_or_version_raises_store_not_found(store: AwsStore) -> None:
    with pytest.raises(StoreNotFound):
        await store.read("no/such/key")
    await store.create(KEY, Secret("first-value"))
    with pytest.raises(StoreNotFound):
        await store.read(KEY, VersionId("00000000-0000-0000-0000-000000000000"))


async def test_a_binary_secret_is_rejected_as_a_payload_error(store: AwsStore, sm: Any) -> None:
    sm.create_secret(Name="bin", SecretBinary=b"\x00\x01")
    with pytest.raises(PayloadError, match="SecretBinary"):
        await store.read("bin")


async def test_an_empty_payload_is_rejected_before_anything_is_sent(store: AwsStore, sm: Any) -> None:
    with pytest.raises(PayloadError):
        await store.create(KEY, Secret(""))
    assert sm.list_secrets()["SecretList"] == []


# ---------------------------------------------------------------- promote and retire


async def test_promote_moves_current_and_keeps_a_draining_label_on_the_old_version(store: AwsStore, sm: Any) -> None:
    v1, v2 = await rotated(store)
    await store.promote(KEY, v2.id)
    assert labels(sm) == {v1.id: sorted(["AWSPREVIOUS", f"BATON_DRAINING_{v1.id}"]), v2.id: ["AWSCURRENT"]}
    assert (await store.read(KEY)).payload.reveal() == "second-value"
    by_id = {v.id: v for v in await store.versions(KEY)}
    assert {"previous", "draining"} <= by_id[v1.id].stages and not by_id[v1.id].retired
    assert by_id[v2.id].is_current


async def test_promote_again_changes_nothing(store: AwsStore, sm: Any) -> None:
    _, v2 = await rotated(store)
    await store.promote(KEY, v2.id)
    before = labels(sm)
    await store.promote(KEY, v2.id)
    assert labels(sm) == before


async def test_two_rotations_keep_both_draining_versions_labelled(store: AwsStore, sm: Any) -> None:
    v1, v2 = await rotated(store)
    await store.promote(KEY, v2.id)
    v3 = await store.create(KEY, Secret("third-value"))
    await store.promote(KEY, v3.id)
    stages = labels(sm)
    # AWSPREVIOUS moved on to v2, but v1 is still labelled, so AWS never deprecates it.
    assert stages[v1.id] == [f"BATON_DRAINING_{v1.id}"]
    assert stages[v2.id] == sorted(["AWSPREVIOUS", f"BATON_DRAINING_{v2.id}"])
    assert stages[v3.id] == ["AWSCURRENT"]


async def test_promote_of_an_unknown_version_raises_store_not_found(store: AwsStore) -> None:
    await store.create(KEY, Secret("first-value"))
    with pytest.raises(StoreNotFound):
        await store.promote(KEY, VersionId("00000000-0000-0000-0000-000000000000"))


async def test_retire_removes_every_baton_label_and_marks_the_version_retired(store: AwsStore, sm: Any) -> None:
    v1, v2 = await rotated(store)
    await store.promote(KEY, v2.id)
    await store.retire(KEY, v1.id)
    assert labels(sm)[v1.id] == []
    by_id = {v.id: v for v in await store.versions(KEY)}
    assert by_id[v1.id].retired and not by_id[v2.id].retired
    await store.retire(KEY, v1.id)  # idempotent
    assert labels(sm)[v1.id] == []


async def test_retire_refuses_the_current_version(store: AwsStore, sm: Any) -> None:
    v1 = await store.create(KEY, Secret("first-value"))
    with pytest.raises(StoreConflict, match="current"):
        await store.retire(KEY, v1.id)
    assert labels(sm)[v1.id] == ["AWSCURRENT"]


async def test_retire_of_an_unknown_version_raises_store_not_found(store: AwsStore) -> None:
    await store.create(KEY, Secret("first-value"))
    with pytest.raises(StoreNotFound):
        await store.retire(KEY, VersionId("00000000-0000-0000-0000-000000000000"))


# ---------------------------------------------------------------- watch


class CountingStore(AwsStore):
    """Records every AWS operation and signals each DescribeSecret poll."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.ops: list[str] = []
        self.polled = asyncio.Condition()

    async def _call(self, op: str, key: str, **params: Any) -> dict[str, Any]:
        self.ops.append(op)
        try:
            return await super()._call(op, key, **params)
        finally:
            async with self.polled:
                self.polled.notify_all()

    async def wait_ops(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self.polled:
            await self.polled.wait_for(lambda: len(self.ops) >= n)


async def collect_watch(store: AwsStore, seen: list[VersionInfo], changed: asyncio.Event) -> None:
    async for info in store.watch(KEY):
        seen.append(info)
        changed.set()


@contextlib.asynccontextmanager
async def writer_and_watcher(moto: MotoServer) -> AsyncIterator[tuple[AwsStore, CountingStore]]:
    """A store to write with and a ``CountingStore`` to watch with, both closed at the block's end."""
    async with (
        contextlib.aclosing(make_store(moto)) as writer,
        contextlib.aclosing(
            CountingStore(endpoint_url=moto.url, poll_interval=POLL, timeout=1.0, max_attempts=2)
        ) as watcher,
    ):
        yield writer, watcher


@contextlib.asynccontextmanager
async def watching(watcher: AwsStore) -> AsyncIterator[tuple[list[VersionInfo], asyncio.Event]]:
    """``watcher.watch(KEY)`` in a task, entered after its first yield: (what it yielded, set on each yield).

    On a clean exit the task is cancelled and must end cancelled (not with an error of its own).
    """
    seen: list[VersionInfo] = []
    changed = asyncio.Event()
    task = asyncio.create_task(collect_watch(watcher, seen, changed))
    try:
        async with asyncio.timeout(5):
            await changed.wait()
        yield seen, changed
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watch_yields_the_current_version_then_a_new_one_within_one_poll(moto: MotoServer, sm: Any) -> None:
    async with writer_and_watcher(moto) as (writer, watcher):
        v1, v2 = await rotated(writer)
        async with watching(watcher) as (seen, changed):
            assert [s.id for s in seen] == [v1.id]
            changed.clear()
            promoted_at = time.monotonic()
            await writer.promote(KEY, v2.id)
            async with asyncio.timeout(5):
                await changed.wait()
            latency = time.monotonic() - promoted_at
            assert [s.id for s in seen] == [v1.id, v2.id] and seen[-1].is_current
            assert latency < POLL + 0.5, latency
            # The watch only ever asks the cheap DescribeSecret, never for a payload.
            assert set(watcher.ops) == {"describe_secret"}


async def test_watch_yields_nothing_on_a_tag_or_pending_change(moto: MotoServer) -> None:
    async with writer_and_watcher(moto) as (writer, watcher):
        await writer.create(KEY, Secret("first-value"))
        async with watching(watcher) as (seen, _):
            await writer.merge_metadata(KEY, {"baton.node.n1": "x", "owner": "team-a"})
            await writer.create(KEY, Secret("pending-value"))
            # Three more polls after the changes, then nothing may have been yielded.
            await watcher.wait_ops(len(watcher.ops) + 3)
            assert len(seen) == 1


# ---------------------------------------------------------------- tags


async def test_two_nodes_merging_their_tags_concurrently_never_lose_each_other(moto: MotoServer) -> None:
    a, b = make_store(moto), make_store(moto)
    try:
        await a.create(KEY, Secret("first-value"))
        for i in range(15):
            await asyncio.gather(
                a.merge_metadata(KEY, {"baton.node.a": f"a-{i}"}),
                b.merge_metadata(KEY, {"baton.node.b": f"b-{i}" + "{long}" * 40 * (i % 2)}),
            )
            meta = await a.read_metadata(KEY)
            assert meta["baton.node.a"] == f"a-{i}"
            assert meta["baton.node.b"] == f"b-{i}" + "{long}" * 40 * (i % 2)
    finally:
        await a.aclose()
        await b.aclose()


async def test_none_deletes_an_entry_and_leaves_the_others(store: AwsStore) -> None:
    await store.create(KEY, Secret("first-value"))
    await store.merge_metadata(KEY, {"baton.node.a": "1", "baton.node.b": "{json}" * 100})
    await store.merge_metadata(KEY, {"baton.node.b": None})
    assert await store.read_metadata(KEY) == {"baton.node.a": "1"}


def _aws_valid(tags: list[dict[str, str]]) -> bool:
    ok = re.compile(r"[A-Za-z0-9 _.:/=+\-@]*")
    return len(tags) <= 50 and all(
        0 < len(t["Key"]) <= 128 and len(t["Value"]) <= 256 and ok.fullmatch(t["Key"]) and ok.fullmatch(t["Value"])
        for t in tags
    )


async def test_a_large_node_report_round_trips_through_tags_aws_would_accept(store: AwsStore, sm: Any) -> None:
    await store.create(KEY, Secret("first-value"))
    holders = tuple(
        Holder(pid=1000 + i, exe=f"/usr/lib/postgresql/16/bin/worker-{i}", consumer="api", how="fd", version="v1")
        for i in range(10)
    )
    big = NodeReport(node="node-1.example.com", credential="db", current="v2", in_use={"v1": 10}, holders=holders)
    assert len(big.to_json()) > 256
    reporter = MetadataReporter(store)
    await reporter.publish(KEY, big)
    tags = sm.describe_secret(SecretId=KEY)["Tags"]
    assert _aws_valid(tags)
    assert any(t["Key"] == "baton/node/node-1.example.com" for t in tags)
    assert await reporter.collect(KEY, "db") == [big]
    # A shorter report leaves no chunk of the longer one behind.
    small = NodeReport(node="node-1.example.com", credential="db", current="v2")
    await reporter.publish(KEY, small)
    assert [t["Key"] for t in sm.describe_secret(SecretId=KEY)["Tags"]] == ["baton/node/node-1.example.com"]
    assert await reporter.collect(KEY, "db") == [small]
    await reporter.forget(KEY, "node-1.example.com")
    assert sm.describe_secret(SecretId=KEY).get("Tags", []) == []


def test_tag_encoding_keeps_plain_values_plain_and_round_trips_the_rest() -> None:
    assert encode_tag("k", "plain value-1") == {"k": "plain value-1"}
    for value in ["", "=zlooks-like-a-head", '{"a": [1, 2]}', "ü" * 300, "x" * 5000]:
        tags = encode_tag("k", value)
        assert all(len(v) <= 256 for v in tags.values())
        assert decode_tags({**tags, "other": "1"}) == {"k": value, "other": "1"}


async def test_the_fifty_tag_limit_is_a_store_error_that_names_dynamodb(store: AwsStore, sm: Any) -> None:
    await store.create(KEY, Secret("first-value"))
    sm.tag_resource(SecretId=KEY, Tags=[{"Key": f"other-{i}", "Value": "x"} for i in range(49)])
    await store.merge_metadata(KEY, {"baton.node.a": "fits"})  # the 50th
    with pytest.raises(StoreError, match="reports: dynamodb"):
        await store.merge_metadata(KEY, {"baton.node.b": "one too many"})
    assert "baton.node.b" not in await store.read_metadata(KEY)
    assert len(sm.describe_secret(SecretId=KEY)["Tags"]) == 50


async def test_a_metadata_key_that_cannot_be_a_tag_is_refused(store: AwsStore) -> None:
    await store.create(KEY, Secret("first-value"))
    with pytest.raises(StoreError, match="tag key"):
        await store.merge_metadata(KEY, {"aws:reserved": "x"})


# ---------------------------------------------------------------- config, outage, leaks


async def test_open_store_builds_an_aws_store_from_the_config(moto: MotoServer) -> None:
    config = parse_config(
        {
            "store": {"kind": "aws", "endpoint_url": moto.url, "poll_interval": "200ms", "draining_label": "DRAIN"},
            "credentials": [],
        }
    )
    store = open_store(config)
    try:
        assert isinstance(store, AwsStore)
        assert store.poll_interval == 0.2
        v1 = await store.create(KEY, Secret("first-value"))
        v2 = await store.create(KEY, Secret("second-value"))
        await store.promote(KEY, v2.id)
        assert f"DRAIN_{v1.id}" in {v.id: v for v in await store.versions(KEY)}[v1.id].stages
    finally:
        await store.aclose()


async def test_a_stopped_server_is_store_unavailable_quickly_and_a_restart_heals(moto_outage: MotoServer) -> None:
    store = make_store(moto_outage)
    try:
        await store.create(KEY, Secret("first-value"))
        moto_outage.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.read(KEY)
        assert time.monotonic() - started < 5.0
        assert "first-value" not in str(info.value)
        moto_outage.start()  # a fresh server: its state is gone
        with pytest.raises(StoreNotFound):
            await store.read(KEY)
        await store.create(KEY, Secret("again-value"))
        assert (await store.read(KEY)).payload.reveal() == "again-value"
    finally:
        await store.aclose()


async def test_watch_polls_through_an_outage_and_sees_the_server_again(
    moto_outage: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = CountingStore(endpoint_url=moto_outage.url, poll_interval=POLL, timeout=0.5, max_attempts=1)
    seen: list[VersionInfo] = []
    changed = asyncio.Event()
    try:
        await store.create(KEY, Secret("first-value"))
        task = asyncio.create_task(collect_watch(store, seen, changed))
        async with asyncio.timeout(5):
            await changed.wait()
        moto_outage.stop()
        await store.wait_ops(len(store.ops) + 3)  # three failed polls
        assert not task.done()
        assert "store unreachable, still polling" in caplog.text
        moto_outage.start()  # fresh state: the secret is gone, which ends the watch
        with pytest.raises(StoreNotFound):
            async with asyncio.timeout(5):
                await task
        assert len(seen) == 1
    finally:
        await store.aclose()


async def test_a_secret_value_never_appears_in_logs_or_errors(
    moto_outage: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-Value-9f8e7d"
    store = make_store(moto_outage)
    errors: list[BaseException] = []
    try:
        v1 = await store.create(KEY, Secret(secret + "-1"))
        v2 = await store.create(KEY, Secret(secret + "-2"))
        await store.create(KEY, Secret(secret + "-2"))
        await store.promote(KEY, v2.id)
        await store.read(KEY)
        await store.read(KEY, v1.id)
        await store.retire(KEY, v1.id)
        for bad in (Secret(secret * 100_000), Secret("")):
            with pytest.raises(PayloadError) as e:
                await store.create(KEY, bad)
            errors.append(e.value)
        moto_outage.stop()
        with pytest.raises(StoreUnavailable) as e2:
            await store.create(KEY, Secret(secret + "-3"))
        errors.append(e2.value)
    finally:
        await store.aclose()
    assert caplog.records, "the store logs its steps"
    assert secret not in caplog.text
    for err in errors:
        chain: BaseException | None = err
        while chain is not None:
            assert secret not in str(chain) and secret not in repr(chain)
            chain = chain.__cause__ or chain.__context__


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDeniedException", 400, "StoreAuthError"),
        ("UnrecognizedClientException", 400, "StoreAuthError"),
        ("ResourceNotFoundException", 400, "StoreNotFound"),
        ("ResourceExistsException", 400, "StoreConflict"),
        ("ThrottlingException", 400, "StoreUnavailable"),
        ("InternalServiceError", 500, "StoreUnavailable"),
        ("SomethingNew", 503, "StoreUnavailable"),
        ("InvalidRequestException", 400, "StoreError"),
    ],
)
def test_aws_error_codes_map_onto_the_store_error_tree_without_the_message(
    code: str, status: int, expected: str
) -> None:
    from botocore.exceptions import ClientError

    from daemon.stores.aws import map_error

    body = {"Error": {"Code": code, "Message": "echo of s3cr3t"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    err = map_error(ClientError(body, "GetSecretValue"), op="get_secret_value", key=KEY)  # type: ignore[arg-type]
    assert type(err).__name__ == expected
    assert "s3cr3t" not in str(err) and KEY in str(err)


def test_a_typical_node_report_needs_few_tags() -> None:
    holders = tuple(
        Holder(pid=10_000 + i, exe="/usr/local/bin/app-server", consumer="app", how="fd", version="3f2a1b2c")
        for i in range(10)
    )
    rep = NodeReport(
        node="ip-10-0-12-34.ec2.internal",
        credential="db",
        current="91c0aa11",
        in_use={"3f2a1b2c": 10, "91c0aa11": 2},
        holders=holders,
        heartbeat=1_700_000_000.123,
        agent_version="0.1.0",
    )
    tags = encode_tag("baton/node/" + rep.node, rep.to_json())
    assert len(tags) <= 2, (len(rep.to_json()), len(tags))
