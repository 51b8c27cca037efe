"""daemon.rotation.gate.decide(): every rule that blocks a retirement, and the all-clear.

Each rule has a failing case (the version waits, with a reason naming the node)
and, through the all-clear test of the same inputs minus the problem, a passing
one. The decision also carries who holds the version, for ``status --pending``.
"""

from __future__ import annotations

import json

import pytest

from daemon.providers.base import Session
from daemon.report.base import Holder, NodeReport
from daemon.rotation.gate import Decision, decide

NOW = 10_000.0
TTL = 90.0
OLD, NEW = "7", "8"


def report(
    node: str,
    *,
    current: str | None = NEW,
    holders: tuple[Holder, ...] = (),
    age: float = 1.0,
    in_use: dict[str, int] | None = None,
) -> NodeReport:
    counts: dict[str, int] = {}
    for h in holders:
        counts[h.version] = counts.get(h.version, 0) + 1
    return NodeReport(
        node=node,
        credential="db",
        current=current,
        in_use=in_use if in_use is not None else counts,
        holders=holders,
        heartbeat=NOW - age,
        agent_version="test",
    )


def gate(reports: list[NodeReport], *, known: set[str] | None = None, sessions: tuple[Session, ...] = ()) -> Decision:
    return decide(
        old=OLD,
        new=NEW,
        reports=reports,
        known=known if known is not None else {r.node for r in reports},
        now=NOW,
        ttl=TTL,
        sessions=sessions,
    )


def app_holder(pid: int = 4242, version: str = OLD) -> Holder:
    return Holder(pid=pid, exe="/usr/bin/app", consumer="app", how="fd", version=version)


# ---------------------------------------------------------------- the all-clear


def test_a_version_is_retired_when_every_node_is_fresh_current_and_free() -> None:
    d = gate([report("a"), report("b"), report("c", holders=(app_holder(version=NEW),))])

    assert d.retire
    assert d.version == OLD
    assert d.reasons == ()
    assert d.holders == {}


# ---------------------------------------------------------------- unknown blocks


def test_no_report_at_all_is_unknown_and_blocks() -> None:
    d = gate([], known=set())

    assert not d.retire
    assert d.reasons == ("no node has reported yet (unknown)",)


def test_a_stale_report_blocks_even_when_it_looks_clean() -> None:
    d = gate([report("a"), report("b", age=TTL + 1)])

    assert not d.retire
    assert len(d.reasons) == 1
    assert d.reasons[0].startswith("b: report is stale (91s old, ttl 90s)")


def test_a_report_exactly_ttl_old_is_still_fresh() -> None:
    assert gate([report("a", age=TTL)]).retire


def test_only_stale_reports_block_and_say_so_rather_than_no_report_yet() -> None:
    d = gate([report("a", age=TTL * 2)])

    assert not d.retire
    assert d.reasons == ("a: report is stale (180s old, ttl 90s)",)


def test_a_known_node_without_a_report_blocks() -> None:
    d = gate([report("a")], known={"a", "gone"})

    assert not d.retire
    assert d.reasons == ("gone: no report (unknown)",)


def test_a_known_node_only_without_any_report_blocks() -> None:
    d = gate([], known={"a"})

    assert not d.retire
    assert d.reasons == ("a: no report (unknown)",)


def test_a_reporting_node_counts_even_if_the_rotator_did_not_know_it_yet() -> None:
    d = gate([report("a"), report("new", current=OLD)], known={"a"})

    assert not d.retire
    assert d.reasons == (f"new: current version is {OLD}, not {NEW}",)


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize("current", [OLD, None, "6"])
def test_a_node_whose_current_is_not_the_new_version_blocks(current: str | None) -> None:
    d = gate([report("a"), report("b", current=current)])

    assert not d.retire
    assert d.reasons == (f"b: current version is {current}, not {NEW}",)


def test_the_newest_report_of_a_node_is_the_one_that_counts() -> None:
    older = report("a", current=OLD, age=20)
    newer = report("a", current=NEW, age=2)

    assert gate([newer, older]).retire
    assert gate([older, newer]).retire
    assert not gate([report("a", current=OLD, age=2), report("a", current=NEW, age=20)]).retire


# ---------------------------------------------------------------- holders


def test_a_holder_of_the_old_version_blocks_and_is_named() -> None:
    h = app_holder()
    d = gate([report("a"), report("b", holders=(h, app_holder(pid=5, version=NEW)))])

    assert not d.retire
    assert d.reasons == (f"b: 1 holder(s) of version {OLD}",)
    assert d.holders == {"b": (h,)}


