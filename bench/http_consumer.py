"""An HTTP consumer of a Baton credential file, for the rotation benchmark's aws-iam and command rows.

It owns nothing of Baton: it is the "application". Kinds:

- ``sts``: the file is an ``~/.aws/credentials`` profile (the README's template);
  each request is STS GetCallerIdentity, signed with SigV4 (botocore's signer)
  by that key, against moto_server with its signature checks on;
- ``token``: the file holds one API token; each request is ``GET /whoami`` with
  it as a bearer token (examples/providers/token_api.py).

Modes: ``per-use`` reads the file for every request; ``pool`` keeps the
credential it read for ``--max-lifetime`` seconds (jittered; an SDK's cached
credentials), drops it after an auth failure, and on SIGHUP (Baton's reload)
keeps it for ``--reload-drain`` more seconds, then reads the file again.
Requests go over one kept-alive HTTP connection. Counts go to ``--stats`` in
the shape bench/pg_consumer.py writes (requests, failures per wall-clock
second, reasons, last use per version). Never prints or records a secret.
"""

from __future__ import annotations

import argparse
import configparser
import http.client
import json
import os
import random
import re
import signal
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

FLUSH_EVERY = 0.25
_VERSION_DIR = re.compile(r"/\.\.v(\d+)-[^/]*/")
_CODE = re.compile(rb"<Code>([A-Za-z]+)</Code>")


class Flags:
    stop = False
    reload = False


def _on_term(_s: int, _f: object) -> None:
    Flags.stop = True


def _on_hup(_s: int, _f: object) -> None:
    Flags.reload = True


@dataclass
class Stats:
    mode: str
    requests: int = 0
    failures: int = 0
    connects: int = 0  # credential reads
    reloads: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    last_use: dict[str, float] = field(default_factory=dict)

    def count(self, *, ok: bool, reason: str | None = None, version: str | None = None) -> None:
        self.requests += 1
        bucket = self.buckets.setdefault(int(time.time()), [0, 0])
        bucket[0] += 1
        if ok:
            if version is not None:
                self.last_use[version] = time.time()
            return
        self.failures += 1
        bucket[1] += 1
        if reason is not None and (reason in self.reasons or len(self.reasons) < 20):
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def flush(self, path: Path) -> None:
        data = {
            "mode": self.mode,
            "requests": self.requests,
            "failures": self.failures,
            "connects": self.connects,
            "reloads": self.reloads,
            "buckets": {str(k): v for k, v in sorted(self.buckets.items())},
            "reasons": self.reasons,
            "last_use": self.last_use,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


@dataclass
class Cred:
    version: str
    values: dict[str, str] = field(repr=False)
    expires: float


class Consumer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.file = Path(args.file)
        self.stats_path = Path(args.stats)
        self.stats = Stats(mode=args.mode)
        self.url = urllib.parse.urlsplit(args.url)
        self.conn: http.client.HTTPConnection | None = None
        self.cred: Cred | None = None
        if args.kind == "sts":
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest
            from botocore.credentials import Credentials

            self._sigv4, self._request, self._credentials = SigV4Auth, AWSRequest, Credentials

    def read(self) -> Cred:
        """Read the credential file (kept open meanwhile: that is when Baton's scan sees it in use)."""
        with open(self.file, "rb") as f:
            target = os.readlink(f"/proc/self/fd/{f.fileno()}")
            m = _VERSION_DIR.search(target)
            text = f.read().decode()
        if self.args.kind == "sts":
            parser = configparser.ConfigParser()
            parser.read_string(text)
            values = dict(parser["default"])
        else:
            values = {"token": text.strip()}
        self.stats.connects += 1
        lifetime = self.args.max_lifetime
        expires = time.monotonic() + lifetime * random.uniform(0.5, 1.5) if lifetime > 0 else float("inf")
        return Cred(version=m.group(1) if m else "?", values=values, expires=expires)

    def _send(self, cred: Cred) -> tuple[int, bytes]:
        if self.args.kind == "sts":
            body = "Action=GetCallerIdentity&Version=2011-06-15"
            req = self._request(
                "POST",
                self.args.url + "/",
                data=body,
                headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
            )
            creds = self._credentials(cred.values["aws_access_key_id"], cred.values["aws_secret_access_key"])
            self._sigv4(creds, "sts", "us-east-1").add_auth(req)
            method, path, headers, data = "POST", "/", dict(req.headers.items()), body.encode()
        else:
            method, path, headers, data = "GET", "/whoami", {"Authorization": f"Bearer {cred.values['token']}"}, None
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.url.hostname or "127.0.0.1", self.url.port, timeout=5)
                self.conn.connect()
                assert self.conn.sock is not None
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def request(self) -> None:
        try:
            if self.args.mode == "per-use" or self.cred is None or time.monotonic() > self.cred.expires:
                self.cred = self.read()
            cred = self.cred
            status, body = self._send(cred)
        except (OSError, KeyError, ValueError, configparser.Error, http.client.HTTPException) as e:
            self.stats.count(ok=False, reason=type(e).__name__)
            self.cred = None
            return
        if status == 200:
            self.stats.count(ok=True, version=cred.version)
            return
        m = _CODE.search(body)
        self.stats.count(ok=False, reason=f"HTTP {status} {m.group(1).decode() if m else ''}".strip())
        self.cred = None  # an auth failure: read the file again (an SDK refreshes its credentials)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, _on_term)
        signal.signal(signal.SIGINT, _on_term)
        signal.signal(signal.SIGHUP, _on_hup)
        interval = 1.0 / self.args.rate
        next_at = time.monotonic()
        last_flush = 0.0
        try:
            while not Flags.stop:
                if Flags.reload:
                    Flags.reload = False
                    self.stats.reloads += 1
                    if self.cred is not None:
                        self.cred.expires = min(self.cred.expires, time.monotonic() + self.args.reload_drain)
                self.request()
                now = time.monotonic()
                if now - last_flush >= FLUSH_EVERY:
                    self.stats.flush(self.stats_path)
                    last_flush = now
                next_at += interval
                if next_at < now - 1.0:
                    next_at = now
                if next_at > now:
                    time.sleep(next_at - now)
        finally:
            if self.conn is not None:
                self.conn.close()
            self.stats.flush(self.stats_path)
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("mode", choices=["per-use", "pool"])
    p.add_argument("--kind", choices=["sts", "token"], required=True)
    p.add_argument("--url", required=True, help="moto_server's or the token API's base URL")
    p.add_argument("--file", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--max-lifetime", type=float, default=0.0)
    p.add_argument("--reload-drain", type=float, default=0.0)
    p.add_argument("--app", default="http-consumer", help="a name in the command line, for Baton's match")
    return Consumer(p.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
