"""The counting proxy in its own process in front of the session's OpenBao, as bench/fleet.py runs them."""

from __future__ import annotations

import hvac
import pytest

from tests.doubles.faultproxy import ProxyProcess
from tests.fixtures.vault import VaultTarget

pytestmark = pytest.mark.integration


def test_the_proxy_serves_openbao_from_its_own_process_and_counts_vault_requests_over_http(
    vault_server: VaultTarget, vault_prefix: str
) -> None:
    key = f"{vault_prefix}/db"
    with ProxyProcess(vault_server.direct_url) as proxy:
        assert proxy._proc is not None and proxy._proc.poll() is None
        client = hvac.Client(url=proxy.url, token=vault_server.baton_token(), timeout=10)
        try:
            client.secrets.kv.v2.create_or_update_secret(path=key, secret={"v": "1"}, mount_point=vault_server.mount)
            for _ in range(2):
                got = client.secrets.kv.v2.read_secret_version(
                    path=key, mount_point=vault_server.mount, raise_on_deleted_version=True
                )
                assert got["data"]["data"] == {"v": "1"}  # the real server's answer, through the proxy
            client.adapter.get(f"/v1/{vault_server.mount}/metadata/{vault_prefix}", params={"list": "true"})
            assert proxy.counts() == {"POST data": 1, "GET data": 2, "LIST metadata": 1}  # reading them is not
            with pytest.raises(hvac.exceptions.Forbidden):  # the server's own refusal, forwarded
                hvac.Client(url=proxy.url, token="not-a-token", timeout=10).secrets.kv.v2.read_secret_version(
                    path=key, mount_point=vault_server.mount, raise_on_deleted_version=True
                )
            assert proxy.counts()["GET data"] == 3
        finally:
            client.adapter.close()
        proc = proxy._proc
    assert proc.poll() is not None  # stopped on exit
