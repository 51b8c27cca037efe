"""A hostile or careless operator's config: each one is refused by ``baton check-config`` and ``baton agent``.

Every case expects exit 2, no traceback, and a line that starts with the field
path of the bad value. The cases run the CLI's own ``main`` in this process (a
subprocess each would cost a minute); ``test_the_real_cli_refuses_...`` runs one
case of each kind through the real ``baton`` executable. The base config is
valid (``test_the_base_config_is_valid`` proves it), so each case fails for the
one thing it changes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.cli import main
from tests.e2e.helpers import baton

pytestmark = pytest.mark.hostile

SECRET = "hunter2-Payload-9f3ac1"


def base(tmp_path: Path) -> dict[str, Any]:
    return {
        "node_id": "node-a",
        "store": {"kind": "local", "path": str(tmp_path / "store.db")},
        "api": {"listen": "127.0.0.1:8787"},
        "credentials": [
            {
                "name": "app-db",
                "key": "app/db",
                "output": {
                    "dir": str(tmp_path / "out" / "app-db"),
                    "mode": "0440",
                    "files": {"password": "{{ password }}"},
                },
                "consumers": [{"name": "api", "match": {"pidfile": str(tmp_path / "api.pid")}}],
                "rotation": {"every": "24h"},
            },
            {
                "name": "other",
                "key": "other",
                "output": {"dir": str(tmp_path / "out" / "other")},
            },
        ],
    }


def put(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set ``a.0.b`` in a copy of ``config``."""
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node: Any = config
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


