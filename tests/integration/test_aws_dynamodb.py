"""DynamoReporter against a real moto_server: one item per (credential, node), conditional heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest

from daemon.config import parse_config
from daemon.errors import StoreConflict, StoreError, StoreNotFound, StoreUnavailable
from daemon.report.base import Holder, NodeReport
from daemon.report.dynamodb import DynamoReporter
from daemon.rotation.gate import decide
from tests.fixtures.moto import MotoServer

pytestmark = pytest.mark.integration

TABLE = "baton-reports"
KEY = "app/db"


def report(node: str, heartbeat: float, current: str = "v2", credential: str = "db") -> NodeReport:
    holder = Holder(pid=4242, exe="/usr/bin/api", consumer="api", how="fd", version="v1")
    return NodeReport(
        node=node,
        credential=credential,
        current=current,
        in_use={"v1": 1},
        holders=(holder,),
        heartbeat=heartbeat,
        agent_version="0.1.0",
    )


@pytest.fixture
async def reporter(moto: MotoServer) -> AsyncIterator[DynamoReporter]:
    async with contextlib.aclosing(
        DynamoReporter(table=TABLE, endpoint_url=moto.url, timeout=1.0, max_attempts=2, create_table=True)
    ) as r:
        yield r


@pytest.fixture
def ddb(moto: MotoServer) -> Iterator[Any]:
    with moto.client("dynamodb") as client:
        yield client


async def test_the_table_is_created_with_credential_and_node_keys_when_asked(
    reporter: DynamoReporter, ddb: Any
) -> None:
    await reporter.publish(KEY, report("n1", 1.0))
    schema = ddb.describe_table(TableName=TABLE)["Table"]["KeySchema"]
    assert {(k["AttributeName"], k["KeyType"]) for k in schema} == {("credential", "HASH"), ("node", "RANGE")}


async def test_the_table_is_not_created_unless_asked(moto: MotoServer, ddb: Any) -> None:
    r = DynamoReporter(table=TABLE, endpoint_url=moto.url, timeout=1.0, max_attempts=2)
    try:
        with pytest.raises(StoreNotFound, match="does not exist"):
            await r.publish(KEY, report("n1", 1.0))
    finally:
        await r.aclose()
    assert TABLE not in ddb.list_tables()["TableNames"]


async def test_published_reports_are_collected_per_credential(reporter: DynamoReporter) -> None:
    a, b, other = report("n1", 1.0), report("n2", 2.0), report("n1", 3.0, credential="cache")
    await asyncio.gather(reporter.publish(KEY, a), reporter.publish(KEY, b), reporter.publish("app/cache", other))
    got = sorted(await reporter.collect(KEY, "db"), key=lambda r: r.node)
    assert got == [a, b]
    assert await reporter.collect("app/cache", "cache") == [other]


async def test_a_newer_heartbeat_replaces_the_report(reporter: DynamoReporter) -> None:
    await reporter.publish(KEY, report("n1", 1.0, current="v1"))
    await reporter.publish(KEY, report("n1", 2.0, current="v2"))
    [got] = await reporter.collect(KEY, "db")
    assert (got.heartbeat, got.current) == (2.0, "v2")


async def test_a_stale_heartbeat_is_rejected_by_the_condition_and_the_newer_report_stays(
    reporter: DynamoReporter,
) -> None:
    newer = report("n1", time.time(), current="v2")
    await reporter.publish(KEY, newer)
    with pytest.raises(StoreConflict, match="newer report"):
        await reporter.publish(KEY, report("n1", newer.heartbeat - 30, current="v1"))
    assert await reporter.collect(KEY, "db") == [newer]
    await reporter.publish(KEY, newer)  # the same report again (a retry) is fine
    assert await reporter.collect(KEY, "db") == [newer]


async def test_collect_pages_through_many_nodes(moto: MotoServer) -> None:
    r = DynamoReporter(table=TABLE, endpoint_url=moto.url, timeout=1.0, create_table=True, page_size=3)
    try:
        reports = [report(f"node-{i:02d}", float(i)) for i in range(10)]
        for rep in reports:
            await r.publish(KEY, rep)
        assert sorted(await r.collect(KEY, "db"), key=lambda x: x.node) == reports
    finally:
        await r.aclose()


def count_queries(client: Any) -> list[set[str]]:
    """Record each Query the client sends, as the set of attributes of each item it got back."""
    pages: list[set[str]] = []

    def after_call(parsed: dict[str, Any], **_: Any) -> None:
        pages.append(set().union(*(item.keys() for item in parsed.get("Items") or [])))

    client.meta.events.register("after-call.dynamodb.Query", after_call)
    return pages


async def test_collect_reads_all_nodes_in_one_query_and_only_the_attributes_it_needs(
    reporter: DynamoReporter,
) -> None:
    reports = [report(f"node-{i:02d}", float(i)) for i in range(25)]
    await asyncio.gather(*(reporter.publish(KEY, rep) for rep in reports))
    pages = count_queries(await reporter._get_client())
    assert sorted(await reporter.collect(KEY, "db"), key=lambda x: x.node) == reports
    assert pages == [{"node", "report"}]  # one page; no key, heartbeat or credential attributes


async def test_collect_with_a_page_size_pages_and_still_reads_each_node_once(moto: MotoServer) -> None:
    r = DynamoReporter(table=TABLE, endpoint_url=moto.url, timeout=1.0, create_table=True, page_size=3)
    try:
        reports = [report(f"node-{i:02d}", float(i)) for i in range(10)]
        await asyncio.gather(*(r.publish(KEY, rep) for rep in reports))
        pages = count_queries(await r._get_client())
        got = await r.collect(KEY, "db")
        assert sorted(got, key=lambda x: x.node) == reports and len(got) == 10
        assert len(pages) == 4  # 3 + 3 + 3 + 1
    finally:
        await r.aclose()


async def test_forget_removes_only_that_nodes_items_for_the_key(reporter: DynamoReporter) -> None:
    await reporter.publish(KEY, report("n1", 1.0))
    await reporter.publish(KEY, report("n2", 1.0))
    await reporter.publish("app/cache", report("n1", 1.0, credential="cache"))
    await reporter.forget(KEY, "n1")
    assert [r.node for r in await reporter.collect(KEY, "db")] == ["n2"]
    assert [r.node for r in await reporter.collect("app/cache", "cache")] == ["n1"]
    await reporter.forget(KEY, "n1")  # already gone: nothing to do


async def test_from_config_reads_the_aws_store_section(moto: MotoServer) -> None:
    config = parse_config(
        {
            "store": {"kind": "aws", "endpoint_url": moto.url, "reports": "dynamodb", "dynamodb_table": TABLE},
            "credentials": [],
        }
    )
    r = DynamoReporter.from_config(config, create_table=True)
    try:
        assert r.table == TABLE
        await r.publish(KEY, report("n1", 1.0))
        assert len(await r.collect(KEY, "db")) == 1
    finally:
        await r.aclose()
    with pytest.raises(StoreError):
        DynamoReporter.from_config(parse_config({"credentials": []}))


async def test_a_stopped_server_is_store_unavailable_and_a_restart_heals(moto_outage: MotoServer) -> None:
    r = DynamoReporter(table=TABLE, endpoint_url=moto_outage.url, timeout=1.0, max_attempts=2, create_table=True)
    try:
        await r.publish(KEY, report("n1", 1.0))
        moto_outage.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await r.collect(KEY, "db")
        assert time.monotonic() - started < 5.0
        moto_outage.start()
        await r.ensure_table()  # a fresh server has no table
        await r.publish(KEY, report("n1", 2.0))
        assert [x.heartbeat for x in await r.collect(KEY, "db")] == [2.0]
    finally:
        await r.aclose()


async def test_an_unreadable_item_stands_as_a_stale_report_of_its_node_and_blocks_the_gate(
    reporter: DynamoReporter, ddb: Any, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    good = NodeReport(node="n1", credential="db", current="v2", heartbeat=now)  # would let v1 go on its own
    await reporter.publish(KEY, good)  # creates the table
    newer_agent = json.loads(replace(good, node="n2").to_json()) | {"added_by_a_newer_agent": [1, 2]}
    items = {
        "n2": {"report": {"S": json.dumps(newer_agent)}},  # readable: the extra field is ignored
        "n3": {"report": {"S": '{"node": "n3", "credential": "db"'}},  # cut short
        "n4": {},  # no report attribute at all
        "n5": {"report": {"S": report("n5", now, credential="cache").to_json()}},  # under the wrong partition
        "n6": {"report": {"S": '{"node": "n6", "credential": "db", "current": "v2", "heartbeat": NaN}'}},
        # Claims to be n1, with a newer heartbeat: it must not hide n1's own report.
        "n7": {"report": {"S": replace(good, node="n1", heartbeat=now + 1).to_json()}},
    }
    for node, extra in items.items():
        ddb.put_item(TableName=TABLE, Item={"credential": {"S": "db"}, "node": {"S": node}, "key": {"S": KEY}, **extra})

    got = {r.node: r for r in await reporter.collect(KEY, "db")}
    assert sorted(got) == ["n1", "n2", "n3", "n4", "n5", "n6", "n7"]
    assert got["n1"] == good and got["n2"] == replace(good, node="n2")
    assert decide(old="v1", new="v2", reports=[good, got["n2"]], known={"n1", "n2"}, now=now, ttl=60).retire
    for node in ("n3", "n4", "n5", "n6", "n7"):
        assert got[node] == NodeReport(node=node, credential="db", current=None), node
    decision = decide(old="v1", new="v2", reports=list(got.values()), known=set(got), now=now, ttl=60)
    assert not decision.retire
    for node in ("n3", "n4", "n5", "n6", "n7"):
        assert any(r.startswith(f"{node}: report is stale") for r in decision.reasons), (node, decision.reasons)
    assert len([r for r in caplog.records if r.getMessage() == "unreadable node report"]) == 5
