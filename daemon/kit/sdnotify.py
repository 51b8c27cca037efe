"""sd_notify(3), written directly: tell systemd we are ready, alive, reloading, stopping.

Owns the datagrams sent to ``$NOTIFY_SOCKET`` (a file system path, or an
abstract socket written ``@name``) and the reading of ``$WATCHDOG_USEC`` /
``$WATCHDOG_PID``. Every function is a no-op returning ``False`` when
``NOTIFY_SOCKET`` is unset (not started by systemd, or in a container).

It must never raise into the daemon (a lost notification is logged, never
fatal), never block the event loop (the socket is non-blocking: a full
receive queue drops the datagram rather than wait), and never send a secret:
callers put names, counts and version ids in ``STATUS=``, nothing else.

Wiring in the daemon (see docs/install.md, "systemd"):

- ``ready()`` once every required credential is written (what ``/readyz`` means);
  with ``status("...")`` lines on each state change.
- ``reloading()`` on SIGHUP before re-reading the config, ``ready()`` after.
- ``watchdog_interval()``: when not ``None``, a supervised task runs
  ``await watchdog_loop()``, pinging at half the interval.
- ``stopping()`` first thing on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

logger = logging.getLogger(__name__)

_ENV_SOCKET = "NOTIFY_SOCKET"


def _address(raw: str) -> str | bytes:
    # '@' marks a Linux abstract socket: its name starts with a NUL byte and
    # has no file; the rest of the name is used as given, without a trailing NUL.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def _format(fields: dict[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"bad sd_notify field name {key!r}")
        text = str(value)
        if "\n" in text:
            # One field per line is the protocol; a newline would forge another field.
            raise ValueError(f"sd_notify field {key} must not contain a newline")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def notify(**fields: object) -> bool:
    """Send ``KEY=value`` lines in one datagram; ``True`` when it was sent.

    ``notify(READY=1, STATUS="3 credentials written")``. Field names are
    upper case (the protocol's); values are turned into text and must not
    contain a newline (``ValueError``: that is a bug in the caller).
    """
    payload = _format(fields)
    raw = os.environ.get(_ENV_SOCKET)
    if not raw:
        return False
    if not (raw.startswith("/") or raw.startswith("@")):
        logger.warning("NOTIFY_SOCKET is neither a path nor an abstract name; not notifying")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(payload, _address(raw))
    except OSError as e:
        # systemd gone, socket full or replaced: the daemon goes on; systemd's own
        # timeouts (TimeoutStartSec, WatchdogSec) are what acts on a missed message.
        logger.warning("sd_notify failed: %s", e.strerror or type(e).__name__)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """``READY=1``: startup (or a reload) finished; systemd starts dependent units now."""
    if status_text is None:
        return notify(READY=1)
    return notify(READY=1, STATUS=_one_line(status_text))


def status(text: str) -> bool:
    """``STATUS=``: one line shown by ``systemctl status``; newlines become spaces."""
    return notify(STATUS=_one_line(text))


def reloading() -> bool:
    """``RELOADING=1``: the daemon re-reads its config; follow with ``ready()``.

    ``MONOTONIC_USEC`` is what systemd 253+ (Type=notify-reload) expects with it;
    older versions ignore the extra field.
    """
    return notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


def stopping() -> bool:
    """``STOPPING=1``: shutdown has begun; systemd stops waiting for READY and the watchdog."""
    return notify(STOPPING=1)


def watchdog() -> bool:
    """``WATCHDOG=1``: a keep-alive ping; systemd restarts the unit when they stop."""
    return notify(WATCHDOG=1)


def watchdog_interval() -> float | None:
    """Seconds between the watchdog deadlines systemd enforces, or ``None`` when off.

    ``None`` when ``WATCHDOG_USEC`` is unset, not a positive integer, or when
    ``WATCHDOG_PID`` names another process (the variable was inherited by a
    child that systemd does not watch).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000


async def watchdog_loop(interval: float | None = None) -> None:
    """Ping the watchdog every half interval until cancelled; return at once when off.

    A ping from a task on the event loop proves the loop still turns; a loop
    blocked for longer than ``WatchdogSec`` gets the daemon restarted, which is
    the point.
    """
    period = watchdog_interval() if interval is None else interval
    if period is None:
        return
    while True:
        watchdog()
        await asyncio.sleep(period / 2)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
