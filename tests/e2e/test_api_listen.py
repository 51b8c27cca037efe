"""``baton agent`` and ``baton rotator`` when api.listen cannot be used: one clear line, exit status 2.

The usual way to get there is one config file for both roles on one host, so
the second to start finds the port taken; or a regular file where the unix
socket should be, which must be left exactly as it was.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.e2e.helpers import baton, free_port, write_config

pytestmark = pytest.mark.e2e

ROLES = ["agent", "rotator"]


def config(tmp_path: Path, listen: str) -> Path:
    return write_config(
        tmp_path / "baton.yaml",
        {
            "node_id": "node-listen",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "api": {"listen": listen},
            "credentials": [
                {
                    "name": "app-db",
                    "key": "app/db",
                    "output": {"dir": str(tmp_path / "out"), "files": {"password": "{{ password }}"}},
                    "rotation": {"every": "1h"},
                }
            ],
        },
    )


def assert_one_clear_line(err: str, *, names: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "api.listen" in line]
    assert len(lines) == 1, err
    assert names in lines[0], err


@pytest.mark.parametrize("role", ROLES)
def test_a_port_already_in_use_is_one_line_naming_api_listen_and_exit_2(role: str, tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # the other role, started first
        result = baton(role, "--config", str(config(tmp_path, f"127.0.0.1:{port}")), cwd=tmp_path)

    assert result.code == 2, result
    assert_one_clear_line(result.err, names="already in use")


@pytest.mark.parametrize("role", ROLES)
def test_a_regular_file_at_the_unix_socket_path_is_refused_and_left_alone(role: str, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("not a socket\n")

    result = baton(role, "--config", str(config(tmp_path, f"unix:{path}")), cwd=tmp_path)

    assert result.code == 2, result
    assert_one_clear_line(result.err, names="is not a socket")
    assert path.read_text() == "not a socket\n"


def test_a_live_unix_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()

        result = baton("agent", "--config", str(config(tmp_path, f"unix:{path}")), cwd=tmp_path)

        assert result.code == 2, result
        assert_one_clear_line(result.err, names="already in use")
        assert path.is_socket()
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))  # still the other process's socket
