"""VaultStore login methods, token renewal and re-authentication, against a real OpenBao.

Every token here is real: TTLs run down on the server, renewals are the
server's answers, revocations are ``auth/token/revoke`` and
``sys/leases/revoke-prefix``, a policy denial is a policy the test rewrites.
Each test's AppRole (or JWT) auth mount is its own, so the proxy's count of
``POST auth/<mount>/login`` is exactly this store's logins. Tokens carry
Baton's policy of docs/install.md and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path

import hvac
import pytest

from daemon.clients.vault import parse_time
from daemon.config import VaultAuthConfig
from daemon.errors import StoreAuthError, StoreUnavailable
from daemon.model import Secret
from daemon.stores.vault import VaultStore
from tests.fixtures.vault import MakeStore, VaultTarget, baton_policy_text

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("vault_faults")]

RENEW = ("POST", "auth/token/renew-self")
LOOKUP = ("GET", "auth/token/lookup-self")


def login(mount: str) -> tuple[str, str]:
    return ("POST", f"auth/{mount}/login")


def approle_auth(vault_server: VaultTarget, tmp_path: Path, **role: object) -> tuple[VaultAuthConfig, str]:
    """An AppRole of this test (options as ``VaultTarget.approle``): its auth config and its mount."""
    mount, role_id, secret_id = vault_server.approle(**role)  # type: ignore[arg-type]
    sid = tmp_path / f"secret_id-{mount}"
    sid.write_text(secret_id + "\n")
    return VaultAuthConfig(method="approle", mount=mount, role_id=role_id, secret_id_file=sid), mount


async def approle_store_reading(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path, **role: object
) -> tuple[VaultStore, str, str]:
    """An AppRole-authenticated store that has logged in and read ``<prefix>/db`` (value "v") once."""
    auth, mount = approle_auth(vault_server, tmp_path, **role)
    store = make_vault_store(auth=auth)
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    await store.read(key)
    return store, key, mount


def approle_token(vault_server: VaultTarget) -> str:
    """A token from a real AppRole login (renewable, 1 h TTL), not held by any store."""
    mount, role_id, secret_id = vault_server.approle()
    c = hvac.Client(url=vault_server.direct_url)
    try:
        resp = c.auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False, mount_point=mount)
        return str(resp["auth"]["client_token"])
    finally:
        c.adapter.close()


def seconds_left(vault_server: VaultTarget, token: str) -> float:
    """The token's time left by its ``expire_time`` (the server's ``ttl`` is whole seconds)."""
    c = vault_server.client()
    try:
        info = c.auth.token.lookup(token)["data"]
    finally:
        c.adapter.close()
    return parse_time(info["expire_time"]) - time.time()


def refused(vault_server: VaultTarget, token: str) -> bool:
    """The server refuses ``token`` now (it may still list an expired one, ttl 0, until it reaps it)."""
    c = hvac.Client(url=vault_server.direct_url, token=token)
    try:
        c.auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        return True
    finally:
        c.adapter.close()
    return False


async def wait_until_monotonic(t: float) -> None:
    # Time itself is what the test waits for (a TTL running down on the server), not another task.
    while time.monotonic() < t:
        await asyncio.sleep(min(0.05, max(0.0, t - time.monotonic())))


async def test_approle_login_reads_and_writes(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    auth, mount = approle_auth(vault_server, tmp_path)
    store = make_vault_store(auth=auth)
    key = f"{vault_prefix}/db"
    await store.promote(key, (await store.create(key, Secret("x"))).id)
    assert (await store.read(key)).payload.reveal() == "x"
    assert vault_server.faults.count(*login(mount)) == 1


async def test_token_file_login_reads(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    tf = tmp_path / "token"
    tf.write_text(vault_server.baton_token() + "\n")
    store = make_vault_store(auth=VaultAuthConfig(method="token_file", token_file=tf))
    vault_server.write(f"{vault_prefix}/db", {"value": "y"})
    assert (await store.read(f"{vault_prefix}/db")).payload.reveal() == "y"


async def test_a_missing_vault_token_is_an_auth_error(make_vault_store: MakeStore, vault_prefix: str) -> None:
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={})
    with pytest.raises(StoreAuthError, match="VAULT_TOKEN"):
        await store.read(f"{vault_prefix}/db")


async def test_a_wrong_approle_secret_id_is_an_auth_error(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    mount, role_id, _ = vault_server.approle()
    sid = tmp_path / "secret_id"
    sid.write_text("not-the-secret-id")
    store = make_vault_store(auth=VaultAuthConfig(method="approle", mount=mount, role_id=role_id, secret_id_file=sid))
    with pytest.raises(StoreAuthError, match="refused") as err:
        await store.read(f"{vault_prefix}/db")
    assert "not-the-secret-id" not in str(err.value) and role_id not in str(err.value)


@pytest.mark.parametrize("spent", ["uses", "ttl"])
async def test_a_used_up_or_expired_secret_id_is_a_clear_auth_error_at_the_next_login(
    spent: str,
    vault_server: VaultTarget,
    make_vault_store: MakeStore,
    vault_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # One use, or two seconds: enough for the first login only.
    role = {"secret_id_num_uses": 1} if spent == "uses" else {"secret_id_ttl": "2s"}
    store, key, mount = await approle_store_reading(vault_server, make_vault_store, vault_prefix, tmp_path, **role)
    if spent == "ttl":
        await wait_until_monotonic(time.monotonic() + 2.2)
    vault_server.revoke_logins(mount)  # the token dies: the store must log in again
    with pytest.raises(StoreAuthError, match="secret_id") as err:
        await store.read(key)
    assert "refused" in str(err.value)
    secret_id = (tmp_path / f"secret_id-{mount}").read_text().strip()
    assert secret_id not in str(err.value) and secret_id not in caplog.text
    assert store.client._grant is not None and store.client._grant.token not in caplog.text
    assert vault_server.faults.count(*login(mount)) == 2


async def test_kubernetes_login_uses_the_service_account_token(
    make_vault_store: MakeStore,
    vault_server: VaultTarget,
    vault_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mount = vault_server.kubernetes("baton")
    jwt = tmp_path / "token"
    good_jwt = vault_server.jwt_for()
    jwt.write_text(good_jwt)
    store = make_vault_store(auth=VaultAuthConfig(method="kubernetes", mount=mount, role="baton", jwt_file=jwt))
    vault_server.write(f"{vault_prefix}/db", {"value": "k"})
    assert (await store.read(f"{vault_prefix}/db")).payload.reveal() == "k"
    assert vault_server.faults.count(*login(mount)) == 1

    # Signed by another key (a token of another cluster), and one for another service account.
    from cryptography.hazmat.primitives.asymmetric import rsa

    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad_jwt in (vault_server.jwt_for(key=other_key), vault_server.jwt_for("system:serviceaccount:apps:other")):
        jwt.write_text(bad_jwt)
        bad = make_vault_store(auth=VaultAuthConfig(method="kubernetes", mount=mount, role="baton", jwt_file=jwt))
        with pytest.raises(StoreAuthError, match="service account token refused") as err:
            await bad.read(f"{vault_prefix}/db")
        assert bad_jwt not in str(err.value)
    assert store.client._grant is not None
    for secret in (store.client._grant.token, good_jwt, bad_jwt):
        assert secret not in caplog.text


async def test_the_token_is_renewed_before_its_ttl_ends(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    # 2 s: renewal at 1.33 s leaves 0.67 s of slack on a loaded machine.
    auth, mount = approle_auth(vault_server, tmp_path, token_ttl="2s")
    store = make_vault_store(auth=auth)
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    login_at = time.monotonic()
    await store.read(key)
    assert store.client.renew_at is not None
    await wait_until_monotonic(store.client.renew_at)
    await store.read(key)
    assert vault_server.faults.count(*RENEW) == 1
    # Past the first TTL: the original grant would have expired on the server by now.
    await wait_until_monotonic(login_at + 2.1)
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_server.faults.count(*login(mount)) == 1
    assert vault_server.faults.count("GET", "metadata") >= 3


async def test_a_token_past_its_max_ttl_is_replaced_by_a_fresh_login(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    # Renewable for 3 s in all: renewals grant less and less, then the server refuses the token.
    store, key, mount = await approle_store_reading(
        vault_server, make_vault_store, vault_prefix, tmp_path, token_ttl="2s", token_max_ttl="3s"
    )
    first = store.client._grant
    assert first is not None
    deadline = time.monotonic() + 10.0
    while vault_server.faults.count(*login(mount)) < 2:  # a poll every 0.1 s, as a watching agent would
        assert time.monotonic() < deadline, "no fresh login within 10 s of a 3 s max TTL"
        assert (await store.read(key)).payload.reveal() == "v"  # every read works throughout
        renewed = vault_server.faults.count(*RENEW)
        await asyncio.sleep(0.1)
    assert renewed >= 1  # renewed while the max TTL allowed, then logged in afresh
    assert (await store.read(key)).payload.reveal() == "v"
    # (With a long max TTL the same renewals keep one login: test_the_token_is_renewed_before_its_ttl_ends.)
    assert store.client._grant is not None and store.client._grant.token != first.token


async def test_a_plain_token_with_a_ttl_is_renewed_too(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    token = vault_server.token(ttl="2s")
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token})
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    await store.read(key)
    assert vault_server.faults.count(*LOOKUP) == 1
    assert store.client.renew_at is not None
    await wait_until_monotonic(store.client.renew_at)
    await store.read(key)
    assert vault_server.faults.count(*RENEW) == 1
    assert seconds_left(vault_server, token) > 1.0


async def test_a_plain_token_past_its_max_ttl_is_an_auth_error_without_a_login_method(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    made = time.monotonic()
    token = vault_server.token(ttl="2s", explicit_max_ttl="3s")
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token})
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    await store.read(key)
    with pytest.raises(StoreAuthError) as err:
        while True:
            assert time.monotonic() < made + 10.0, "the token outlived its 3 s max TTL by 7 s"
            await store.read(key)
            await asyncio.sleep(0.1)
    assert vault_server.faults.count(*RENEW) >= 1  # renewed while it could be...
    assert time.monotonic() - made >= 2.0  # ...so it outlived its first 2 s TTL
    assert refused(vault_server, token)
    assert token not in str(err.value)


async def test_a_revoked_token_is_replaced_by_a_fresh_approle_login(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store, key, mount = await approle_store_reading(vault_server, make_vault_store, vault_prefix, tmp_path)
    vault_server.revoke_logins(mount)
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_server.faults.count(*login(mount)) == 2


async def test_a_revoked_static_token_fails_with_an_auth_error_after_one_retry(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    token = approle_token(vault_server)
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token})
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    await store.read(key)
    vault_server.revoke(token)
    with pytest.raises(StoreAuthError) as err:
        await store.read(key)
    assert token not in str(err.value)
    # One lookup at start, one to tell a dead token from a policy denial, one for the re-login attempt.
    assert vault_server.faults.count(*LOOKUP) == 3


async def test_concurrent_calls_after_a_revocation_log_in_once(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store, key, mount = await approle_store_reading(vault_server, make_vault_store, vault_prefix, tmp_path)
    vault_server.revoke_logins(mount)
    got = await asyncio.gather(*(store.read(key) for _ in range(6)))
    assert {g.payload.reveal() for g in got} == {"v"}
    assert vault_server.faults.count(*login(mount)) == 2


async def test_a_policy_denial_on_a_live_token_never_spends_a_login(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store, key, mount = await approle_store_reading(vault_server, make_vault_store, vault_prefix, tmp_path)
    assert vault_server.faults.count(*login(mount)) == 1
    vault_server.deny(key)  # the role's policy now denies the key; its token stays valid
    for _ in range(3):  # e.g. three polls: a limited-use secret_id must not pay for any of them
        with pytest.raises(StoreAuthError, match="denied by policy"):
            await store.read(key)
    assert vault_server.faults.count(*login(mount)) == 1
    vault_server.deny(None)
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_server.faults.count(*login(mount)) == 1


async def test_a_failed_renewal_falls_back_to_a_fresh_login(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store, key, mount = await approle_store_reading(
        vault_server, make_vault_store, vault_prefix, tmp_path, token_ttl="2s"
    )
    vault_server.faults.fail_with(503, path="/v1/auth/token/renew-self", times=1)
    assert store.client.renew_at is not None
    await wait_until_monotonic(store.client.renew_at)
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_server.faults.count(*RENEW) == 1
    assert vault_server.faults.count(*login(mount)) == 2


async def test_an_unavailable_login_endpoint_is_store_unavailable_not_an_auth_error_and_the_next_call_logs_in(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    auth, mount = approle_auth(vault_server, tmp_path, secret_id_num_uses=1)
    store = make_vault_store(auth=auth)
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    vault_server.faults.fail_with(503, path=f"/v1/auth/{mount}/login", times=1)
    with pytest.raises(StoreUnavailable):
        await store.read(key)
    # The answer never came from the server, so the one-use secret_id is still good.
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_server.faults.count(*login(mount)) == 2


async def test_a_token_without_the_default_policy_is_refused_at_start_naming_it(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    # Baton's own policy alone: the KV paths are allowed, looking itself up is not (docs/install.md).
    token = vault_server.token(no_default_policy=True)
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token})
    vault_server.write(f"{vault_prefix}/db", {"value": "v"})
    with pytest.raises(StoreAuthError, match="default policy") as err:
        await store.read(f"{vault_prefix}/db")
    assert token not in str(err.value)
    # The same policy with Vault's default one added works.
    ok = make_vault_store(auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": vault_server.token()})
    assert (await ok.read(f"{vault_prefix}/db")).payload.reveal() == "v"


async def test_the_policy_of_the_docs_reaches_its_own_mount_only(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    # Every store of these tests runs on this token (tests/fixtures/vault.py): enough for all of Baton.
    # Here: nothing beyond the mount it names, and no change of policies.
    elsewhere = vault_server.new_mount()
    vault_server.write(f"{vault_prefix}/db", {"value": "v"})
    vault_server.write(f"{vault_prefix}/db", {"value": "other"}, mount=elsewhere)
    outside = make_vault_store(mount=elsewhere)
    with pytest.raises(StoreAuthError, match="denied by policy"):
        await outside.read(f"{vault_prefix}/db")
    assert (await make_vault_store().read(f"{vault_prefix}/db")).payload.reveal() == "v"
    c = hvac.Client(url=vault_server.direct_url, token=vault_server.baton_token())
    try:
        with pytest.raises(hvac.exceptions.Forbidden):
            c.sys.create_or_update_policy(name="escalate", policy='path "*" { capabilities = ["sudo"] }')
    finally:
        c.adapter.close()


async def test_a_store_in_a_namespace_logs_in_and_keeps_its_keys_there(
    vault_server: VaultTarget, make_vault_store: MakeStore, tmp_path: Path
) -> None:
    # OpenBao has namespaces (the double had none): the KV mount, the AppRole and the policy all
    # live in the namespace, and every request, the login too, must carry X-Vault-Namespace.
    ns = f"baton-{uuid.uuid4().hex[:8]}"
    root = vault_server.client()
    inner = hvac.Client(url=vault_server.direct_url, token=vault_server.root_token, namespace=ns, timeout=10)
    try:
        root.adapter.post(f"/v1/sys/namespaces/{ns}", json={})
        inner.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
        inner.sys.create_or_update_policy(name="baton", policy=baton_policy_text("kv"))
        inner.sys.enable_auth_method("approle")
        inner.auth.approle.create_or_update_approle("baton", token_policies=["baton"], token_ttl="1h")
        role_id = inner.auth.approle.read_role_id("baton")["data"]["role_id"]
        sid = tmp_path / "secret_id"
        sid.write_text(inner.auth.approle.generate_secret_id("baton")["data"]["secret_id"])
        store = make_vault_store(
            mount="kv", namespace=ns, auth=VaultAuthConfig(method="approle", role_id=role_id, secret_id_file=sid)
        )
        await store.promote("app/db", (await store.create("app/db", Secret("in-ns"))).id)
        assert (await store.read("app/db")).payload.reveal() == "in-ns"
        got = inner.secrets.kv.v2.read_secret_version(path="app/db", mount_point="kv", raise_on_deleted_version=True)
        assert got["data"]["data"] == {"value": "in-ns"}
        with pytest.raises(hvac.exceptions.InvalidPath):  # nothing outside the namespace
            root.secrets.kv.v2.read_secret_version(path="app/db", mount_point="kv", raise_on_deleted_version=True)
        assert vault_server.faults.count("POST", "auth/approle/login") == 1
    finally:
        with contextlib.suppress(hvac.exceptions.VaultError):
            inner.sys.disable_auth_method("approle")
            inner.sys.disable_secrets_engine("kv")
            root.adapter.delete(f"/v1/sys/namespaces/{ns}")
        inner.adapter.close()
        root.adapter.close()
