"""A command provider for the tests: ``python command_steps.py <mode> <step>``, JSON on stdin and stdout.

Modes: ``ok`` (a password in a state file: create mints ``{"id", "password"}``,
apply records it valid, retire invalid, sessions from a ``using`` file);
``pause`` (like ok, but at the step named by PAUSE_STEP it writes its pid into
the FIFO PAUSE_FIFO and waits until the test writes a line back into it);
``hang`` (starts a grandchild in its process group, writes its pid to
GRANDCHILD_FILE, then sleeps); ``exit3`` (fails with an ``error`` quoting
every secret it was given); ``nonjson`` (prints the secret it was given, raw);
``flood`` (prints 1 MiB); ``deep`` (JSON nested deeper than the parser's stack);
``stderr`` (prints the secret on stderr, then works). With
FAIL_TEST_FROM=N, ``ok`` fails ``test`` of pw-N and later, quoting the secret.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def values(msg: dict[str, Any]) -> list[str]:
    found = []
    for k in ("current", "new", "old"):
        if isinstance(msg.get(k), dict):
            found += [str(v) for v in msg[k].values()]
    return found


def ok(step: str, msg: dict[str, Any]) -> dict[str, Any]:
    state = Path(os.environ["STATE_DIR"])
    valid = state / "valid.json"
    live = json.loads(valid.read_text()) if valid.exists() else {}
    if step == "create":
        n = len(list(state.glob("minted-*"))) + 1
        (state / f"minted-{n}").touch()
        return {"payload": {"id": f"pw-{n}", "password": secrets.token_urlsafe(24)}}
    if step == "apply":
        live[msg["new"]["id"]] = msg["new"]["password"]
    elif step == "test":
        if live.get(msg["new"]["id"]) != msg["new"]["password"]:
            print(json.dumps({"error": f"{msg['new']['id']} is not valid"}))
            sys.exit(1)
    elif step == "retire":
        live.pop(msg["old"]["id"], None)
    elif step == "sessions":
        using = state / "using"
        held = using.read_text().split() if using.exists() else []
        return {"sessions": [{"principal": i, "client": "test", "count": 1} for i in held if i == msg["old"]["id"]]}
    valid.write_text(json.dumps(live))
    return {}


def main() -> int:
    mode, step = sys.argv[1], sys.argv[2]
    msg = json.load(sys.stdin)
    if mode == "pause" and step == os.environ.get("PAUSE_STEP"):
        with open(os.environ["PAUSE_FIFO"], "w") as fifo:
            fifo.write(f"{os.getpid()}\n")
        with open(os.environ["PAUSE_FIFO"]) as fifo:
            fifo.readline()
    if mode == "hang":
        child = subprocess.Popen(["/bin/sleep", "300"])
        Path(os.environ["GRANDCHILD_FILE"]).write_text(str(child.pid))
        time.sleep(300)
    if mode == "exit3":
        print(json.dumps({"error": "refused: " + " ".join(values(msg))}))
        return 3
    if mode == "nonjson":
        print("not json: " + " ".join(values(msg)))
        return 0
    if mode == "flood":
        sys.stdout.write("x" * (1 << 20))
        return 0
    if mode == "deep":
        sys.stdout.write("[" * 50_000)
        return 0
    fail_from = os.environ.get("FAIL_TEST_FROM")
    if mode == "ok" and step == "test" and fail_from and int(msg["new"]["id"].split("-")[1]) >= int(fail_from):
        print(json.dumps({"error": "test refused: " + " ".join(values(msg))}))
        return 1
    if mode == "stderr":
        print("leaking " + " ".join(values(msg)), file=sys.stderr)
    print(json.dumps(ok(step, msg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
