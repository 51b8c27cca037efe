#!/usr/bin/env python3
"""A small HTTP API that issues bearer tokens: the target system of the http_token.py example.

Stands for any SaaS or internal API with API tokens. An admin token (read from
``--admin-token-file``) manages tokens; a token is presented as
``Authorization: Bearer <token>``:

- ``POST /tokens`` ``{"label": "..."}`` (admin): 201 ``{"id", "token"}``; the token is shown once
- ``GET /tokens`` (admin): 200 ``[{"id", "label", "created", "last_used"}]`` (no token values)
- ``POST /tokens/<id>/regenerate`` (admin): 200 ``{"id", "token"}``: a new value IN PLACE, the old one dies
- ``DELETE /tokens/<id>`` (admin): 204, 404 when there is no such token
- ``GET /whoami`` (a token): 200 ``{"id"}``, 401 for an unknown token; records the token's last use

Prints ``listening on http://127.0.0.1:<port>`` once it serves (``--port 0``: a free one).
Standard library only; state is in memory. Never logs a token.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class Tokens:
    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.lock = threading.Lock()
        self.by_id: dict[str, dict[str, Any]] = {}

    def issue(self, label: str) -> dict[str, str]:
        with self.lock:
            tid = "tok_" + secrets.token_hex(6)
            value = secrets.token_urlsafe(32)
            self.by_id[tid] = {"id": tid, "label": label, "token": value, "created": time.time(), "last_used": None}
            return {"id": tid, "token": value}

    def regenerate(self, tid: str) -> dict[str, str] | None:
        with self.lock:
            entry = self.by_id.get(tid)
            if entry is None:
                return None
            entry["token"] = secrets.token_urlsafe(32)
            return {"id": tid, "token": entry["token"]}

    def who(self, value: str) -> str | None:
        with self.lock:
            for entry in self.by_id.values():
                if hmac.compare_digest(entry["token"], value):
                    entry["last_used"] = time.time()
                    return str(entry["id"])
        return None


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms wait for an ACK

    def log_message(self, format: str, *args: Any) -> None:
        return  # request lines could carry nothing secret, but stay quiet: the bench runs thousands

    def _send(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _bearer(self) -> str:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else ""

    def _admin(self) -> bool:
        if hmac.compare_digest(self._bearer(), self.server.tokens.admin):
            return True
        self._send(401, {"error": "admin token required"})
        return False

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 65536:
            return None
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return None

    def do_GET(self) -> None:
        tokens = self.server.tokens
        if self.path == "/whoami":
            tid = tokens.who(self._bearer())
            self._send(200, {"id": tid}) if tid else self._send(401, {"error": "unknown token"})
        elif self.path == "/tokens":
            if self._admin():
                with tokens.lock:
                    listed = [{k: v for k, v in e.items() if k != "token"} for e in tokens.by_id.values()]
                self._send(200, listed)
        else:
            self._send(404, {"error": "no such path"})

    def do_POST(self) -> None:
        tokens = self.server.tokens
        body = self._body()
        if not self._admin():
            return
        if self.path == "/tokens":
            label = body.get("label") if isinstance(body, dict) else None
            if not isinstance(label, str) or not label:
                self._send(400, {"error": "label required"})
            else:
                self._send(201, tokens.issue(label))
        elif m := re.fullmatch(r"/tokens/([\w-]+)/regenerate", self.path):
            got = tokens.regenerate(m.group(1))
            self._send(200, got) if got else self._send(404, {"error": "no such token"})
        else:
            self._send(404, {"error": "no such path"})

    def do_DELETE(self) -> None:
        tokens = self.server.tokens
        if not self._admin():
            return
        m = re.fullmatch(r"/tokens/([\w-]+)", self.path)
        with tokens.lock:
            found = m is not None and tokens.by_id.pop(m.group(1), None) is not None
        self._send(204) if found else self._send(404, {"error": "no such token"})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, tokens: Tokens) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.tokens = tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--admin-token-file", type=Path, required=True)
    args = ap.parse_args(argv)
    server = Server(args.port, Tokens(args.admin_token_file.read_text().strip()))
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
