"""The ``lease:`` block of a credential, ``agent.state_dir``, and the state files issuers keep (kit/statefile.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.config import parse_config
from daemon.errors import ConfigError, StateFileError
from daemon.kit import plugins
from daemon.kit.statefile import MAX_BYTES, load_state, save_state

VAULT = {"kind": "vault", "url": "http://127.0.0.1:8200"}


def _config(cred: dict[str, Any], *, store: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "store": store if store is not None else VAULT,
        "credentials": [{"name": "db", "output": {"dir": "/run/baton-test/db"}, **cred}],
        **extra,
    }


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return e.value.problems


def test_a_leased_credential_needs_no_key_and_says_it_is_issued_as_a_lease() -> None:
    config = parse_config(_config({"lease": {"path": "database/creds/app"}}))
    cred = config.credentials[0]
    assert cred.key == "db"  # its node reports are filed under its name
    assert cred.issued_kind() == "lease"
    assert cred.lease is not None and (cred.lease.renew_at, cred.lease.rotate_before) == (0.67, 0.33)
    assert config.agent.state_dir == Path("/var/lib/baton")
    assert plugins.load(plugins.ISSUERS, "lease", kind="issuer").__name__ == "LeaseIssuer"


def test_a_store_credential_still_needs_its_key_and_is_not_issued() -> None:
    assert any(p.startswith("credentials.0.key") for p in _problems(_config({})))
    assert parse_config(_config({"key": "app/db"})).credentials[0].issued_kind() is None


def test_a_lease_on_a_store_other_than_vault_names_the_field() -> None:
    problems = _problems(_config({"lease": {"path": "database/creds/app"}}, store={"kind": "local"}))
    assert any(p.startswith("credentials.0.lease:") and "vault" in p for p in problems), problems


@pytest.mark.parametrize(
    ("lease", "field"),
    [
        ({"path": "../sys/leases"}, "credentials.0.lease.path"),
        ({"path": "database//creds"}, "credentials.0.lease.path"),
        ({"path": "database/creds/app?x=1"}, "credentials.0.lease.path"),
        ({"path": "/database/creds/app"}, "credentials.0.lease.path"),
        ({"path": "database/creds/app", "renew_at": 1.5}, "credentials.0.lease.renew_at"),
        ({"path": "database/creds/app", "rotate_before": 0}, "credentials.0.lease.rotate_before"),
        ({"path": "database/creds/app", "max_ttl": "-3s"}, "credentials.0.lease.max_ttl"),
        ({"path": "database/creds/app", "surprise": 1}, "credentials.0.lease.surprise"),
        ({}, "credentials.0.lease.path"),
    ],
)
def test_a_bad_lease_block_names_the_field(lease: dict[str, Any], field: str) -> None:
    problems = _problems(_config({"lease": lease}))
    assert any(p.startswith(field) for p in problems), problems


def test_an_issued_credential_cannot_also_be_rotated() -> None:
    problems = _problems(_config({"lease": {"path": "database/creds/app"}, "rotation": {"every": "1h"}}))
    assert any("remove rotation" in p for p in problems), problems


def test_state_dir_must_be_absolute() -> None:
    problems = _problems(_config({"key": "k"}, agent={"state_dir": "state"}))
    assert any(p.startswith("agent.state_dir") for p in problems), problems


# ---------------------------------------------------------------- state files


def test_state_is_written_0600_in_a_0700_dir_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "lease-db.json"
    save_state(path, {"a": [1, 2]})
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert load_state(path) == {"a": [1, 2]}
    save_state(path, {"a": 3})  # replaced whole, no temp file left beside it
    assert load_state(path) == {"a": 3}
    assert [p.name for p in path.parent.iterdir()] == ["lease-db.json"]
    assert load_state(path.with_name("missing.json")) is None


def _hostile(tmp_path: Path, how: str) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    path = d / "lease-db.json"
    if how == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_text("{}")
        path.symlink_to(target)
    elif how == "world-readable":
        path.write_text("{}")
        path.chmod(0o644)
    elif how == "open dir":
        path.write_text("{}")
        path.chmod(0o600)
        d.chmod(0o777)
    elif how == "fifo":
        os.mkfifo(path, 0o600)
    else:
        body = {
            "not json": b"{lease",
            "not an object": b"[1, 2]",
            "not utf-8": b'{"a": "\xff"}',
            "deep": b"[" * 100_000 + b"]" * 100_000,
            "huge": b'{"a": "' + b"x" * (MAX_BYTES + 10) + b'"}',
        }[how]
        path.write_bytes(body)
        path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    "how", ["symlink", "world-readable", "open dir", "fifo", "not json", "not an object", "not utf-8", "deep", "huge"]
)
def test_an_untrusted_state_file_is_refused_with_a_clear_error(tmp_path: Path, how: str) -> None:
    path = _hostile(tmp_path, how)
    with pytest.raises(StateFileError) as e:
        load_state(path)
    assert str(path.parent) in str(e.value)


def test_a_state_file_never_follows_a_symlink_on_write(tmp_path: Path) -> None:
    path = _hostile(tmp_path, "symlink")
    save_state(path, {"b": 1})
    assert json.loads((tmp_path / "elsewhere.json").read_text()) == {}
    assert not path.is_symlink() and load_state(path) == {"b": 1}


# ---------------------------------------------------------------- the lease issuer's entries


def _entry(**over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "version": "1796160000",
        "lease_id": "database/creds/app/abc",
        "data": {"username": "u", "password": "p"},
        "path": "database/creds/app",
        "issued": 1.0,
        "duration": 10.0,
        "expires": 11.0,
        "renewable": True,
        "phase": "current",
        "renewed": 1.0,
        "max_expires": None,
    }
    entry.update(over)
    return entry


def test_a_lease_entry_round_trips() -> None:
    from daemon.issuers.lease import Lease

    lease = Lease.from_json(_entry())
    assert Lease.from_json(lease.to_json()) == lease
    assert "abc" not in repr(lease) and "'p'" not in repr(lease)  # neither the id nor the data in a repr


@pytest.mark.parametrize(
    "over",
    [
        {"version": "../1"},
        {"version": 7},
        {"lease_id": ""},
        {"lease_id": "a\nb"},
        {"lease_id": None},
        {"data": ["u"]},
        {"data": {"1": 1, 2: 2}},
        {"phase": "stolen"},
        {"issued": "yesterday"},
        {"expires": float("nan")},
        {"expires": 10**400},  # an integer beyond any float: math.isfinite raises OverflowError
        {"duration": -1},
        {"renewed": True},
        {"max_expires": "soon"},
        {"path": ""},
    ],
)
def test_a_hostile_lease_entry_is_refused(over: dict[str, Any]) -> None:
    from daemon.issuers.lease import Lease

    with pytest.raises(StateFileError):
        Lease.from_json(_entry(**over))
