"""Render off the event loop, in a child process that can be killed.

A Python thread cannot be stopped: a runaway template (a nested loop of 10^10
steps, a string of gigabytes) in a thread would burn CPU and memory for ever.
So one small persistent child (``daemon.files.render.serve``) renders, one request at
a time over a pipe (4-byte length + JSON), under an address-space limit
(RLIMIT_AS). A render that outlasts its timeout, or a request cancelled mid-way
(SIGTERM), kills the child (SIGKILL); the next request starts a new one. Where
setrlimit is refused (baton.service's SystemCallFilter denies @resources), the
parent watches the child's RSS during each render and kills it past the limit.
The payload crosses the pipe only, never argv or the environment; the child
starts with an empty environment, is not dumpable, and dies with its parent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.errors import PAYLOAD_REASONS, PayloadError, RenderUnavailable
from daemon.files.render import Rendered
from daemon.model import Secret

log = logging.getLogger(__name__)

# Address space of the child: the interpreter and jinja2 take ~25 MB of it,
# rendered output at most a few times agent.max_file_size (<= 16 MiB) per file.
MEMORY_LIMIT = 512 << 20
# The directory that holds the ``daemon`` package, first on the child's sys.path.
_ROOT = str(Path(__file__).resolve().parents[2])
# A child that has not said hello by then is not coming (imports take ~0.15 s).
_START_TIMEOUT = 15.0
# How often the parent looks at the child's RSS when RLIMIT_AS could not be set.
_RSS_EVERY = 0.02
_PAGE = os.sysconf("SC_PAGE_SIZE")

# The child's whole program. -I: no PYTHON* variables, no user site, no cwd on
# sys.path; the package's own directory is put first instead.
_BOOT = """
import ctypes, os, resource, signal, sys
root, parent, memory, use_rlimit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: same-uid processes cannot read our memory
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the agent
if os.getppid() != parent:
    sys.exit(0)  # the agent died before PDEATHSIG was set
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the agent's to handle
sys.path.insert(0, root)
import daemon.files.render
limited = False
if use_rlimit:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        limited = True
    except (OSError, ValueError):
        pass  # seccomp may refuse it: the parent watches our RSS instead
