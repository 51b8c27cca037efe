"""The ``baton`` command line as a real process: check-config, agent with a bad config, store, the example.

Exit status: 0 ok, 2 bad usage or config (one line per problem naming the
field path, never a traceback); only ``store get --reveal`` prints a value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from daemon.stores.base import MAX_PAYLOAD
from tests.e2e.helpers import baton, free_port, poll, start_agent, store_put
from tests.helpers import GOOD_CONFIG

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "agent.yaml"
SECRET = "cli-Secret-Value-5e1d"

BAD = {
    "bad mode": (GOOD_CONFIG.replace('"0440"', '"0777"'), ["credentials.0.output.mode: "]),
    "unknown keys": (
        GOOD_CONFIG.replace('      mode: "0440"\n', '      mode: "0440"\n      colour: red\n') + "extra: 1\n",
        ["credentials.0.output.colour: unknown key", "extra: unknown key"],
    ),
    "missing field and bad listen": (
        GOOD_CONFIG.replace("    key: app/db\n", "").replace("127.0.0.1:8787", "8787"),
        ["credentials.0.key: required field is missing", "api.listen: "],
    ),
    "duplicates": (
        GOOD_CONFIG
        + "  - {name: app-db, key: b, output: {dir: /var/lib/baton-good-config/b}}\n"
        + "  - {name: c, key: c, output: {dir: /var/lib/baton-good-config/app-db}}\n",
        ["credentials.1.name: duplicate credential name", "credentials.2.output.dir: same output dir"],
    ),
    "bad duration and signal and match": (
        GOOD_CONFIG
        + "    consumers:\n"
        + "      - name: c\n"
        + "        match: {pidfile: /run/c.pid, exe: /usr/bin/c}\n"
        + "        reload: {signal: SIGNOPE}\n"
        + "        min_restart_interval: often\n",
        [
            "credentials.0.consumers.0.match: ",
            "credentials.0.consumers.0.reload.signal: ",
            "credentials.0.consumers.0.min_restart_interval: ",
        ],
    ),
}


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text
    assert 'File "' not in text


# ---------------------------------------------------------------- check-config and agent --config


def test_check_config_prints_ok_and_exits_0(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(GOOD_CONFIG)

    r = baton("check-config", str(tmp_path / "c.yaml"))

    assert (r.code, r.out, r.err) == (0, "ok\n", "")


@pytest.mark.parametrize(("text", "expected"), list(BAD.values()), ids=list(BAD))
def test_check_config_and_agent_print_one_line_per_problem_and_exit_2(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)

    check = baton("check-config", str(path), cwd=tmp_path)
    agent = baton("agent", "--config", str(path), cwd=tmp_path)

    for r in (check, agent):
        assert r.code == 2
        assert r.out == ""
        _no_traceback(r.err)
        lines = r.err.splitlines()
        for prefix in expected:
            assert any(line.startswith(prefix) for line in lines), (prefix, lines)
    # The agent says exactly what check-config says, and writes nothing.
    assert agent.err == check.err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "store.db").exists()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [("node_id: [\n", r": line \d+ invalid YAML"), (None, r": cannot read: No such file or directory")],
    ids=["invalid YAML", "missing file"],
)
def test_an_unreadable_config_is_one_line_and_exit_2(tmp_path: Path, text: str | None, pattern: str) -> None:
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)

    for r in (baton("check-config", str(path)), baton("agent", "--config", str(path))):
        assert r.code == 2
        _no_traceback(r.err)
        (line,) = r.err.splitlines()
        assert line.startswith(str(path))
        assert re.search(pattern, line)


def test_the_example_config_is_valid() -> None:
    r = baton("check-config", str(EXAMPLE))

    assert (r.code, r.out) == (0, "ok\n"), r.err


def test_the_example_config_runs_an_agent_that_writes_into_demo_out(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "agent.yaml"
    text = EXAMPLE.read_text()
    assert '"127.0.0.1:8787"' in text
    assert "/tmp/baton-demo/" in text
    text = text.replace("/tmp/baton-demo/", f"{tmp_path / 'demo-out'}/")
    config.write_text(text.replace('"127.0.0.1:8787"', f'"127.0.0.1:{port}"'))
    store_put(tmp_path / "demo-out" / "store.db", "app/db", json.dumps({"username": "app", "password": SECRET}))

    agent = start_agent(config, cwd=tmp_path, port=port)
    try:
        agent.wait_ready()
        assert (tmp_path / "demo-out" / "app-db" / "password").read_text() == SECRET
        assert (tmp_path / "demo-out" / "app-db" / "dsn").read_text() == f"postgresql://app:{SECRET}@db:5432/app"
        code, _took = agent.stop()
        assert code == 0
    finally:
        agent.kill()
    agent.assert_never_said([SECRET])


# ---------------------------------------------------------------- store put


def test_store_put_reads_a_file_or_stdin_and_prints_the_new_id(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    value = tmp_path / "v"
    value.write_text(SECRET)

    first = baton("store", "--path", str(db), "put", "k", "--value-file", str(value))
    second = baton("store", "--path", str(db), "put", "k", "--value-file", "-", stdin=b"from-stdin")

    assert (first.code, first.out) == (0, "1\n")
    assert (second.code, second.out) == (0, "2\n")
    assert SECRET not in first.out + first.err
    shown = baton("store", "--path", str(db), "get", "k", "--reveal")
    assert shown.out == "from-stdin\n"


EMPTY = (b"", "payload is empty")
TOO_BIG = (b"x" * (MAX_PAYLOAD + 1), "over the 1 MiB limit")
NOT_UTF8 = (b"\xff\xfe not utf-8 \xc3", "not valid UTF-8")


@pytest.mark.parametrize(
    ("data", "message", "source"),
    [(*EMPTY, "file"), (*TOO_BIG, "file"), (*NOT_UTF8, "file"), (*TOO_BIG, "stdin"), (*NOT_UTF8, "stdin")],
    ids=["empty file", "file over 1 MiB", "file not UTF-8", "stdin over 1 MiB", "stdin not UTF-8"],
)
def test_store_put_refuses_a_bad_payload_with_a_clear_message(
    tmp_path: Path, data: bytes, message: str, source: str
) -> None:
    db = tmp_path / "s.db"
    if source == "file":
        (tmp_path / "v").write_bytes(data)
        r = baton("store", "--path", str(db), "put", "k", "--value-file", str(tmp_path / "v"))
    else:
        r = baton("store", "--path", str(db), "put", "k", "--value-file", "-", stdin=data)

    assert r.code != 0
    assert r.out == ""
    assert message in r.err
    assert len(r.err.splitlines()) == 1
    _no_traceback(r.err)
    assert baton("store", "--path", str(db), "versions", "k").out == ""


def test_store_put_of_a_missing_value_file_is_exit_2(tmp_path: Path) -> None:
    r = baton("store", "--path", str(tmp_path / "s.db"), "put", "k", "--value-file", str(tmp_path / "nope"))

    assert r.code == 2
    assert r.err == f"cannot read {tmp_path / 'nope'}: No such file or directory\n"


# ---------------------------------------------------------------- versions and get


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    db = tmp_path / "s.db"
    store_put(db, "k", SECRET + "-1")
    store_put(db, "k", SECRET + "-2")
    return db


def test_store_versions_lists_stages_and_never_a_value(filled: Path) -> None:
    text = baton("store", "--path", str(filled), "versions", "k")
    as_json = baton("store", "--path", str(filled), "versions", "k", "--json")

    assert text.code == as_json.code == 0
    rows = [line.split() for line in text.out.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("1", "previous"), ("2", "current")]
    data = json.loads(as_json.out)
    assert [(v["id"], v["stages"], v["retired"]) for v in data] == [
        ("1", ["previous"], False),
        ("2", ["current"], False),
    ]
    for r in (text, as_json):
        assert SECRET not in r.out + r.err


def test_store_get_prints_the_value_only_with_reveal(filled: Path) -> None:
    hidden = baton("store", "--path", str(filled), "get", "k")
    old = baton("store", "--path", str(filled), "get", "k", "--version", "1")
    shown = baton("store", "--path", str(filled), "get", "k", "--reveal")
    shown_old = baton("store", "--path", str(filled), "get", "k", "--version", "1", "--reveal")

    assert hidden.code == old.code == 0
    assert SECRET not in hidden.out + hidden.err + old.out + old.err
    assert "--reveal" in hidden.out
    assert hidden.out.startswith("version 2 ")
    assert old.out.startswith("version 1 ")
    assert shown.out == SECRET + "-2\n"
    assert shown_old.out == SECRET + "-1\n"


def test_store_get_of_an_unknown_key_fails_in_one_line(tmp_path: Path) -> None:
    r = baton("store", "--path", str(tmp_path / "s.db"), "get", "nope", "--reveal")

    assert r.code == 1
    assert r.out == ""
    (line,) = r.err.splitlines()
    assert line.startswith("baton: ")
    assert "'nope'" in line


def test_a_missing_subcommand_is_a_usage_error_with_exit_2() -> None:
    r = baton("store")

    assert r.code == 2
    assert "usage:" in r.err
    _no_traceback(r.err)


def test_version_flag_prints_the_version() -> None:
    r = baton("--version")

    assert r.code == 0
    assert r.out.startswith("baton ")


def test_polling_helper_fails_with_the_name_of_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="the impossible"):
        poll(lambda: False, timeout=0.05, what="the impossible")
