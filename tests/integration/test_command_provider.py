"""The command provider: real processes per step, through CredentialRotator on a real LocalStore.

Step scripts: tests/integration/command_steps.py (hostile and well-behaved
modes) and the example examples/providers/http_token.py against the example
token API (examples/providers/token_api.py), run here on a free loopback port.
Every test that can see a secret searches the captured logs and outcomes for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import CommandProviderConfig, Config
from daemon.errors import ProviderError
from daemon.model import CURRENT, Secret
from daemon.providers.command import CommandProvider
from daemon.report.metadata import MetadataReporter
from daemon.rotation.workflow import CredentialRotator, RotationResult
from daemon.stores.local import LocalStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = Path(__file__).with_name("command_steps.py")
EXAMPLES = ROOT / "examples" / "providers"
KEY = "app/token"
SEED_SECRET = "seed-secret-Zq81xLw3"
SEED = Secret(json.dumps({"id": "pw-0", "password": SEED_SECRET}))


def command(mode: str, tmp_path: Path, **kw: Any) -> CommandProviderConfig:
    env = {"STATE_DIR": str(tmp_path), **kw.pop("env", {})}
    return CommandProviderConfig.model_validate(
        {"kind": "command", "command": [sys.executable, str(STEPS), mode], "env": env, "principal_field": "id", **kw}
    )


def make_config(tmp_path: Path, provider: CommandProviderConfig) -> Config:
    return Config.model_validate(
        {
            "node_id": "rotator-1",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "report": {"heartbeat": 10, "ttl": 30},
            "credentials": [
                {
                    "name": "token",
                    "key": KEY,
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": 3600, "provider": provider.model_dump()},
                }
            ],
        }
    )


def rotator(tmp_path: Path, store: LocalStore, provider: CommandProviderConfig) -> CredentialRotator:
    config = make_config(tmp_path, provider)
    return CredentialRotator(
        config=config,
        credential=config.credentials[0],
        store=store,
        reporter=MetadataReporter(store),
        provider=CommandProvider(provider),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalStore]:
    s = LocalStore(tmp_path / "store.db", watch_files=False)
    await s.put(KEY, SEED)
    try:
        yield s
    finally:
        await s.aclose()


# ---------------------------------------------------------------- a well-behaved command


async def test_a_rotation_runs_create_apply_test_and_passes_payloads_only_on_stdin(
    tmp_path: Path, store: LocalStore
) -> None:
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    config = command("pause", tmp_path, env={"PAUSE_STEP": "apply", "PAUSE_FIFO": str(fifo)})
    task = asyncio.create_task(rotator(tmp_path, store, config).rotate())
    # The step writes its pid into the FIFO and waits: its argv and environment are read while it runs.
    pid = int(await asyncio.to_thread(lambda: fifo.read_text().strip()))
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    await asyncio.to_thread(lambda: fifo.write_text("go\n"))
    outcome = await asyncio.wait_for(task, 60)

    assert outcome.result == RotationResult.ROTATED, outcome
    new = json.loads((await store.read(KEY)).payload.reveal())
    assert new["id"] == "pw-1"
    assert cmdline[-2:] == [b"apply", b""] and cmdline[0].decode() == sys.executable
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert names == {"PATH", "LANG", "BATON_STEP", "STATE_DIR", "PAUSE_STEP", "PAUSE_FIFO"}
    for secret in (SEED_SECRET, new["password"]):
        assert secret.encode() not in b"".join(cmdline) + b"".join(environ)
    assert json.loads((tmp_path / "valid.json").read_text()) == {"pw-1": new["password"]}


async def test_retire_refuses_a_principal_to_keep_and_sessions_come_from_the_command(tmp_path: Path) -> None:
    p = CommandProvider(command("ok", tmp_path))
    old = await p.create(current=None)
    await p.apply(old, current=None)
    (tmp_path / "using").write_text("pw-1")
    assert [(s.principal, s.count) for s in await p.sessions(old)] == [("pw-1", 1)]
    with pytest.raises(ProviderError, match="refusing to retire pw-1"):
        await p.retire(old, keep={"pw-1"})
    await p.retire(old, keep={"pw-2"})
    assert json.loads((tmp_path / "valid.json").read_text()) == {}
    assert p.principal(old) == "pw-1"


# ---------------------------------------------------------------- hostile commands


@dataclass(frozen=True)
class Bad:
    mode: str
    error: str
    kw: dict[str, Any]


BAD = [
    Bad("exit3", r"^command step create: failed \(exit 3\): refused: pw-0 \*\*\*$", {}),
    Bad("nonjson", r"^command step create: printed something that is not JSON$", {}),
    Bad("flood", r"^command step create: printed more than 65536 bytes \(killed\)$", {}),
    Bad("deep", r"^command step create: printed something that is not JSON$", {}),
    Bad("hang", r"^command step create: timed out after 1s \(killed with its process group\)$", {"timeout": 1}),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.mode for b in BAD])
async def test_a_bad_command_fails_the_rotation_naming_the_step_and_the_current_credential_stays(
    tmp_path: Path, store: LocalStore, caplog: pytest.LogCaptureFixture, bad: Bad
) -> None:
    caplog.set_level(logging.DEBUG)
    config = command(bad.mode, tmp_path, env={"GRANDCHILD_FILE": str(tmp_path / "grandchild")}, **bad.kw)

    outcome = await asyncio.wait_for(rotator(tmp_path, store, config).rotate(), 60)

    assert (outcome.result, outcome.step) == (RotationResult.FAILED, "create")
    assert outcome.error is not None
    assert re.fullmatch(bad.error, outcome.error), outcome.error
    got = await store.read(KEY)
    assert got.payload == SEED and CURRENT in got.info.stages
    assert [v.id for v in await store.versions(KEY)] == [got.info.id]
    assert SEED_SECRET not in caplog.text + str(outcome)
    if bad.mode == "hang":  # the grandchild went with the step's process group
        grandchild = int((tmp_path / "grandchild").read_text())
        assert _gone(grandchild), f"grandchild {grandchild} outlived the step"


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited, waited for on a pidfd (SIGKILL is delivered asynchronously)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(30_000))  # readable once the process has exited
    finally:
        os.close(fd)


async def test_what_a_command_prints_on_stderr_is_never_shown(
    tmp_path: Path, store: LocalStore, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    outcome = await rotator(tmp_path, store, command("stderr", tmp_path)).rotate()
    assert outcome.result == RotationResult.ROTATED
    new = json.loads((await store.read(KEY)).payload.reveal())["password"]
    out, err = capfd.readouterr()
    for secret in (SEED_SECRET, new):
        assert secret not in caplog.text + out + err


async def test_a_missing_executable_fails_clearly(tmp_path: Path) -> None:
    config = CommandProviderConfig(kind="command", command=[str(tmp_path / "absent")])
    with pytest.raises(ProviderError, match=r"command step test: cannot start .*absent \(No such file"):
        await CommandProvider(config).test(SEED)


def test_the_config_wants_an_absolute_executable_and_no_shell_string() -> None:
    with pytest.raises(ValueError, match="absolute path"):
        CommandProviderConfig.model_validate({"kind": "command", "command": ["rotate.sh"]})
    with pytest.raises(ValueError, match="absolute path"):
        CommandProviderConfig.model_validate({"kind": "command", "command": []})


# ---------------------------------------------------------------- the HTTP token example


@dataclass
class TokenApi:
    url: str
    admin_file: Path

    def whoami(self, token: str) -> int:
        req = urllib.request.Request(self.url + "/whoami", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return e.code


@pytest.fixture
def token_api(tmp_path: Path) -> Iterator[TokenApi]:
    admin = tmp_path / "admin-token"
    admin.write_text("admin-token-Yy72pQ\n")
    admin.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "token_api.py"), "--port", "0", "--admin-token-file", str(admin)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "listening on <url>" once it serves
        assert line.startswith("listening on "), line
        yield TokenApi(url=line.split()[-1], admin_file=admin)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def http_token(api: TokenApi, **env: str) -> CommandProviderConfig:
    return CommandProviderConfig.model_validate(
        {
            "kind": "command",
            "command": [sys.executable, str(EXAMPLES / "http_token.py")],
            "principal_field": "id",
            "slots": 2,
            "env": {"TOKEN_API_URL": api.url, "TOKEN_API_ADMIN_TOKEN_FILE": str(api.admin_file), **env},
        }
    )


async def test_the_http_token_example_rotates_a_token_and_the_old_one_works_until_retired(
    tmp_path: Path, token_api: TokenApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = CommandProvider(http_token(token_api))
    v1 = await p.create(current=None)
    await p.apply(v1, current=None)
    await p.test(v1)
    v2 = await p.create(current=v1)
    await p.apply(v2, current=v1)
    await p.test(v2)
    t1, t2 = (json.loads(v.reveal())["token"] for v in (v1, v2))
    assert token_api.whoami(t1) == 200 and token_api.whoami(t2) == 200

    assert [s.principal for s in await p.sessions(v1)] == [p.principal(v1)]  # used just now
    idle = CommandProvider(http_token(token_api, TOKEN_IDLE_FOR="0"))
    assert await idle.sessions(v1) == []

    await p.retire(v1, keep={p.principal(v2) or ""})
    assert token_api.whoami(t1) == 401 and token_api.whoami(t2) == 200
    await p.retire(v1, keep=set())  # again: already gone, fine
    assert t1 not in caplog.text and t2 not in caplog.text and "admin-token-Yy72pQ" not in caplog.text


async def test_the_http_token_example_fails_clearly_when_the_api_is_down(tmp_path: Path) -> None:
    api = TokenApi(url="http://127.0.0.1:9", admin_file=tmp_path / "none")
    (tmp_path / "none").write_text("x")
    with pytest.raises(ProviderError, match=r"command step create: failed temporarily \(exit 75\): .*unreachable"):
        await CommandProvider(http_token(api)).create(current=None)


# ---------------------------------------------------------------- the users-file example


async def test_the_users_file_example_alternates_two_users_and_retire_leaves_a_re_passworded_slot(
    tmp_path: Path,
) -> None:
    users = tmp_path / "users"
    config = CommandProviderConfig.model_validate(
        {
            "kind": "command",
            "command": [sys.executable, str(EXAMPLES / "users_file.py")],
            "principal_field": "username",
            "slots": 2,
            "env": {"USERS_FILE": str(users), "USERS_BASE": "app"},
        }
    )
    p = CommandProvider(config)

    async def rotate(current: Secret | None) -> Secret:
        new = await p.create(current=current)
        await p.apply(new, current=current)
        await p.apply(new, current=current)  # again, as after a crash: the same state
        await p.test(new)
        return new

    def names() -> list[str]:
        return sorted(line.split(":", 1)[0] for line in users.read_text().splitlines())

    v1 = await rotate(None)
    v2 = await rotate(v1)
    assert [p.principal(v) for v in (v1, v2)] == ["app_a", "app_b"] and names() == ["app_a", "app_b"]
    await p.retire(v1, keep={"app_b"})
    assert names() == ["app_b"]
    v3 = await rotate(v2)  # app_a again, with a new password
    await p.retire(v1, keep=set())  # a stale retire of v1: app_a's password has changed since
    assert names() == ["app_a", "app_b"]
    await p.test(v3)
    with pytest.raises(ProviderError, match="command step test: failed \\(exit 1\\): user app_a does not have"):
        await p.test(v1)
    assert json.loads(v1.reveal())["password"] not in users.read_text()