channel_in, channel_out = os.fdopen(0, "rb"), os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # a stray print must not corrupt the replies
daemon.files.render.serve(channel_in, channel_out, hello={"memory_limited": limited})
"""


class RenderWorker:
    """Renders versions in a killable child process. One per agent (or ``baton exec``); ``aclose()`` ends it."""

    def __init__(self, *, memory_limit: int = MEMORY_LIMIT, use_rlimit: bool = True) -> None:
        self.memory_limit = memory_limit
        self.use_rlimit = use_rlimit
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        # How many children were started (a test sees the kill-and-respawn).
        self.starts = 0
        # Whether the running child got RLIMIT_AS; if not, _roundtrip watches its RSS.
        self.memory_limited = False
        self._said_unlimited = False
        self._closed = False

    async def render(
        self,
        *,
        files: Mapping[str, str],
        env: Mapping[str, str],
        payload: Secret,
        time_limit: float,
        max_bytes: int,
    ) -> Rendered:
        """Render one version. Raises ``PayloadError`` (reason ``timeout`` past ``time_limit`` seconds).

        A child that cannot be started raises ``RenderUnavailable`` (an
        ``OSError``): not the payload's fault, so the caller retries with backoff.
        """
        request = json.dumps(
            {"files": dict(files), "env": dict(env), "payload": payload.reveal(), "max_bytes": max_bytes}
        ).encode()
        # A reply may escape each character (\\u0000: 6 bytes); anything longer is not ours.
        limit = (len(files) + len(env)) * (6 * max_bytes + 1024) + 4096
        async with self._lock:
            try:
                reply = await self._roundtrip(request, time_limit, limit)
            except _WorkerDied:
                # Once more on a fresh child: an outside kill (OOM killer) is not the payload's fault.
                try:
                    reply = await self._roundtrip(request, time_limit, limit)
                except _WorkerDied:
                    raise PayloadError("the render worker died rendering this version", reason="worker") from None
        return _parse_reply(reply, files=files, env=env)

    async def _roundtrip(self, request: bytes, time_limit: float, limit: int) -> bytes:
        proc = await self._started()
        assert proc.stdin is not None and proc.stdout is not None
        done = False
        over_memory = asyncio.Event()
        watch = None if self.memory_limited else asyncio.create_task(self._watch_rss(proc, over_memory))
        try:
            async with asyncio.timeout(time_limit):
                proc.stdin.write(len(request).to_bytes(4, "big") + request)
                await proc.stdin.drain()
                reply = await _read_frame(proc.stdout, limit)
            done = True
            return reply
        except TimeoutError:
            raise PayloadError(f"rendering took longer than {time_limit:g}s; stopped", reason="timeout") from None
        except (asyncio.IncompleteReadError, ConnectionError):
            if over_memory.is_set():
                raise PayloadError("rendering went over the memory limit; stopped", reason="memory") from None
            raise _WorkerDied from None
        finally:
            if watch is not None:
                watch.cancel()
            if not done:
                # Mid-request (timeout, cancel, crash): the child's state is unknown. Kill it.
                await self._kill()

    async def _watch_rss(self, proc: asyncio.subprocess.Process, over: asyncio.Event) -> None:
        """Without RLIMIT_AS: kill the child once its RSS passes the limit (no event says so: poll)."""
        statm = f"/proc/{proc.pid}/statm"
        while True:
            await asyncio.sleep(_RSS_EVERY)
            try:
                with open(statm, "rb") as f:  # noqa: ASYNC230 - procfs, never blocks
                    resident = int(f.read().split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                return
            if resident > self.memory_limit:
                over.set()
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return

    async def _started(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        await self._kill()
        if self._closed:
            raise RenderUnavailable("the render worker is closed")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-c",
            _BOOT,
            _ROOT,
            str(os.getpid()),
            str(self.memory_limit),
            "1" if self.use_rlimit else "0",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={},
            cwd="/",
            # Its own session: a terminal's signals go to Baton, which decides.
            start_new_session=True,
        )
        self._proc = proc
        self.starts += 1
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                hello = json.loads(await _read_frame(proc.stdout, 4096))
            self.memory_limited = hello["memory_limited"] is True
        except (TimeoutError, asyncio.IncompleteReadError, PayloadError, ValueError, KeyError, TypeError):
            await self._kill()
            raise RenderUnavailable("the render worker did not start") from None
        if not self.memory_limited and not self._said_unlimited:
            self._said_unlimited = True
            log.info("render worker: RLIMIT_AS not available; its RSS is watched during each render instead")
        return proc

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # at once, before any await: a cancel cannot leave it running
        if proc.stdin is not None:
            proc.stdin.close()
        # SIGKILL is prompt. Shielded: a cancel here still lets the wait reap it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)

    @property
    def pid(self) -> int | None:
        """The child's pid while one runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def aclose(self) -> None:
        """Kill the child at once, even mid-render (that render fails); no child is started after."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        async with self._lock:
            await self._kill()


class _WorkerDied(Exception):
    """The child ended mid-request (EOF on its pipe)."""


async def _read_frame(stream: asyncio.StreamReader, limit: int) -> bytes:
    size = int.from_bytes(await stream.readexactly(4), "big")
    if size > limit:
        raise PayloadError("the render worker sent an oversized reply", reason="worker")
    return await stream.readexactly(size)


def _parse_reply(reply: bytes, *, files: Mapping[str, str], env: Mapping[str, str]) -> Rendered:
    """Check the reply's shape: the child is a separate process, and checked like one."""
    try:
        data = json.loads(reply)
        if not isinstance(data, dict):
            raise ValueError
        if "error" in data:
            reason = data.get("reason")
            raise PayloadError(str(data["error"])[:500], reason=reason if reason in PAYLOAD_REASONS else "worker")
        binary = data.get("binary") or {}
        if not isinstance(binary, dict) or not isinstance(data["files"], dict) or set(binary) & set(data["files"]):
            raise ValueError
        out_files = _texts({**data["files"], **binary}, files)
        out_env = _texts(data["env"], env)
        return Rendered(
            {k: base64.b64decode(v, validate=True) if k in binary else v.encode() for k, v in out_files.items()},
            out_env,
        )
    except PayloadError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeEncodeError, binascii.Error):
        raise PayloadError("the render worker sent a malformed reply", reason="worker") from None


def _texts(got: Any, wanted: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(got, dict) or set(got) != set(wanted) or not all(isinstance(v, str) for v in got.values()):
        raise ValueError
    return got
