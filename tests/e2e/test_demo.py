"""``baton demo --json`` end to end: the real CLI, three real consumers, three rotations, in under a minute.

The demo checks itself (every consumer request is checked against the
store's non-retired versions); this test checks the demo's own verdict, its
exit status, its time budget, and that it cleans up its temp dir on success.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import BATON

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUDGET = 60.0


def test_demo_json_rotates_three_times_retires_three_versions_without_a_consumer_error_in_under_a_minute(
    tmp_path: Path,
) -> None:
    # A private TMPDIR: the demo's temp dir lands here, so the test can tell it was removed.
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.run(
        [BATON, "demo", "--json"],
        capture_output=True,
        timeout=BUDGET + 30,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    out = proc.stdout.decode()
    err = proc.stderr.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-4000:]}"
    assert took < BUDGET, f"the demo took {took:.1f}s"

    lines = [line for line in out.splitlines() if line.strip()]
    # --json: the JSON result is the only thing on stdout; progress goes to stderr.
    assert len(lines) == 1, out
    result = json.loads(lines[-1])
    assert result["rotations"] == 3
    assert result["consumer_errors"] == 0
    assert result["retired"] == 3
    assert isinstance(result["max_drain_seconds"], int | float)
    assert not isinstance(result["max_drain_seconds"], bool)
    assert 0 <= result["max_drain_seconds"] < BUDGET
    assert result["completed"] is True
    # Each consumer kind was really exercised: requests served, the holder reopened, the at-start one restarted.
    assert result["requests"] > 0
    assert result["reopens_of_hold"] >= 3
    assert result["restarts_of_once"] >= 3

    assert "rotations 3/3" in err
    leftovers = [p.name for p in Path(tmp_path).iterdir() if p.name.startswith("baton-demo-")]
    assert leftovers == [], f"the demo left its temp dir behind: {leftovers}"


def test_demo_prints_no_generated_password_on_stdout_or_stderr(tmp_path: Path) -> None:
    # The demo's passwords are 32-char alnum (token_urlsafe for the first); --keep leaves the store to read them.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [BATON, "demo", "--json", "--rotations", "1", "--keep"],
        capture_output=True,
        timeout=BUDGET + 30,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    (root,) = [p for p in Path(tmp_path).iterdir() if p.name.startswith("baton-demo-")]
    conn = sqlite3.connect(root / "store.db")
    try:
        # Retired versions have their payload erased; the current one (and any still kept) remain.
        values = [r[0] for r in conn.execute("SELECT payload FROM versions WHERE payload IS NOT NULL")]
    finally:
        conn.close()
    assert values, "the store holds no payload to search for"
    said = proc.stdout.decode() + proc.stderr.decode() + (root / "baton.log").read_text()
    assert "rotated" in said  # the log really holds the rotation events
    assert not [v for v in values if v in said], "a secret value appears in the demo's output or log"
