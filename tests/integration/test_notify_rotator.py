"""A rotator's notifications: a hung webhook never delays a rotation, and no body holds a secret.

A real rotator on the local store and a real HTTP server on a free loopback
port (the hook of test_notify_webhook.py) that holds every request until the
test releases it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from daemon.config import parse_config
from daemon.rotation.service import Rotator
from daemon.stores.local import LocalStore
from tests.integration.test_notify_webhook import KEY, Hook, hook, until

pytestmark = pytest.mark.integration
__all__ = ["hook"]  # the fixture


async def test_a_hung_hook_never_delays_a_rotation_and_no_body_holds_a_secret(hook: Hook, tmp_path: Path) -> None:
    hook.hang = asyncio.Event()
    key = tmp_path / "hook.key"
    key.write_bytes(KEY)
    db = tmp_path / "store.db"
    config = parse_config(
        {
            "node_id": "n1",
            "store": {"kind": "local", "path": str(db)},
            "api": {"listen": "127.0.0.1:0"},
            "credentials": [
                {"name": "db", "key": "k", "output": {"dir": str(tmp_path / "out")}, "rotation": {"every": "1d"}}
            ],
            "notify": [
                {"kind": "webhook", "url": hook.url, "secret_file": str(key), "timeout": 30},
                {"kind": "webhook", "url": hook.url, "format": "slack", "events": ["rotated"]},
            ],
        }
    )
    rotator = Rotator(config, install_signals=False, serve_api=False)
    task = asyncio.create_task(rotator.serve())
    r = None
    try:
        r = await until(lambda: rotator.rotators["db"].last_outcome is not None and rotator.rotators["db"])
        await asyncio.wait_for(hook.arrived.wait(), 15)  # the first rotation's notice is held by the hook
        rotator.rotate_now.set()
        await until(lambda: r.last_outcome is not None and r.last_outcome.version == "2")
        assert not hook.hang.is_set()  # rotated while the hook still holds the first request
        hook.hang.set()
        await until(lambda: sum(json.loads(b).get("event") == "rotated" for b in hook.bodies) >= 2)
        await until(lambda: sum("text" in json.loads(b) for b in hook.bodies) >= 2)
    finally:
        hook.hang.set()
        rotator.should_exit.set()
        await task
    store = LocalStore(db, watch_files=False)
    try:
        secrets = [store.read_sync("k", v.id).payload.reveal() for v in store.versions_sync("k") if not v.retired]
    finally:
        store.close()
    assert secrets and all(len(s) >= 16 for s in secrets)
    everything = b"\n".join(hook.bodies) + json.dumps(hook.headers).encode()
    for s in secrets:
        assert s.encode() not in everything
    assert KEY not in everything
    assert b"secret-path" not in everything
