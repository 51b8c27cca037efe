"""An in-repo HTTP double of HashiCorp Vault: exactly the endpoints Baton's Vault store uses.

No Vault binary can be installed on the test machines, so this aiohttp app
implements the documented semantics of the endpoints ``daemon/stores/vault.py``
calls, and nothing else:

- KV v2 (one mount, default ``secret``): ``GET/POST <mount>/data/<path>`` with
  versions, ``?version=N`` and ``options.cas`` (400 "check-and-set parameter did
  not match the current version"); ``GET/POST/PATCH/DELETE <mount>/metadata/<path>``
  (PATCH needs ``Content-Type: application/merge-patch+json`` and merges
  ``custom_metadata`` server-side, ``null`` deletes a key); listing with the
  documented ``GET <mount>/metadata/<prefix>?list=true`` form (aiohttp's C HTTP
  parser rejects the ``LIST`` verb, so the store uses the GET form on any server); ``POST <mount>/delete/<path>``
  and ``POST <mount>/destroy/<path>`` with ``{"versions": [...]}``; ``max_versions``
  pruning (default 10).
- custom_metadata limits as documented: at most 64 keys, key 1..128 bytes,
  value 1..512 bytes (400 "custom_metadata validation failed: ..."). The KV
  plugin validates only the body of a PATCH; the double also checks the merged
  result, which is the documented limit, so a client can never rely on getting
  past it. (The store checks client-side as well.)
- Auth: every request but the logins needs a live ``X-Vault-Token``; otherwise
  403 ``{"errors": ["permission denied"]}``. ``auth/token/lookup-self``,
  ``auth/token/renew-self`` (bounded by the token's max TTL),
  ``auth/approle/login`` and ``auth/kubernetes/login`` issue tokens with
  ``token_ttl`` / ``token_max_ttl``.

Test hooks (thread-safe, callable from the test's thread): ``fail_with(503)``,
``set_delay(seconds)``, ``revoke_all_tokens()``, ``add_approle``,
``add_kubernetes_role``, and ``counts`` of requests by (method, endpoint kind).

The double never logs or echoes a secret value in an error body, like Vault.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

MAX_KEYS = 64
MAX_KEY_LEN = 128
MAX_VALUE_LEN = 512
_CM_PREFIX = "custom_metadata validation failed"


def _rfc3339(t: float | None) -> str:
    if t is None:
        return ""
    # Vault prints nanoseconds; emit 9 digits so clients must parse them.
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def _json(data: Any, status: int = 200) -> web.Response:
    # Vault sends exactly "application/json" (no charset); hvac only parses the
    # "errors" list of a response with exactly that content type.
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


def _err(status: int, *messages: str) -> web.Response:
    return _json({"errors": list(messages)}, status)


@dataclass
class _Version:
    data: dict[str, Any] | None
    created: float
    deletion: float | None = None
    destroyed: bool = False

    def meta(self) -> dict[str, Any]:
        return {
            "created_time": _rfc3339(self.created),
            "deletion_time": _rfc3339(self.deletion),
            "destroyed": self.destroyed,
        }

    @property
    def deleted(self) -> bool:
        return self.deletion is not None and self.deletion <= time.time()


@dataclass
class _Key:
    created: float
    updated: float
    versions: dict[int, _Version] = field(default_factory=dict)
    current: int = 0
    oldest: int = 0
    max_versions: int = 0
    custom: dict[str, str] = field(default_factory=dict)


@dataclass
class _Token:
    id: str
    ttl: float  # 0: never expires (the root token)
    expires_at: float
    max_expires_at: float
    renewable: bool
    policies: list[str]
    creation_ttl: float


def _validate_custom(custom: dict[str, str]) -> list[str]:
    if len(custom) > MAX_KEYS:
        return [f"{_CM_PREFIX}: payload must contain at most {MAX_KEYS} keys, provided {len(custom)}"]
    problems = []
    for k, v in custom.items():
        if not 0 < len(k.encode()) <= MAX_KEY_LEN:
            problems.append(f"{_CM_PREFIX}: length of key {k!r} is {len(k)} but must be 0 < len(key) <= {MAX_KEY_LEN}")
        if not 0 < len(v.encode()) <= MAX_VALUE_LEN:
            problems.append(
                f"{_CM_PREFIX}: length of value for key {k!r} is {len(v)} but must be 0 < len(value) <= {MAX_VALUE_LEN}"
            )
    return problems


class VaultDouble:
    """The state and the aiohttp app. Handlers run on the server's loop; hooks on any thread."""

    def __init__(
        self,
        *,
        mount: str = "secret",
        root_token: str | None = None,
        token_ttl: float = 3600.0,
        token_max_ttl: float = 86400.0,
        max_versions: int = 10,
    ) -> None:
        self.mount = mount
        self.root_token = root_token or "root-" + secrets.token_hex(8)
        self.token_ttl = token_ttl
        self.token_max_ttl = token_max_ttl
        self.max_versions = max_versions
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._tokens: dict[str, _Token] = {}
        self._approles: dict[str, str] = {}
        self._kube_roles: dict[str, str] = {}
        self._fail_status: int | None = None
        self._denied: str | None = None
        self._fail_times: int | None = None
        self._delay = 0.0
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._issue(self.root_token, ttl=0.0, renewable=False, policies=["root"])

    # ------------------------------------------------------------ hooks

    def fail_with(self, status: int | None, *, times: int | None = None) -> None:
        """Answer every request (or the next ``times``) with ``status``; ``None`` stops."""
        with self._lock:
            self._fail_status, self._fail_times = status, times

    def set_delay(self, seconds: float) -> None:
        """Delay every response by ``seconds`` (0 turns it off)."""
        with self._lock:
            self._delay = seconds

    def deny(self, path: str | None) -> None:
        """Answer 403 to every KV request under ``path`` whatever the token (a policy
        without that capability); the tokens stay valid. ``None`` lifts it."""
        with self._lock:
            self._denied = path.strip("/") if path is not None else None

    def revoke_all_tokens(self, *, keep_root: bool = True) -> None:
        with self._lock:
            self._tokens = {k: t for k, t in self._tokens.items() if keep_root and k == self.root_token}

    def add_approle(self, role_id: str, secret_id: str) -> None:
        with self._lock:
            self._approles[role_id] = secret_id

    def add_kubernetes_role(self, role: str, jwt: str) -> None:
        with self._lock:
            self._kube_roles[role] = jwt

    def token_ttl_left(self, token: str) -> float | None:
        with self._lock:
            t = self._tokens.get(token)
            return None if t is None else t.expires_at - time.time()

    def count(self, method: str, kind: str) -> int:
        with self._lock:
            return self.counts[(method, kind)]

    def write(self, path: str, data: dict[str, Any]) -> int:
        """Write a version directly, as an operator's ``vault kv put`` would."""
        with self._lock:
            return self._put(path, data)

    def release(self) -> None:
        """Wake delayed handlers (used at shutdown)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    # ------------------------------------------------------------ state

    def _issue(self, token: str | None = None, *, ttl: float, renewable: bool, policies: list[str]) -> _Token:
        now = time.time()
        tok = _Token(
            id=token or "hvs." + secrets.token_urlsafe(18),
            ttl=ttl,
            expires_at=now + ttl if ttl else float("inf"),
            max_expires_at=now + self.token_max_ttl if ttl else float("inf"),
            renewable=renewable,
            policies=policies,
            creation_ttl=ttl,
        )
        self._tokens[tok.id] = tok
        return tok

    def _live(self, token: str | None) -> _Token | None:
        t = self._tokens.get(token or "")
        if t is None or t.expires_at <= time.time():
            return None
        return t

    def _put(self, path: str, data: dict[str, Any]) -> int:
        now = time.time()
        key = self._keys.setdefault(path, _Key(created=now, updated=now))
        key.current += 1
        key.versions[key.current] = _Version(data=data, created=now)
        key.updated = now
        keep = key.max_versions or self.max_versions
        for v in sorted(key.versions):
            if len(key.versions) <= keep:
                break
            del key.versions[v]
        key.oldest = min(key.versions)
        return key.current

    # ------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/v1/{tail:.*}", self._dispatch)
        app.on_startup.append(self._started)
        return app

    async def _started(self, _app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

    @staticmethod
    def _kind(tail: str) -> str:
        if tail.startswith("auth/"):
            return tail
        parts = tail.split("/", 2)
        return parts[1] if len(parts) > 1 else tail

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        method = "LIST" if request.query.get("list") == "true" else request.method
        with self._lock:
            self.counts[(method, self._kind(tail))] += 1
            delay = self._delay
            status = self._fail_status
            if status is not None and self._fail_times is not None:
                self._fail_times -= 1
                if self._fail_times <= 0:
                    self._fail_status = self._fail_times = None
        if delay and self._wake is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        if status is not None:
            return _err(status, "Vault is sealed" if status == 503 else "injected failure")
        resp: web.StreamResponse = await handler(request)
        return resp

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"].rstrip("/")
        method = request.method
        if method == "GET" and request.query.get("list") == "true":
            method = "LIST"
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                text = await request.text()
                raw = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError:
                return _err(400, "failed to parse JSON input")
            if isinstance(raw, dict):
                body = raw
        with self._lock:
            if tail == "auth/approle/login" and method in ("POST", "PUT"):
                return self._approle_login(body)
            if tail == "auth/kubernetes/login" and method in ("POST", "PUT"):
                return self._kube_login(body)
            token = self._live(request.headers.get("X-Vault-Token"))
            if token is None:
                return _err(403, "permission denied")
            if tail == "auth/token/lookup-self" and method == "GET":
                return self._lookup_self(token)
            if tail == "auth/token/renew-self" and method in ("POST", "PUT"):
                return self._renew_self(token, body)
            mount, _, rest = tail.partition("/")
            kind, _, path = rest.partition("/")
            if mount != self.mount or kind not in ("data", "metadata", "delete", "destroy"):
                return _err(404, f"no handler for route {tail!r}. route entry not found.")
            if self._denied is not None and (path + "/").startswith(self._denied + "/"):
                return _err(403, "permission denied")
            if method == "LIST" and kind == "metadata":
                return self._list(path)
            if not path:
                return _err(400, "missing path")
            handler = getattr(self, f"_{kind}_{method.lower()}", None)
            if handler is None:
                return _err(405, "unsupported operation")
            if kind == "metadata" and method == "PATCH":
                ctype = request.headers.get("Content-Type", "")
                if ctype.split(";")[0].strip() != "application/merge-patch+json":
                    return _err(415, "PATCH requires Content-Type application/merge-patch+json")
            resp: web.Response = handler(path, body, request)
            return resp

    # ------------------------------------------------------------ auth

    def _auth_response(self, tok: _Token) -> web.Response:
        return _json(
            {
                "auth": {
                    "client_token": tok.id,
                    "accessor": "acc-" + tok.id[-6:],
                    "policies": tok.policies,
                    "lease_duration": int(tok.ttl),
                    "renewable": tok.renewable,
                }
            }
        )

    def _approle_login(self, body: dict[str, Any]) -> web.Response:
        role_id, secret_id = body.get("role_id"), body.get("secret_id")
        if not role_id or self._approles.get(str(role_id)) != secret_id:
            return _err(400, "invalid role or secret ID")
        return self._auth_response(self._issue(ttl=self.token_ttl, renewable=True, policies=["default", "baton"]))

    def _kube_login(self, body: dict[str, Any]) -> web.Response:
        role, jwt = body.get("role"), body.get("jwt")
        if not role or self._kube_roles.get(str(role)) != jwt:
            return _err(403, "permission denied")
        return self._auth_response(self._issue(ttl=self.token_ttl, renewable=True, policies=["default", "baton"]))

    def _lookup_self(self, tok: _Token) -> web.Response:
        left = 0 if not tok.ttl else max(0, int(tok.expires_at - time.time()))
        return _json(
            {
                "data": {
                    "id": tok.id,
                    "policies": tok.policies,
                    "ttl": left,
                    "creation_ttl": int(tok.creation_ttl),
                    "renewable": tok.renewable,
                    "expire_time": None if not tok.ttl else _rfc3339(tok.expires_at),
                }
            }
        )

    def _renew_self(self, tok: _Token, body: dict[str, Any]) -> web.Response:
        if not tok.renewable:
            return _err(400, "lease is not renewable")
        increment = body.get("increment")
        want = float(increment.rstrip("s")) if isinstance(increment, str) else float(increment or tok.creation_ttl)
        now = time.time()
        tok.ttl = max(0.0, min(want, tok.max_expires_at - now))
        tok.expires_at = now + tok.ttl
        return self._auth_response(tok)

    # ------------------------------------------------------------ KV v2

    def _data_get(self, path: str, _body: dict[str, Any], request: web.Request) -> web.Response:
        key = self._keys.get(path)
        if key is None:
            return _err(404)
        try:
            wanted = int(request.query.get("version", "0"))
        except ValueError:
            return _err(400, "version must be an integer")
        number = wanted or key.current
        ver = key.versions.get(number)
        if ver is None:
            return _err(404)
        meta = {"version": number, **ver.meta(), "custom_metadata": key.custom or None}
        if ver.deleted or ver.destroyed:
            return _json({"data": {"data": None, "metadata": meta}}, status=404)
        return _json({"data": {"data": ver.data, "metadata": meta}})

    def _data_post(self, path: str, body: dict[str, Any], _request: web.Request) -> web.Response:
        data = body.get("data")
        if not isinstance(data, dict):
            return _err(400, "no data provided")
        options = body.get("options") or {}
        key = self._keys.get(path)
        current = key.current if key else 0
        if "cas" in options:
            try:
                cas = int(options["cas"])
            except (TypeError, ValueError):
                return _err(400, "error parsing check-and-set parameter")
            if cas != current:
                return _err(400, "check-and-set parameter did not match the current version")
        number = self._put(path, data)
        key = self._keys[path]
        ver = key.versions[number]
        return _json({"data": {"version": number, **ver.meta(), "custom_metadata": key.custom or None}})

    _data_put = _data_post

    def _metadata_get(self, path: str, _body: dict[str, Any], _request: web.Request) -> web.Response:
        key = self._keys.get(path)
        if key is None:
            return _err(404)
        return _json(
            {
                "data": {
                    "versions": {str(n): v.meta() for n, v in sorted(key.versions.items())},
                    "current_version": key.current,
                    "oldest_version": key.oldest,
                    "created_time": _rfc3339(key.created),
                    "updated_time": _rfc3339(key.updated),
                    "max_versions": key.max_versions,
                    "cas_required": False,
                    "delete_version_after": "0s",
                    "custom_metadata": dict(key.custom) or None,
                }
            }
        )

    def _metadata_post(self, path: str, body: dict[str, Any], _request: web.Request) -> web.Response:
        custom = body.get("custom_metadata")
        if custom is not None:
            if not isinstance(custom, dict):
                return _err(400, f"{_CM_PREFIX}: expected a map")
            custom = {str(k): "" if v is None else str(v) for k, v in custom.items()}
            problems = _validate_custom(custom)
            if problems:
                return _err(400, *problems)
        now = time.time()
        key = self._keys.setdefault(path, _Key(created=now, updated=now))
        if "max_versions" in body:
            key.max_versions = int(body["max_versions"])
        if custom is not None:
            key.custom = custom
        key.updated = now
        return web.Response(status=204)

    _metadata_put = _metadata_post

    def _metadata_patch(self, path: str, body: dict[str, Any], _request: web.Request) -> web.Response:
        key = self._keys.get(path)
        if key is None:
            return _err(404)
        patch = body.get("custom_metadata")
        if patch is not None and not isinstance(patch, dict):
            return _err(400, f"{_CM_PREFIX}: expected a map")
        patch = patch or {}
        sets = {str(k): str(v) for k, v in patch.items() if v is not None}
        problems = _validate_custom(sets)
        if problems:
            return _err(400, *problems)
        merged = dict(key.custom)
        for k, v in patch.items():
            if v is None:
                merged.pop(str(k), None)
            else:
                merged[str(k)] = str(v)
        # The documented limit holds for the stored map, not only for this body.
        problems = _validate_custom(merged)
        if problems:
            return _err(400, *problems)
        if "max_versions" in body:
            key.max_versions = int(body["max_versions"])
        key.custom = merged
        key.updated = time.time()
        return web.Response(status=204)

    def _metadata_delete(self, path: str, _body: dict[str, Any], _request: web.Request) -> web.Response:
        self._keys.pop(path, None)
        return web.Response(status=204)

    def _list(self, prefix: str) -> web.Response:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        names: set[str] = set()
        for path in self._keys:
            if path.startswith(prefix):
                first, slash, _ = path[len(prefix) :].partition("/")
                names.add(first + slash)
        if not names:
            return _err(404)
        return _json({"data": {"keys": sorted(names)}})

    def _versions_arg(self, body: dict[str, Any]) -> list[int] | web.Response:
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions:
            return _err(400, "no version number provided")
        try:
            return [int(v) for v in versions]
        except (TypeError, ValueError):
            return _err(400, "versions must be integers")

    def _delete_post(self, path: str, body: dict[str, Any], _request: web.Request) -> web.Response:
        versions = self._versions_arg(body)
        if isinstance(versions, web.Response):
            return versions
        key = self._keys.get(path)
        now = time.time()
        for n in versions:
            ver = key.versions.get(n) if key else None
            if ver is not None and ver.deletion is None:
                ver.deletion = now
        return web.Response(status=204)

    _delete_put = _delete_post

    def _destroy_post(self, path: str, body: dict[str, Any], _request: web.Request) -> web.Response:
        versions = self._versions_arg(body)
        if isinstance(versions, web.Response):
            return versions
        key = self._keys.get(path)
        for n in versions:
            ver = key.versions.get(n) if key else None
            if ver is not None:
                ver.destroyed = True
                ver.data = None
        return web.Response(status=204)

    _destroy_put = _destroy_post


class VaultServer:
    """Runs a ``VaultDouble`` on a free loopback port in a background thread with its own loop.

    hvac is synchronous and runs in worker threads, so the server must not share
    the test's event loop (a blocked test loop would block the server too).
    """

    def __init__(self, double: VaultDouble | None = None) -> None:
        self.double = double or VaultDouble()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def root_token(self) -> str:
        return self.double.root_token

    def start(self) -> VaultServer:
        self._thread = threading.Thread(target=self._run, name="vault-double", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("vault double did not start")
        if self._error is not None:
            raise RuntimeError("vault double failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner = web.AppRunner(self.double.app(), access_log=None, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None and server.sockets
            port = server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
        except BaseException as e:
            self._error = e
            self._ready.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.double.release()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)
        self._thread = None

    def __enter__(self) -> VaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------ in its own process

ROOT_TOKEN_ENV = "VAULT_DOUBLE_ROOT_TOKEN"
COUNTS_PATH = "/_double/counts"


def _counts_route(double: VaultDouble) -> Any:
    """``GET /_double/counts`` (root token only): the request counters as {"METHOD kind": n}."""

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("X-Vault-Token") != double.root_token:
            return _err(403, "permission denied")
        with double._lock:
            counts = {f"{m} {k}": n for (m, k), n in sorted(double.counts.items()) if k}  # k "": this route
        return _json(counts)

    return handler


def serve(*, port: int = 0) -> None:
    """Serve a ``VaultDouble`` on loopback until SIGTERM/SIGINT; print ``{"url": ...}`` on stdout once listening.

    The root token comes from ``$VAULT_DOUBLE_ROOT_TOKEN`` (else a random one
    nobody can use), so it never appears in output.
    """
    double = VaultDouble(root_token=os.environ.get(ROOT_TOKEN_ENV) or None)
    app = double.app()
    app.router.add_get(COUNTS_PATH, _counts_route(double))

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        bound = server.sockets[0].getsockname()[1]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(json.dumps({"url": f"http://127.0.0.1:{bound}"}) + "\n")
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            double.release()
            await runner.cleanup()

    asyncio.run(main())


class VaultProcess:
    """A ``VaultDouble`` in a child process (``python -m tests.doubles.vault``), so it gets its own core.

    For benchmarks: no test hooks but the counters, read over HTTP with ``counts()``.
    """

    def __init__(self, *, python: str | None = None) -> None:
        self.python = python or sys.executable
        self.root_token = "root-" + secrets.token_hex(8)
        self.url = ""
        self._proc: Any = None

    def start(self) -> VaultProcess:
        root = Path(__file__).resolve().parents[2]
        self._proc = subprocess.Popen(
            [self.python, "-m", "tests.doubles.vault"],
            cwd=root,
            env={**os.environ, ROOT_TOKEN_ENV: self.root_token, "PYTHONPATH": str(root)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(10)
            self._proc.stdout.close()
            raise RuntimeError(f"vault double process exited ({self._proc.returncode}) before listening")
        self.url = json.loads(line)["url"]
        return self

    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    def counts(self) -> dict[str, int]:
        req = urllib.request.Request(self.url + COUNTS_PATH, headers={"X-Vault-Token": self.root_token})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return {str(k): int(v) for k, v in json.loads(resp.read()).items()}

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def __enter__(self) -> VaultProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    serve()
