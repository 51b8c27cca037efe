"""``baton rotate`` and ``baton retire --force``: ask the running rotator, and follow what it does.

Both talk to the rotator's endpoint (``api.listen`` of the config given, or ``--url``)
with its action token (``api.token_file``, or the one the rotator made in
``api.runtime_dir``). ``rotate --wait`` follows the rotation through ``/v1/status``:
the step, the nodes that have the new version, the holders of the old one, a line
on stderr at each change; exit 0 once the old version is retired, 1 when the
rotation fails or the timeout passes (naming what still holds it). Exit 2 for
what the caller must fix: a credential the config does not rotate, no rotator
answering, a token refused, a forced retire of the current version. Nothing here
prints a secret value: versions are ids, holders pids and exes; the token is sent,
never shown.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, TextIO

import aiohttp

from daemon.config import Config, CredentialConfig
from daemon.rotation.actions import token_path
from daemon.schedule import span

OK, FAILED, USAGE = 0, 1, 2
POLL = 0.2  # seconds between looks at the rotator's status while following
REQUEST_TIMEOUT = 10.0
MAX_SHOWN = 3  # holders named on a progress line


def shown(value: object) -> str:
    """A string from the status (a node report's node, exe, consumer, a gate reason) fit for a terminal:
    a hostile node's control characters (an escape sequence that rewrites the screen) become ``?``."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


def _user() -> str:
    """Who asks, as this process can tell (recorded with a forced retirement; the rotator adds what it saw)."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):
        name = f"uid {os.getuid()}"
    return f"{name}@{socket.gethostname()}"[:120]


class _Rotator:
    """The rotator's endpoint: its status and its actions. Unreachable: ``aiohttp.ClientError`` or ``TimeoutError``."""

    def __init__(self, listen: str, token: str) -> None:
        self.listen = listen
        self.token = token
        connector: aiohttp.BaseConnector | None = None
        if listen.startswith("unix:"):
            connector = aiohttp.UnixConnector(path=listen[5:])
            self.base = "http://localhost"
        else:
            self.base = listen if listen.startswith("http") else f"http://{listen}"
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))

    async def aclose(self) -> None:
        await self.session.close()

    async def credential(self, name: str) -> dict[str, Any] | None:
        """The rotator's status of one credential; None if it does not show it."""
        async with self.session.get(f"{self.base}/v1/status") as resp:
            data = await resp.json(content_type=None)
        if not isinstance(data, dict) or data.get("role") != "rotator":
            raise aiohttp.ClientError("the endpoint is not a rotator's")
        cred = (data.get("credentials") or {}).get(name)
        return cred if isinstance(cred, dict) else None

    async def act(self, action: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(
            f"{self.base}/v1/actions/{action}", json=body, headers={"Authorization": f"Bearer {self.token}"}
        ) as resp:
            try:
                answer = await resp.json(content_type=None)
            except ValueError:
                answer = {}
            return resp.status, answer if isinstance(answer, dict) else {}


def _rotated(config: Config, name: str, err: TextIO) -> CredentialConfig | None:
    cred = next((c for c in config.credentials if c.name == name), None)
    if cred is None:
        names = ", ".join(sorted(c.name for c in config.credentials)) or "none"
        print(f"baton: unknown credential {name!r} (the config names: {names})", file=err)
        return None
    if cred.rotation is None:
        print(f"baton: {name} has no rotation: block, so no rotator rotates it", file=err)
        return None
    return cred


def _open(config: Config, url: str | None, err: TextIO) -> _Rotator | None:
    path = token_path(config.api.runtime_dir, config.api.token_file)
    try:
        token = path.read_text().strip()
    except OSError as e:
        print(
            f"baton: cannot read the rotator's token {path}: {e.strerror} "
            "(is `baton rotator` running with this config, and are you its user?)",
            file=err,
        )
        return None
    return _Rotator(url or config.api.listen, token)


def _refused(code: int, answer: Mapping[str, Any], client: _Rotator, err: TextIO) -> int:
    """Say why an action was not taken; the exit status."""
    if code == 401:
        print(f"baton: the rotator at {client.listen} refused the token (a rotator restarted since?)", file=err)
        return USAGE
    why = str(answer.get("error") or f"HTTP {code}")
    print(f"baton: {why}", file=err)
    return USAGE if code in (400, 404, 409) else FAILED


def _unreachable(client: _Rotator, e: BaseException, err: TextIO) -> int:
    print(
        f"baton: no rotator answers at {client.listen} ({type(e).__name__}): is `baton rotator` running?",
        file=err,
    )
    return USAGE


# ---------------------------------------------------------------- baton rotate


async def rotate(
    config: Config,
    name: str,
    *,
    wait: bool,
    patience: float,
    url: str | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    if _rotated(config, name, err) is None:
        return USAGE
    client = _open(config, url, err)
    if client is None:
        return USAGE
    try:
        try:
            code, answer = await client.act("rotate", {"credential": name, "user": _user()})
        except (aiohttp.ClientError, TimeoutError) as e:
            return _unreachable(client, e, err)
        if code != 200:
            return _refused(code, answer, client, err)
        old = answer.get("current")
        after = answer.get("after_attempt")
        old = str(old) if isinstance(old, str | int) else None
        print(f"{name}: rotation requested" + (f" (current version {old})" if old else ""), file=err)
        if not wait:
            print(f"rotation of {name} requested", file=out)
            return OK
        return await _follow(
            client,
            name,
            old=old,
            after=int(after) if isinstance(after, int) else 0,
            patience=patience,
            out=out,
            err=err,
        )
    finally:
        await client.aclose()


async def _follow(
    client: _Rotator, name: str, *, old: str | None, after: int, patience: float, out: TextIO, err: TextIO
) -> int:
    """Follow the rotation asked for until ``old`` is retired; a progress line on stderr at each change."""
    deadline = time.monotonic() + patience
    shown = ""
    still = "the rotation has not started"
    while True:
        try:
            c = await client.credential(name)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            c = None
        if c is None:
            line = f"{name}: the rotator does not answer; waiting"
        elif int(c.get("attempts") or 0) <= after:
            step = c.get("step")
            line = f"{name}: rotating ({step})" if step else f"{name}: waiting for the rotator to start the rotation"
            still = f"the rotation was at step {step}" if step else "the rotation had not started"
        else:
            outcome = c.get("last_outcome") or {}
            result = outcome.get("result")
            if result == "failed":
                print(
                    f"baton: the rotation of {name} failed at step {outcome.get('step')}: {outcome.get('error')}",
                    file=err,
                )
                return FAILED
            if result == "postponed":
                print(f"baton: the rotation of {name} was postponed: {outcome.get('error')}", file=err)
                return FAILED
            new = str(outcome.get("version"))
            if old is None or old == new:
                print(f"{name}: rotated to version {new}", file=out)
                return OK
            if old in (c.get("retired_recent") or []):
                print(f"{name}: version {old} retired; version {new} is current", file=out)
                return OK
            line, still = _progress(name, old=old, new=new, c=c)
        if line != shown:
            print(line, file=err, flush=True)
            shown = line
        if time.monotonic() >= deadline:
            print(f"baton: timed out after {span(patience)}: {still}", file=err)
            return FAILED
        await asyncio.sleep(POLL)


def _progress(name: str, *, old: str, new: str, c: Mapping[str, Any]) -> tuple[str, str]:
    """The progress line of a drain, and what still holds ``old`` (for a timeout)."""
    nodes = c.get("nodes") or {}
    on_new = sum(1 for v in nodes.values() if v == new)
    decision = next((d for d in c.get("pending") or [] if isinstance(d, dict) and d.get("version") == old), None)
    head = f"{name}: version {new} on {on_new}/{len(nodes)} node(s); version {old}"
    if decision is None:
        return f"{head}: waiting for the retirement gate", f"version {old} of {name} was not retired yet"
    holders = [
        shown(f"{node} pid {h.get('pid')} {h.get('exe') or '?'}" + (f" ({h['consumer']})" if h.get("consumer") else ""))
        for node, hs in (decision.get("holders") or {}).items()
        for h in hs
    ]
    reasons = [shown(r) for r in decision.get("reasons") or []]
    if decision.get("retire"):
        return f"{head}: retiring", f"version {old} of {name} was being retired"
    if holders:
        more = f" and {len(holders) - MAX_SHOWN} more" if len(holders) > MAX_SHOWN else ""
        line = f"{head}: {len(holders)} holder(s): {', '.join(holders[:MAX_SHOWN])}{more}"
    else:
        line = f"{head}: waiting: {'; '.join(reasons[:MAX_SHOWN]) or 'the gate'}"
    held = "; ".join(holders) or "no holder named"
    return line, f"version {old} of {name} is still held ({held}); " + "; ".join(reasons)


# ---------------------------------------------------------------- baton retire --force


async def retire(
    config: Config,
    name: str,
    version: str,
    *,
    force: bool,
    reason: str,
    url: str | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    if not force:
        print("baton: retire retires a version before the gate allows it: it needs --force (and --reason)", file=err)
        return USAGE
    if not reason.strip():
        print("baton: --reason is required: it is recorded with the retirement", file=err)
        return USAGE
    if _rotated(config, name, err) is None:
        return USAGE
    client = _open(config, url, err)
    if client is None:
        return USAGE
    try:
        try:
            c = await client.credential(name)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return _unreachable(client, e, err)
        _list_holders(name, version, c or {}, out)
        user = _user()
        body = {"credential": name, "version": version, "force": True, "reason": reason, "user": user}
        try:
            code, answer = await client.act("retire", body)
        except (aiohttp.ClientError, TimeoutError) as e:
            return _unreachable(client, e, err)
        if code != 200:
            return _refused(code, answer, client, err)
        print(f"{name}: version {version} retired by force (asked by {user}: {reason.strip()})", file=out)
        return OK
    finally:
        await client.aclose()


def _list_holders(name: str, version: str, c: Mapping[str, Any], out: TextIO) -> None:
    """What still holds the version, as the rotator last judged it: said before it is retired anyway."""
    decision = next((d for d in c.get("pending") or [] if isinstance(d, dict) and d.get("version") == version), None)
    if decision is None:
        print(f"{name} version {version}: the rotator has no holder of it on record", file=out)
        return
    holders = [(node, h) for node, hs in (decision.get("holders") or {}).items() for h in hs]
    print(f"{name} version {version}: {len(holders)} holder(s) will lose it:", file=out)
    for node, h in holders:
        who = h.get("consumer") or "unmanaged"
        print(shown(f"  {node}: pid {h.get('pid')} {h.get('exe')} ({who}, via {h.get('how')})"), file=out)
    for r in decision.get("reasons") or []:
        print(f"  - {shown(r)}", file=out)
