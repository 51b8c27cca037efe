"""Find the processes of a declared consumer: pidfile, cmdline regex, exe, systemd unit.

Blocking (reads /proc); call it in a thread. Returns pids sorted, so that a
rolling reload visits them in a stable order.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
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


_CLK_TCK = os.sysconf("SC_CLK_TCK")
# process_start() is good to a tick and the /proc/uptime resolution (10 ms
# each): callers deciding "started before or after a swap" allow this much.
START_SLACK = 0.05


def process_start(pid: int) -> float | None:
    """Wall time ``pid`` started, to about 10 ms.

    psutil's create_time adds the start tick to a boot time rounded to the
    second, so it can be off by up to a second: too coarse to tell whether a
    process started before or after a version was swapped in. Here the start
    tick is set against /proc/uptime, read at the same moment as the clock.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        now = time.time()
        start_ticks = int(stat.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    return now - uptime + start_ticks / _CLK_TCK


def unit_of(pid: int) -> str | None:
    """The systemd unit whose cgroup holds ``pid`` (``api.service``), if any."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return unit_from_cgroup(text)


def unit_from_cgroup(text: str) -> str | None:
    """The innermost ``.service``/``.scope`` in a /proc/<pid>/cgroup text (v1 or v2)."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            if part.endswith((".service", ".scope")):
                return part
    return None


def find_processes(match: MatchConfig) -> list[int]:
    """Pids of the processes that ``match`` selects (never Baton itself): the ones a reload goes to."""
    return match_all({"_": match}, children=False)["_"]


def match_all(matches: Mapping[str, MatchConfig], *, children: bool = True) -> dict[str, list[int]]:
    """Pids per name for many matches, in one pass over the process table; with ``children``, the
    descendants of a match that asks for them (``match.children``: the holders of a server's versions)."""
    out = _match_all(matches)
    if children:
        for name, match in matches.items():
            if match.children and out[name]:
                out[name] = sorted(set(out[name]) | _descendants(out[name]))
    return out


def _descendants(pids: list[int]) -> set[int]:
    found: set[int] = set()
    for pid in pids:
        try:
            found.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    found.discard(_SELF)
    return found


def _match_all(matches: Mapping[str, MatchConfig]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {name: [] for name in matches}
    scanning = {}
    for name, match in matches.items():
        if match.pidfile is not None:
            out[name] = _pidfile(match.pidfile)
        else:
            pattern = re.compile(match.cmdline) if match.cmdline is not None else None
            exe = os.path.realpath(match.exe) if match.exe is not None else None
            scanning[name] = (pattern, exe, match.systemd_unit)
    if not scanning:
        return out
    attrs = ["pid", "cmdline", "exe"]
    for proc in psutil.process_iter(attrs):
        pid = proc.info["pid"]
        if pid == _SELF:
            continue
        unit: str | bool | None = False  # read the cgroup only when some match asks
        for name, (pattern, exe, want_unit) in scanning.items():
            if pattern is not None:
                cmd = " ".join(proc.info["cmdline"] or [])
                hit = bool(cmd) and pattern.search(cmd) is not None
            elif exe is not None:
                hit = bool(proc.info["exe"]) and os.path.realpath(proc.info["exe"]) == exe
            else:
                if unit is False:
                    unit = unit_of(pid)
                hit = unit == want_unit
            if hit:
                out[name].append(pid)
    return {name: sorted(pids) for name, pids in out.items()}