def run_main(*argv: str) -> tuple[int, str, str]:
    """``baton ARGV`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(list(argv))
    return int(info.value.code or 0), out.getvalue(), err.getvalue()


def check(tmp_path: Path, config: dict[str, Any]) -> tuple[int, str, str]:
    path = tmp_path / "baton.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_main("check-config", str(path))


def assert_refused(code: int, err: str, field: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert any(line.startswith(field + ":") for line in err.splitlines()), err


def test_the_base_config_is_valid(tmp_path: Path) -> None:
    assert check(tmp_path, base(tmp_path)) == (0, "ok\n", "")


# ---------------------------------------------------------------- output dirs (finding 3)

SYSTEM_DIRS = ["/", "/etc", "/usr", "/var", "/home", "/tmp", "/var/lib", "/usr/local", "/run", "/root", "/opt"]


@pytest.mark.parametrize("bad", [*SYSTEM_DIRS, "/run/baton/../../etc", "/etc/", "//etc", "/proc/self", "/sys/fs"])
def test_an_output_dir_that_is_a_system_directory_is_refused(tmp_path: Path, bad: str) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.0.output.dir", bad))

    assert_refused(code, err, "credentials.0.output.dir")


@pytest.mark.parametrize("bad", [".", "", "out/app-db", "./out"])
def test_an_output_dir_that_is_relative_or_empty_is_refused(tmp_path: Path, bad: str) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.0.output.dir", bad))

    assert_refused(code, err, "credentials.0.output.dir")


@pytest.mark.parametrize("relation", ["inside", "equal", "containing", "equal after normpath"])
def test_an_output_dir_inside_equal_to_or_containing_another_credentials_is_refused(
    tmp_path: Path, relation: str
) -> None:
    first = tmp_path / "out" / "app-db"
    other = {
        "inside": first / "sub",
        "equal": first,
        "containing": first.parent,
        "equal after normpath": f"{first}/../app-db/.",
    }[relation]
    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.1.output.dir", str(other)))

    assert_refused(code, err, "credentials.1.output.dir")
    assert "credentials.0" in err


def test_an_existing_non_empty_directory_baton_did_not_create_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "srv-data"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    (foreign / "..baton-state.json").write_text("{}")  # a state file alone does not make it Baton's

    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.0.output.dir", str(foreign)))

    assert_refused(code, err, "credentials.0.output.dir")
    assert "'important.txt'" in err
    assert (foreign / "important.txt").read_text() == "keep me"


@pytest.mark.parametrize("marker", ["..baton-state.json", "..baton.lock"])
def test_a_non_empty_directory_holding_batons_own_state_or_lock_file_is_accepted(tmp_path: Path, marker: str) -> None:
    out = tmp_path / "out" / "app-db"
    out.mkdir(parents=True)
    (out / marker).write_text("{}")
    (out / "password").symlink_to("..current/password")

    assert check(tmp_path, base(tmp_path)) == (0, "ok\n", "")


def test_a_directory_left_by_an_interrupted_first_write_is_accepted(tmp_path: Path) -> None:
    # Killed after the version dir and the links, before the lock and state files:
    # the next start recovers it, so the config check must not lock the agent out.
    out = tmp_path / "out" / "app-db"
    (out / "..v1-0a1b2c3d").mkdir(parents=True)
    (out / "..v.tmp-0a1b2c3d4e5f").mkdir()
    (out / "..current").symlink_to("..v1-0a1b2c3d")
    (out / "password").symlink_to("..current/password")

    assert check(tmp_path, base(tmp_path)) == (0, "ok\n", "")


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_output_dir_path_that_is_a_file_or_a_symlink_is_refused(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "out" / "app-db"
    target.parent.mkdir()
    if kind == "file":
        target.write_text("x")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")

    code, _, err = check(tmp_path, base(tmp_path))

    assert_refused(code, err, "credentials.0.output.dir")


def test_the_agent_refuses_to_start_on_a_system_output_dir(tmp_path: Path) -> None:
    config = put(base(tmp_path), "credentials.0.output.dir", "/etc")
    path = tmp_path / "baton.yaml"
    path.write_text(yaml.safe_dump(config))

    r = baton("agent", "--config", str(path), timeout=20)

    assert_refused(r.code, r.err, "credentials.0.output.dir")


# ---------------------------------------------------------------- durations, modes, templates, names (finding 10)

DURATIONS = {
    "credentials.0.rotation.every": [0, "0s", float("nan"), float("inf"), "99999999999999999999d", -1, 10**400],
    "agent.scan_interval": [0, float("nan")],
    "agent.retry_min": ["0ms"],
    "report.heartbeat": [0, float("inf")],
    "credentials.0.rotation.max_drain": ["0s", "11000d"],
    "credentials.0.consumers.0.health.timeout": [0],
    "credentials.0.consumers.0.min_restart_interval": [float("nan"), -5],
}


@pytest.mark.parametrize(
    ("field", "bad"), [(f, v) for f, vs in DURATIONS.items() for v in vs], ids=lambda x: repr(x)[:30]
)
def test_a_duration_that_is_zero_not_finite_negative_or_absurd_is_refused(tmp_path: Path, field: str, bad: Any) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), field, bad))

    assert_refused(code, err, field)


@pytest.mark.parametrize("bad", [400, 440, 256, "0460", "0406", "0540", "0401", "4400", "1400", "2440", "0o440"])
def test_a_mode_that_is_an_int_writable_by_others_executable_or_special_is_refused(tmp_path: Path, bad: Any) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.0.output.mode", bad))

    assert_refused(code, err, "credentials.0.output.mode")


def test_an_unquoted_mode_is_not_reinterpreted(tmp_path: Path) -> None:
    (tmp_path / "baton.yaml").write_text(
        yaml.safe_dump(base(tmp_path)).replace("mode: '0440'", "mode: 400"),
    )

    r = baton("check-config", str(tmp_path / "baton.yaml"))

    assert_refused(r.code, r.err, "credentials.0.output.mode")
    assert "quoted" in r.err


@pytest.mark.parametrize(
    ("field", "template"),
    [
        ("credentials.0.output.files.password", "{{ password"),
        ("credentials.0.output.files.password", "{% if %}"),
        ("credentials.0.output.env.DB_PASSWORD", "{{ password }"),
    ],
)
def test_a_template_syntax_error_is_refused_at_check_config(tmp_path: Path, field: str, template: str) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), field, template))

    assert_refused(code, err, field)


@pytest.mark.parametrize(
    ("field", "bad"), [("owner", "nosuchuser-baton"), ("group", "nosuchgroup-baton"), ("owner", -1)]
)
def test_an_owner_or_group_that_does_not_resolve_is_refused(tmp_path: Path, field: str, bad: Any) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), f"credentials.0.output.{field}", bad))

    assert_refused(code, err, f"credentials.0.output.{field}")


def test_an_owner_and_group_that_resolve_are_accepted(tmp_path: Path) -> None:
    config = put(put(base(tmp_path), "credentials.0.output.owner", "nobody"), "credentials.0.output.group", 0)

    assert check(tmp_path, config) == (0, "ok\n", "")


@pytest.mark.parametrize(
    "bad",
    [
        "a\0b",
        "x" * 300,
        "é" * 128,
        "password.tmp-1",
        ".password.tmp-x",
        "..current",
        "..baton-state.json",
        ".",
        "..",
        "a/b",
        "",
        "line\nbreak",
    ],
    ids=lambda x: repr(x)[:20],
)
def test_a_file_name_that_is_not_a_plain_name_is_refused(tmp_path: Path, bad: str) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.0.output.files", {bad: "{{ password }}"}))

    assert_refused(code, err, "credentials.0.output.files")


@pytest.mark.parametrize("bad", ["A-B", "1X", "", "X=Y"])
def test_an_env_name_that_is_not_a_variable_name_is_refused(tmp_path: Path, bad: str) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.0.output.env", {bad: "{{ password }}"}))

    assert_refused(code, err, "credentials.0.output.env")


@pytest.mark.parametrize("bad", ["", "../../x", "a/b", ".hidden", "a" * 254, "has space", "nul\0", 7])
def test_a_node_id_that_is_empty_a_path_or_too_long_is_refused(tmp_path: Path, bad: Any) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "node_id", bad))

    assert_refused(code, err, "node_id")


def test_an_empty_store_path_is_refused(tmp_path: Path) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "store.path", ""))

    assert_refused(code, err, "store.path")


def test_a_store_path_that_is_a_directory_or_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for bad in (str(tmp_path), str(tmp_path / "afile" / "store.db")):
        code, _, err = check(tmp_path, put(base(tmp_path), "store.path", bad))

        assert_refused(code, err, "store.path")


# ---------------------------------------------------------------- other fields


OTHER: dict[str, tuple[str, Any, str]] = {
    "port out of range": ("api.listen", "127.0.0.1:65536", "api.listen"),
    "relative unix socket": ("api.listen", "unix:api.sock", "api.listen"),
    "empty host": ("api.listen", ":8787", "api.listen"),
    "empty cmdline": ("credentials.0.consumers.0.match", {"cmdline": ""}, "credentials.0.consumers.0.match.cmdline"),
    "cmdline that matches everything": (
        "credentials.0.consumers.0.match",
        {"cmdline": ".*"},
        "credentials.0.consumers.0.match.cmdline",
    ),
    "relative pidfile": (
        "credentials.0.consumers.0.match.pidfile",
        "api.pid",
        "credentials.0.consumers.0.match.pidfile",
    ),
    "health url not http": (
        "credentials.0.consumers.0.health",
        {"http": "file:///etc/passwd"},
        "credentials.0.consumers.0.health.http",
    ),
    "empty restart command": (
        "credentials.0.consumers.0.reload",
        {"restart": {"command": []}},
        "credentials.0.consumers.0.reload.restart.command",
    ),
    "empty exec argv element": (
        "credentials.0.consumers.0.reload",
        {"exec": [""]},
        "credentials.0.consumers.0.reload.exec.0",
    ),
    "empty key": ("credentials.0.key", "", "credentials.0.key"),
    "empty consumer name": ("credentials.0.consumers.0.name", "", "credentials.0.consumers.0.name"),
    "max_draining 0": ("credentials.0.rotation.max_draining", 0, "credentials.0.rotation.max_draining"),
    "ttl below heartbeat": ("report", {"heartbeat": "30s", "ttl": "10s"}, "report.ttl"),
    "retry_max below retry_min": ("agent", {"retry_min": "10s", "retry_max": "1s"}, "agent.retry_max"),
    "forget_after within the report ttl": (
        "report",
        {"heartbeat": "30s", "forget_after": "60s"},
        "report.forget_after",
    ),
    "empty pod selector": ("store", {"kind": "kubernetes", "pod_selector": ""}, "store.pod_selector"),
    "empty approle role_id": (
        "store",
        {"kind": "vault", "url": "https://vault:8200", "auth": {"method": "approle", "role_id": ""}},
        "store.auth.role_id",
    ),
}


@pytest.mark.parametrize(("where", "bad", "field"), list(OTHER.values()), ids=list(OTHER))
def test_other_fields_with_a_value_that_makes_no_sense_are_refused(
    tmp_path: Path, where: str, bad: Any, field: str
) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), where, bad))

    assert_refused(code, err, field)


@pytest.mark.parametrize(
    ("store", "field"),
    [
        ({"kind": "vault", "url": "vault:8200"}, "store.url"),
        ({"kind": "vault", "url": "ftp://vault:8200"}, "store.url"),
        ({"kind": "vault", "url": "https://vault:8200", "mount": ""}, "store.mount"),
        ({"kind": "aws", "endpoint_url": "localhost:5000"}, "store.endpoint_url"),
        ({"kind": "vault", "url": "https://vault:8200", "timeout": 0}, "store.timeout"),
        ({"kind": "aws", "poll_interval": float("nan")}, "store.poll_interval"),
    ],
)
def test_a_store_url_or_setting_that_makes_no_sense_is_refused(tmp_path: Path, store: Any, field: str) -> None:
    code, _, err = check(tmp_path, put(base(tmp_path), "store", store))

    assert_refused(code, err, field)


def test_a_provider_port_out_of_range_is_refused(tmp_path: Path) -> None:
    provider = {"kind": "postgres", "admin_dsn_file": str(tmp_path / "dsn"), "username": "app", "port": 70000}

    code, _, err = check(tmp_path, put(base(tmp_path), "credentials.0.rotation", {"every": "1h", "provider": provider}))

    assert_refused(code, err, "credentials.0.rotation.provider.port")


# ---------------------------------------------------------------- unix socket path (finding 11)


def test_a_regular_file_at_the_unix_socket_path_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    sock.write_text("not a socket")

    code, _, err = check(tmp_path, put(base(tmp_path), "api.listen", f"unix:{sock}"))

    assert_refused(code, err, "api.listen")
    assert sock.read_text() == "not a socket"


def test_a_stale_socket_at_the_unix_socket_path_is_accepted(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))

    assert check(tmp_path, put(base(tmp_path), "api.listen", f"unix:{sock}")) == (0, "ok\n", "")


# ---------------------------------------------------------------- baton store --path (finding 11)


@pytest.mark.parametrize("bad", ["/proc/self/nope/store.db", "DIR", "UNDER_FILE", ""])
def test_baton_store_with_a_bad_path_prints_one_line_and_exits_2(tmp_path: Path, bad: str) -> None:
    (tmp_path / "afile").write_text("x")
    path = {"DIR": str(tmp_path), "UNDER_FILE": str(tmp_path / "afile" / "store.db")}.get(bad, bad)

    for args in (["versions", "app/db"], ["put", "app/db", "--value-file", "-"]):
        r = baton("store", "--path", path, *args, stdin=b"v")

        assert r.code == 2, r.err
        assert "Traceback" not in r.err
        assert len(r.err.strip().splitlines()) == 1, r.err
        assert r.out == ""


# ---------------------------------------------------------------- secrets stay out of the messages


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("password", SECRET),  # an unknown key holding a pasted secret
        ("store.token", SECRET),
        ("credentials.0.output.files.password", {"nested": SECRET}),
        ("credentials.0.output.files.password", 12345678),
        ("credentials.0.output.env.DB_PASSWORD", ["x", SECRET]),
        ("credentials.0.rotation.provider", {"kind": "postgres", "admin_dsn_file": SECRET + "\0", "username": "a"}),
    ],
)
def test_a_secret_pasted_into_the_config_is_never_echoed(tmp_path: Path, field: str, value: Any) -> None:
    code, out, err = check(tmp_path, put(base(tmp_path), field, value))

    assert code == 2, err
    assert SECRET not in out + err
    assert "12345678" not in err
    assert json.dumps(SECRET) not in err
    assert os.linesep.join(err.splitlines()).count("\n") < 10


# ---------------------------------------------------------------- the real executable

REAL = {
    "system dir": ("credentials.0.output.dir", "/run/baton/../../etc", "credentials.0.output.dir"),
    "nested dir": ("credentials.1.output.dir", "NESTED", "credentials.1.output.dir"),
    "foreign dir": ("credentials.0.output.dir", "FOREIGN", "credentials.0.output.dir"),
    "zero interval": ("credentials.0.rotation.every", 0, "credentials.0.rotation.every"),
    "nan duration": ("report.heartbeat", float("nan"), "report.heartbeat"),
    "int mode": ("credentials.0.output.mode", 400, "credentials.0.output.mode"),
    "template": ("credentials.0.output.files.password", "{{ password", "credentials.0.output.files.password"),
    "owner": ("credentials.0.output.owner", "nosuchuser-baton", "credentials.0.output.owner"),
    "file name": ("credentials.0.output.files", {"x.tmp-1": "{{ password }}"}, "credentials.0.output.files"),
    "node id": ("node_id", "../../x", "node_id"),
    "store path": ("store.path", "", "store.path"),
    "socket path": ("api.listen", "FILE_SOCKET", "api.listen"),
}


@pytest.mark.parametrize(("where", "bad", "field"), list(REAL.values()), ids=list(REAL))
def test_the_real_cli_refuses_each_kind_of_bad_config_with_exit_2_naming_the_field(
    tmp_path: Path, where: str, bad: Any, field: str
) -> None:
    if bad == "NESTED":
        bad = str(tmp_path / "out" / "app-db" / "nested")
    elif bad == "FOREIGN":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "db.sqlite").write_text("x")
        bad = str(tmp_path / "data")
    elif bad == "FILE_SOCKET":
        (tmp_path / "api.sock").write_text("x")
        bad = f"unix:{tmp_path / 'api.sock'}"
    path = tmp_path / "baton.yaml"
    path.write_text(yaml.safe_dump(put(base(tmp_path), where, bad)))

    r = baton("check-config", str(path))

    assert_refused(r.code, r.err, field)
    assert r.out == ""
