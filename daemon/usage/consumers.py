"""Find the processes of a declared consumer: pidfile, cmdline regex, exe, systemd unit.

Blocking (reads /proc); call it in a thread. Returns pids sorted, so that a
rolling reload visits them in a stable order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil

from daemon.config import MatchConfig

_SELF = os.getpid()


def _pidfile(path: Path) -> list[int]:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [pid] if psutil.pid_exists(pid) else []


def unit_of(pid: int) -> str | None:
    """The systemd unit whose cgroup holds ``pid`` (``api.service``), if any."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            if part.endswith((".service", ".scope")):
                return part
    return None


def find_processes(match: MatchConfig) -> list[int]:
    """Pids of the processes that ``match`` selects (never Baton itself)."""
    if match.pidfile is not None:
        return _pidfile(match.pidfile)
    pids: list[int] = []
    pattern = re.compile(match.cmdline) if match.cmdline is not None else None
    exe = os.path.realpath(match.exe) if match.exe is not None else None
    for proc in psutil.process_iter(["pid", "cmdline", "exe"]):
        pid = proc.info["pid"]
        if pid == _SELF:
            continue
        if pattern is not None:
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd and pattern.search(cmd):
                pids.append(pid)
        elif exe is not None:
            if proc.info["exe"] and os.path.realpath(proc.info["exe"]) == exe:
                pids.append(pid)
        elif match.systemd_unit is not None and unit_of(pid) == match.systemd_unit:
            pids.append(pid)
    return sorted(pids)
