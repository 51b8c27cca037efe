"""The ``command`` provider: a user-supplied executable per step, JSON on stdin and stdout.

Each step (create, apply, test, retire, sessions) runs ``command + [step]``
without a shell, in a new session (its own process group), with ``/`` as its
directory and a minimal environment (PATH, LANG, BATON_STEP and the config's
``env``). The step's input, payloads included, is one JSON object on stdin,
the only place a secret is ever passed (never argv, never the environment); its
answer is one JSON object on stdout. The contract (messages, exit codes, time
limits, idempotency) is docs/providers.md.

It must never show what a command prints: stdout may carry a payload and is
only parsed (an error says "not JSON", never quotes it), stderr is discarded,
and the ``error`` text a failing step may give is cut short and scrubbed of
every secret value it was handed. A step that outlives ``timeout`` or prints
more than ``max_output`` bytes is killed with its whole process group, and so
is whatever a finished step leaves behind in that group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Collection, Iterable
from typing import Any

from daemon.config import CommandProviderConfig
from daemon.errors import PayloadError, ProviderError
from daemon.model import Secret
from daemon.payload import MAX_PAYLOAD, fields_of, payload_object
from daemon.providers.base import Provider, Session

log = logging.getLogger(__name__)

PROTOCOL = 1
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: a failure worth retrying at the next interval, said as such
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_REASON_MAX = 300
_CHUNK = 65536


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _scrub(text: str, payloads: Iterable[Secret | None], *, public: str | None = None) -> str:
    """``text`` with every secret value of ``payloads`` (the whole, and each string field but the
    ``public`` one, the principal) masked."""
    values: set[str] = set()
    for p in payloads:
        if p is None:
            continue
        values.add(p.reveal())
        with contextlib.suppress(PayloadError):
            values.update(_strings({k: v for k, v in fields_of(p).items() if k != public}))
    for v in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        text = text.replace(v, "***")
    return text


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class CommandProvider(Provider):
    """Run the configured executable for each step (see the module docstring and docs/providers.md)."""

    def __init__(self, config: CommandProviderConfig) -> None:
        self.config = config
        self.slots: int | None = config.slots

    # ------------------------------------------------------------ Provider protocol

    async def create(self, *, current: Secret | None) -> Secret:
        out = await self._run("create", {"current": self._message_payload(current)}, secrets=[current])
        payload = out.get("payload")
        if not isinstance(payload, dict):
            raise ProviderError('command step create: its answer has no "payload" object')
        new = Secret(json.dumps(payload))
        try:
            if len(new.reveal()) > MAX_PAYLOAD or payload_object(new) is None:
                raise PayloadError("too_large")
        except PayloadError as e:
            raise ProviderError(f"command step create: its payload is unusable ({e.reason})") from None
        return new

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        message = {"new": self._message_payload(new), "current": self._message_payload(current)}
        await self._run("apply", message, secrets=[new, current])

    async def test(self, new: Secret) -> None:
        await self._run("test", {"new": self._message_payload(new)}, secrets=[new])

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        principal = self.principal(old)
        if principal is not None and principal in keep:
            raise ProviderError(f"refusing to retire {principal}: the current or a newer version names it")
        await self._run("retire", {"old": self._message_payload(old), "keep": sorted(keep)}, secrets=[old])

    async def sessions(self, old: Secret) -> list[Session]:
        out = await self._run("sessions", {"old": self._message_payload(old)}, secrets=[old])
        listed = out.get("sessions", [])
        if not isinstance(listed, list):
            raise ProviderError('command step sessions: "sessions" is not a list')
        found: list[Session] = []
        for item in listed:
            if not isinstance(item, dict):
                raise ProviderError("command step sessions: a session is not a JSON object")
            principal, client, count = item.get("principal"), item.get("client", ""), item.get("count", 1)
            if not isinstance(principal, str) or not isinstance(client, str) or not isinstance(count, int):
                raise ProviderError(
                    'command step sessions: a session needs "principal" (string), "client" (string), "count" (int)'
                )
            if count > 0:
                public = self.config.principal_field
                found.append(
                    Session(
                        principal=_scrub(principal, [old], public=public),
                        client=_scrub(client, [old], public=public),
                        count=count,
                    )
                )
        return found

    def principal(self, payload: Secret) -> str | None:
        name = self.config.principal_field
        if name is None:
            return None
        try:
            value = fields_of(payload).get(name)
        except PayloadError:
            return None
        return value if isinstance(value, str) and value else None

    async def aclose(self) -> None:
        return None  # nothing outlives a step

    # ------------------------------------------------------------ running a step

    @staticmethod
    def _message_payload(payload: Secret | None) -> dict[str, Any] | None:
        if payload is None:
            return None
        try:
            return fields_of(payload)
        except PayloadError as e:
            raise ProviderError(f"a payload cannot be passed to the command ({e.reason})") from None

    async def _run(self, step: str, message: dict[str, Any], *, secrets: list[Secret | None]) -> dict[str, Any]:
        """Run one step; its stdout's JSON object, or ``ProviderError`` naming the step (never quoting output)."""
        data = json.dumps({"baton": PROTOCOL, "step": step, **message}).encode()
        env = {**BASE_ENV, **self.config.env, "BATON_STEP": step}
        limit = self.config.max_output
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.config.command,
                step,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        except OSError as e:
            raise ProviderError(f"command step {step}: cannot start {self.config.command[0]} ({e.strerror})") from None
        out = bytearray()
        too_much = False
        try:
            async with asyncio.timeout(self.config.timeout):
                assert proc.stdin is not None and proc.stdout is not None
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    proc.stdin.write(data)
                    await proc.stdin.drain()
                proc.stdin.close()
                while chunk := await proc.stdout.read(_CHUNK):
                    out += chunk
                    if len(out) > limit:
                        too_much = True
                        break
                if not too_much:
                    await proc.wait()
        except TimeoutError:
            raise ProviderError(
                f"command step {step}: timed out after {self.config.timeout:g}s (killed with its process group)"
            ) from None
        finally:
            # At the limit, on too much output, on a cancel, and after a normal end (whatever it left running).
            _kill_group(proc.pid)
            if proc.returncode is None:
                await proc.wait()
        if too_much:
            raise ProviderError(f"command step {step}: printed more than {limit} bytes (killed)")
        return self._answer(step, proc.returncode, bytes(out), secrets)

    def _answer(self, step: str, code: int | None, out: bytes, secrets: list[Secret | None]) -> dict[str, Any]:
        answer: Any = None
        text = out.strip()
        if text:
            try:
                answer = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
                answer = None
                if code == 0:
                    raise ProviderError(f"command step {step}: printed something that is not JSON") from None
        elif code == 0 and step in ("apply", "test", "retire", "sessions"):
            answer = {}
        if code == 0:
            if not isinstance(answer, dict):
                raise ProviderError(f"command step {step}: its answer is not a JSON object")
            return answer
        reason = ""
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            reason = ": " + _scrub(answer["error"], secrets, public=self.config.principal_field)[:_REASON_MAX]
        if code is not None and code < 0:
            raise ProviderError(f"command step {step}: killed by signal {-code}{reason}")
        if code == EXIT_TEMPFAIL:
            raise ProviderError(f"command step {step}: failed temporarily (exit {code}){reason}")
        raise ProviderError(f"command step {step}: failed (exit {code}){reason}")
