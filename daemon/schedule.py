"""When a credential's next rotation is due: ``every``, or a cron expression with a window, jitter and
``not_during`` windows. Pure: no I/O, no clock of its own (callers pass ``now``).

Cron expressions are croniter's (5 fields or an ``@daily``-style name), read in one
IANA time zone, so "0 3 * * 1-5" is 03:00 on weekdays there, across DST changes.
A cron time opens a window of ``window`` seconds: a rotator that was down at 03:00
and is back by the window's end still rotates; after that, the next cron time.
Jitter delays each due time by a fraction of ``jitter`` that is fixed per
credential and due time (a hash, not a random draw), so every call, and a
restarted rotator, gives the same answer. A due time inside a ``not_during`` window
moves to that window's end (with cron, only while the cron window is still open).

It sits below ``config`` so that a schedule that cannot be parsed, or never fires, is
refused at load naming its field.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

# How far ahead "never fires" looks: this many cron times, or this many seconds.
LOOKAHEAD_FIRES = 1000
LOOKAHEAD_SECONDS = 5 * 366 * 86400.0
_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def check_cron(expr: str) -> str:
    """The expression, if croniter reads it as 5 fields (or a name such as ``@daily``); else ValueError."""
    text = " ".join(expr.split())
    if text.lower() in _MACROS:
        return text.lower()
    if len(text.split(" ")) != 5:
        raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), not {len(text.split())}")
    if not re.fullmatch(r"[0-9A-Za-z*/,\- ?LW#]+", text) or not croniter.is_valid(text):
        raise ValueError(f"{text[:60]!r} is not a cron expression")
    return text


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError if there is none of that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {name[:60]!r}") from e


@dataclass(frozen=True)
class Cron:
    """A cron expression in a time zone: the times it names."""

    expr: str
    tz: ZoneInfo

    def next_after(self, t: float) -> float | None:
        """The first time strictly after ``t``; None if there is none (croniter gives up, e.g. 30 February)."""
        try:
            return float(croniter(self.expr, datetime.fromtimestamp(t, self.tz)).get_next(float))
        except (CroniterError, ValueError, OverflowError):
            return None

    def last_at_or_before(self, t: float) -> float | None:
        """The latest time at or before ``t``; None if there is none."""
        nxt = self.next_after(t - 1.0)
        if nxt is not None and nxt <= t:
            return nxt
        try:
            return float(croniter(self.expr, datetime.fromtimestamp(t, self.tz)).get_prev(float))
        except (CroniterError, ValueError, OverflowError):
            return None


@dataclass(frozen=True)
class Blackout:
    """A ``not_during`` window: from each time ``start`` names, for ``duration`` seconds."""

    start: Cron
    duration: float

    def end_if_inside(self, t: float) -> float | None:
        """When the window that holds ``t`` ends; None if ``t`` is outside every window."""
        opened = self.start.last_at_or_before(t)
        if opened is not None and t < opened + self.duration:
            return opened + self.duration
        return None


@dataclass(frozen=True)
class Schedule:
    """One credential's rotation times. Exactly one of ``every`` and ``cron``."""

    name: str  # the credential: seeds its jitter
    every: float | None = None
    cron: Cron | None = None
    window: float = 3600.0
    jitter: float = 0.0
    not_during: Sequence[Blackout] = field(default_factory=tuple)

    def due(self, *, last: float, now: float) -> float:
        """When the rotation after one at ``last`` is due (may be before ``now``: due at once)."""
        if self.cron is None:
            assert self.every is not None
            clear = self._clear(self._jittered(last + self.every), limit=None)
            return float("inf") if clear is None else clear
        after = max(last, now - self.window)  # a cron time whose window has passed is missed
        for _ in range(LOOKAHEAD_FIRES):
            fire = self.cron.next_after(after)
            if fire is None:
                break
            at = self._clear(self._jittered(fire), limit=fire + self.window)
            if at is not None:
                return at
            after = fire
        return float("inf")  # never (refused at load: see ``never_fires``)

    def retry_at(self, now: float) -> float:
        """After a failed or postponed rotation, when to try again: the next interval, or the next cron time."""
        if self.cron is None:
            assert self.every is not None
            return now + self.every
        return self.due(last=now, now=now)

    def never_fires(self, now: float) -> tuple[str, str] | None:
        """The field at fault and why, when this schedule would never start a rotation from ``now`` on."""
        if self.cron is not None:
            if self.cron.next_after(now) is None:
                return "cron", "the schedule never fires: the expression names no time that comes (30 February?)"
            if self.jitter >= self.window:
                return "jitter", f"must be shorter than window ({self.jitter:g}s is not under {self.window:g}s)"
        due = self.due(last=now, now=now)
        if due == float("inf") or due - now > LOOKAHEAD_SECONDS:
            return "not_during", "the schedule never fires: these windows cover every time it names"
        return None

    def describe(self) -> str:
        """One line for ``baton status``: ``every 1h`` or ``cron 0 3 * * 1-5 (UTC), window 2h``, and the rest."""
        if self.cron is None:
            assert self.every is not None
            parts = [f"every {span(self.every)}"]
        else:
            parts = [f"cron {self.cron.expr} ({self.cron.tz.key}), window {span(self.window)}"]
        if self.jitter > 0:
            parts.append(f"jitter {span(self.jitter)}")
        if self.not_during:
            parts.append(f"not during {len(self.not_during)} window(s)")
        return ", ".join(parts)

    def _jittered(self, t: float) -> float:
        if self.jitter <= 0:
            return t
        digest = hashlib.sha256(f"{self.name}\0{t:.0f}".encode()).digest()
        return t + self.jitter * int.from_bytes(digest[:8], "big") / 2**64

    def _clear(self, t: float, *, limit: float | None) -> float | None:
        """``t``, or the end of the ``not_during`` windows that hold it; None once past ``limit``
        or when windows keep holding it (they cover every time)."""
        for _ in range(len(self.not_during) * 8 + 1):
            ends = [e for b in self.not_during if (e := b.end_if_inside(t)) is not None]
            if not ends:
                return t
            t = max(ends)
            if limit is not None and t >= limit:
                return None
        return None


def span(seconds: float) -> str:
    """``1h30m``, ``2h``, ``45s``: a duration as the config writes it."""
    s = round(seconds)
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            out += f"{s // size}{unit}"
            s %= size
    return out + (f"{s}s" if s or not out else "")
