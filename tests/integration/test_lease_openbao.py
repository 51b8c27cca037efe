"""Leased database users on the agent (issue 13.2/13.3), on real parts end to end.

A real OpenBao dev server of the test's own (tests/fixtures/bao_database.py)
runs its database secrets engine (``postgresql-database-plugin``) against the
session's PostgreSQL 15; ``baton agent`` runs as a process with a ``lease:``
credential; consumers are real processes that query PostgreSQL with the
rendered files (tests/integration/lease_consumer.py). TTLs are seconds, so each
test takes a few seconds; waits poll the agent's events, metrics and
``pg_roles`` with deadlines.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import AgentProcess, baton, free_port, poll, start_agent, write_config
from tests.fixtures.bao_database import BaoDev
from tests.fixtures.postgres import PgScratch

pytestmark = [pytest.mark.integration]

CONSUMER = [sys.executable, "-m", "tests.integration.lease_consumer"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bao(tmp_path: Path, pg_scratch: PgScratch) -> Iterator[BaoDev]:
    # Stopped before pg_scratch drops the test's roles: OpenBao must not drop one (an expiry) meanwhile.
    server = BaoDev(log_path=tmp_path / "bao.log")
    if not Path(sys.executable).with_name("bao").exists():
        pytest.skip("OpenBao is not installed")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(
    tmp: Path, bao: BaoDev, *, lease: dict[str, Any], consumers: list[dict[str, Any]] | None = None, **extra: Any
) -> tuple[Path, int]:
    port = free_port()
    creds = [
        {
            "name": "db",
            "lease": lease,
            "output": {"dir": str(tmp / "out"), "files": {"user": "{{ username }}", "password": "{{ password }}"}},
            "consumers": consumers or [],
        },
        *extra.pop("more", []),
    ]
    config = {
        "node_id": "lease-node",
        "store": {
            "kind": "vault",
            "url": bao.url,
            "auth": {"method": "token_file", "token_file": str(bao.write_token(tmp / "token"))},
            "timeout": "3s",
        },
        "api": {"listen": f"127.0.0.1:{port}"},
        "log": {"format": "json", "level": "info"},
        "agent": {
            "state_dir": str(tmp / "state"),
            "scan_interval": "300ms",
            "debounce": "0s",
            "retry_min": "200ms",
            "retry_max": "1s",
            "fanotify": "off",
        },
        "report": {"heartbeat": "2s"},
        "credentials": creds,
        **extra,
    }
    return write_config(tmp / "agent.yaml", config), port


def _roles(scratch: PgScratch) -> set[str]:
    rows = scratch.admin_sql(f"SELECT rolname FROM pg_roles WHERE starts_with(rolname, '{scratch.prefix}')")
    return {str(r[0]) for r in rows}


def _metric(agent: AgentProcess, name: str, **labels: str) -> float:
    _, body = agent.get("/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in body.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            total += float(m.group(2))
    return total


def _consumer(tmp: Path, scratch: PgScratch, mode: str, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    report = tmp / f"{name}.json"
    proc = subprocess.Popen(
        [
            *CONSUMER,
            "--dir",
            str(tmp / "out"),
            "--port",
            str(scratch.cluster.port),
            "--db",
            scratch.dbname,
            "--mode",
            mode,
            "--report",
            str(report),
            "--pidfile",
            str(tmp / f"{name}.pid"),
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    poll(lambda: report.exists() or proc.poll() is not None, timeout=20, what=f"consumer {name} running")
    assert proc.poll() is None, f"consumer {name} exited with {proc.returncode}"
    return proc, report


def _counters(report: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def _user(tmp: Path) -> str:
    return (tmp / "out" / "user").read_text().strip()


def _secrets(tmp: Path, bao: BaoDev, scratch: PgScratch) -> list[str]:
    """Every lease id the agent kept and the passwords it wrote, the root token, the admin password."""
    found = [bao.root_token, scratch.cluster.admin_password]
    state = tmp / "state" / "lease-db.json"
    if state.exists():
        for lease in json.loads(state.read_text())["leases"]:
            found += [lease["lease_id"], lease["data"]["password"]]
    return found


def test_leases_renew_roll_over_and_the_old_user_is_revoked_only_after_its_last_holder(
    tmp_path: Path, bao: BaoDev, pg_scratch: PgScratch
) -> None:
    bao.setup_database(pg_scratch.cluster, dbname=pg_scratch.dbname, prefix=pg_scratch.prefix, max_ttl="20s")
    path, port = _config(
        tmp_path,
        bao,
        lease={"path": "database/creds/app", "rotate_before": 0.5, "max_ttl": "20s", "warn_before": "1s"},
        consumers=[
            {
                "name": "app",
                "match": {"pidfile": str(tmp_path / "app.pid")},
                "loads": "on-reload",
                "reload": {"signal": "SIGHUP"},
                "health": {"alive_for": "0s"},
            }
        ],
    )
    agent = start_agent(path, cwd=tmp_path, port=port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        first = agent.wait_event("version_written", timeout=20)
        user1 = _user(tmp_path)
        assert _roles(pg_scratch) == {user1}
        app, app_report = _consumer(tmp_path, pg_scratch, "pool", "app")
        holder, _ = _consumer(tmp_path, pg_scratch, "hold", "holder")
        procs += [app, holder]
        # Renewals happen (a 2 s lease renewed at 0.67 of it).
        poll(
            lambda: (
                _metric(agent, "baton_lease_operations_total", credential="db", operation="renew", result="ok") >= 3
            ),
            timeout=15,
            what="three renewals",
        )
        # At rotate_before (half of 20 s left) a new lease is a new version; the pooled consumer reloads.
        issued = agent.wait_event("lease_issued", timeout=20, after=agent.events().index(first) + 1)
        v1 = first["version"]
        assert issued["previous"] == v1
        poll(lambda: _user(tmp_path) != user1, timeout=10, what="the new user on disk")
        user2 = _user(tmp_path)
        poll(lambda: _counters(app_report)["user"] == user2, timeout=10, what="the pool consumer on the new user")
        # The holder keeps the old user alive past several renew periods: renewed, not revoked.
        renewed = _metric(agent, "baton_lease_operations_total", credential="db", operation="renew", result="ok")
        poll(
            lambda: (
                _metric(agent, "baton_lease_operations_total", credential="db", operation="renew", result="ok")
                >= renewed + 4
            ),  # the old lease and the new one, two periods each
            timeout=15,
            what="renewals while the old lease is held",
        )
        old = agent.credential("db")["issuer"]["leases"][v1]
        assert old["state"] == "held" and old["holders"], old
        shown = baton("status", "--config", str(path))
        agent.bodies.append(shown.out + shown.err)  # searched for secrets below
        assert shown.code == 0 and f"{v1}: held lease" in shown.out and f":{holder.pid}" in shown.out, shown
        assert _roles(pg_scratch) == {user1, user2}
        assert not [e for e in agent.events() if e.get("event") == "lease_revoked"]
        # The last holder lets go: revoked at the next scan, the database user gone.
        holder.kill()
        holder.wait()
        revoked = agent.wait_event("lease_revoked", timeout=10)
        assert revoked["version"] == v1 and revoked["after_unheld"] < 2.0
        assert _roles(pg_scratch) == {user2}
        poll(lambda: v1 not in agent.credential("db")["on_disk"], timeout=10, what="the old version's files removed")
        counters = _counters(app_report)
        assert counters["failed"] == 0 and counters["ok"] > 0, counters
        assert "lease_id" not in json.dumps(agent.status())
        agent.assert_never_said(_secrets(tmp_path, bao, pg_scratch))
        assert (tmp_path / "state" / "lease-db.json").stat().st_mode & 0o777 == 0o600
    finally:
        for p in procs:
            p.kill()
            p.wait()
        agent.kill()


def test_a_held_lease_near_its_max_ttl_is_an_event_first_and_its_expiry_names_the_holder(
    tmp_path: Path, bao: BaoDev, pg_scratch: PgScratch
) -> None:
    bao.setup_database(
        pg_scratch.cluster, dbname=pg_scratch.dbname, prefix=pg_scratch.prefix, default_ttl="4s", max_ttl="8s"
    )
    path, port = _config(
        tmp_path, bao, lease={"path": "database/creds/app", "renew_at": 0.25, "rotate_before": 0.6, "warn_before": "3s"}
    )
    agent = start_agent(path, cwd=tmp_path, port=port)
    holder = None
    try:
        first = agent.wait_event("version_written", timeout=20)
        holder, _ = _consumer(tmp_path, pg_scratch, "hold", "holder")
        # The max TTL is learned from the first capped renewal (no max_ttl in the config).
        expiring = agent.wait_event("lease_expiring", timeout=20)
        assert expiring["version"] == first["version"]
        assert any(h.endswith(f":{holder.pid}") for h in expiring["holders"]), expiring
        assert _metric(agent, "baton_lease_expiring_held", credential="db") >= 0
        expired = agent.wait_event("lease_expired", timeout=10)
        assert expired["version"] == first["version"]
        assert any(h.endswith(f":{holder.pid}") for h in expired["holders"]), expired
        assert agent.events().index(expiring) < agent.events().index(expired)
        assert agent.proc.poll() is None
        agent.assert_never_said(_secrets(tmp_path, bao, pg_scratch))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        agent.kill()


def test_kill_9_and_restart_adopts_the_lease_and_makes_no_new_database_user(
    tmp_path: Path, bao: BaoDev, pg_scratch: PgScratch
) -> None:
    # 6 s: the lease outlives a restart of the agent on a loaded machine (a few seconds).
    bao.setup_database(
        pg_scratch.cluster, dbname=pg_scratch.dbname, prefix=pg_scratch.prefix, default_ttl="6s", max_ttl="60s"
    )
    path, port = _config(tmp_path, bao, lease={"path": "database/creds/app"})
    agent = start_agent(path, cwd=tmp_path, port=port)
    try:
        written = agent.wait_event("version_written", timeout=20)
        user = _user(tmp_path)
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        agent = start_agent(path, cwd=tmp_path, port=port)
        adopted = agent.wait_event("lease_adopted", timeout=20)
        assert adopted["version"] == written["version"]
        # The adopted lease is renewed (at adoption, then on schedule), not replaced.
        poll(
            lambda: (
                _metric(agent, "baton_lease_operations_total", credential="db", operation="renew", result="ok") >= 2
            ),
            timeout=15,
            what="renewals of the adopted lease",
        )
        assert _roles(pg_scratch) == {user}
        assert _user(tmp_path) == user
        assert not [e for e in agent.events() if e.get("event") == "lease_issued"]
        assert agent.credential("db")["current"] == written["version"]
        agent.assert_never_said(_secrets(tmp_path, bao, pg_scratch))
    finally:
        agent.kill()


def test_an_openbao_restart_is_survived_with_a_new_lease_and_a_clear_event(
    tmp_path: Path, bao: BaoDev, pg_scratch: PgScratch
) -> None:
    # A 5 s lease outlives the restart (about a second): its next renewal meets a server that forgot it.
    setup = {"dbname": pg_scratch.dbname, "prefix": pg_scratch.prefix, "default_ttl": "5s", "max_ttl": "60s"}
    bao.setup_database(pg_scratch.cluster, **setup)
    path, port = _config(tmp_path, bao, lease={"path": "database/creds/app"})
    agent = start_agent(path, cwd=tmp_path, port=port)
    try:
        first = agent.wait_event("version_written", timeout=20)
        user1 = _user(tmp_path)
        bao.stop()
        bao.start()  # a dev server starts empty: no leases, no database mount
        lost = agent.wait_event("lease_lost", timeout=20)
        assert lost["version"] == first["version"] and "not found" in lost["reason"], lost
        assert agent.credential("db")["written"]  # the last good files stay meanwhile
        bao.setup_database(pg_scratch.cluster, **setup)
        after = agent.events().index(lost)
        written = agent.wait_event("version_written", timeout=20, after=after)
        assert written["version"] != first["version"]
        assert _user(tmp_path) != user1
        assert agent.proc.poll() is None
        agent.assert_never_said(_secrets(tmp_path, bao, pg_scratch))
    finally:
        agent.kill()


def test_openbao_down_longer_than_a_lease_keeps_the_files_names_the_holders_and_recovers(
    tmp_path: Path, bao: BaoDev, pg_scratch: PgScratch
) -> None:
    setup = {"dbname": pg_scratch.dbname, "prefix": pg_scratch.prefix, "default_ttl": "3s", "max_ttl": "60s"}
    bao.setup_database(pg_scratch.cluster, **setup)
    path, port = _config(tmp_path, bao, lease={"path": "database/creds/app"})
    agent = start_agent(path, cwd=tmp_path, port=port)
    holder = None
    try:
        first = agent.wait_event("version_written", timeout=20)
        v1 = first["version"]
        holder, _ = _consumer(tmp_path, pg_scratch, "hold", "holder")
        poll(
            lambda: agent.credential("db")["issuer"]["leases"][v1]["holders"],
            timeout=10,
            what="the holder seen on the current lease",
        )
        bao.stop()
        failed = agent.wait_event("lease_renew_failed", timeout=10)
        assert failed["version"] == v1 and "connect" in failed["error"]
        expired = agent.wait_event("lease_expired", timeout=10)
        assert expired["version"] == v1 and any(h.endswith(f":{holder.pid}") for h in expired["holders"]), expired
        # The last good files stay, the agent goes on.
        assert _user(tmp_path) and agent.credential("db")["current"] == v1
        assert agent.proc.poll() is None
        bao.start()
        bao.setup_database(pg_scratch.cluster, **setup)
        written = agent.wait_event("version_written", timeout=20, after=agent.events().index(expired))
        assert written["version"] != v1
        agent.assert_never_said(_secrets(tmp_path, bao, pg_scratch))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        agent.kill()


def test_bad_input_a_path_without_a_lease_a_hostile_state_file_and_a_denied_revocation(
    tmp_path: Path, bao: BaoDev, pg_scratch: PgScratch
) -> None:
    bao.setup_database(
        pg_scratch.cluster, dbname=pg_scratch.dbname, prefix=pg_scratch.prefix, default_ttl="2s", max_ttl="12s"
    )
    bao.request("POST", "secret/data/plain", {"data": {"password": "kv-" + "s3cret"}})
    # The agent's own token may read creds and renew, but not revoke (yet).
    policy = 'path "database/creds/app" { capabilities = ["read"] }\n'
    policy += 'path "sys/leases/renew" { capabilities = ["update"] }\n'
    policy += 'path "sys/leases/lookup" { capabilities = ["update"] }\n'
    policy += 'path "secret/data/plain" { capabilities = ["read"] }\n'
    bao.request("PUT", "sys/policies/acl/agent", {"policy": policy})
    token = bao.request("POST", "auth/token/create", {"policies": ["agent"], "period": "1h"})["auth"]["client_token"]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "lease-db.json").write_text('{"format": 1, "credential": "db", "leases": [{"lease_id": 7}]}')
    (state / "lease-db.json").chmod(0o600)
    path, port = _config(
        tmp_path,
        bao,
        lease={"path": "database/creds/app", "max_ttl": "12s", "rotate_before": 0.5, "revoke_retry_max": "500ms"},
        more=[
            {
                "name": "kv",
                "required": False,
                "lease": {"path": "secret/data/plain"},
                "output": {"dir": str(tmp_path / "kv")},
            }
        ],
    )
    bao.write_token(tmp_path / "token", token)
    agent = start_agent(path, cwd=tmp_path, port=port)
    try:
        rejected = agent.wait_event("state_file_rejected", timeout=20)
        assert rejected["credential"] == "db"
        failed = agent.wait_event("lease_issue_failed", timeout=20)
        assert failed["credential"] == "kv" and "no lease" in failed["error"]
        assert "no lease" in (agent.credential("kv")["issuer"]["issue_error"] or "")
        first = agent.wait_event("version_written", timeout=20)
        user1 = _user(tmp_path)
        # The rollover at half the max TTL: the unheld old lease cannot be revoked (403): retried, shown.
        denied = agent.wait_event("lease_revoke_failed", timeout=20)
        assert denied["version"] == first["version"] and "denied" in denied["error"]
        revoking = agent.credential("db")["issuer"]["revoking"]
        assert [r["version"] for r in revoking] == [first["version"]] and revoking[0]["error"]
        assert user1 in _roles(pg_scratch)
        policy += 'path "sys/leases/revoke" { capabilities = ["update"] }\n'
        bao.request("PUT", "sys/policies/acl/agent", {"policy": policy})
        revoked = agent.wait_event("lease_revoked", timeout=15)
        assert revoked["version"] == first["version"]
        assert user1 not in _roles(pg_scratch)
        assert agent.proc.poll() is None
        agent.assert_never_said([token, *_secrets(tmp_path, bao, pg_scratch), "kv-" + "s3cret"])
    finally:
        agent.kill()


def test_check_config_refuses_a_lease_without_a_vault_store(tmp_path: Path) -> None:
    config = {
        "store": {"kind": "local", "path": str(tmp_path / "store.db")},
        "credentials": [
            {"name": "db", "lease": {"path": "database/creds/app"}, "output": {"dir": str(tmp_path / "o")}}
        ],
    }
    result = baton("check-config", str(write_config(tmp_path / "c.yaml", config)))
    assert result.code == 2 and "credentials.0.lease" in result.err + result.out