def test_holders_beyond_the_report_limit_still_block_by_count() -> None:
    # A report keeps at most max_holders summaries but always the full count.
    d = gate([report("a", holders=(), in_use={OLD: 25})])

    assert not d.retire
    assert d.reasons == (f"a: 25 holder(s) of version {OLD}",)
    assert d.holders == {"a": ()}


def test_holders_of_a_stale_node_are_still_shown() -> None:
    h = app_holder()
    d = gate([report("a", holders=(h,), age=TTL * 3)])

    assert not d.retire
    assert d.holders == {"a": (h,)}
    assert "stale" in d.reasons[0]


def test_an_unmanaged_holder_is_reported_with_no_consumer() -> None:
    h = Holder(pid=99, exe="/usr/bin/cat", consumer=None, how="fd", version=OLD)
    d = gate([report("a", holders=(h,))])

    assert not d.retire
    assert d.as_dict()["holders"] == {"a": [{"pid": 99, "exe": "/usr/bin/cat", "consumer": None, "how": "fd"}]}


# ---------------------------------------------------------------- provider sessions


def test_provider_sessions_on_the_old_credential_block() -> None:
    sessions = (Session("app_a", "10.0.0.5", 2), Session("app_a", "10.0.0.6", 1))
    d = gate([report("a")], sessions=sessions)

    assert not d.retire
    assert d.reasons == (f"provider: 3 session(s) still use version {OLD}",)
    assert d.sessions == sessions


# ---------------------------------------------------------------- everything at once, for --pending


def test_every_reason_is_listed_at_once_in_node_order() -> None:
    d = gate(
        [
            report("c", holders=(app_holder(),)),
            report("b", current=OLD),
            report("a", age=TTL + 10),
        ],
        known={"a", "b", "c", "d"},
        sessions=(Session("app_a", "10.0.0.5"),),
    )

    assert not d.retire
    assert d.reasons == (
        "a: report is stale (100s old, ttl 90s)",
        f"b: current version is {OLD}, not {NEW}",
        f"c: 1 holder(s) of version {OLD}",
        "d: no report (unknown)",
        f"provider: 1 session(s) still use version {OLD}",
    )


def test_the_decision_as_dict_is_json_with_reasons_holders_and_sessions() -> None:
    d = gate([report("a", holders=(app_holder(),))], sessions=(Session("app_a", "10.0.0.5"),))

    data = json.loads(json.dumps(d.as_dict()))

    assert data == {
        "version": OLD,
        "retire": False,
        "reasons": [f"a: 1 holder(s) of version {OLD}", f"provider: 1 session(s) still use version {OLD}"],
        "holders": {"a": [{"pid": 4242, "exe": "/usr/bin/app", "consumer": "app", "how": "fd"}]},
        "sessions": [{"principal": "app_a", "client": "10.0.0.5", "count": 1}],
    }


def test_the_gate_is_pure_and_does_not_touch_its_inputs() -> None:
    reports = [report("a", holders=(app_holder(),))]
    known = {"a"}

    first = gate(reports, known=known)
    second = gate(reports, known=known)

    assert first == second
    assert known == {"a"}
    assert reports[0].in_use == {OLD: 1}


# ---------------------------------------------------------------- min_drain


def test_a_version_superseded_less_than_min_drain_ago_waits() -> None:
    d = decide(old=OLD, new=NEW, reports=[report("a")], known={"a"}, now=NOW, ttl=TTL, superseded_for=30, min_drain=60)

    assert not d.retire
    assert d.reasons == ("superseded 30s ago; min_drain is 60s",)


def test_a_version_superseded_at_least_min_drain_ago_may_go() -> None:
    d = decide(old=OLD, new=NEW, reports=[report("a")], known={"a"}, now=NOW, ttl=TTL, superseded_for=60, min_drain=60)

    assert d.retire


def test_without_min_drain_a_successor_stamped_slightly_ahead_of_our_clock_does_not_block() -> None:
    # The successor's creation time comes from the store (another host's clock for Vault/AWS);
    # with min_drain off, a few seconds of clock skew must not hold a retirement.
    d = decide(old=OLD, new=NEW, reports=[report("a")], known={"a"}, now=NOW, ttl=TTL, superseded_for=-3, min_drain=0)

    assert d.retire, d.reasons


def test_min_drain_does_not_hide_that_no_node_has_reported() -> None:
    d = decide(old=OLD, new=NEW, reports=[], known=set(), now=NOW, ttl=TTL, superseded_for=5, min_drain=60)

    assert not d.retire
    assert d.reasons == ("superseded 5s ago; min_drain is 60s", "no node has reported yet (unknown)")
