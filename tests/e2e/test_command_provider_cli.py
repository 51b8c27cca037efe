"""``baton rotator`` with a command provider whose test step fails quoting the secret, as a real process.

The first rotation works; the second one's ``test`` step exits 1 with an
``error`` that quotes the new password. The rotator must say the rotation
failed at step test, keep the first version current, and no byte of its output
or of ``baton status`` may carry either password.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from daemon.model import CURRENT, PENDING
from daemon.stores.local import LocalStore
from tests.e2e.helpers import BATON, baton, write_config

pytestmark = pytest.mark.e2e

STEPS = Path(__file__).resolve().parents[1] / "integration" / "command_steps.py"
KEY = "app/token"


async def test_a_failing_test_step_is_reported_by_step_and_no_password_reaches_any_output(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "baton.yaml",
        {
            "node_id": "rotator-e2e",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "api": {"listen": f"unix:{tmp_path}/api.sock"},
            "log": {"format": "json", "level": "debug"},
            "credentials": [
                {
                    "name": "token",
                    "key": KEY,
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {
                        "every": 1,
                        "provider": {
                            "kind": "command",
                            "command": [sys.executable, str(STEPS), "ok"],
                            "principal_field": "id",
                            "env": {"STATE_DIR": str(tmp_path), "FAIL_TEST_FROM": "2"},
                        },
                    },
                }
            ],
        },
    )
    proc = await asyncio.create_subprocess_exec(
        BATON,
        "rotator",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = bytearray()
    failed: dict[str, object] = {}
    try:
        assert proc.stdout is not None

        async def until_failed() -> None:
            assert proc.stdout is not None
            async for line in proc.stdout:
                output.extend(line)
                if b'"rotation_failed"' in line:
                    failed.update(json.loads(line))
                    return

        await asyncio.wait_for(until_failed(), 90)
        status = await asyncio.to_thread(baton, "status", "--config", str(config))  # asks the running rotator
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        output.extend(rest)
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]

    assert failed["step"] == "test"
    assert str(failed["error"]).startswith("command step test: failed (exit 1): test refused: pw-2 ***")
    store = LocalStore(tmp_path / "store.db", watch_files=False)
    try:
        versions = await store.versions(KEY)
        assert [(v.id, CURRENT in v.stages, PENDING in v.stages) for v in versions] == [
            ("1", True, False),
            ("2", False, True),
        ]
        passwords = [json.loads((await store.read(KEY, v.id)).payload.reveal())["password"] for v in versions]
    finally:
        await store.aclose()
    assert status.code == 0 and "token" in status.out, status.err
    shown = output.decode(errors="replace") + status.out + status.err
    for password in passwords:
        assert password not in shown
