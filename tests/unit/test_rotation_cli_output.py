"""What ``baton retire``, ``baton rotate --wait`` and ``baton status --pending`` print of node reports.

A node report may come from a hostile node: its node name, exe, consumer and the
gate's reasons quoting them must not carry control characters to the operator's
terminal (an escape sequence can clear the screen or fake a line).
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from typing import Any

from daemon.rotation import control, status

HOSTILE = "/usr/bin/app\x1b[2J\x1b]0;owned\x07\r\nfake: version 1 retired"


def _decision(version: str) -> dict[str, Any]:
    holder = {"pid": 42, "exe": HOSTILE, "consumer": "c\x1b[31m", "how": "fd", "version": version}
    return {
        "version": version,
        "retire": False,
        "reasons": [f"node n\x1b[1m holds it ({HOSTILE})"],
        "holders": {"n\x1b[1m": [holder, {**holder, "pid": 0}]},
        "sessions": [{"principal": "u\x1b[0m", "client": "x\r", "count": 1}],
    }


def _clean(text: str) -> None:
    assert not any(not c.isprintable() for c in text.replace("\n", "")), repr(text)
    assert "\nfake: version 1 retired" not in text


def test_baton_retire_lists_a_hostile_holder_without_its_control_characters() -> None:
    out = io.StringIO()
    control._list_holders("db", "1", {"pending": [_decision("1")]}, out)
    _clean(out.getvalue())
    assert "/usr/bin/app?[2J" in out.getvalue()


def test_baton_rotate_wait_progress_shows_a_hostile_holder_without_its_control_characters() -> None:
    line, still = control._progress("db", old="1", new="2", c={"nodes": {}, "pending": [_decision("1")]})
    _clean(line)
    _clean(still)


def test_baton_status_pending_shows_a_hostile_holder_without_its_control_characters() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        status._print_pending({"db": [_decision("1")]})
    _clean(out.getvalue())
