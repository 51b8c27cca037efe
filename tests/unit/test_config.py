"""daemon.config: the documented shape validates; every bad file is named field by field.

Loading goes through real YAML files in a temp dir, and the ``check-config``
command is driven in-process through ``daemon.cli.main`` (the subprocess runs,
no traceback included, are in tests/e2e/test_cli.py).
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from daemon import config
from daemon.cli import main
from daemon.config import (
    LOCK_FILE,
    MAX_DURATION,
    STATE_FILE,
    SYSTEM_DIRS,
    TMP_INFIX,
    Config,
    HealthConfig,
    RotationConfig,
    check_host,
    file_name_problem,
    lexical,
    load_config,
    output_dir_problem,
    parse_config,
    parse_duration,
    store_path_problem,
)
from daemon.errors import ConfigError
from daemon.files import writer
from tests.helpers import GOOD_CONFIG


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "baton.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    return info.value.problems


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


# ---------------------------------------------------------------- the good shape


def test_the_documented_config_validates_with_its_values(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD_CONFIG))

    assert config.node_id == "node-a"
    assert config.store.kind == "local"
    assert config.store.path == Path("./store.db")
    assert config.api.listen == "127.0.0.1:8787"
    (cred,) = config.credentials
    assert cred.name == "app-db"
    assert cred.key == "app/db"
    assert cred.required is True
    assert cred.output.mode == 0o440
    assert cred.output.layout == "symlink"
    assert set(cred.output.files) == {"password", "dsn"}
    assert config.credential("app-db") is cred


def test_check_config_prints_ok_and_exits_zero_for_the_documented_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _check(_write(tmp_path, GOOD_CONFIG), capsys)

    assert (code, out, err) == (0, "ok\n", "")


def test_defaults_give_a_0400_file_named_value_and_a_local_store() -> None:
    config = Config.model_validate({"credentials": [{"name": "x", "key": "x", "output": {"dir": "/tmp/x"}}]})

    out = config.credentials[0].output
    assert out.mode == 0o400
    assert out.files == {"value": "{{ value }}"}
    assert config.store.kind == "local"
    assert config.api.listen == "127.0.0.1:8787"


def test_a_config_is_frozen_after_load(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD_CONFIG))

    with pytest.raises(ValueError, match="frozen"):
        config.node_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("250ms", 0.25), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0), (2, 2.0), ("1.5", 1.5)],
)
def test_durations_are_read_in_their_units(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad",
    ["soon", "-1s", "5 parsecs", True, -3, None, float("nan"), float("inf"), "9" * 20 + "d", 10**400, "\u0661s"],
)
def test_a_bad_duration_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_a_duration_of_ten_years_is_the_longest_accepted() -> None:
    assert parse_duration("3650d") == MAX_DURATION
    with pytest.raises(ValueError, match="at most 10 years"):
        parse_duration("3651d")


@pytest.mark.parametrize(
    ("field", "zero_ok"),
    [
        ("agent.debounce", True),
        ("agent.scan_interval", False),
        ("agent.retry_min", False),
        ("report.heartbeat", False),
        ("credentials.0.rotation.min_drain", True),
        ("credentials.0.rotation.max_drain", False),
    ],
)
def test_only_the_fields_where_zero_means_no_wait_accept_zero(field: str, zero_ok: bool) -> None:
    data: dict[str, Any] = {
        "credentials": [{"name": "x", "key": "x", "output": {"dir": "/tmp/x"}, "rotation": {"every": "1h"}}]
    }
    *parents, last = field.split(".")
    node: Any = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[last] = "0s"

    if zero_ok:
        parse_config(data)
    else:
        with pytest.raises(ConfigError, match=re.escape(field) + ": must be more than 0"):
            parse_config(data)


def test_the_names_the_config_reserves_are_the_writers_own() -> None:
    assert TMP_INFIX == writer._TMP
    assert STATE_FILE == writer.STATE
    assert LOCK_FILE == writer.LOCK
    assert writer.CURRENT_LINK.startswith("..")
    assert config._WRITER_NAME.pattern == f"{writer._VDIR.pattern}|{writer._TEMP.pattern}"


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("password", True),
        ("db.json", True),
        (".pgpass", True),
        ("é" * 127, True),
        ("é" * 128, False),
        ("x" * 255, True),
        ("x" * 256, False),
        ("a/b", False),
        ("a\0b", False),
        ("tab\there", False),
        ("..current", False),
        ("..", False),
        (".", False),
        ("", False),
        ("pw.tmp-x", False),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_a_file_name_must_be_a_plain_name_of_at_most_255_bytes(name: str, ok: bool) -> None:
    assert (file_name_problem(name) is None) is ok


@pytest.mark.parametrize(
    ("given", "expected"),
    [("/run/baton/../../etc", "/etc"), ("//etc", "/etc"), ("/a/./b/", "/a/b"), ("/a//b", "/a/b")],
)
def test_an_output_dir_is_normalised_lexically(given: str, expected: str) -> None:
    assert lexical(Path(given)) == Path(expected)
    config = parse_config({"credentials": [{"name": "x", "key": "x", "output": {"dir": f"{given}/x"}}]})
    assert config.credentials[0].output.dir == Path(expected) / "x"


def test_every_system_dir_is_absolute_and_normalised() -> None:
    assert all(lexical(Path(d)) == Path(d) for d in SYSTEM_DIRS)
    assert {"/", "/etc", "/usr", "/var", "/home", "/tmp", "/var/lib", "/usr/local", "/run", "/opt"} <= SYSTEM_DIRS


def test_a_path_part_that_is_not_a_plain_name_is_quoted_so_a_problem_stays_one_line(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GOOD_CONFIG + '"colour\\nred": 1\n"a: b": 2\n".": 3\n')

    assert "'colour\\nred': unknown key" in problems, problems
    assert "'a: b': unknown key" in problems
    assert "'.': unknown key" in problems


def test_an_unknown_key_never_echoes_its_value(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GOOD_CONFIG + "vault_token: s.very-secret-token\n")

    assert problems == ["vault_token: unknown key"]


# ---------------------------------------------------------------- checks against the host


def test_store_path_problem_names_what_is_wrong_with_a_path(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")

    assert store_path_problem(tmp_path / "new" / "store.db") is None
    assert store_path_problem(tmp_path / "f") is None  # an existing file: SQLite says if it is a database
    assert store_path_problem("") == "must not be empty"
    assert "is a directory" in (store_path_problem(tmp_path) or "")
    assert f"{tmp_path / 'f'} is not a directory" == store_path_problem(tmp_path / "f" / "store.db")
    assert "kernel file system" in (store_path_problem("/proc/self/nope/store.db") or "")
    assert "not a regular file" in (store_path_problem("/dev/null") or "")


def test_output_dir_problem_accepts_new_empty_and_batons_own_dirs_only(tmp_path: Path) -> None:
    files = {"password"}
    assert output_dir_problem(tmp_path / "new", files) is None
    (tmp_path / "empty").mkdir()
    assert output_dir_problem(tmp_path / "empty", files) is None
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "..baton.lock").touch()
    (tmp_path / "ours" / "unrelated").touch()  # the lock says it is ours, whatever else is there
    assert output_dir_problem(tmp_path / "ours", files) is None
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "password").touch()
    (tmp_path / "theirs" / "index.html").touch()
    assert "'index.html'" in (output_dir_problem(tmp_path / "theirs", files) or "")


def test_check_host_looks_up_owner_and_group_names_and_takes_numbers_as_they_are(tmp_path: Path) -> None:
    def output(**kw: Any) -> dict[str, Any]:
        return {"name": "x", "key": "x", "output": {"dir": str(tmp_path / "x"), **kw}}

    ok = parse_config({"credentials": [output(owner="root", group="root")]})
    numeric = parse_config({"credentials": [output(owner=54321, group=54321)]})
    bad = parse_config({"credentials": [output(owner="no-such-user-baton", group="no-such-group-baton")]})

    assert check_host(ok) == []
    assert check_host(numeric) == []
    assert check_host(bad) == [
        "credentials.0.output.owner: no such user 'no-such-user-baton' on this host",
        "credentials.0.output.group: no such group 'no-such-group-baton' on this host",
    ]


def test_a_socket_file_at_the_unix_listen_path_is_fine_and_anything_else_is_not(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    config = parse_config({"api": {"listen": f"unix:{sock}"}, "credentials": []})
    assert check_host(config) == []
    sock.mkdir()
    assert check_host(config) == [f"api.listen: {sock} exists and is not a socket; Baton will not replace it"]


def test_a_consumer_without_a_health_check_gets_the_alive_for_default_without_a_warning(tmp_path: Path) -> None:
    # filterwarnings=error turns any pydantic UserWarning raised while the
    # default HealthConfig is built into a failure of this test.
    config = load_config(
        _write(
            tmp_path,
            GOOD_CONFIG
            + """\
    consumers:
      - name: app
        match: {pidfile: /run/app.pid}
        reload: {signal: HUP}
