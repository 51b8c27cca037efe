"""What the mysql/redis and aws-iam/command rows of bench/rotation_under_load.py share:
a phase's versions in the local store and its summary row (the PostgreSQL rows' fields)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Protocol

from daemon.model import PENDING
from daemon.stores.local import LocalStore


class HasStats(Protocol):
    def stats(self) -> list[tuple[str, dict[str, Any]]]: ...


def store_versions(path: Path, key: str) -> list[tuple[int, bool, bool]]:
    """(id, retired, pending) of each version of ``key`` in the local store at ``path``."""
    store = LocalStore(path, watch_files=False)
    try:
        return [(int(v.id), v.retired, PENDING in v.stages) for v in store.versions_sync(key)]
    finally:
        store.close()


def summarize(
    *,
    versions: list[tuple[int, bool, bool]],
    consumers: HasStats,
    phase_events: list[dict[str, Any]],
    t0: float,
    t_end: float,
    timed_out: bool,
    load: Any,
    zero_downtime: bool,
    at_end: tuple[str, int],
    counted: tuple[str, ...] = ("requests", "failed", "reloads"),
) -> dict[str, Any]:
    """The same fields as the PostgreSQL rows; ``at_end`` in place of ``roles_at_end`` (its name and count),
    and per consumer variant the sums of ``counted`` (``failed`` is the consumers' ``failures``)."""

    def times(name: str) -> dict[str, float]:
        return {str(e["version"]): e["at"] for e in phase_events if e["event"] == name and e["version"] is not None}

    promoted, retired_at = times("rotated"), times("retired")
    ids = sorted(v[0] for v in versions)
    drains = []
    for vid in ids:
        successor = next((n for n in ids if n > vid and str(n) in promoted), None)
        if str(vid) in retired_at and successor is not None:
            drains.append(retired_at[str(vid)] - promoted[str(successor)])
    duration = t_end - t0
    variants: dict[str, dict[str, Any]] = {}
    timeline: dict[str, dict[int, list[int]]] = {}
    uses_after_retirement = 0
    for variant, s in consumers.stats():
        v = variants.setdefault(variant, {"processes": 0, **dict.fromkeys(counted, 0), "reasons": {}})
        v["processes"] += 1
        for k in counted:
            v[k] += s.get("failures" if k == "failed" else k, 0)
        for reason, n in s.get("reasons", {}).items():
            v["reasons"][reason] = v["reasons"].get(reason, 0) + n
        series = timeline.setdefault(variant, {})
        for sec, (req, fail) in s.get("buckets", {}).items():
            cur = series.setdefault(int(sec), [0, 0])
            cur[0] += req
            cur[1] += fail
        for version, last in s.get("last_use", {}).items():
            if version in retired_at and last > retired_at[version]:
                uses_after_retirement += 1
    for v in variants.values():
        v["rps"] = round(v["requests"] / duration, 1) if duration > 0 else 0.0
    total_requests = sum(v["requests"] for v in variants.values())
    total_failed = sum(v["failed"] for v in variants.values())
    rotated = max(0, sum(1 for v in versions if not v[2]) - 1)
    retired = sum(1 for v in versions if v[1])
    met = (total_failed == 0 and uses_after_retirement == 0) if zero_downtime else total_failed > 0
    ordered = sorted(drains)
    return {
        "duration_s": round(duration, 1),
        "rotations": rotated,
        "retirements": retired,
        "rotation_failures": sum(1 for e in phase_events if e["event"] == "rotation_failed"),
        "retirement_failures": sum(1 for e in phase_events if e["event"] == "retirement_failed"),
        "promote_to_retire_s": {
            "n": len(drains),
            "max": round(ordered[-1], 3) if ordered else None,
            "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3) if ordered else None,
            "median": round(statistics.median(drains), 3) if drains else None,
        },
        "requests": total_requests,
        "failed": total_failed,
        "rps": round(total_requests / duration, 1) if duration > 0 else 0.0,
        "target_rps": load.total_rate,
        "consumers": variants,
        "uses_after_retirement": uses_after_retirement,
        at_end[0]: at_end[1],
        "timed_out": timed_out,
        "target": "0 failed requests" if zero_downtime else "> 0 failed requests (naive rotation breaks clients)",
        "met": met and not timed_out and retired >= rotated,
        "_timeline": {k: dict(sorted(series.items())) for k, series in timeline.items()},
        "_t0": t0,
        "_promotes": sorted(round(t - t0, 2) for t in promoted.values()),
    }
