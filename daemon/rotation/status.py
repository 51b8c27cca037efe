"""`baton status` and `baton node forget`: read-only views and the one node operation.

``--pending`` is computed from the store itself (the same gate the rotator
runs), so it answers even when no rotator is running. Nothing here prints a
secret value: versions are ids, holders are pids and names.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import aiohttp

from daemon.config import Config
from daemon.errors import BatonError
from daemon.kit.logs import event
from daemon.model import NodeId
from daemon.providers import open_provider
from daemon.report import open_reporter
from daemon.report.base import Reporter
from daemon.report.holders import HolderSource, open_holders
from daemon.rotation.control import shown
from daemon.rotation.reader import GateReader
from daemon.schedule import span
from daemon.stores import open_store
from daemon.stores.base import SecretStore

log = logging.getLogger(__name__)


def _gates(config: Config) -> tuple[SecretStore, Reporter, HolderSource | None, list[GateReader]]:
    """The read-only gate of every credential; a provider only where one rotates it (for its sessions)."""
    store = open_store(config)
    reporter = open_reporter(config, store)
    holders = open_holders(config, act=False)  # looks only: never rolls a workload
    gates = [
        GateReader(
            config=config,
            credential=c,
            store=store,
            reporter=reporter,
            provider=open_provider(c.rotation) if c.rotation is not None else None,
            holders=holders,
        )
        for c in config.credentials
    ]
    return store, reporter, holders, gates


async def pending(config: Config) -> dict[str, Any]:
    store, reporter, holders, gates = _gates(config)
    try:
        out: dict[str, Any] = {}
        for g in gates:
            try:
                decisions = await g.evaluate(now=time.time())
            finally:
                if g.provider is not None:
                    await g.provider.aclose()
            out[g.cred.name] = [d.as_dict() for d in decisions]
        return out
    finally:
        if holders is not None:
            await holders.aclose()
        await reporter.aclose()
        await store.aclose()


def _print_pending(data: dict[str, Any]) -> None:
    if not any(data.values()):
        print("no version is waiting for retirement")
        return
    for cred, decisions in data.items():
        for d in decisions:
            verdict = "ready to retire" if d["retire"] else "waiting"
            print(f"{cred} version {d['version']}: {verdict}")
            # Node reports may come from hostile nodes: their strings are made fit for a terminal.
            for reason in d["reasons"]:
                print(f"  - {shown(reason)}")
            for node, holders in d["holders"].items():
                for h in holders:
                    if not h["pid"]:  # no process: a pod or workload (report/holders.py), its exe says what
                        print(shown(f"    {node} {h['exe']}"))
                        continue
                    who = h["consumer"] or "unmanaged"
                    print(shown(f"    {node}: pid {h['pid']} {h['exe']} ({who}, via {h['how']})"))
            for s in d["sessions"]:
                print(shown(f"    provider: {s['principal']} from {s['client']} x{s['count']}"))


async def print_status(config: Config, *, pending: bool, as_json: bool, url: str | None) -> int:
    if pending:
        try:
            data = await globals()["pending"](config)
        except BatonError as e:
            print(f"baton: {e}", file=sys.stderr)
            return 1
        if as_json:
            print(json.dumps(data, indent=1))
        else:
            _print_pending(data)
        return 0
    listen = url or config.api.listen
    connector: aiohttp.BaseConnector | None = None
    if listen.startswith("unix:"):
        connector = aiohttp.UnixConnector(path=listen[5:])
        base = "http://localhost"
    else:
        base = listen if listen.startswith("http") else f"http://{listen}"
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"{base}/v1/status", timeout=aiohttp.ClientTimeout(total=5)) as resp,
        ):
            data = await resp.json()
    except (aiohttp.ClientError, TimeoutError) as e:
        print(f"baton: cannot reach the agent at {listen}: {type(e).__name__}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    if data.get("role") == "rotator":
        _print_rotator(data)
        return 0
    print(f"node {data.get('node')}  ready={data.get('ready')}")
    for name, c in data.get("credentials", {}).items():
        when = time.strftime("%H:%M:%S", time.localtime(c["last_change"])) if c.get("last_change") else "-"
        print(f"  {name}: current {c.get('current')} (changed {when}) on disk {c.get('on_disk')}")
        for v, info in c.get("versions", {}).items():
            print(f"    {v}: {info['state']}, {len(info['holders'])} holder(s)")
        _print_issuer(c.get("issuer"))
        if c.get("last_error"):
            print(f"    last error: {c['last_error']}")
    return 0


def _print_issuer(issuer: Any) -> None:
    """An issued credential's own versions (leases: TTL and max TTL left, holders, revocations pending)."""
    if not isinstance(issuer, dict):
        return
    print(f"    issued ({issuer.get('kind')}) from {issuer.get('path') or '-'}")
    if issuer.get("issue_error"):
        print(f"    cannot issue: {issuer['issue_error']}")
    for v, lease in (issuer.get("leases") or {}).items():
        if not isinstance(lease, dict):
            continue
        held = ", ".join(lease.get("holders") or []) or "no holders"
        max_left = lease.get("max_ttl_left")
        print(
            f"    {v}: {lease.get('state')} lease {lease.get('lease')}, ttl {lease.get('ttl_left')}s, "
            f"max ttl {'?' if max_left is None else f'{max_left}s'}, {held}"
        )
    if issuer.get("kind") == "certificate":
        for v, cert in (issuer.get("versions") or {}).items():
            if isinstance(cert, dict):
                revoked = ", revoked" if cert.get("revoked") else ""
                print(
                    f"    {v}: {cert.get('state')} certificate {cert.get('subject')} serial {cert.get('serial')}, "
                    f"not after {cert.get('not_after')}{revoked}"
                )
        if issuer.get("renew_at"):
            print(f"    renewal due {_clock(issuer['renew_at'])}")
    for r in issuer.get("revoking") or []:
        if isinstance(r, dict):
            print(f"    {r.get('version')}: revocation pending ({r.get('attempts')} failed): {r.get('error') or '-'}")


def _when(t: float | None) -> str:
    """A rotation time with its date and how far off it is: ``2026-12-02 03:00:00 UTC (in 3h27m)``."""
    if not isinstance(t, int | float) or not 0 < t < 1e11:
        return "-"
    left = t - time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) + (f" (in {span(left)})" if left > 0 else " (due)")


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _print_rotator(data: dict[str, Any]) -> None:
    """The rotator's view: leading or standby, and per credential who holds its lease until when."""
    print(f"rotator {data.get('leadership')}")
    for name, c in data.get("credentials", {}).items():
        lease = c.get("lease")
        if lease is None:
            held = "no lease (store without leases)"
        elif lease.get("leading"):
            held = f"leading, lease until {_clock(lease.get('expires'))}"
        elif lease.get("leader"):
            held = f"standing by: {lease['leader']} holds the lease until {_clock(lease.get('expires'))}"
        else:
            held = "standing by: lease free"
        outcome = (c.get("last_outcome") or {}).get("result") or "-"
        print(f"  {name}: {held}; next rotation {_when(c.get('next_rotation'))}; last {outcome}")
        if c.get("schedule"):
            print(f"    schedule: {c['schedule']}")


async def forget_node(config: Config, node: NodeId) -> int:
    store = open_store(config)
    reporter = open_reporter(config, store)
    try:
        for c in config.credentials:
            await reporter.forget(c.key, node)
            event(log, "node_forgotten", credential=c.name, node=node)
        print(f"forgot node {node}")
        return 0
    finally:
        await reporter.aclose()
        await store.aclose()
