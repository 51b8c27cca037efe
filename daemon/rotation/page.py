"""The fleet page: the rotator's endpoint serves it at ``/`` (read-only HTML, no JavaScript).

One server-rendered page that refreshes itself (``<meta http-equiv=refresh>``):
each credential with its versions and stages, every node with its current
version and report age, each pending version with the gate's reasons and its
holders (node, pid, exe, consumer), the last events, and a timeline of the
last versions (inline SVG: a bar from each version's creation to its
retirement, or to now).

Everything it shows comes from the store's version list, the node reports,
the gate's last decisions and the rotator's own events: ids, names, pids,
times and counts. It never reads a payload, so it has no secret value to
show; a version's digest is not shown either. Node reports come from nodes
that may be hostile: every string is HTML-escaped (text and attributes) and
cut short, and the page carries no script (the endpoint sends a CSP that
allows none). ``api.ApiServer`` serves it to loopback peers (and a unix
socket) or with the bearer token. However many loads come in, what it shows is
gathered at most once per ``MIN_AGE`` (2 s), one gather at a time: a flood of
page loads cannot become a flood of store reads.
"""

from __future__ import annotations

import asyncio
import collections
import html
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon import __version__
from daemon.errors import BatonError
from daemon.kit.logs import listen
from daemon.model import VersionInfo
from daemon.report.base import NodeReport
from daemon.rotation.workflow import CredentialRotator

log = logging.getLogger(__name__)

REFRESH = 5  # seconds between the page's own reloads
MIN_AGE = 2.0  # a page younger than this is served again, not gathered again
MAX_EVENTS = 40
MAX_TEXT = 160
TIMELINE_VERSIONS = 8
# Events the page lists (the rotator's own; a node's come through its report).
SHOWN_EVENTS = frozenset(
    {
        "rotated",
        "rotation_failed",
        "rotation_postponed",
        "rotation_resumed",
        "rotation_blocked",
        "retired",
        "retirement_failed",
        "retired_in_store_only",
        "retirement_pending_too_long",
        "force_retired",
        "node_joined",
        "node_gone",
        "node_forgotten",
        "rotator_leading",
        "rotator_lost_lease",
        "config_reloaded",
        "config_rejected",
    }
)
_EVENT_FIELDS = ("credential", "version", "step", "error", "node", "reason", "by")


@dataclass(frozen=True)
class Shown:
    """One event as the page lists it."""

    at: float
    name: str
    level: int
    details: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.details if k == key), None)


