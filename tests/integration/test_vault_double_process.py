"""The Vault double in its own process (``python -m tests.doubles.vault``), as bench/fleet.py runs it."""

from __future__ import annotations

import hvac
import pytest

from tests.doubles.vault import VaultProcess

pytestmark = pytest.mark.integration


def test_the_double_serves_from_its_own_process_and_counts_requests_over_http() -> None:
    with VaultProcess() as vault:
        assert vault._proc is not None and vault._proc.poll() is None
        client = hvac.Client(url=vault.url, token=vault.root_token, timeout=10)
        try:
            client.secrets.kv.v2.create_or_update_secret(path="app/db", secret={"v": "1"})
            client.secrets.kv.v2.read_secret_version(path="app/db", raise_on_deleted_version=True)
            client.secrets.kv.v2.read_secret_version(path="app/db", raise_on_deleted_version=True)
            assert vault.counts() == {"POST data": 1, "GET data": 2}  # reading the counters is not counted
            with pytest.raises(hvac.exceptions.Forbidden):
                hvac.Client(url=vault.url, token="not-the-root", timeout=10).secrets.kv.v2.read_secret_version(
                    path="app/db", raise_on_deleted_version=True
                )
        finally:
            client.adapter.close()
        proc = vault._proc
    assert proc.poll() is not None  # stopped on exit
