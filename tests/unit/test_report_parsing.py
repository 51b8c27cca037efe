"""NodeReport.from_json: forward compatible (unknown fields ignored), strict on what the gate relies on.

An unreadable report must raise one of the errors the reporters catch
(TypeError, ValueError, KeyError): they then stand in a stale report, and the
gate blocks on it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.report.base import MAX_REPORT_CHARS, REPORT_PREFIX, Holder, NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation.gate import decide
from daemon.stores.local import LocalStore

NOW = 1_000_000.0
REPORT = NodeReport(
    node="n1",
    credential="db",
    current="v2",
    in_use={"v1": 1, "v2": 3},
    holders=(Holder(pid=7, exe="/usr/bin/app", consumer="app", how="fd", version="v1"),),
    heartbeat=NOW,
    agent_version="0.1.0",
    errors=("scan: permission denied",),
)
UNREADABLE = (TypeError, ValueError, KeyError)


def as_dict() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REPORT.to_json())
    return data


def test_a_report_round_trips_through_json() -> None:
    assert NodeReport.from_json(REPORT.to_json()) == REPORT


def test_fields_a_newer_agent_added_are_ignored_at_the_top_and_in_holders() -> None:
    data = as_dict() | {"cgroup_v3": {"nested": [1, 2]}, "zzz": None}
    data["holders"][0]["container_id"] = "abc"
    assert NodeReport.from_json(json.dumps(data)) == REPORT


@given(extra=st.dictionaries(st.text(min_size=1).filter(lambda k: k not in as_dict()), st.integers() | st.text()))
def test_any_unknown_top_level_keys_leave_the_report_unchanged(extra: dict[str, Any]) -> None:
    assert NodeReport.from_json(json.dumps(as_dict() | extra)) == REPORT


def test_only_the_required_fields_are_enough() -> None:
    got = NodeReport.from_json('{"node": "n1", "credential": "db", "current": null}')
    assert got == NodeReport(node="n1", credential="db", current=None)


@pytest.mark.parametrize("missing", ["node", "credential", "current"])
def test_a_missing_required_field_still_raises(missing: str) -> None:
    data = as_dict()
    del data[missing]
    with pytest.raises(TypeError):
        NodeReport.from_json(json.dumps(data))


def test_a_holder_missing_a_field_still_raises() -> None:
    data = as_dict()
    del data["holders"][0]["version"]
    with pytest.raises(TypeError):
        NodeReport.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["[]", "null", '"a string"', "42", "true"])
def test_a_value_that_is_not_an_object_raises_type_error(text: str) -> None:
    with pytest.raises(TypeError, match="JSON object"):
        NodeReport.from_json(text)


@pytest.mark.parametrize("text", ["", "{", '{"node": "n1",', "not json"])
def test_text_that_is_not_json_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        NodeReport.from_json(text)


@pytest.mark.parametrize(
    "change",
    [
        {"node": 5},
        {"credential": ["db"]},
        {"current": 2},
        {"heartbeat": "recent"},
        {"heartbeat": True},
        {"heartbeat": None},
        {"in_use": [1]},
        {"in_use": {"v1": "many"}},
        {"holders": {"pid": 1}},
        {"holders": ["x"]},
    ],
    ids=repr,
)
def test_a_field_of_the_wrong_type_is_unreadable(change: dict[str, Any]) -> None:
    with pytest.raises(UNREADABLE):
        NodeReport.from_json(json.dumps(as_dict() | change))


@pytest.mark.parametrize("beat", ["NaN", "Infinity", "-Infinity"])
def test_a_heartbeat_that_is_not_finite_is_unreadable(beat: str) -> None:
    # NaN never compares as older than the ttl, so the gate would take it as fresh.
    text = '{"node": "n1", "credential": "db", "current": "v2", "heartbeat": ' + beat + "}"
    with pytest.raises(ValueError, match="finite"):
        NodeReport.from_json(text)


def test_an_integer_heartbeat_is_accepted() -> None:
    assert NodeReport.from_json(json.dumps(as_dict() | {"heartbeat": 12})).heartbeat == 12


def test_the_stale_stand_in_for_an_unreadable_report_blocks_the_gate_and_names_the_node() -> None:
    fresh = NodeReport(node="n1", credential="db", current="v2", heartbeat=NOW)
    stand_in = NodeReport(node="n2", credential="db", current=None)
    assert decide(old="v1", new="v2", reports=[fresh], known={"n1"}, now=NOW, ttl=60).retire
    decision = decide(old="v1", new="v2", reports=[fresh, stand_in], known={"n1", "n2"}, now=NOW, ttl=60)
    assert not decision.retire
    assert [r for r in decision.reasons if r.startswith("n2:")] == [decision.reasons[0]]
    assert "stale" in decision.reasons[0]


# ---------------------------------------------------------------- found by tests/fuzz/test_report_fuzz.py
# Each of these escaped the reporters' except (TypeError, ValueError, KeyError) and would
# have ended the rotator's retire pass, or read a malformed count as "no holder".


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_a_report_nested_deeper_than_the_stack_is_unreadable_not_a_recursion_error(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = '{"node": "n1", "credential": "db", "current": null, "in_use": ' + opener * 5000 + closer * 5000 + "}"
    with pytest.raises(ValueError, match="nested"):
        NodeReport.from_json(text)


@pytest.mark.parametrize("count", ["Infinity", "-Infinity", "NaN", "0.5", "1.0", "-1", '"1"', "true", "null"])
def test_a_holder_count_that_is_not_a_non_negative_integer_is_unreadable(count: str) -> None:
    # Infinity raised OverflowError from int(); 0.5 was truncated to 0, a node with no holder.
    text = '{"node": "n1", "credential": "db", "current": "v2", "in_use": {"v1": ' + count + "}}"
    with pytest.raises(TypeError, match="in_use"):
        NodeReport.from_json(text)


@pytest.mark.parametrize("beat", ["-1", "-0.5", "1" + "0" * 400])
def test_a_negative_heartbeat_or_one_beyond_any_float_is_unreadable(beat: str) -> None:
    # 10**400 passed json and raised OverflowError in math.isfinite (and in the gate's age).
    text = '{"node": "n1", "credential": "db", "current": "v2", "heartbeat": ' + beat + "}"
    with pytest.raises(ValueError, match="non-negative"):
        NodeReport.from_json(text)


@pytest.mark.parametrize(
    "holder",
    [
        {"pid": "7"},
        {"pid": -1},
        {"pid": True},
        {"exe": ["/bin/app"]},
        {"consumer": 5},
        {"how": None},
        {"version": 1},
    ],
    ids=repr,
)
def test_a_holder_field_of_the_wrong_type_is_unreadable(holder: dict[str, Any]) -> None:
    data = as_dict()
    data["holders"][0].update(holder)
    with pytest.raises(TypeError, match="holders"):
        NodeReport.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "change", [{"errors": "scan failed"}, {"errors": [["deep"]]}, {"agent_version": [1]}], ids=repr
)
def test_errors_and_agent_version_of_the_wrong_type_are_unreadable(change: dict[str, Any]) -> None:
    # A string was split into one error per character; str() of a nested list can recurse.
    with pytest.raises(TypeError):
        NodeReport.from_json(json.dumps(as_dict() | change))


def test_a_report_over_the_size_cap_is_unreadable() -> None:
    text = json.dumps(as_dict() | {"agent_version": "x" * MAX_REPORT_CHARS})
    with pytest.raises(ValueError, match="at most"):
        NodeReport.from_json(text)


def test_a_report_naming_another_node_than_its_record_is_unreadable() -> None:
    assert NodeReport.from_json(REPORT.to_json(), node="n1") == REPORT
    with pytest.raises(ValueError, match="another node"):
        NodeReport.from_json(REPORT.to_json(), node="n2")


async def test_an_entry_that_claims_another_nodes_name_does_not_hide_that_nodes_report(tmp_path: Path) -> None:
    # Filed under "evil" with n1's name and a newer heartbeat, it made the gate judge n1
    # by it: n1's holder of v1 vanished and v1 was let go.
    store = LocalStore(tmp_path / "store.db", watch_files=False)
    holding = replace(REPORT, in_use={"v1": 1}, holders=())
    spoof = replace(REPORT, in_use={}, holders=(), heartbeat=NOW + 1)
    try:
        await store.merge_metadata(
            "k", {REPORT_PREFIX + "n1": holding.to_json(), REPORT_PREFIX + "evil": spoof.to_json()}
        )
        reports = await MetadataReporter(store).collect("k", "db")
    finally:
        await store.aclose()
    assert sorted(r.node for r in reports) == ["evil", "n1"]
    assert [r for r in reports if r.node == "n1"] == [holding]
    decision = decide(old="v1", new="v2", reports=reports, known={r.node for r in reports}, now=NOW, ttl=60)
    assert not decision.retire
    assert decision.blocking == {"evil", "n1"}