class EventRing:
    """The rotator's last events (names, ids, short errors), taken from ``kit.logs.event``."""

    def __init__(self, size: int = MAX_EVENTS) -> None:
        self.events: collections.deque[Shown] = collections.deque(maxlen=size)
        self.retired_at: dict[tuple[str, str], float] = {}  # (credential, version) -> when this rotator retired it
        self._unlisten: Any = None

    def start(self) -> None:
        self._unlisten = listen(self._on_event)

    def close(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    def _on_event(self, name: str, level: int, fields: Mapping[str, Any]) -> None:
        if name not in SHOWN_EVENTS:
            return
        now = time.time()
        details = tuple((k, _short(fields[k])) for k in _EVENT_FIELDS if fields.get(k) is not None)
        self.events.append(Shown(now, name, level, details))
        if name in ("retired", "force_retired", "retired_in_store_only"):
            cred, version = fields.get("credential"), fields.get("version")
            if cred is not None and version is not None:
                self.retired_at[(str(cred), str(version))] = now
                if len(self.retired_at) > 1000:
                    self.retired_at.pop(next(iter(self.retired_at)))


class FleetSource(Protocol):
    """What the page reads of the rotator (``rotation.service.Rotator``)."""

    @property
    def rotators(self) -> Mapping[str, CredentialRotator]: ...

    @property
    def next_rotation(self) -> Mapping[str, float]: ...

    def status_line(self) -> str: ...


@dataclass
class CredentialView:
    name: str
    key: str
    versions: list[VersionInfo] = field(default_factory=list)
    reports: list[NodeReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class FleetPage:
    """Gathers what the page shows and renders it; ``start``/``close`` follow the rotator's lifecycle."""

    def __init__(self, source: FleetSource, *, refresh: int = REFRESH, min_age: float = MIN_AGE) -> None:
        self.source = source
        self.refresh = refresh
        self.ring = EventRing()
        # One gather at a time, and none more often than min_age: any number of page loads
        # costs the store (a Vault status path: one read per node) one collect per min_age.
        self.min_age = min_age
        self._lock = asyncio.Lock()
        self._page: tuple[float, str] | None = None

    def start(self) -> None:
        self.ring.start()

    def close(self) -> None:
        self.ring.close()

    async def html(self) -> str:
        async with self._lock:
            if self._page is not None and time.monotonic() - self._page[0] < self.min_age:
                return self._page[1]
            page = await self._render()
            self._page = (time.monotonic(), page)
            return page

    async def _render(self) -> str:
        views = [await self._gather(name, r) for name, r in sorted(self.source.rotators.items())]
        return render(
            views,
            rotators=self.source.rotators,
            next_rotation=self.source.next_rotation,
            status=self.source.status_line(),
            events=list(self.ring.events),
            retired_at=self.ring.retired_at,
            now=time.time(),
            refresh=self.refresh,
        )

    async def _gather(self, name: str, r: CredentialRotator) -> CredentialView:
        view = CredentialView(name=name, key=r.key)
        try:
            view.versions = sorted(await r.store.versions(r.key), key=lambda v: v.created)
        except BatonError as e:
            view.problems.append(f"versions: {e}")
        try:
            view.reports = sorted(await r.reporter.collect(r.key, r.cred.name), key=lambda rep: rep.node)
        except BatonError as e:
            view.problems.append(f"node reports: {e}")
        return view


# ---------------------------------------------------------------- rendering (pure)


def _short(value: object, limit: int = MAX_TEXT) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def e(value: object, limit: int = MAX_TEXT) -> str:
    """Escaped for HTML text and attributes (quotes too), cut to ``limit`` characters."""
    return html.escape(_short(value, limit), quote=True)


def _clock(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _stage(v: VersionInfo) -> str:
    if v.retired:
        return "retired"
    if v.is_current:
        return "current"
    return ", ".join(sorted(v.stages)) or "superseded"


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2430;background:#fbfbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #d8dbe0}
h3{font-size:1em;margin:1em 0 .3em}table{border-collapse:collapse;margin:.3em 0 1em}
th,td{border:1px solid #d8dbe0;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef0f3}code{font-size:.95em}.muted{color:#6b7280}
.current{color:#0a7d32;font-weight:600}.retired{color:#6b7280}.pending{color:#b45309;font-weight:600}
.stale{color:#b91c1c}.bad{color:#b91c1c}.status{padding:.4em .7em;background:#eef0f3;display:inline-block}
svg text{font:12px system-ui,sans-serif}
"""


def render(
    views: Sequence[CredentialView],
    *,
    rotators: Mapping[str, CredentialRotator],
    next_rotation: Mapping[str, float],
    status: str,
    events: Sequence[Shown],
    retired_at: Mapping[tuple[str, str], float],
    now: float,
    refresh: int = REFRESH,
) -> str:
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Baton fleet</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Baton fleet</h1>",
        f'<p class="status" id="status">{e(status, 400)}</p>',
        f'<p class="muted">rotator {e(__version__)} · {e(_clock(now))} · refreshes every {int(refresh)} s</p>',
    ]
    for view in views:
        r = rotators[view.name]
        out.extend(_credential(view, r, next_rotation.get(view.name), retired_at, now))
    out.append('<h2 id="events">Last events</h2>')
    if events:
        out.append("<table><tr><th>time</th><th>event</th><th>details</th></tr>")
        for ev in reversed(events):
            cls = ' class="bad"' if ev.level >= logging.WARNING else ""
            details = " ".join(f"{e(k)}={e(v)}" for k, v in ev.details)
            out.append(f"<tr><td>{e(_clock(ev.at))}</td><td{cls}>{e(ev.name)}</td><td>{details}</td></tr>")
        out.append("</table>")
    else:
        out.append('<p class="muted">none since this rotator started</p>')
    out.append("</body></html>")
    return "\n".join(out)


def _credential(
    view: CredentialView,
    r: CredentialRotator,
    next_at: float | None,
    retired_at: Mapping[tuple[str, str], float],
    now: float,
) -> list[str]:
    name = view.name
    out = [f'<h2 id="cred-{e(name)}">Credential <code>{e(name)}</code></h2>']
    outcome = r.last_outcome
    facts = [f"key <code>{e(view.key)}</code>", f"next rotation {e(_clock(next_at))}"]
    if outcome is not None:
        facts.append(f"last rotation: {e(outcome.result)}" + (f" at step {e(outcome.step)}" if outcome.step else ""))
        if outcome.error:
            facts.append(f'<span class="bad">{e(outcome.error)}</span>')
    out.append("<p>" + " · ".join(facts) + "</p>")
    for problem in view.problems:
        out.append(f'<p class="bad">{e(problem, 300)}</p>')
    pending = {d.version: d for d in r.last_decisions}
    # Versions
    out.append(f'<h3>Versions</h3><table class="versions" data-credential="{e(name)}">')
    out.append("<tr><th>version</th><th>stage</th><th>created</th><th>retired</th></tr>")
    for v in reversed(view.versions[-20:]):
        stage = "pending retirement" if v.id in pending else _stage(v)
        cls = "pending" if v.id in pending else _stage(v).split(",")[0]
        when = retired_at.get((name, v.id))
        out.append(
            f'<tr data-version="{e(v.id)}"><td>{e(v.id)}</td><td class="{e(cls)}">{e(stage)}</td>'
            f"<td>{e(_clock(v.created))}</td><td>{e(_clock(when) if when else ('yes' if v.retired else '-'))}</td></tr>"
        )
    out.append("</table>")
    # Timeline
    out.append(timeline(name, view.versions, pending=set(pending), retired_at=retired_at, now=now))
    # Nodes
    out.append("<h3>Nodes</h3>")
    current = next((v.id for v in reversed(view.versions) if v.is_current), None)
    if view.reports:
        out.append('<table class="nodes"><tr><th>node</th><th>current version</th><th>report age</th>')
        out.append("<th>holders per version</th><th>agent</th><th>errors</th></tr>")
        ttl = r.config.report.report_ttl
        for rep in view.reports:
            age = now - rep.heartbeat if rep.heartbeat else None
            stale = age is None or age > ttl
            cur_cls = "current" if rep.current == current else "pending"
            in_use = ", ".join(f"{e(k)}: {e(n)}" for k, n in sorted(rep.in_use.items())) or "-"
            age_text = "never (unreadable or missing)" if age is None else _age(age) + (" (stale)" if stale else "")
            out.append(
                f'<tr data-node="{e(rep.node)}"><td>{e(rep.node)}</td><td class="{cur_cls}">{e(rep.current)}</td>'
                f'<td class="{"stale" if stale else ""}">{e(age_text)}</td><td>{in_use}</td>'
                f"<td>{e(rep.agent_version)}</td><td>{e('; '.join(rep.errors), 300) or '-'}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append('<p class="muted">no node has reported</p>')
    # Pending retirements
    out.append("<h3>Pending retirements</h3>")
    if not pending:
        out.append('<p class="muted">none</p>')
    for version, d in pending.items():
        out.append(f'<div class="pending-version" data-version="{e(version)}">')
        out.append(f'<p><span class="pending">version {e(version)}</span> waits:</p><ul class="reasons">')
        for reason in d.reasons[:20]:
            out.append(f"<li>{e(reason, 300)}</li>")
        out.append("</ul>")
        holders = [(node, h) for node, hs in sorted(d.holders.items()) for h in hs]
        if holders:
            out.append('<table class="holders"><tr><th>node</th><th>pid</th><th>exe</th><th>consumer</th>')
            out.append("<th>seen by</th></tr>")
            for node, h in holders[:50]:
                out.append(
                    f'<tr data-pid="{e(h.pid)}"><td>{e(node)}</td><td>{e(h.pid)}</td><td><code>{e(h.exe)}</code></td>'
                    f"<td>{e(h.consumer or '(unmanaged)')}</td><td>{e(h.how)}</td></tr>"
                )
            out.append("</table>")
        if d.sessions:
            out.append('<table class="sessions"><tr><th>principal</th><th>client</th><th>sessions</th></tr>')
            for s in d.sessions[:50]:
                out.append(f"<tr><td>{e(s.principal)}</td><td>{e(s.client)}</td><td>{e(s.count)}</td></tr>")
            out.append("</table>")
        out.append("</div>")
    return out


def timeline(
    name: str,
    versions: Sequence[VersionInfo],
    *,
    pending: set[str],
    retired_at: Mapping[tuple[str, str], float],
    now: float,
) -> str:
    """Inline SVG: one bar per version of the last ``TIMELINE_VERSIONS``, from its creation to its
    retirement (as this rotator saw it; else the next version's creation, drawn faint) or to now."""
    shown = [v for v in versions if v.created][-TIMELINE_VERSIONS:]
    if not shown:
        return '<p class="muted">no versions yet</p>'
    start = shown[0].created
    span = max(now - start, 1.0)
    width, left, row = 760, 60, 22
    height = row * len(shown) + 30
    out = [
        f'<svg class="timeline" role="img" width="{width + left + 20}" height="{height}" '
        f'viewBox="0 0 {width + left + 20} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>Versions of {e(name)} over time</title>",
    ]
    created = [v.created for v in versions]
    for i, v in enumerate(shown):
        y = 8 + i * row
        end = retired_at.get((name, v.id))
        faint = False
        if end is None:
            if v.retired:
                later = [c for c in created if c > v.created]
                end, faint = (later[0] if later else now), True
            else:
                end = now
        x0 = left + (v.created - start) / span * width
        x1 = left + (end - start) / span * width
        color = "#6b7280" if v.retired else "#b45309" if v.id in pending else "#0a7d32" if v.is_current else "#2563eb"
        opacity = "0.35" if faint else "0.9"
        label = f"v{v.id} {_stage(v)}: {_clock(v.created)} -> {_clock(end) if v.retired else 'now'}"
        out.append(
            f'<text x="4" y="{y + 13}">v{e(v.id, 12)}</text>'
            f'<rect data-version="{e(v.id)}" x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 2.0):.1f}" height="{row - 6}" '
            f'rx="3" fill="{color}" fill-opacity="{opacity}"><title>{e(label, 200)}</title></rect>'
        )
    axis = 8 + len(shown) * row
    out.append(f'<line x1="{left}" y1="{axis}" x2="{left + width}" y2="{axis}" stroke="#9ca3af"/>')
    out.append(f'<text x="{left}" y="{axis + 16}">{e(_clock(start))}</text>')
    out.append(f'<text x="{left + width}" y="{axis + 16}" text-anchor="end">now</text>')
    out.append("</svg>")
    return "\n".join(out)
