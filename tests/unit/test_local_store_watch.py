"""The local store's watches share one watcher task, and an idle watch costs nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.model import Secret
from daemon.stores.local import LocalStore


async def test_many_watches_started_together_share_one_watcher_and_all_see_a_put_from_another_connection(
    tmp_path: Path,
) -> None:
    db = tmp_path / "store.db"
    writer = LocalStore(db, watch_files=False)
    for i in range(20):
        writer.put_sync(f"k{i}", Secret(f"v{i}"))
    store = LocalStore(db)
    seen: dict[str, list[str]] = {f"k{i}": [] for i in range(20)}
    both = asyncio.Event()

    async def follow(key: str) -> None:
        async for info in store.watch(key):
            seen[key].append(info.id)
            if all(len(v) >= 1 for v in seen.values()) and len(seen["k7"]) == 2:
                both.set()

    tasks = [asyncio.create_task(follow(k)) for k in seen]
    try:
        await asyncio.wait_for(_until(lambda: all(seen.values())), 5)
        watchers = [t for t in asyncio.all_tasks() if t.get_name() == "local-store-watch"]
        assert len(watchers) == 1
        await asyncio.to_thread(writer.put_sync, "k7", Secret("new"))
        await asyncio.wait_for(both.wait(), 2)
        assert seen["k7"] == ["1", "2"]
        assert all(v == ["1"] for k, v in seen.items() if k != "k7")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.aclose()
        writer.close()


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    while not cond():
        await asyncio.sleep(0.01)
