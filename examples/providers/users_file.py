#!/usr/bin/env python3
"""A Baton ``command`` provider: alternating users in a local users file (``name:salt:sha256``).

Stands for any service that reads its accounts from a file (a proxy's
htpasswd, a broker's user list). Two users ``<BASE>_a`` and ``<BASE>_b``
alternate, so the current one keeps working while the other gets a new
password. It shows the second idempotency pattern of docs/providers.md:
``create`` only mints (nothing becomes valid, so a lost answer leaves nothing
behind) and ``apply`` makes the password valid (writing it again is the same).

    provider:
      kind: command
      command: [/usr/bin/python3, /etc/baton/providers/users_file.py]
      principal_field: username
      slots: 2
      env: {USERS_FILE: /etc/myservice/users, USERS_BASE: app}

``retire`` removes the old user's line, unless ``keep`` names it or its
password has changed since (the slot was given a newer credential). The file
is replaced atomically (write, fsync, rename). ``sessions``: this file cannot
tell who is logged in, so none. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
from typing import Any


def users() -> dict[str, tuple[str, str]]:
    path = os.environ["USERS_FILE"]
    found: dict[str, tuple[str, str]] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, _, rest = line.strip().partition(":")
                salt, _, digest = rest.partition(":")
                if name and digest:
                    found[name] = (salt, digest)
    return found


def save(found: dict[str, tuple[str, str]]) -> None:
    path = os.environ["USERS_FILE"]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".users-")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{n}:{s}:{d}\n" for n, (s, d) in sorted(found.items()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def digest(salt: str, password: str) -> str:
    return hashlib.sha256((salt + password).encode()).hexdigest()


def matches(entry: tuple[str, str] | None, password: str) -> bool:
    return entry is not None and hmac.compare_digest(entry[1], digest(entry[0], password))


def main() -> int:
    step = sys.argv[-1]
    msg: dict[str, Any] = json.load(sys.stdin)
    base = os.environ["USERS_BASE"]
    found = users()
    if step == "create":
        current = (msg.get("current") or {}).get("username")
        name = f"{base}_b" if current == f"{base}_a" else f"{base}_a"
        answer: dict[str, Any] = {"payload": {"username": name, "password": secrets.token_urlsafe(24)}}
    elif step == "apply":
        new = msg["new"]
        if not matches(found.get(new["username"]), new["password"]):
            salt = secrets.token_hex(8)
            found[new["username"]] = (salt, digest(salt, new["password"]))
            save(found)
        answer = {}
    elif step == "test":
        new = msg["new"]
        if not matches(found.get(new["username"]), new["password"]):
            print(json.dumps({"error": f"user {new['username']} does not have the new password"}))
            return 1
        answer = {}
    elif step == "retire":
        old = msg["old"]
        if old["username"] in msg.get("keep", []):
            print(json.dumps({"error": f"user {old['username']} is named by the current version"}))
            return 1
        if matches(found.get(old["username"]), old["password"]):
            del found[old["username"]]
            save(found)
        answer = {}
    elif step == "sessions":
        answer = {"sessions": []}
    else:
        print(json.dumps({"error": f"unknown step {step}"}))
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
