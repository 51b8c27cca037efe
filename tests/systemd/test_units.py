"""Both units under a real systemd as PID 1 (issue 11), in one container booted for the session.

The tests run in file order and share the container: the ones that restart the
agent come early, so that the 45 s the last test needs (past WatchdogSec=30s)
have mostly gone by while the others ran.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, cast

import pytest

from tests.systemd.conftest import Host

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

AGENT, ROTATOR = "baton.service", "baton-rotator.service"
SIGNAL, RESTART = "consumer-signal.service", "consumer-restart.service"


def _credential(host: Host, name: str) -> dict[str, Any]:
    return cast(dict[str, Any], cast(dict[str, Any], host.status()["credentials"])[name])


def _holders(host: Host, version: str) -> dict[int, str]:
    versions = _credential(host, "app-db").get("versions", {})
    return {h["pid"]: h["consumer"] for h in versions.get(version, {}).get("holders", [])}


def _until(check: Any, *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _current(host: Host) -> str:
    return str(_credential(host, "app-db")["current"])


def test_both_units_start_and_systemctl_status_shows_their_status_lines(host: Host) -> None:
    for unit in (AGENT, ROTATOR, SIGNAL, RESTART):
        assert host.prop(unit, "ActiveState") == "active", host.c.run(f"systemctl status {unit}", check=False).stdout
    # STATUS= is refreshed every 5 s: the failed write of "outside" shows up by then.
    host.c.until(
        f"systemctl show -p StatusText --value {AGENT} | grep -q 'errors: outside'", timeout=15, what="agent STATUS="
    )
    agent = host.c.run(f"systemctl status --no-pager {AGENT}", check=False).stdout
    rotator = host.c.run(f"systemctl status --no-pager {ROTATOR}", check=False).stdout
    # The credential outside ReadWritePaths is the one not written (see the sandbox test).
    assert re.search(r'Status: "1/2 credentials written; errors: outside; 2 consumers', agent), agent
    assert re.search(
        r'Status: "leading: 1 credentials \(app-db\); next rotation app-db in \d+m; 0 pending retirements"', rotator
    ), rotator


def test_a_consumer_unit_gets_its_credential_before_it_starts_and_is_matched_by_its_unit(host: Host) -> None:
    ready_at = int(host.prop(AGENT, "ActiveEnterTimestampMonotonic"))
    for unit, kind in ((SIGNAL, "signal"), (RESTART, "restart")):
        # After=baton.service and Type=notify: systemd started it only once the agent said READY=1.
        assert int(host.prop(unit, "ExecMainStartTimestampMonotonic")) >= ready_at
        state = host.consumer(kind)
        assert re.fullmatch(r"/run/baton/app-db/\.\.v[^/]+/password", str(state["version"])), state
        assert state["errors"] == 0
    current = _current(host)
    pids = {
        int(host.prop(SIGNAL, "MainPID")): "signal-consumer",
        int(host.prop(RESTART, "MainPID")): "restart-consumer",
    }
    # {systemd_unit: ...} matched each unit's process, a process of another user.
    _until(lambda: _holders(host, current) == pids, timeout=15, what="both consumers seen as holders")


def test_the_fanotify_drop_in_gives_open_events_or_the_agent_says_why_not(host: Host) -> None:
    c = host.c
    without = c.run(f"journalctl -b -u {AGENT} --no-pager -o cat", check=False).stdout
    assert "fanotify needs CAP_SYS_ADMIN" in without, "without the drop-in the agent says why it falls back"
    c.run(
        "install -D -m 0644 /baton-src/systemd/baton.service.d/fanotify.conf "
        "/etc/systemd/system/baton.service.d/fanotify.conf && systemctl daemon-reload && systemctl restart baton"
    )
    try:
        pid = host.prop(AGENT, "MainPID")
        assert host.prop(AGENT, "ActiveState") == "active"
        fds = c.run(f"ls -l /proc/{pid}/fd").stdout
        if "anon_inode:[fanotify]" not in fds:
            off = c.run(f"journalctl -b -u baton --no-pager -o cat _PID={pid}").stdout
            assert "open events (fanotify) are off" in off, off
            pytest.fail(f"fanotify refused in the container; the agent fell back to fd scans: {off[-600:]}")
        # The marks are on the credential directories (inode marks), so consumers' opens are seen.
        fd = next(line.split()[-3] for line in fds.splitlines() if "anon_inode:[fanotify]" in line)
        info = c.run(f"cat /proc/{pid}/fdinfo/{fd}").stdout
        assert "fanotify ino:" in info, info
    finally:
        c.run("rm -f /etc/systemd/system/baton.service.d/fanotify.conf && systemctl daemon-reload")
        c.run("systemctl restart baton")


def test_a_kill_9_of_the_agent_is_restarted_by_systemd_and_consumers_keep_reading(host: Host) -> None:
    c = host.c
    before = host.c.show(AGENT, "MainPID", "NRestarts")
    consumers = {kind: host.consumer(kind) for kind in ("signal", "restart")}
    c.run(f"systemctl kill --signal=KILL --kill-whom=main {AGENT}")
    c.until(
        f'test "$(systemctl show -p MainPID --value {AGENT})" != {before["MainPID"]} '
        f'&& test "$(systemctl show -p MainPID --value {AGENT})" != 0 && systemctl is-active -q {AGENT}',
        timeout=30,
        what="the agent restarted by Restart=on-failure",
    )
    assert int(host.prop(AGENT, "NRestarts")) == int(before["NRestarts"]) + 1
    for kind, was in consumers.items():
        now = host.consumer(kind)
        assert now["pid"] == was["pid"], "the consumer itself was not touched"
        assert cast(int, now["reads"]) > cast(int, was["reads"]) and now["errors"] == 0


def test_a_rotation_reloads_one_consumer_by_signal_one_by_systemd_restart_and_retires_the_old_version(
    host: Host,
) -> None:
    old = _current(host)
    restart_pid = host.prop(RESTART, "MainPID")
    new = host.put()
    tag = f"/..v{new}-"
    signal_state = _until(
        lambda: (s := host.consumer("signal")) and tag in str(s["version"]) and s,
        timeout=30,
        what="the signal consumer to re-open the new version on SIGHUP",
    )
    assert signal_state["reopens"] >= 1 and signal_state["errors"] == 0
    # {systemd: restart}: the agent (user baton) ran systemctl try-restart, which polkit allowed.
    _until(
        lambda: (
            host.prop(RESTART, "MainPID") not in ("0", restart_pid) and tag in str(host.consumer("restart")["version"])
        ),
        timeout=30,
        what="the restart consumer restarted by systemd with the new version",
    )
    restarted = host.consumer("restart")
    # Each roll is "ok" once its health check passed (alive_for after the reload).
    _until(
        lambda: {r["result"] for r in cast(dict[str, Any], host.status()["consumers"]).values()} == {"ok"},
        timeout=30,
        what="both consumers' reloads reported ok",
    )
    _until(
        lambda: any(str(v["id"]) == old and v["retired"] for v in host.versions()),
        timeout=60,
        what=f"version {old} retired by the rotator",
    )
    lines = host.c.run(f"journalctl -u {ROTATOR} --no-pager -o cat").stdout.splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]  # systemd's own lines are text
    retired = next(e["ts"] for e in events if e.get("event") == "retired" and str(e.get("version")) == old)
    # Retired only after both let go of it.
    assert float(retired) >= float(signal_state["reopened_at"])
    assert float(retired) >= float(cast(float, restarted["started"]))
    rotator = host.prop(ROTATOR, "StatusText")
    assert rotator.startswith("leading: 1 credentials (app-db)"), rotator


def test_the_sandbox_holds_and_a_credential_outside_ReadWritePaths_fails_naming_the_drop_in(host: Host) -> None:
    c = host.c
    pid = host.prop(AGENT, "MainPID")
    # Its own mount namespace: read-only everywhere but its directories.
    refused = c.run(f"nsenter -t {pid} -m touch /etc/baton/probe", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused
    c.run(f"nsenter -t {pid} -m sh -c 'touch /run/baton/probe && rm /run/baton/probe'")
    outside = _credential(host, "outside")
    error = str(outside["last_error"])
    assert not outside["written"]
    assert "ReadWritePaths=/srv/outside/cred" in error and "baton.service.d" in error, error
    assert c.run("test -e /srv/outside", check=False).returncode != 0
    # And the job goes on: it still reads /proc/<pid>/fd of the other users' consumers.
    signal_pid = int(host.prop(SIGNAL, "MainPID"))
    assert c.run(f"stat -c %U /proc/{signal_pid}").stdout.strip() == "app"
    _until(lambda: signal_pid in _holders(host, _current(host)), timeout=15, what="the consumer seen through its fds")
    assert host.prop(AGENT, "ActiveState") == "active"


def test_the_journal_and_systemctl_status_hold_no_secret_value(host: Host) -> None:
    assert len(host.values) >= 2  # the first version and the rotated one
    journal = host.c.run("journalctl -b --no-pager -o json", timeout=60).stdout
    status = host.c.run(f"systemctl status --no-pager -n 200 {AGENT} {ROTATOR}", check=False).stdout
    assert "version_written" in journal  # the agent's events are there to be searched
    for value in host.values:
        assert value not in journal
        assert value not in status
        assert json.dumps(value)[1:-1] not in journal


def test_both_units_stay_active_past_the_watchdog_across_reload_and_stop_within_TimeoutStopSec(host: Host) -> None:
    c = host.c
    before = {u: c.show(u, "MainPID", "NRestarts", "ExecMainStartTimestampMonotonic") for u in (AGENT, ROTATOR)}
    # CLOCK_MONOTONIC is not namespaced: the container's timestamps are on our clock.
    started = max(int(b["ExecMainStartTimestampMonotonic"]) for b in before.values()) / 1e6
    time.sleep(max(0.0, started + 45 - time.monotonic()))
    for unit, was in before.items():
        now = c.show(unit, "ActiveState", "MainPID", "NRestarts", "WatchdogTimestampMonotonic")
        assert now["ActiveState"] == "active" and now["MainPID"] == was["MainPID"], (unit, now)
        assert now["NRestarts"] == was["NRestarts"], f"{unit} was restarted (the watchdog?)"
        # WATCHDOG=1 pings arrive from the event loop (every 15 s at WatchdogSec=30s).
        assert time.monotonic() - int(now["WatchdogTimestampMonotonic"]) / 1e6 < 20, (unit, now)
    since = c.run("date +'%Y-%m-%d %H:%M:%S'").stdout.strip()
    c.run(f"systemctl reload {AGENT} {ROTATOR}", timeout=30)
    for unit in (AGENT, ROTATOR):
        c.until(
            f"journalctl -u {unit} --since '{since}' --no-pager -o cat | grep -q config_reloaded",
            timeout=15,
            what=f"{unit} to re-read its config",
        )
        now = c.show(unit, "ActiveState", "MainPID")
        assert now == {"ActiveState": "active", "MainPID": before[unit]["MainPID"]}, (unit, now)
    for unit in (ROTATOR, AGENT):
        t0 = time.monotonic()
        c.run(f"systemctl stop {unit}", timeout=30)
        took = time.monotonic() - t0
        result = c.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert took < 15, f"{unit} took {took:.1f}s to stop"
        assert result == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (unit, result)
