"""The aws-iam provider against a real moto_server's IAM and STS.

What moto can and cannot show: it records GetAccessKeyLastUsed for every request
signed by a key (date, service, region), and with its authentication on
(``/moto-api/reset-auth``) it checks signatures, so a wrong secret or a deleted
key is refused; it does NOT refuse an Inactive key (real AWS does), so
"Inactive" is checked on IAM's own word (ListAccessKeys), and "unusable" only
after deletion. A consumer in a subprocess signs with the key from a file
rendered by the README's ``~/.aws/credentials`` template.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import AwsIamProviderConfig
from daemon.errors import ProviderBlocked, ProviderError
from daemon.files.render import render
from daemon.model import Secret
from daemon.providers.aws_iam import CREATING, TAG, AwsIamProvider
from tests.fixtures.moto import MotoServer

pytestmark = pytest.mark.integration

USER = "app"
# The README's template, as an output file: the agent renders it from the payload.
CREDENTIALS_TEMPLATE = (
    "[default]\naws_access_key_id = {{ access_key_id }}\naws_secret_access_key = {{ secret_access_key }}\n"
)
CONSUMER = """
import sys, botocore.session
s = botocore.session.get_session()
c = s.create_client("sts", region_name="us-east-1", endpoint_url=sys.argv[1])
print(c.get_caller_identity()["Arn"])
"""


def provider(moto: MotoServer, **kw: Any) -> AwsIamProvider:
    params: dict[str, Any] = {
        "kind": "aws-iam",
        "user_name": USER,
        "endpoint_url": moto.url,
        "timeout": 5,
        "propagation": 0,
        "idle_for": 3600,
        "delete_after": 3600,
    }
    params.update(kw)
    return AwsIamProvider(AwsIamProviderConfig.model_validate(params))


@pytest.fixture
def iam(moto: MotoServer) -> Iterator[Any]:
    with moto.client("iam") as client:
        client.create_user(UserName=USER)
        yield client


def keys(iam: Any) -> dict[str, str]:
    return {k["AccessKeyId"]: k["Status"] for k in iam.list_access_keys(UserName=USER)["AccessKeyMetadata"]}


def key_id(payload: Secret) -> str:
    return str(json.loads(payload.reveal())["access_key_id"])


async def rotate(p: AwsIamProvider, current: Secret | None) -> Secret:
    new = await p.create(current=current)
    await p.apply(new, current=current)
    await p.test(new)
    return new


def _auth(moto: MotoServer, count: str) -> None:
    req = urllib.request.Request(
        moto.url + "/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(req, timeout=5.0) as resp:
        assert resp.status == 200


@pytest.fixture
def authenticated(moto: MotoServer, iam: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """moto checking signatures, Baton signing as an IAM admin user of its own."""
    iam.create_user(UserName="baton-admin")
    iam.put_user_policy(
        UserName="baton-admin",
        PolicyName="all",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    admin = iam.create_access_key(UserName="baton-admin")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", admin["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", admin["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    _auth(moto, "0")
    try:
        yield moto
    finally:
        _auth(moto, "inf")


def consume(moto: MotoServer, payload: Secret, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """A real consumer: botocore in a subprocess, its key from the rendered credentials file."""
    path = tmp_path / "credentials"
    path.write_bytes(render({"credentials": CREDENTIALS_TEMPLATE}, payload)["credentials"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(path), AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    return subprocess.run(
        [sys.executable, "-c", CONSUMER, moto.url], env=env, capture_output=True, text=True, timeout=60, check=False
    )


# ---------------------------------------------------------------- the rotation


async def test_a_rotation_adds_the_second_key_and_the_old_one_stays_active_until_retired(
    moto: MotoServer, iam: Any
) -> None:
    p = provider(moto)
    try:
        v1 = await rotate(p, None)
        v2 = await rotate(p, v1)
        assert set(json.loads(v2.reveal())) == {"access_key_id", "secret_access_key"}
        assert keys(iam) == {key_id(v1): "Active", key_id(v2): "Active"}
        assert p.principal(v2) == key_id(v2) and repr(v2) == "Secret(***)"
        assert sorted(await p.live()) == sorted([key_id(v1), key_id(v2)])

        await p.retire(v1, keep={key_id(v2)})
        assert keys(iam) == {key_id(v1): "Inactive", key_id(v2): "Active"}
        await p.retire(v1, keep={key_id(v2)})  # idempotent: Inactive, not yet deleted (delete_after 1h)
        assert keys(iam) == {key_id(v1): "Inactive", key_id(v2): "Active"}
        assert await p.live() == [key_id(v2)]

        # No free place while the Inactive key waits out delete_after: the rotation waits, nothing changes.
        with pytest.raises(ProviderError, match=r"no free place.*delete_after"):
            await p.create(current=v2)
        assert keys(iam) == {key_id(v1): "Inactive", key_id(v2): "Active"}
    finally:
        await p.aclose()

    later = provider(moto, delete_after=0)
    try:
        v3 = await rotate(later, v2)  # delete_after has passed: the Inactive key goes, the new one takes its place
        assert keys(iam) == {key_id(v2): "Active", key_id(v3): "Active"}
        await later.retire(v2, keep={key_id(v3)})  # delete_after 0: Inactive, then deleted at once
        assert keys(iam) == {key_id(v3): "Active"}
        assert not any(t["Key"].startswith(TAG + key_id(v2)) for t in iam.list_user_tags(UserName=USER)["Tags"])
    finally:
        await later.aclose()


async def test_a_consumer_signs_with_the_new_key_while_the_old_one_works_until_deleted(
    authenticated: MotoServer, iam: Any, tmp_path: Path
) -> None:
    p = provider(authenticated, delete_after=0)
    try:
        v1 = await rotate(p, None)
        v2 = await rotate(p, v1)
        for v in (v1, v2):
            done = consume(authenticated, v, tmp_path)
            assert done.returncode == 0, done.stderr[-2000:]
            assert done.stdout.strip().endswith(f":user/{USER}")

        await p.retire(v1, keep={key_id(v2)})

        old = consume(authenticated, v1, tmp_path)
        assert old.returncode != 0 and "InvalidClientTokenId" in old.stderr
        assert consume(authenticated, v2, tmp_path).returncode == 0
    finally:
        await p.aclose()


async def test_a_key_whose_secret_does_not_sign_fails_the_test_step_without_quoting_it(
    authenticated: MotoServer, iam: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = provider(authenticated)
    try:
        v1 = await p.create(current=None)
        data = json.loads(v1.reveal())
        forged = Secret(json.dumps({**data, "secret_access_key": "forged-" + data["secret_access_key"]}))
        with pytest.raises(ProviderError, match=r"SignatureDoesNotMatch.*does not work") as err:
            await p.test(forged)
        await p.test(v1)
    finally:
        await p.aclose()
    shown = str(err.value) + caplog.text
    assert data["secret_access_key"] not in shown and "forged-" not in shown


async def test_wrong_admin_credentials_fail_create_before_anything_is_minted(
    authenticated: MotoServer, iam: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-admin-secret")
    p = provider(authenticated)
    try:
        with pytest.raises(
            ProviderError, match="listing the access keys of IAM user app failed: SignatureDoesNotMatch"
        ):
            await p.create(current=None)
    finally:
        await p.aclose()
    _auth(authenticated, "inf")
    assert keys(iam) == {}


# ---------------------------------------------------------------- usage


async def test_an_old_key_used_after_the_swap_blocks_retirement_until_it_has_been_idle(
    moto: MotoServer, iam: Any, tmp_path: Path
) -> None:
    p = provider(moto)
    try:
        v1 = await rotate(p, None)
        assert consume(moto, v1, tmp_path).returncode == 0  # used before the swap
        await rotate(p, v1)
        assert await p.sessions(v1) == []  # not since the swap: nothing holds it

        assert consume(moto, v1, tmp_path).returncode == 0  # a consumer that missed the new version
        [session] = await p.sessions(v1)
        assert session.principal == key_id(v1) and "sts in us-east-1" in session.client
    finally:
        await p.aclose()
    idle = provider(moto, idle_for=0.001)
    try:
        assert await idle.sessions(v1) == []  # unused for longer than idle_for
    finally:
        await idle.aclose()


# ---------------------------------------------------------------- keys that are not Baton's


async def test_a_user_with_two_keys_neither_of_them_batons_is_refused_clearly(moto: MotoServer, iam: Any) -> None:
    foreign = {iam.create_access_key(UserName=USER)["AccessKey"]["AccessKeyId"] for _ in range(2)}
    p = provider(moto)
    try:
        with pytest.raises(ProviderError, match="already has two access keys, neither created by Baton") as err:
            await p.create(current=None)
    finally:
        await p.aclose()
    assert all(k in str(err.value) for k in foreign)
    assert keys(iam) == dict.fromkeys(foreign, "Active")


async def test_a_key_that_is_not_batons_is_never_deactivated(moto: MotoServer, iam: Any) -> None:
    made = iam.create_access_key(UserName=USER)["AccessKey"]
    seed = Secret(json.dumps({"access_key_id": made["AccessKeyId"], "secret_access_key": made["SecretAccessKey"]}))
    p = provider(moto)
    try:
        v2 = await rotate(p, seed)  # a seeded key is the current one: the second place is free
        with pytest.raises(ProviderError, match="not created by Baton"):
            await p.retire(seed, keep={key_id(v2)})
        with pytest.raises(ProviderError, match="the current or a newer version names it"):
            await p.retire(v2, keep={key_id(v2)})
    finally:
        await p.aclose()
    assert keys(iam) == {made["AccessKeyId"]: "Active", key_id(v2): "Active"}


async def test_a_key_minted_by_an_interrupted_create_is_deleted_only_if_never_used(
    moto: MotoServer, iam: Any, tmp_path: Path
) -> None:
    p = provider(moto)
    try:
        v1 = await rotate(p, None)
        # A create that died after CreateAccessKey, before its tag: only baton:creating says it was ours.
        iam.tag_user(UserName=USER, Tags=[{"Key": CREATING, "Value": repr(time.time())}])
        lost = iam.create_access_key(UserName=USER)["AccessKey"]["AccessKeyId"]
        v2 = await p.create(current=v1)
        assert keys(iam) == {key_id(v1): "Active", key_id(v2): "Active"}
        assert lost not in keys(iam)

        # A Baton key no version names that has been used: left alone, and the rotation blocks.
        assert consume(moto, v2, tmp_path).returncode == 0
        with pytest.raises(ProviderBlocked) as err:
            await p.create(current=v1)
        assert err.value.live == (key_id(v2),)
        assert keys(iam) == {key_id(v1): "Active", key_id(v2): "Active"}
    finally:
        await p.aclose()


async def test_no_secret_access_key_reaches_a_log_line(
    moto: MotoServer, iam: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = provider(moto, delete_after=0)
    seen: list[str] = []
    try:
        current = None
        for _ in range(3):
            current_new = await rotate(p, current)
            seen.append(json.loads(current_new.reveal())["secret_access_key"])
            if current is not None:
                await p.sessions(current)
                await p.retire(current, keep={key_id(current_new)})
            current = current_new
        with contextlib.suppress(ProviderError):
            await p.retire(Secret("not json"))
    finally:
        await p.aclose()
    assert "made Inactive" in caplog.text and "deleted access key" in caplog.text
    assert not any(s in caplog.text for s in seen)