""",
        )
    )

    (consumer,) = config.credentials[0].consumers
    assert consumer.reload.signal == "SIGHUP"
    assert consumer.health.alive_for == 2.0


def test_a_health_check_built_in_code_gets_the_alive_for_default_without_a_warning() -> None:
    # Code (the demo, the status command) builds these models directly; pydantic
    # ignores a model returned by an "after" validator on __init__ and warns.
    assert HealthConfig().alive_for == 2.0


def test_a_rotation_built_in_code_gets_the_password_generator_without_a_warning() -> None:
    rotation = RotationConfig(every=60)

    assert rotation.generator is not None
    assert rotation.generator.kind == "password"


def test_a_rotation_without_a_source_gets_the_password_generator() -> None:
    config = Config.model_validate(
        {"credentials": [{"name": "x", "key": "x", "output": {"dir": "/tmp/x"}, "rotation": {"every": "1h"}}]}
    )

    rotation = config.credentials[0].rotation
    assert rotation is not None
    assert rotation.every == 3600.0
    assert rotation.generator is not None
    assert rotation.generator.kind == "password"


# ---------------------------------------------------------------- bad files, one line per problem


BAD_CASES = {
    "bad mode": (GOOD_CONFIG.replace('"0440"', '"0777"'), "credentials.0.output.mode: "),
    "mode not octal": (GOOD_CONFIG.replace('"0440"', '"rw-r-----"'), "credentials.0.output.mode: "),
    "world-writable mode": (GOOD_CONFIG.replace('"0440"', '"0442"'), "credentials.0.output.mode: "),
    "unknown key at top level": (GOOD_CONFIG + "colour: red\n", "colour: unknown key"),
    "unknown key nested": (
        GOOD_CONFIG.replace('      mode: "0440"\n', '      mode: "0440"\n      colour: red\n'),
        "credentials.0.output.colour: unknown key",
    ),
    "unknown key in the store": (
        GOOD_CONFIG.replace("path: ./store.db}", "path: ./store.db, colour: red}"),
        "store.colour: unknown key",
    ),
    "missing required field": (
        GOOD_CONFIG.replace("    key: app/db\n", ""),
        "credentials.0.key: required field is missing",
    ),
    "missing credentials": ("node_id: a\n", "credentials: required field is missing"),
    "duplicate credential names": (
        GOOD_CONFIG + "  - {name: app-db, key: other, output: {dir: /var/lib/baton-good-config/other}}\n",
        "credentials.1.name: duplicate credential name 'app-db'",
    ),
    "duplicate output dirs": (
        GOOD_CONFIG + "  - {name: other, key: other, output: {dir: /var/lib/baton-good-config/x/../app-db/}}\n",
        "credentials.1.output.dir: same output dir as credentials.0",
    ),
    "bad listen port": (GOOD_CONFIG.replace("127.0.0.1:8787", "127.0.0.1:99999"), "api.listen: "),
    "bad listen without port": (GOOD_CONFIG.replace("127.0.0.1:8787", "localhost"), "api.listen: "),
    "bad duration": (GOOD_CONFIG + "agent: {debounce: soon}\n", "agent.debounce: expected a duration"),
    "bad signal": (
        GOOD_CONFIG + "    consumers:\n      - {name: c, match: {pidfile: /run/c.pid}, reload: {signal: SIGFOO}}\n",
        "credentials.0.consumers.0.reload.signal: unknown signal 'SIGFOO'",
    ),
    "consumer match with two keys": (
        GOOD_CONFIG + "    consumers:\n      - {name: c, match: {pidfile: /run/c.pid, cmdline: app}}\n",
        "credentials.0.consumers.0.match: match needs exactly one of",
    ),
    "bad file name": (
        GOOD_CONFIG.replace('password: "{{ password }}"', '"../x": "{{ password }}"'),
        "credentials.0.output.files: ",
    ),
    "unknown store kind": (GOOD_CONFIG.replace("kind: local", "kind: etcd"), "store: "),
    "not a mapping": ("- a\n- b\n", "(top level): expected a mapping"),
    "empty file": ("", "(top level): expected a mapping"),
}


@pytest.mark.parametrize(("text", "expected"), list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_a_bad_config_names_the_field_path_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(tmp_path, text)

    assert any(line.startswith(expected) for line in problems), problems
    assert all("\n" not in line for line in problems)


@pytest.mark.parametrize(("text", "expected"), list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_check_config_prints_the_problem_lines_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    code, out, err = _check(_write(tmp_path, text), capsys)

    assert code == 2
    assert out == ""
    assert any(line.startswith(expected) for line in err.splitlines()), err
    assert "Traceback" not in err


def test_every_problem_of_a_file_is_reported_not_only_the_first(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace('"0440"', '"0777"').replace("127.0.0.1:8787", "nope") + "colour: red\n"

    problems = _problems(tmp_path, text)

    assert {p.split(":")[0] for p in problems} >= {"credentials.0.output.mode", "api.listen", "colour"}


def test_a_bad_value_is_shown_shortened(tmp_path: Path) -> None:
    long = "x" * 200
    problems = _problems(tmp_path, GOOD_CONFIG.replace("127.0.0.1:8787", long))

    (line,) = [p for p in problems if p.startswith("api.listen")]
    assert long not in line
    assert len(line) < 160


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "node_id: a\nstore: [\n")

    code, _out, err = _check(path, capsys)

    assert code == 2
    assert err.startswith(f"{path}: line ")
    assert "invalid YAML" in err
    assert len(err.splitlines()) == 1


def test_a_missing_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _check(tmp_path / "nope.yaml", capsys)

    assert code == 2
    assert out == ""
    assert err == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"


def test_an_operator_who_cannot_look_into_the_agents_dirs_gets_no_false_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # check-config run by a user who may not read /var/lib/baton: the agent,
    # running as its own user, checks again when it opens or writes.
    config = parse_config(
        {
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "api": {"listen": f"unix:{tmp_path / 'api.sock'}"},
            "credentials": [{"name": "x", "key": "x", "output": {"dir": str(tmp_path / "x")}}],
        }
    )

    def denied(*_args: object, **_kw: object) -> None:
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        for name in ("stat", "lstat", "scandir"):
            m.setattr(os, name, denied)
        problems = check_host(config)

    assert problems == []


def test_check_config_reports_host_and_template_problems_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GOOD_CONFIG.replace('      mode: "0440"\n', '      mode: "0440"\n      owner: no-such-user-baton\n')
    text = text.replace('password: "{{ password }}"', 'password: "{{ password"')

    code, _out, err = _check(_write(tmp_path, text), capsys)

    assert code == 2
    assert err.splitlines() == [
        "credentials.0.output.owner: no such user 'no-such-user-baton' on this host",
        "credentials.0.output.files.password: template syntax error on line 1: unexpected end of template, "
        "expected 'end of print statement'.",
    ]


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet", "Rollout"])
def test_a_rollout_reload_names_any_workload_kind_the_rollout_action_restarts(kind: str) -> None:
    from daemon.config import RolloutConfig
    from sidecar.rollout import KINDS

    assert RolloutConfig.model_validate({"kind": kind, "name": "web"}).kind in KINDS
    with pytest.raises(ValueError, match="kind"):
        RolloutConfig.model_validate({"kind": "CronJob", "name": "web"})
