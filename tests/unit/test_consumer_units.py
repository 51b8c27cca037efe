"""A consumer declared by systemd unit is found through its cgroup."""

from __future__ import annotations

from daemon.usage.consumers import unit_from_cgroup


def test_the_unit_comes_from_a_cgroup_v2_path() -> None:
    assert unit_from_cgroup("0::/system.slice/api.service\n") == "api.service"


def test_a_process_in_a_sub_cgroup_of_a_unit_belongs_to_that_unit() -> None:
    assert unit_from_cgroup("0::/system.slice/api.service/worker\n") == "api.service"


def test_cgroup_v1_lines_name_the_unit_in_the_systemd_hierarchy() -> None:
    text = "12:pids:/system.slice/db.service\n1:name=systemd:/system.slice/db.service\n"
    assert unit_from_cgroup(text) == "db.service"


def test_a_user_session_scope_and_a_process_outside_units() -> None:
    assert unit_from_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n") == "session-3.scope"
    assert unit_from_cgroup("0::/\n") is None
