"""Environment fingerprints against real child processes started with credential values."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

import pytest

from daemon.usage.environ import environ_fingerprints, fingerprint, read_environ, scan_environ
from tests.unit import test_usage_fdscan as fds
from tests.unit.test_usage_fdscan import Children

# Shared fixtures, bound here so that pytest finds them in this module.
children = fds.children

KEY = b"agent-key-for-tests"
SECRET_7 = "s3cret-seven-DO-NOT-LEAK"
SECRET_8 = "s3cret-eight-DO-NOT-LEAK"


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DB_PASSWORD", "OTHER")}
    env.update(extra)
    return env


def test_fingerprint_is_the_hmac_sha256_of_name_equals_value_under_the_key() -> None:
    expected = hmac.new(KEY, b"DB_PASSWORD=" + SECRET_7.encode(), hashlib.sha256).hexdigest()

    assert fingerprint(KEY, "DB_PASSWORD", SECRET_7) == expected
    assert fingerprint(b"other-key", "DB_PASSWORD", SECRET_7) != expected
    assert fingerprint(KEY, "DB_PASS", SECRET_7) != expected
    assert SECRET_7 not in expected


def test_only_entries_with_a_wanted_name_are_fingerprinted() -> None:
    raw = b"PATH=/bin\0DB_PASSWORD=" + SECRET_7.encode() + b"\0OTHER=" + SECRET_7.encode() + b"\0NOEQUALS\0"

    assert environ_fingerprints(raw, key=KEY, names={b"DB_PASSWORD"}) == {fingerprint(KEY, "DB_PASSWORD", SECRET_7)}


def test_processes_are_matched_to_the_version_in_their_environment(children: Children) -> None:
    seven = children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    eight = children("hold", env=env_with(DB_PASSWORD=SECRET_8))
    # Same value under a name we did not render: not a consumer of ours.
    other_name = children("hold", env=env_with(OTHER=SECRET_7))
    plain = children("hold", env=env_with())
    index = {
        fingerprint(KEY, "DB_PASSWORD", SECRET_7): "v7",
        fingerprint(KEY, "DB_PASSWORD", SECRET_8): "v8",
    }

    found = scan_environ(index, key=KEY, names={"DB_PASSWORD"})

    assert found == {seven.pid: {"v7"}, eight.pid: {"v8"}}
    assert other_name.pid not in found and plain.pid not in found


def test_a_wrong_key_matches_nothing(children: Children) -> None:
    children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    index = {fingerprint(b"someone-else", "DB_PASSWORD", SECRET_7): "v7"}

    assert scan_environ(index, key=KEY, names={"DB_PASSWORD"}) == {}


def test_given_pids_limit_the_scan_and_gone_pids_are_ignored(children: Children) -> None:
    a = children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    b = children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    gone = children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    gone.stop()
    index = {fingerprint(KEY, "DB_PASSWORD", SECRET_7): "v7"}

    assert scan_environ(index, key=KEY, names=["DB_PASSWORD"], pids=[a.pid, gone.pid]) == {a.pid: {"v7"}}
    assert read_environ(gone.pid) is None
    assert b.pid in scan_environ(index, key=KEY, names=["DB_PASSWORD"])


def test_no_names_or_no_index_reads_nothing() -> None:
    assert scan_environ({}, key=KEY, names={"DB_PASSWORD"}) == {}
    assert scan_environ({"x": 1}, key=KEY, names=()) == {}


def test_the_value_never_shows_in_results_or_logs(children: Children, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    child = children("hold", env=env_with(DB_PASSWORD=SECRET_7))
    index = {fingerprint(KEY, "DB_PASSWORD", SECRET_7): "v7"}

    found = scan_environ(index, key=KEY, names={"DB_PASSWORD"}, pids=[child.pid])

    assert found == {child.pid: {"v7"}}
    prints = environ_fingerprints(read_environ(child.pid) or b"", key=KEY, names={b"DB_PASSWORD"})
    assert prints == {fingerprint(KEY, "DB_PASSWORD", SECRET_7)}
    text = repr(found) + repr(prints) + caplog.text
    assert SECRET_7 not in text
