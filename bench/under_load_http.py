"""The rotation benchmark's aws-iam and command rows (bench/rotation_under_load.py runs them).

Each row: an agent and a rotator in this process on the embedded local store,
and real consumer processes (bench/http_consumer.py: 4 per-use + 1 pooled, the
same ~280 requests/s shape as the PostgreSQL rows) against the real system:

- ``aws-iam``: the aws-iam provider on a private moto_server with its
  signature checks on; consumers sign STS GetCallerIdentity with the key from
  the README's ``~/.aws/credentials`` template;
- ``aws-iam-in-place``: the naive baseline, bench/naive_iam_step.py through
  the command provider (delete the key, create another): consumers fail;
- ``command-http-token``: examples/providers/http_token.py rotating a token of
  examples/providers/token_api.py, consumers calling ``GET /whoami``;
- ``command-http-token-in-place``: the same example regenerating its one token
  in place (TOKEN_STRATEGY=in-place): consumers fail.

It never prints a key, a token or the admin credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench._phase import store_versions, summarize  # noqa: E402
from daemon.agent.service import Agent  # noqa: E402
from daemon.config import parse_config  # noqa: E402
from daemon.rotation.service import Rotator  # noqa: E402
from tests.fixtures.moto import AWS_ENV, MotoServer, _free_port  # noqa: E402

PHASES = ("aws-iam", "aws-iam-in-place", "command-http-token", "command-http-token-in-place")
ZERO_DOWNTIME = {"aws-iam": True, "aws-iam-in-place": False, "command-http-token": True}
CONSUMER = BENCH / "http_consumer.py"
EXAMPLES = ROOT / "examples" / "providers"
KEY = "bench/cred"
CREDENTIAL = "cred"
AWS_TEMPLATE = "[default]\naws_access_key_id = {{ access_key_id }}\naws_secret_access_key = {{ secret_access_key }}\n"
TOKEN_TEMPLATE = "{{ token }}\n"
RETIRE_DEADLINE = 60.0
_LIVE: set[int] = set()  # consumer and server pids still to be stopped


def kill_leftovers() -> None:
    for pid in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _LIVE.discard(pid)


# ---------------------------------------------------------------- the systems


@dataclass
class Target:
    kind: str  # http_consumer --kind
    url: str
    provider: dict[str, Any]
    file: str
    template: str
    principals: Callable[[], list[str]]  # what the system holds at the end (key ids, token ids)


def _moto_auth(url: str, count: str) -> None:
    req = urllib.request.Request(
        url + "/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(req, timeout=5.0) as resp:
        assert resp.status == 200


@contextlib.contextmanager
def moto_system(root: Path) -> Iterator[tuple[MotoServer, Path]]:
    """A private moto_server checking signatures; Baton's admin is an IAM user of its own.
    Yields the server and an ``~/.aws/credentials`` file of that admin (for the naive step)."""
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENV)
    server = MotoServer(port=_free_port(), log_path=root / "moto_server.log")
    server.start()
    try:
        with server.client("iam") as iam:
            iam.create_user(UserName="baton-admin")
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            iam.put_user_policy(UserName="baton-admin", PolicyName="all", PolicyDocument=json.dumps(policy))
            admin = iam.create_access_key(UserName="baton-admin")["AccessKey"]
            for user in ("bench-app", "bench-naive"):
                iam.create_user(UserName=user)
        admin_file = root / "admin-credentials"
        admin_file.write_text(
            f"[default]\naws_access_key_id = {admin['AccessKeyId']}\n"
            f"aws_secret_access_key = {admin['SecretAccessKey']}\n"
        )
        admin_file.chmod(0o600)
        os.environ["AWS_ACCESS_KEY_ID"] = admin["AccessKeyId"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = admin["SecretAccessKey"]
        for k in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            os.environ.pop(k, None)  # moto refuses an IAM user's key with a session token
        _moto_auth(server.url, "0")
        yield server, admin_file
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def token_api(root: Path) -> Iterator[tuple[str, Path]]:
    admin = root / "api-admin-token"
    admin.write_text(os.urandom(16).hex() + "\n")
    admin.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "token_api.py"), "--port", "0", "--admin-token-file", str(admin)],
        stdout=subprocess.PIPE,
        text=True,
    )
    _LIVE.add(proc.pid)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit("the example token API did not start")
        yield line.split()[-1], admin
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        _LIVE.discard(proc.pid)
        if proc.stdout is not None:
            proc.stdout.close()


def iam_keys(server: MotoServer, admin_file: Path, user: str) -> list[str]:
    import boto3

    keys = dict(line.split(" = ", 1) for line in admin_file.read_text().splitlines() if " = " in line)
    iam = boto3.client(
        "iam",
        region_name="us-east-1",
        endpoint_url=server.url,
        aws_access_key_id=keys["aws_access_key_id"],
        aws_secret_access_key=keys["aws_secret_access_key"],
    )
    try:
        return [k["AccessKeyId"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]]
    finally:
        iam.close()


def api_tokens(url: str, admin: Path, label: str) -> list[str]:
    req = urllib.request.Request(url + "/tokens", headers={"Authorization": f"Bearer {admin.read_text().strip()}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return [t["id"] for t in json.loads(resp.read()) if t["label"] == label]


def target_for(phase: str, *, moto: tuple[MotoServer, Path] | None, api: tuple[str, Path] | None) -> Target:
    if phase.startswith("aws-iam"):
        assert moto is not None
        server, admin_file = moto
        if phase == "aws-iam":
            provider: dict[str, Any] = {
                "kind": "aws-iam",
                "user_name": "bench-app",
                "endpoint_url": server.url,
                "delete_after": 0,
                "idle_for": 0.5,
                "propagation": 5,
            }
            user = "bench-app"
        else:
            provider = {
                "kind": "command",
                "command": [sys.executable, str(BENCH / "naive_iam_step.py")],
                "principal_field": "access_key_id",
                "env": {
                    "AWS_SHARED_CREDENTIALS_FILE": str(admin_file),
                    "AWS_CONFIG_FILE": os.devnull,
                    "MOTO_URL": server.url,
                    "IAM_USER": "bench-naive",
                },
            }
            user = "bench-naive"
        return Target(
            kind="sts",
            url=server.url,
            provider=provider,
            file="credentials",
            template=AWS_TEMPLATE,
            principals=lambda: iam_keys(server, admin_file, user),
        )
    assert api is not None
    url, admin = api
    label = phase
    env = {"TOKEN_API_URL": url, "TOKEN_API_ADMIN_TOKEN_FILE": str(admin), "TOKEN_LABEL": label}
    env["TOKEN_IDLE_FOR"] = "0.5"
    if phase.endswith("in-place"):
        env["TOKEN_STRATEGY"] = "in-place"
    provider = {"kind": "command", "command": [sys.executable, str(EXAMPLES / "http_token.py")], "env": env}
    if not phase.endswith("in-place"):
        # In place, every version names the same token: it has no principal of its own to keep or retire.
        provider.update(principal_field="id", slots=2)
    return Target(
        kind="token",
        url=url,
        provider=provider,
        file="token",
        template=TOKEN_TEMPLATE,
        principals=lambda: api_tokens(url, admin, label),
    )


# ---------------------------------------------------------------- one row


def phase_config(target: Target, *, root: Path, every: float) -> dict[str, Any]:
    return {
        "node_id": "bench-node",
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"format": "json", "level": "info"},
        "report": {"heartbeat": 0.5},
        "agent": {"debounce": 0.1, "scan_interval": 0.25, "fanotify": "off"},
        "credentials": [
            {
                "name": CREDENTIAL,
                "key": KEY,
                "output": {"dir": str(root / "out"), "files": {target.file: target.template}},
                "consumers": [
                    {
                        "name": "per-use",
                        "match": {"cmdline": f"http_consumer\\.py per-use .*{root}/"},
                        "loads": "per-use",
                    },
                    {
                        "name": "pool",
                        "match": {"cmdline": f"http_consumer\\.py pool .*{root}/"},
                        "loads": "on-reload",
                        "reload": {"signal": "SIGHUP"},
                        "health": {"alive_for": 0.1},
                        "min_restart_interval": 0.1,
                    },
                ],
                "rotation": {"every": every, "provider": target.provider},
            }
        ],
    }


@dataclass
class Consumers:
    procs: list[tuple[str, asyncio.subprocess.Process, Path]] = field(default_factory=list)

    async def start(self, *, target: Target, root: Path, load: Any) -> None:
        pool = ["pool", "--rate", str(load.pool_rate), "--max-lifetime", str(load.max_lifetime)]
        specs = [("pool", [*pool, "--reload-drain", str(load.reload_drain)])]
        specs += [("per-use", ["per-use", "--rate", str(load.per_use_rate)]) for _ in range(load.per_use_procs)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        for i, (variant, args) in enumerate(specs):
            stats = root / f"stats-{variant}-{i}.json"
            argv = [sys.executable, str(CONSUMER), *args, "--kind", target.kind, "--url", target.url]
            argv += ["--file", str(root / "out" / target.file), "--stats", str(stats)]
            with open(root / f"consumer-{i}.log", "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stderr=err, start_new_session=True
                )
            _LIVE.add(proc.pid)
            self.procs.append((variant, proc, stats))

    async def stop(self) -> None:
        for _, proc, _ in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            _LIVE.discard(proc.pid)

    def stats(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for variant, _, path in self.procs:
            try:
                out.append((variant, json.loads(path.read_text())))
            except (OSError, ValueError):
                out.append((variant, {}))
        return out


async def run_phase(
    phase: str, *, target: Target, rotations: int, every: float, load: Any, root: Path, events: Any, progress: TextIO
) -> dict[str, Any]:
    # The schedule mints version 1 at once and would then wait an hour: the loop below asks for each
    # rotation (rotate_now) every ``every`` seconds, so exactly ``rotations`` happen, however slow a step is.
    config = parse_config(phase_config(target, root=root, every=3600.0))
    first_event = len(events.events)
    rotator = Rotator(config, install_signals=False, serve_api=False)
    agent = Agent(config, install_signals=False)
    tasks = [
        asyncio.create_task(rotator.serve(), name=f"bench-rotator-{phase}"),
        asyncio.create_task(agent.serve(), name=f"bench-agent-{phase}"),
    ]
    consumers = Consumers()
    timed_out = False
    t0 = time.time()
    try:
        await asyncio.wait_for(agent.ready.wait(), 60)
        t0 = time.time()
        await consumers.start(target=target, root=root, load=load)
        print(f"[{phase}] consumers started: {load.per_use_procs} per-use + 1 pool", file=progress, flush=True)
        done_at: float | None = None
        asked: tuple[int, int] | None = None  # (rotations done, events seen) when a rotation was last asked for
        next_at = time.monotonic() + every
        last_line = ""
        while True:
            versions = await asyncio.to_thread(store_versions, root / "store.db", KEY)
            rotated = max(0, sum(1 for v in versions if not v[2]) - 1)
            retired = sum(1 for v in versions if v[1])
            failures = sum(s.get("failures", 0) for _, s in consumers.stats())
            line = f"[{phase}] rotations {rotated}/{rotations} retired {retired} failed requests {failures}"
            if line != last_line:
                print(f"{time.strftime('%H:%M:%S')} {line}", file=progress, flush=True)
                last_line = line
            # Ask again only once the last ask was answered: a rotation done, or put off (postponed, failed).
            answered = (
                asked is None
                or rotated > asked[0]
                or {e["event"] for e in events.events[asked[1] :]}
                & {
                    "rotation_postponed",
                    "rotation_failed",
                }
            )
            if rotated < rotations and answered and time.monotonic() >= next_at:
                asked = (rotated, len(events.events))
                rotator.rotate_now.set()
                next_at = time.monotonic() + every
            if rotated >= rotations and done_at is None:
                done_at = time.monotonic()
            if rotated >= rotations and retired >= rotated:
                break
            if done_at is not None and time.monotonic() - done_at > RETIRE_DEADLINE:
                timed_out = True
                break
            # A naive step runs a Python process with boto3 (seconds on a loaded machine): room for it.
            if time.time() - t0 > rotations * (every + 15) + 60:
                timed_out = True
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)  # a little load after the last retirement
    finally:
        await consumers.stop()
        rotator.should_exit.set()
        agent.should_exit.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return summarize(
        versions=await asyncio.to_thread(store_versions, root / "store.db", KEY),
        consumers=consumers,
        phase_events=events.events[first_event:],
        t0=t0,
        t_end=time.time(),
        timed_out=timed_out,
        load=load,
        zero_downtime=ZERO_DOWNTIME.get(phase, False),
        at_end=("principals_at_end", len(await asyncio.to_thread(target.principals))),
    )


async def run_phases(
    phases: list[str], *, rotations: int, every: float, load: Any, workdir: Path, events: Any, progress: TextIO
) -> dict[str, dict[str, Any]]:
    """Every chosen row, each system started once for the rows that use it."""
    results: dict[str, dict[str, Any]] = {}
    aws = [p for p in phases if p.startswith("aws-iam")]
    cmd = [p for p in phases if p.startswith("command-")]
    groups: list[tuple[list[str], Any]] = [(aws, moto_system), (cmd, token_api)]
    for chosen, system in groups:
        if not chosen:
            continue
        sysroot = workdir / f"system-{chosen[0]}"
        sysroot.mkdir()
        with system(sysroot) as handle:
            for phase in chosen:
                root = workdir / phase
                root.mkdir()
                moto = handle if system is moto_system else None
                api = handle if system is token_api else None
                target = target_for(phase, moto=moto, api=api)
                results[phase] = await run_phase(
                    phase,
                    target=target,
                    rotations=rotations,
                    every=every,
                    load=load,
                    root=root,
                    events=events,
                    progress=progress,
                )
    return results
