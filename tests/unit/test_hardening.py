"""Small hardening rules: null fields, blank renders, store file modes, config limits, report trimming."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from daemon.config import parse_config
from daemon.errors import ConfigError, PayloadError
from daemon.files.render import render
from daemon.model import Secret
from daemon.report.base import NodeReport
from daemon.report.metadata import fit
from daemon.stores.local import LocalStore


def test_a_null_field_is_rejected_not_written_as_the_text_none() -> None:
    with pytest.raises(PayloadError, match="null"):
        render({"password": "{{ password }}"}, Secret('{"password": null}'))


def test_a_render_of_only_whitespace_counts_as_empty() -> None:
    with pytest.raises(PayloadError, match="empty"):
        render({"password": "{{ password }}\n"}, Secret('{"password": ""}'))


def test_the_store_database_and_its_wal_and_shm_are_private_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "state" / "store.db", watch_files=False)
    store.put_sync("k", Secret("hunter2"))
    try:
        for name in ("store.db", "store.db-wal", "store.db-shm"):
            mode = stat.S_IMODE((tmp_path / "state" / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    finally:
        store.close()


def test_the_kubernetes_store_refuses_more_than_one_draining_version() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(
            {
                "store": {"kind": "kubernetes", "namespace": "ns"},
                "credentials": [
                    {
                        "name": "db",
                        "key": "db",
                        "output": {"dir": "/tmp/x"},
                        "rotation": {"every": "1h", "max_draining": 2},
                    }
                ],
            }
        )
    assert any(p.startswith("credentials.0.rotation.max_draining:") for p in e.value.problems)


def test_a_long_error_is_cut_so_the_report_still_fits_the_store_limit() -> None:
    report = NodeReport(node="n", credential="db", current="2", in_use={"1": 3}, errors=("x" * 2000,), heartbeat=1.0)
    text = fit(report, 512)
    assert len(text.encode()) <= 512
    assert NodeReport.from_json(text).in_use == {"1": 3}
