"""Node reports on a real OpenBao: custom_metadata merges (and their 64-key limit), and the status path."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import hvac
import pytest

from daemon.clients.vault import MAX_METADATA_KEYS
from daemon.config import parse_config
from daemon.errors import StoreError
from daemon.model import Secret
from daemon.report import open_reporter
from daemon.report.base import Holder, NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.report.vault_status import VaultStatusReporter
from daemon.rotation.gate import decide
from daemon.stores.vault import VaultStore
from tests.doubles.faultproxy import ThreadedFaultProxy
from tests.fixtures.vault import MakeStore, VaultTarget

pytestmark = pytest.mark.integration


async def rotated_key(store: VaultStore, key: str) -> str:
    await store.promote(key, (await store.create(key, Secret("v1"))).id)
    return key


def report(node: str, credential: str = "db", current: str = "1", beat: float = 1.0) -> NodeReport:
    return NodeReport(
        node=node,
        credential=credential,
        current=current,
        in_use={current: 1},
        holders=(Holder(pid=42, exe="/usr/bin/app", consumer="app", how="fd", version=current),),
        heartbeat=beat,
    )


async def test_two_nodes_merging_concurrently_never_lose_an_entry(
    make_vault_store: MakeStore, vault_prefix: str
) -> None:
    a, b = make_vault_store(), make_vault_store()
    key = await rotated_key(a, f"{vault_prefix}/db")

    async def node(store: VaultStore, name: str) -> None:
        for round_ in range(3):
            await asyncio.gather(
                *(store.merge_metadata(key, {f"baton.node.{name}-{i}": f"r{round_}"}) for i in range(15))
            )

    await asyncio.gather(node(a, "a"), node(b, "b"))
    meta = await a.read_metadata(key)
    nodes = {k: v for k, v in meta.items() if k.startswith("baton.node.")}
    assert len(nodes) == 30
    assert set(nodes.values()) == {"r2"}
    assert meta["baton.current"] == "1"  # the staging entries survive too


async def test_the_metadata_reporter_round_trips_reports_of_two_nodes(
    make_vault_store: MakeStore, vault_prefix: str
) -> None:
    a, b = make_vault_store(), make_vault_store()
    key = await rotated_key(a, f"{vault_prefix}/db")
    ra, rb = MetadataReporter(a), MetadataReporter(b)
    await asyncio.gather(ra.publish(key, report("n1")), rb.publish(key, report("n2")))
    got = sorted(await ra.collect(key, "db"), key=lambda r: r.node)
    assert got == [report("n1"), report("n2")]
    await rb.forget(key, "n1")
    assert [r.node for r in await ra.collect(key, "db")] == ["n2"]


async def test_merging_past_64_keys_raises_a_store_error_naming_status_path(
    vault_store: VaultStore, vault_prefix: str
) -> None:
    key = await rotated_key(vault_store, f"{vault_prefix}/db")
    have = len(await vault_store.read_metadata(key))
    room = MAX_METADATA_KEYS - have
    await vault_store.merge_metadata(key, {f"baton.node.n{i}": "x" for i in range(room)})
    assert len(await vault_store.read_metadata(key)) == MAX_METADATA_KEYS
    with pytest.raises(StoreError, match="status_path"):
        await vault_store.merge_metadata(key, {"baton.node.one-too-many": "x"})
    # Replacing an existing entry, or one in and one out, still fits.
    await vault_store.merge_metadata(key, {"baton.node.n0": "y"})
    await vault_store.merge_metadata(key, {"baton.node.n1": None, "baton.node.other": "z"})
    assert len(await vault_store.read_metadata(key)) == MAX_METADATA_KEYS


async def test_the_server_checks_only_a_patch_body_so_a_map_raced_past_64_keys_still_takes_updates(
    vault_store: VaultStore, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    # OpenBao validates the PATCH body, not the merged map: two nodes that each
    # checked 63 keys and added one leave 65 stored (the double refused that).
    key = await rotated_key(vault_store, f"{vault_prefix}/db")
    have = len(await vault_store.read_metadata(key))
    await vault_store._patch(key, {f"baton.node.n{i}": "x" for i in range(MAX_METADATA_KEYS - have)})
    other = make_vault_store()
    await other._patch(key, {"baton.node.raced": "x"})  # the second node's merge, checked before the first landed
    meta = await vault_store.read_metadata(key)
    assert len(meta) == MAX_METADATA_KEYS + 1 and meta["baton.node.raced"] == "x"
    # Over the limit: a new entry is refused naming status_path, and nothing is written...
    with pytest.raises(StoreError, match="status_path"):
        await vault_store.merge_metadata(key, {"baton.node.new": "x"})
    assert "baton.node.new" not in await vault_store.read_metadata(key)
    # ...but the nodes already there keep heart-beating, and removals shrink the map.
    await vault_store.merge_metadata(key, {"baton.node.n0": "y"})
    await vault_store.merge_metadata(key, {"baton.node.raced": None})
    meta = await vault_store.read_metadata(key)
    assert meta["baton.node.n0"] == "y" and len(meta) == MAX_METADATA_KEYS
    # A whole body over the limit is still refused by the server itself.
    with pytest.raises(StoreError, match="status_path"):
        await vault_store._patch(key, {f"baton.node.m{i}": "x" for i in range(MAX_METADATA_KEYS + 1)})


async def test_a_metadata_value_over_512_bytes_is_refused_with_advice(
    vault_store: VaultStore, vault_prefix: str
) -> None:
    key = await rotated_key(vault_store, f"{vault_prefix}/db")
    with pytest.raises(StoreError, match="512"):
        await vault_store.merge_metadata(key, {"baton.node.big": "x" * 513})


async def test_the_status_path_reporter_round_trips_many_nodes(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    key = "app/db"
    # More nodes than custom_metadata could ever hold.
    nodes = [f"node-{i:03d}" for i in range(70)]
    await asyncio.gather(*(reporter.publish(key, report(n)) for n in nodes))
    await reporter.publish("app/other", report("node-000", credential="other"))
    await reporter.publish(key, report("node-001", current="2", beat=2.0))

    got = {r.node: r for r in await reporter.collect(key, "db")}
    assert sorted(got) == nodes
    assert got["node-001"] == report("node-001", current="2", beat=2.0)
    assert [r.credential for r in await reporter.collect("app/other", "other")] == ["other"]

    await reporter.forget(key, "node-005")
    assert "node-005" not in {r.node for r in await reporter.collect(key, "db")}

    # A reporter that never saw the key (a restarted rotator) finds the entry by its key.
    fresh = VaultStatusReporter(store, parse=NodeReport.from_json)
    await fresh.forget(key, "node-006")
    left = {r.node for r in await fresh.collect(key, "db")}
    assert "node-006" not in left and len(left) == 68
    assert [r.node for r in await fresh.collect("app/other", "other")] == ["node-000"]


async def test_status_path_entries_keep_at_most_two_versions(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    for beat in range(5):
        await reporter.publish("app/db", report("n1", beat=float(beat)))
    versions = await store.versions(f"{vault_prefix}/status/db/n1")
    assert len([v for v in versions if not v.retired]) <= 2
    assert [r.heartbeat for r in await reporter.collect("app/db", "db")] == [4.0]


async def test_collect_lists_once_and_reads_each_entry_once(
    vault_server: VaultTarget, vault_faults: ThreadedFaultProxy, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    nodes = [f"node-{i:03d}" for i in range(40)]
    await asyncio.gather(*(reporter.publish("app/db", report(n)) for n in nodes))
    before = vault_faults.counts()
    assert sorted(r.node for r in await reporter.collect("app/db", "db")) == nodes
    spent = {k: n - before.get(k, 0) for k, n in vault_faults.counts().items() if n != before.get(k, 0)}
    assert spent == {("LIST", "metadata"): 1, ("GET", "data"): 40}


async def test_collect_nodes_reads_just_those_entries_and_leaves_out_missing_ones(
    vault_server: VaultTarget, vault_faults: ThreadedFaultProxy, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    await asyncio.gather(*(reporter.publish("app/db", report(f"node-{i:03d}")) for i in range(40)))
    await reporter.publish("app/db", report("node-007", current="2", beat=2.0))
    before = vault_faults.counts()
    got = await reporter.collect_nodes("app/db", "db", ["node-007", "node-031", "never-reported"])
    assert sorted(got, key=lambda r: r.node) == [report("node-007", current="2", beat=2.0), report("node-031")]
    spent = {k: n - before.get(k, 0) for k, n in vault_faults.counts().items() if n != before.get(k, 0)}
    assert spent == {("GET", "data"): 3}  # no LIST, one read per node asked for
    with pytest.raises(StoreError, match="bad node name"):
        await reporter.collect_nodes("app/db", "db", ["../escape"])


async def test_collect_of_a_credential_nobody_reported_is_empty(make_vault_store: MakeStore, vault_prefix: str) -> None:
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    assert await reporter.collect("app/db", "db") == []


async def test_a_node_name_with_a_slash_is_refused(make_vault_store: MakeStore, vault_prefix: str) -> None:
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    with pytest.raises(StoreError):
        await reporter.publish("app/db", report("../other"))


async def test_open_reporter_picks_the_status_path_reporter_for_vault(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    config = parse_config(
        {
            "store": {
                "kind": "vault",
                "url": vault_server.url,
                "reports": "status_path",
                "status_prefix": f"{vault_prefix}/status",
            },
            "credentials": [{"name": "db", "key": "app/db", "output": {"dir": "/tmp/baton-test-x"}}],
        }
    )
    store = make_vault_store()
    reporter = open_reporter(config, store)
    assert isinstance(reporter, VaultStatusReporter)
    await reporter.publish("app/db", report("n1"))
    assert await reporter.collect("app/db", "db") == [report("n1")]
    assert [k for k in await store.client.list(f"{vault_prefix}/status/db")] == ["n1"]


async def test_an_unreadable_status_entry_stands_as_a_stale_report_of_its_node_and_blocks_the_gate(
    make_vault_store: MakeStore, vault_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    now = time.time()
    good = NodeReport(node="n1", credential="db", current="2", heartbeat=now)  # would let "1" go on its own
    await reporter.publish("app/db", good)
    newer_agent = json.loads(replace(good, node="n2").to_json()) | {"added_by_a_newer_agent": True}
    folder = f"{vault_prefix}/status/db"
    await store._write(f"{folder}/n2", {"report": json.dumps(newer_agent), "key": "app/db"}, cas=None)
    await store._write(f"{folder}/n3", {"report": '{"node": "n3", "credential": "db"', "key": "app/db"}, cas=None)
    await store._write(f"{folder}/n4", {"key": "app/db"}, cas=None)  # no report field
    await store._write(f"{folder}/n5", {"report": replace(good, credential="x").to_json()}, cas=None)
    # Filed under n6, speaking for n1 with a newer heartbeat: it must not hide n1's own report.
    spoof = replace(good, current="3", heartbeat=now + 5).to_json()
    await store._write(f"{folder}/n6", {"report": spoof, "key": "app/db"}, cas=None)

    got = {r.node: r for r in await reporter.collect("app/db", "db")}
    assert sorted(got) == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert got["n1"] == good and got["n2"] == replace(good, node="n2")
    assert decide(old="1", new="2", reports=[good, got["n2"]], known={"n1", "n2"}, now=now, ttl=60).retire
    for node in ("n3", "n4", "n5", "n6"):
        assert got[node] == NodeReport(node=node, credential="db", current=None), node
    decision = decide(old="1", new="2", reports=list(got.values()), known=set(got), now=now, ttl=60)
    assert not decision.retire
    for node in ("n3", "n4", "n5", "n6"):
        assert any(r.startswith(f"{node}: report is stale") for r in decision.reasons), (node, decision.reasons)
    assert len([r for r in caplog.records if r.getMessage() == "unreadable node report"]) == 4
    # forget still finds the unreadable entry (by its recorded key) and removes it: then it is gone.
    await VaultStatusReporter(store, parse=NodeReport.from_json).forget("app/db", "n3")
    assert "n3" not in {r.node for r in await reporter.collect("app/db", "db")}


async def test_rotation_and_status_path_reports_work_on_a_mount_that_requires_check_and_set(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    # A hardened mount: every data write must carry cas (OpenBao answers 400 "check-and-set
    # parameter required" otherwise). Node reports are written without one: the client reads
    # the entry's current version and writes at it.
    c = vault_server.client()
    try:
        c.adapter.post(f"/v1/{vault_server.mount}/config", json={"cas_required": True})
        with pytest.raises(hvac.exceptions.InvalidRequest):  # the server really enforces it
            c.secrets.kv.v2.create_or_update_secret(path="x", secret={"v": "1"}, mount_point=vault_server.mount)
    finally:
        c.adapter.close()
    store = make_vault_store(status_prefix=f"{vault_prefix}/status")
    key = await rotated_key(store, f"{vault_prefix}/db")
    await store.promote(key, (await store.create(key, Secret("v2"))).id)
    assert (await store.read(key)).payload.reveal() == "v2"
    reporter = VaultStatusReporter(store, parse=NodeReport.from_json)
    for beat in (1.0, 2.0, 3.0):  # a new entry, then versions of it
        await reporter.publish(key, report("n1", beat=beat))
    await reporter.publish(key, report("n2"))
    got = {r.node: r for r in await reporter.collect(key, "db")}
    assert got == {"n1": report("n1", beat=3.0), "n2": report("n2")}
