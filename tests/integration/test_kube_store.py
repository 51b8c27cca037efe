"""KubernetesStore against the apiserver double (or a real cluster when KUBECONFIG is set)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client, config

from daemon.config import parse_config
from daemon.errors import StoreAuthError, StoreConflict, StoreNotFound, StoreUnavailable
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, VersionInfo
from daemon.report.base import NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.stores.kubernetes import KubernetesStore, version_of
from tests.fixtures.kube import KubeApi

pytestmark = pytest.mark.integration

TEST_SECRET = "s3cr3t-value-that-must-never-leak-7f1c"


@pytest.fixture
async def store(kube_api: KubeApi) -> AsyncIterator[KubernetesStore]:
    s = KubernetesStore(
        namespace=kube_api.namespace, kubeconfig=kube_api.kubeconfig, backoff=(0.02, 0.2), watch_timeout=30
    )
    yield s
    await s.aclose()


async def put_secret(kube_api: KubeApi, name: str, data: dict[str, str], **annotations: str) -> None:
    """Create or overwrite a Secret as an outside writer would (kubectl, another controller)."""
    body = {
        "metadata": {"name": name, "namespace": kube_api.namespace, "annotations": annotations},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
    async with await config.new_client_from_config(config_file=str(kube_api.kubeconfig)) as c:
        core = client.CoreV1Api(c)
        resp = await core.replace_namespaced_secret(name, kube_api.namespace, body, _preload_content=False)
        status = resp.status
        resp.release()
        if status == 404:
            resp = await core.create_namespaced_secret(kube_api.namespace, body, _preload_content=False)
            status = resp.status
            resp.release()
        assert status < 300, status


async def next_info(it: AsyncIterator[VersionInfo], timeout: float = 5.0) -> VersionInfo:
    return await asyncio.wait_for(anext(it), timeout)


async def test_read_returns_the_single_value_key_as_the_payload_and_a_content_hash_version(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": TEST_SECRET})
    got = await store.read(name)
    assert got.payload.reveal() == TEST_SECRET
    assert got.id == version_of(TEST_SECRET)
    assert got.info.stages == {CURRENT}


async def test_a_secret_with_several_keys_reads_as_a_json_object_of_its_fields(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"username": "app", "password": TEST_SECRET})
    got = await store.read(name)
    assert got.payload.reveal() == '{"password":"' + TEST_SECRET + '","username":"app"}'


async def test_reading_a_missing_secret_raises_store_not_found(kube_api: KubeApi, store: KubernetesStore) -> None:
    with pytest.raises(StoreNotFound):
        await store.read(kube_api.name("absent"))


async def test_watch_yields_a_content_change_and_ignores_an_annotation_change(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "one"})
    async with contextlib.aclosing(store.watch(name)) as it:
        first = await next_info(it)
        assert first.id == version_of("one")
        await put_secret(kube_api, name, {"value": "one"}, note="annotation only")
        await store.merge_metadata(name, {"baton.node.n1": "{}"})
        await put_secret(kube_api, name, {"value": "two"})
        second = await next_info(it)
        # Had an annotation change been yielded, this would be "one" again.
        assert second.id == version_of("two")


async def test_watch_resumes_with_the_resource_version_after_the_stream_ends(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    double = kube_api.hooks()
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "one"})
    async with contextlib.aclosing(store.watch(name)) as it:
        assert (await next_info(it)).id == version_of("one")
        pending = asyncio.ensure_future(next_info(it))
        await double.until(lambda: len(double.watchers) == 1)
        double.end_watches()
        await double.until(lambda: len(double.watch_requests()) == 2)
        await put_secret(kube_api, name, {"value": "two"})
        assert (await pending).id == version_of("two")
    watches = double.watch_requests()
    assert len(watches) >= 2
    # The second stream resumed from a resourceVersion, not from scratch: no re-list happened.
    assert watches[1].query.get("resourceVersion") not in (None, "", "0")
    lists = [r for r in double.requests if r.method == "GET" and "watch" not in r.query and r.path.endswith("/secrets")]
    assert len(lists) == 1


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_watch_survives_a_forced_410_by_listing_again(
    kube_api: KubeApi, store: KubernetesStore, as_http: bool
) -> None:
    double = kube_api.hooks()
    double.watch_410_as_http = as_http
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "one"})
    async with contextlib.aclosing(store.watch(name)) as it:
        assert (await next_info(it)).id == version_of("one")
        pending = asyncio.ensure_future(next_info(it))
        await double.until(lambda: len(double.watchers) == 1)
        double.expire_watches()
        await put_secret(kube_api, name, {"value": "two"})
        assert (await pending).id == version_of("two")
    lists = [r for r in double.requests if r.method == "GET" and "watch" not in r.query and r.path.endswith("/secrets")]
    assert len(lists) == 2


async def test_watch_retries_with_backoff_through_server_errors(kube_api: KubeApi, store: KubernetesStore) -> None:
    double = kube_api.hooks()
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "one"})
    double.fail(503, times=3, method="GET", path="/secrets")
    async with contextlib.aclosing(store.watch(name)) as it:
        assert (await next_info(it)).id == version_of("one")
    assert double.faults[0].remaining == 0


async def test_errors_are_mapped_to_the_daemon_error_tree(kube_api: KubeApi, store: KubernetesStore) -> None:
    double = kube_api.hooks()
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": TEST_SECRET})
    double.fail(503)
    with pytest.raises(StoreUnavailable):
        await store.read(name)
    double.fail(403)
    with pytest.raises(StoreAuthError):
        await store.read(name)
    double.token = "rotated-elsewhere"
    with pytest.raises(StoreAuthError):
        await store.read(name)


async def test_an_unreachable_apiserver_is_store_unavailable(kube_api: KubeApi, store: KubernetesStore) -> None:
    double = kube_api.hooks()
    await double.close()
    with pytest.raises(StoreUnavailable):
        await store.read("db")


async def test_rotator_create_promote_retire_uses_the_companion_secrets(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "old"})
    created = await store.create(name, Secret("new"))
    assert created.stages == {PENDING}
    assert created == await store.create(name, Secret("new"))  # idempotent
    assert (await store.read(name, created.id)).payload.reveal() == "new"
    assert [(v.id, v.stages) for v in await store.versions(name)] == [
        (version_of("old"), {CURRENT}),
        (version_of("new"), {PENDING}),
    ]
    await store.promote(name, created.id)
    await store.promote(name, created.id)  # idempotent
    assert (await store.read(name)).payload.reveal() == "new"
    assert [(v.id, v.stages) for v in await store.versions(name)] == [
        (version_of("old"), {PREVIOUS}),
        (version_of("new"), {CURRENT}),
    ]
    assert (await store.read(name, version_of("old"))).payload.reveal() == "old"
    with pytest.raises(StoreConflict):
        await store.retire(name, created.id)  # the current version is never retired
    await store.retire(name, version_of("old"))
    await store.retire(name, version_of("old"))  # idempotent
    with pytest.raises(StoreNotFound):
        await store.read(name, version_of("old"))
    old = (await store.versions(name))[0]
    assert (old.id, old.retired) == (version_of("old"), True)


async def test_promote_loses_a_race_with_a_concurrent_writer_as_store_conflict(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    double = kube_api.hooks()
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "old"})
    created = await store.create(name, Secret("new"))
    # Another writer changes the Secret between promote's read and its write.
    original_replace = store._replace

    async def racing_replace(obj: dict[str, object]) -> dict[str, object]:
        if obj["metadata"]["name"] == name:  # type: ignore[index]
            await put_secret(kube_api, name, {"value": "someone-else"})
        return await original_replace(obj)  # type: ignore[arg-type]

    store._replace = racing_replace  # type: ignore[method-assign]
    with pytest.raises(StoreConflict):
        await store.promote(name, created.id)
    store._replace = original_replace  # type: ignore[method-assign]
    assert (await store.read(name)).payload.reveal() == "someone-else"
    puts = [r for r in double.requests if r.method == "PUT" and r.path.endswith(f"/{name}")]
    assert puts, "promote must have tried a conditional PUT"
    # Retrying the step succeeds against the new state.
    await store.promote(name, created.id)
    assert (await store.read(name)).payload.reveal() == "new"


async def test_two_nodes_annotation_patches_never_lose_each_other(kube_api: KubeApi, store: KubernetesStore) -> None:
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "v"})
    seen = len(kube_api.double.requests) if kube_api.double is not None else 0
    other = KubernetesStore(namespace=kube_api.namespace, kubeconfig=kube_api.kubeconfig)
    try:
        await asyncio.gather(
            *(
                s.merge_metadata(name, {f"baton.node.n{i}": f"r{i}"})
                for i, s in zip(range(20), [store, other] * 10, strict=True)
            )
        )
        meta = await store.read_metadata(name)
        assert {k: v for k, v in meta.items() if k.startswith("baton.node.")} == {
            f"baton.node.n{i}": f"r{i}" for i in range(20)
        }
        await other.merge_metadata(name, {"baton.node.n3": None})
        assert "baton.node.n3" not in await store.read_metadata(name)
    finally:
        await other.aclose()
    if kube_api.double is not None:
        ours = kube_api.double.requests[seen:]
        assert {r.content_type for r in ours if r.method == "PATCH"} == {"application/merge-patch+json"}
        assert not [r for r in ours if r.method == "PUT"], "annotations are never read-modify-written"


async def test_metadata_reporter_round_trips_node_reports_through_annotations(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": "v"})
    reporter = MetadataReporter(store)
    long_node = "node-" + "x" * 80  # longer than an annotation name part may be
    for node in ("n1", long_node):
        await reporter.publish(name, NodeReport(node=node, credential="db", current="abc", heartbeat=1.0))
    assert sorted(r.node for r in await reporter.collect(name, "db")) == sorted(["n1", long_node])
    await reporter.forget(name, long_node)
    assert [r.node for r in await reporter.collect(name, "db")] == ["n1"]


async def test_from_config_reads_namespace_and_kubeconfig(kube_api: KubeApi) -> None:
    cfg = parse_config(
        {
            "store": {"kind": "kubernetes", "namespace": kube_api.namespace, "kubeconfig": str(kube_api.kubeconfig)},
            "credentials": [{"name": "db", "key": "db", "output": {"dir": "/tmp/x"}}],
        }
    )
    s = KubernetesStore.from_config(cfg)
    try:
        name = kube_api.name("db")
        await put_secret(kube_api, name, {"value": "v"})
        assert (await s.read(name)).payload.reveal() == "v"
    finally:
        await s.aclose()


async def test_the_secret_value_never_appears_in_logs_or_exceptions(
    kube_api: KubeApi, store: KubernetesStore, caplog: pytest.LogCaptureFixture
) -> None:
    double = kube_api.hooks()
    caplog.set_level(logging.DEBUG)
    name = kube_api.name("db")
    await put_secret(kube_api, name, {"value": TEST_SECRET})
    errors: list[BaseException] = []
    assert (await store.read(name)).payload.reveal() == TEST_SECRET
    await store.create(name, Secret(TEST_SECRET + "-next"))
    for status in (500, 409, 403, 404, 422):
        double.fail(status, method="PUT")
        try:
            await store.promote(name, version_of(TEST_SECRET + "-next"))
        except Exception as e:
            errors.append(e)
    async with contextlib.aclosing(store.watch(name)) as it:
        double.fail(503, method="GET")
        await next_info(it)
    assert len(errors) == 5
    for e in errors:
        chain: BaseException | None = e
        while chain is not None:
            assert TEST_SECRET not in str(chain) and TEST_SECRET not in repr(chain)
            assert base64.b64encode(TEST_SECRET.encode()).decode()[:20] not in str(chain)
            chain = chain.__cause__ or chain.__context__
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert caplog.records, "debug logging was captured"
    assert TEST_SECRET not in text
    assert base64.b64encode(TEST_SECRET.encode()).decode()[:20] not in text
