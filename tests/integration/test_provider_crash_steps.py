"""aws-iam and command providers: a crash at every step boundary is resumed, nothing live is orphaned.

The rotator (CredentialRotator on a real LocalStore) runs a second rotation
against the real system (moto_server's IAM; the example token API with
examples/providers/http_token.py) and "dies" right after one call returned:
a provider step (create, apply, test, retire) or a store write (create,
promote), before anything after it was recorded. A new store object, a new
provider and a new rotator then finish the rotation and the retirement. After
it: one current version, it works against the real system, the old one does
not, and no key or token exists that no version names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from daemon.config import Config
from daemon.model import Secret
from daemon.providers import open_provider
from daemon.providers.base import Provider
from daemon.report.base import NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation.workflow import CredentialRotator, RotationResult
from daemon.stores.base import SecretStore
from daemon.stores.local import LocalStore
from tests.fixtures.moto import MotoServer
from tests.fuzz import FUZZ

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "providers"
KEY = "app/cred"
# (object, method): the rotator dies right after this call returned.
BOUNDARIES = [
    ("provider", "create"),
    ("store", "create"),
    ("provider", "apply"),
    ("provider", "test"),
    ("store", "promote"),
    ("provider", "retire"),
]


class Crash(BaseException):
    """The process dies: not a BatonError, so no step catches it."""


class CrashAfter:
    """``inner``, whose ``method`` raises Crash once, right after the real call returned."""

    def __init__(self, inner: Any, method: str) -> None:
        self._inner = inner
        self._method = method

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        async def crashing(*args: Any, **kwargs: Any) -> Any:
            await attr(*args, **kwargs)
            raise Crash(f"after {name}")

        return crashing


@dataclass
class System:
    """The target system of one provider, seen from outside the code under test."""

    provider: dict[str, Any]
    works: Any  # (payload) -> bool
    principals: Any  # () -> set of what the system holds for this credential
    principal_of: Any  # (payload) -> str


@dataclass
class TokenApi:
    url: str
    admin: str

    def call(self, path: str, token: str) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None


@pytest.fixture
def token_api(tmp_path: Path) -> Iterator[TokenApi]:
    admin = tmp_path / "admin-token"
    admin.write_text("admin-token-crash-Q9\n")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "token_api.py"), "--port", "0", "--admin-token-file", str(admin)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield TokenApi(url=line.split()[-1], admin="admin-token-crash-Q9")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def aws_iam(moto: MotoServer) -> System:
    def iam_keys() -> dict[str, str]:
        with moto.client("iam") as iam:
            return {k["AccessKeyId"]: k["Status"] for k in iam.list_access_keys(UserName="app")["AccessKeyMetadata"]}

    def works(payload: Secret) -> bool:
        import boto3

        data = json.loads(payload.reveal())
        # moto does not refuse an Inactive key: IAM's own word says whether the key is usable.
        if iam_keys().get(data["access_key_id"]) != "Active":
            return False
        sts = boto3.client(
            "sts",
            region_name="us-east-1",
            endpoint_url=moto.url,
            aws_access_key_id=data["access_key_id"],
            aws_secret_access_key=data["secret_access_key"],
        )
        try:
            return str(sts.get_caller_identity()["Arn"]).endswith(":user/app")
        finally:
            sts.close()

    with moto.client("iam") as iam:
        iam.create_user(UserName="app")
    return System(
        provider={
            "kind": "aws-iam",
            "user_name": "app",
            "endpoint_url": moto.url,
            "delete_after": 0,
            "idle_for": 0.001,
            "propagation": 0,
            "timeout": 5,
        },
        works=works,
        principals=lambda: set(iam_keys()),
        principal_of=lambda p: json.loads(p.reveal())["access_key_id"],
    )


def command(api: TokenApi, tmp_path: Path) -> System:
    (tmp_path / "admin-token").write_text(api.admin)
    return System(
        provider={
            "kind": "command",
            "command": [sys.executable, str(EXAMPLES / "http_token.py")],
            "principal_field": "id",
            "slots": 2,
            "env": {
                "TOKEN_API_URL": api.url,
                "TOKEN_API_ADMIN_TOKEN_FILE": str(tmp_path / "admin-token"),
                "TOKEN_IDLE_FOR": "0",
            },
        },
        works=lambda p: api.call("/whoami", json.loads(p.reveal())["token"])[0] == 200,
        principals=lambda: {t["id"] for t in api.call("/tokens", api.admin)[1]},
        principal_of=lambda p: json.loads(p.reveal())["id"],
    )


@pytest.fixture
def system(request: pytest.FixtureRequest, tmp_path: Path) -> System:
    if request.param == "aws-iam":
        return aws_iam(request.getfixturevalue("moto"))
    return command(request.getfixturevalue("token_api"), tmp_path)


def make_config(tmp_path: Path, provider: dict[str, Any]) -> Config:
    return Config.model_validate(
        {
            "node_id": "rotator-1",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "report": {"heartbeat": 10, "ttl": 30},
            "credentials": [
                {
                    "name": "cred",
                    "key": KEY,
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": 3600, "provider": provider},
                }
            ],
        }
    )


@contextlib.asynccontextmanager
async def rotator_on(
    config: Config, *, crash: tuple[str, str] | None = None
) -> AsyncIterator[tuple[CredentialRotator, LocalStore]]:
    """One rotator "process": its own store object and provider, closed when it ends (or dies)."""
    assert config.credentials[0].rotation is not None
    store = LocalStore(config.store.path, watch_files=False)  # type: ignore[union-attr]
    provider = open_provider(config.credentials[0].rotation)
    try:
        wrapped_store: Any = store
        wrapped_provider: Any = provider
        if crash is not None:
            if crash[0] == "store":
                wrapped_store = CrashAfter(store, crash[1])
            else:
                wrapped_provider = CrashAfter(provider, crash[1])
        rotator = CredentialRotator(
            config=config,
            credential=config.credentials[0],
            store=cast(SecretStore, wrapped_store),
            reporter=MetadataReporter(store),
            provider=cast(Provider, wrapped_provider),
        )
        yield rotator, store
    finally:
        await provider.aclose()
        await store.aclose()


async def report_current(store: LocalStore) -> None:
    """The one node holds only the current version: the old one may retire."""
    current = (await store.read(KEY)).info.id
    report = NodeReport(node="node-a", credential="cred", current=current, in_use={current: 1}, heartbeat=time.time())
    await MetadataReporter(store).publish(KEY, report)


# make test: every boundary at least once, and both providers right after create (what a lost answer
# leaves live); make fuzz (BATON_FUZZ=1): every pair.
_QUICK = {
    "aws-iam": [("provider", "create"), ("provider", "test"), ("provider", "retire")],
    "command": [("provider", "create"), ("store", "create"), ("provider", "apply"), ("store", "promote")],
}
CASES = [(p, b) for p in ("aws-iam", "command") for b in (BOUNDARIES if FUZZ else _QUICK[p])]


@pytest.mark.parametrize(
    ("system", "boundary"), CASES, indirect=["system"], ids=[f"{p}-{o}.{m}" for p, (o, m) in CASES]
)
async def test_a_crash_right_after_each_step_is_resumed_and_leaves_nothing_live_unnamed(
    tmp_path: Path, system: System, boundary: tuple[str, str]
) -> None:
    config = make_config(tmp_path, system.provider)
    async with rotator_on(config) as (rotator, store):
        assert (await rotator.rotate()).result == RotationResult.ROTATED
        v1 = (await store.read(KEY)).payload
    assert await asyncio.to_thread(system.works, v1)

    async with rotator_on(config, crash=boundary) as (rotator, store):
        with pytest.raises(Crash):
            if boundary[1] == "retire":
                assert (await rotator.rotate()).result == RotationResult.ROTATED
                await report_current(store)
                await rotator.retire_ready()
            else:
                await rotator.rotate()
        standing = (await store.read(KEY)).payload  # v1, or (crash at retire) the version that superseded it
        assert await asyncio.to_thread(system.works, standing), "the current credential broke at the crash"

    async with rotator_on(config) as (rotator, store):
        if boundary[1] != "retire":
            outcome = await rotator.rotate()
            assert outcome.result == RotationResult.ROTATED, outcome
        await report_current(store)
        assert [v for v in await rotator.retire_ready()], "the superseded version did not retire"
        current = (await store.read(KEY)).payload
        versions = await store.versions(KEY)

    assert [v.is_current for v in versions].count(True) == 1
    assert all(v.retired for v in versions if not v.is_current)
    assert current != v1
    assert await asyncio.to_thread(system.works, current)
    assert not await asyncio.to_thread(system.works, v1)
    # Nothing the crash minted is left live: the system holds exactly the current credential.
    assert await asyncio.to_thread(system.principals) == {system.principal_of(current)}
