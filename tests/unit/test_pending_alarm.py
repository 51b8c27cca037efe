"""retirement_pending_too_long: said once per version past rotation.max_drain, and again only after it was gone."""

from __future__ import annotations

from typing import Any

from daemon.kit.logs import listen
from daemon.model import NodeId, VersionId, VersionInfo
from daemon.report.base import Holder
from daemon.rotation.alarms import PendingAlarm
from daemon.rotation.gate import Decision


def pending(version: str) -> Decision:
    holder = Holder(7, "/usr/bin/app", "api", "fd", VersionId(version))
    return Decision(VersionId(version), False, ("n1: 1 holder(s) of version 1",), {NodeId("n1"): (holder,)})


def test_a_version_pending_past_max_drain_is_said_once_with_its_reasons_and_nodes() -> None:
    heard: list[tuple[str, dict[str, Any]]] = []
    stop = listen(lambda name, level, fields: heard.append((name, dict(fields))))
    try:
        alarm = PendingAlarm("db", max_drain=60)
        assert alarm.check([pending("1")], now=1000.0) == []
        assert alarm.check([pending("1")], now=1059.0) == []
        assert alarm.check([pending("1")], now=1061.0) == ["1"]
        assert alarm.check([pending("1")], now=2000.0) == []  # once
        alarm.check([], now=2001.0)  # retired (or forced): forgotten
        assert alarm.check([pending("1")], now=2002.0) == []  # its clock starts again
    finally:
        stop()
    said = [f for name, f in heard if name == "retirement_pending_too_long"]
    assert said == [
        {
            "credential": "db",
            "version": "1",
            "pending_seconds": 61,
            "max_drain": 60,
            "reasons": ["n1: 1 holder(s) of version 1"],
            "nodes": ["n1"],
        }
    ]


def test_the_wait_counts_from_the_newer_versions_creation_when_the_versions_are_given() -> None:
    alarm = PendingAlarm("db", max_drain=3600)
    versions = [VersionInfo(VersionId("1"), created=0.0 + 10), VersionInfo(VersionId("2"), created=100.0)]
    # A rotator that just started sees version 1 pending for the first time, a day after version 2 came.
    assert alarm.check([pending("1")], versions, now=100.0 + 86400) == ["1"]
