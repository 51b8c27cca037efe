#!/usr/bin/python3
"""A credential consumer for the systemd tests, run as its own unit and user.

Opens its credential at start (a missing file ends it with status 1: the unit
fails), holds it open and reads it every 0.2 s through the held fd and through
the stable path, as a client of a database would. With "hup" it re-opens the
file on SIGHUP. Its state file says which version it holds (the path the fd
points at, which names the version, never the value) and how many reads worked.
"""

import json
import os
import signal
import sys
import time

path, state_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
held = open(path)  # noqa: SIM115 - held open on purpose
stats = {
    "pid": os.getpid(),
    "started": time.time(),
    "version": os.readlink(f"/proc/self/fd/{held.fileno()}"),
    "reads": 0,
    "errors": 0,
    "reopens": 0,
    "reopened_at": None,
}
reopen = False


def on_hup(_signum, _frame):
    global reopen
    reopen = mode == "hup"


signal.signal(signal.SIGHUP, on_hup)
while True:
    if reopen:
        reopen = False
        held.close()
        held = open(path)  # noqa: SIM115
        stats.update(
            reopens=stats["reopens"] + 1,
            version=os.readlink(f"/proc/self/fd/{held.fileno()}"),
            reopened_at=time.time(),
        )
    try:
        held.seek(0)
        with open(path) as fresh:
            if not held.read() or not fresh.read():
                raise ValueError("empty credential")
        stats["reads"] += 1
    except (OSError, ValueError):
        stats["errors"] += 1
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, state_path)
    time.sleep(0.2)
