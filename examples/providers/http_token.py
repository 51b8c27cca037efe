#!/usr/bin/env python3
"""A Baton ``command`` provider: rotate an API token through an HTTP API (token_api.py's).

Config (everything here is not secret; the admin token is read from a file):

    provider:
      kind: command
      command: [/usr/bin/python3, /etc/baton/providers/http_token.py]
      principal_field: id
      slots: 2
      env:
        TOKEN_API_URL: https://api.internal:8443
        TOKEN_API_ADMIN_TOKEN_FILE: /etc/baton/api-admin-token
        TOKEN_LABEL: app            # the tokens this credential owns
        TOKEN_IDLE_FOR: "60"        # a superseded token used this recently still has a session
        TOKEN_STRATEGY: two-tokens  # or in-place: regenerate the one token (NOT zero-downtime)

Steps (the contract is docs/providers.md): ``create`` issues a new token
(``POST /tokens``) after deleting tokens of its label that no version names
and that were never used (what an earlier create whose answer was lost
left); ``apply`` checks the token still exists (the API made it valid at
create); ``test`` calls ``GET /whoami`` with it; ``retire`` deletes it (gone
already: fine); ``sessions`` reports it while it was used within
TOKEN_IDLE_FOR. Exit 0 with a JSON object, 1 with {"error"} for a failure,
75 when the API is unreachable (retry later). Standard library only; it never
prints a token except as the payload of ``create``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

TEMPFAIL = 75


class Fail(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def call(method: str, path: str, *, token: str, body: Any = None) -> tuple[int, Any]:
    url = os.environ["TOKEN_API_URL"].rstrip("/") + path
    if not url.startswith(("http://", "https://")):
        raise Fail("TOKEN_API_URL must be an http:// or https:// URL")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}"})  # noqa: S310 (checked above)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError) as e:
        raise Fail(f"the token API is unreachable ({type(e).__name__})", TEMPFAIL) from None


def admin_token() -> str:
    path = os.environ["TOKEN_API_ADMIN_TOKEN_FILE"]
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise Fail(f"cannot read TOKEN_API_ADMIN_TOKEN_FILE {path} ({e.strerror})") from None


def listed(admin: str) -> list[dict[str, Any]]:
    status, tokens = call("GET", "/tokens", token=admin)
    if status != 200 or not isinstance(tokens, list):
        raise Fail(f"listing tokens answered HTTP {status}")
    label = os.environ.get("TOKEN_LABEL", "baton")
    return [t for t in tokens if t.get("label") == label]


def create(msg: dict[str, Any]) -> dict[str, Any]:
    admin = admin_token()
    current = (msg.get("current") or {}).get("id")
    if os.environ.get("TOKEN_STRATEGY") == "in-place" and current:
        status, made = call("POST", f"/tokens/{current}/regenerate", token=admin)
        if status != 200:
            raise Fail(f"regenerating token {current} answered HTTP {status}")
        return {"payload": {"id": made["id"], "token": made["token"]}}
    for t in listed(admin):
        if t["id"] != current and t.get("last_used") is None:
            call("DELETE", f"/tokens/{t['id']}", token=admin)  # never used, named by no version: an orphan
    status, made = call("POST", "/tokens", token=admin, body={"label": os.environ.get("TOKEN_LABEL", "baton")})
    if status != 201:
        raise Fail(f"issuing a token answered HTTP {status}")
    return {"payload": {"id": made["id"], "token": made["token"]}}


def apply(msg: dict[str, Any]) -> dict[str, Any]:
    tid = msg["new"]["id"]
    if not any(t["id"] == tid for t in listed(admin_token())):
        raise Fail(f"token {tid} no longer exists")
    return {}


def test(msg: dict[str, Any]) -> dict[str, Any]:
    new = msg["new"]
    status, who = call("GET", "/whoami", token=new["token"])
    if status != 200 or not isinstance(who, dict) or who.get("id") != new["id"]:
        raise Fail(f"token {new['id']} does not work (HTTP {status})")
    return {}


def retire(msg: dict[str, Any]) -> dict[str, Any]:
    tid = msg["old"]["id"]
    if tid in msg.get("keep", []):
        raise Fail(f"token {tid} is named by the current version")
    if os.environ.get("TOKEN_STRATEGY") == "in-place":
        return {}  # the one token was regenerated: nothing old is left
    status, _ = call("DELETE", f"/tokens/{tid}", token=admin_token())
    if status not in (204, 404):
        raise Fail(f"deleting token {tid} answered HTTP {status}")
    return {}


def sessions(msg: dict[str, Any]) -> dict[str, Any]:
    tid = msg["old"]["id"]
    if os.environ.get("TOKEN_STRATEGY") == "in-place":
        return {"sessions": []}  # one token for old and new: its use cannot tell them apart
    idle_for = float(os.environ.get("TOKEN_IDLE_FOR", "60"))
    for t in listed(admin_token()):
        if t["id"] == tid and t.get("last_used") and time.time() - t["last_used"] < idle_for:
            return {"sessions": [{"principal": tid, "client": "token API", "count": 1}]}
    return {"sessions": []}


STEPS = {"create": create, "apply": apply, "test": test, "retire": retire, "sessions": sessions}


def main() -> int:
    step = sys.argv[-1]
    try:
        msg = json.load(sys.stdin)
        answer = STEPS[step](msg)
    except Fail as e:
        print(json.dumps({"error": str(e)}))
        return e.code
    except (KeyError, TypeError, ValueError) as e:
        print(json.dumps({"error": f"bad input for step {step} ({type(e).__name__})"}))
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
