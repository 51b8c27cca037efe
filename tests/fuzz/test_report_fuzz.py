"""Issue 10: a node report from a hostile node (or a hostile writer of the store) is read safely.

Every reporter (store metadata, DynamoDB, the Vault status path, pod annotations)
reads a report with ``NodeReport.from_json`` and catches exactly the errors it
promises for an unreadable one (TypeError, ValueError, KeyError), standing in a
stale report that blocks the gate. So, for any text at all:

- ``from_json`` returns a sane report or raises one of those three, nothing else
  (a RecursionError or OverflowError would escape every reporter and end the
  rotator's retire pass);
- a report it returns has a finite, non-negative heartbeat, non-negative integer
  holder counts, holders and errors of the declared types, and no part larger
  than the text it came from (itself bounded);
- through a real reporter (the local store's metadata, SQLite) and the gate, a
  node whose report is unreadable blocks by name, and a hostile entry never lets
  a version go while an honest node still holds it or is not yet on the new one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.report.base import MAX_REPORT_CHARS, REPORT_PREFIX, Holder, NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation.gate import decide
from daemon.stores.local import LocalStore
from tests.fuzz import scale

pytestmark = pytest.mark.fuzz

UNREADABLE = (TypeError, ValueError, KeyError)
NOW = 1_700_000_000.0
TTL = 90.0
OLD, NEW = "1", "2"

# ---------------------------------------------------------------- hostile texts

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
)
# Values a report's fields plausibly hold, so that examples get past the first type check.
plausible = {
    "node": st.sampled_from(["n1", "n2", "evil", ""]),
    "credential": st.just("db"),
    "current": st.sampled_from([OLD, NEW, None]),
    "heartbeat": st.sampled_from([NOW, NOW - 1, NOW + 1, 0, -1.0, 1e308, -0.0])
    | st.floats(allow_nan=True)
    | st.integers(min_value=10**300, max_value=10**400),
    "in_use": st.dictionaries(
        st.sampled_from([OLD, NEW]), st.integers(-3, 3) | st.floats(allow_nan=True) | st.sampled_from(["1", True])
    ),
    "holders": st.lists(
        st.fixed_dictionaries(
            {
                "pid": st.integers(-1, 10) | json_values,
                "exe": st.just("/bin/app") | json_values,
                "consumer": st.none() | st.just("app") | json_values,
                "how": st.just("fd") | json_values,
                "version": st.sampled_from([OLD, NEW]) | json_values,
            }
        ),
        max_size=3,
    ),
    "agent_version": st.just("0.1.0") | json_values,
    "errors": st.lists(st.text(max_size=10) | json_values, max_size=3) | json_values,
}
report_like = st.fixed_dictionaries(
    {},
    optional={k: v | json_values for k, v in plausible.items()}
    | {"zzz": json_values},  # a field some newer agent added
)


def deep(depth: int, opener: str) -> str:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + closer * depth


deeply_nested = st.builds(
    lambda depth, opener, where: where.replace("X", deep(depth, opener)),
    st.integers(min_value=1, max_value=150_000),
    st.sampled_from(["[", "{"]),
    st.sampled_from(
        [
            "X",
            '{"node": "n1", "credential": "db", "current": null, "in_use": X}',
            '{"node": "n1", "credential": "db", "current": null, "errors": [X]}',
            '{"node": "n1", "credential": "db", "current": null, "holders": [{"pid": 1, "exe": X}]}',
        ]
    ),
)
hostile_texts = (
    report_like.map(lambda d: json.dumps(d, allow_nan=True))
    | json_values.map(lambda v: json.dumps(v, allow_nan=True))
    | st.text()
    | st.binary().map(lambda b: b.decode("utf-8", "surrogateescape"))
    | deeply_nested
)


def parse(text: str) -> NodeReport | None:
    """The report, or None when it is unreadable; anything else raised fails the test."""
    try:
        return NodeReport.from_json(text)
    except UNREADABLE:
        return None


def assert_sane(report: NodeReport, text: str) -> None:
    assert isinstance(report.node, str) and isinstance(report.credential, str)
    assert report.current is None or isinstance(report.current, str)
    assert not isinstance(report.heartbeat, bool) and isinstance(report.heartbeat, int | float)
    assert math.isfinite(float(report.heartbeat)) and report.heartbeat >= 0, report.heartbeat
    for version, count in report.in_use.items():
        assert isinstance(version, str)
        assert type(count) is int and count >= 0, count
    for h in report.holders:
        assert isinstance(h, Holder)
        assert type(h.pid) is int and h.pid >= 0, h.pid
        assert isinstance(h.exe, str) and isinstance(h.how, str) and isinstance(h.version, str)
        assert h.consumer is None or isinstance(h.consumer, str)
    assert isinstance(report.agent_version, str)
    assert all(isinstance(e, str) for e in report.errors)
    # Bounded: the text is at most MAX_REPORT_CHARS, and no part outgrows it.
    assert len(text) <= MAX_REPORT_CHARS
    assert len(report.holders) + len(report.in_use) + len(report.errors) <= len(text)
    # What was read writes out again as a report that reads back the same (defaults spelled
    # out can push a report right at the cap over it).
    again = report.to_json()
    if len(again) <= MAX_REPORT_CHARS:
        assert NodeReport.from_json(again) == report


@given(text=hostile_texts)
def test_any_text_read_as_a_node_report_is_a_sane_report_or_unreadable(text: str) -> None:
    report = parse(text)
    if report is not None:
        assert_sane(report, text)


@pytest.mark.parametrize("extra", [-1, 0, 1, 10**6])
def test_a_report_over_the_size_cap_is_unreadable_and_one_at_it_is_read(extra: int) -> None:
    head = '{"node": "n1", "credential": "db", "current": null, "agent_version": "'
    text = head + "x" * (MAX_REPORT_CHARS + extra - len(head) - 2) + '"}'
    assert len(text) == MAX_REPORT_CHARS + extra
    report = parse(text)
    if extra > 0:
        assert report is None
    else:
        assert report is not None
        assert_sane(report, text)


@given(data=report_like)
def test_a_report_shaped_object_is_a_sane_report_or_unreadable(data: dict[str, Any]) -> None:
    text = json.dumps(data, allow_nan=True)
    report = parse(text)
    if report is not None:
        assert_sane(report, text)


# ---------------------------------------------------------------- through a reporter and the gate

HONEST = ("n1", "n2")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    s = LocalStore(Path(tmp_path_factory.mktemp("reports")) / "store.db", watch_files=False)
    yield s  # type: ignore[misc]
    s.close()


_keys = itertools.count()


# Each example is a store write and read (SQLite, ~15 ms): a quarter of the fuzz profile's count.
@settings(
    max_examples=scale(ci=200, fuzz=5000),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    # The store keeps UTF-8 text: a lone surrogate cannot be written, so it cannot be read either.
    hostile=hostile_texts.filter(lambda t: len(t) < 200_000 and _utf8(t)),
    honest=st.tuples(*[st.sampled_from(["drained", "holding", "behind", "stale"]) for _ in HONEST]),
)
def test_a_hostile_report_entry_never_lets_a_version_go_that_an_honest_node_still_needs(
    store: LocalStore, hostile: str, honest: tuple[str, ...]
) -> None:
    key = f"fuzz/{next(_keys)}"
    entries = {
        REPORT_PREFIX + node: honest_report(node, how).to_json() for node, how in zip(HONEST, honest, strict=True)
    }
    entries[REPORT_PREFIX + "evil"] = hostile
    store.merge_metadata_sync(key, entries)

    reports = asyncio.run(MetadataReporter(store).collect(key, "db"))
    # As the rotator knows them: every node seen in a report (the honest ones have been, all along).
    known = {*HONEST, *(r.node for r in reports)}
    decision = decide(old=OLD, new=NEW, reports=reports, known=known, now=NOW, ttl=TTL)

    for node, how in zip(HONEST, honest, strict=True):
        if how != "drained":
            assert not decision.retire, (node, how, decision)
    parsed = parse(hostile)
    if parsed is None or parsed.credential != "db" or parsed.node != "evil":
        # Unreadable, about another credential, or claiming another node's name: the entry's
        # node is unknown, and unknown blocks by name.
        assert "evil" in decision.blocking, decision
        assert not decision.retire


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def honest_report(node: str, how: str) -> NodeReport:
    return NodeReport(
        node=node,
        credential="db",
        current=OLD if how == "behind" else NEW,
        in_use={OLD: 1} if how == "holding" else {},
        heartbeat=NOW - 10 * TTL if how == "stale" else NOW,
    )
