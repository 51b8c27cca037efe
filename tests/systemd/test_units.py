"""Both units under a real systemd as PID 1 (issue 11)."""

from __future__ import annotations

import pytest

from tests.systemd.conftest import Host

pytestmark = [pytest.mark.systemd, pytest.mark.slow]


def test_both_units_start_and_show_their_status_lines(host: Host) -> None:
    for unit in ("baton.service", "baton-rotator.service"):
        assert host.prop(unit, "ActiveState") == "active", host.c.run(f"systemctl status {unit}", check=False).stdout
    print(host.prop("baton.service", "StatusText"))
    print(host.prop("baton-rotator.service", "StatusText"))
