"""A naive in-place password change, as a Baton ``command`` provider: the benchmark's baseline for mysql and redis.

``create`` sets a new password on the one account (MariaDB: ``ALTER USER ...
IDENTIFIED BY``; Redis: ``ACL SETUSER ... resetpass``): what a cron script
does. The old password stops working at once, before any consumer has the new
one. ``apply``, ``test`` and ``retire`` have nothing left to do; ``sessions``
cannot tell. Environment: KIND (mysql or redis), ADMIN_FILE (the admin DSN or
URL file, never the credentials themselves), USERNAME, HOST, PORT.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from urllib.parse import unquote, urlsplit


def main() -> int:
    step = sys.argv[-1]
    json.load(sys.stdin)
    if step != "create":
        print(json.dumps({"sessions": []} if step == "sessions" else {}))
        return 0
    with open(os.environ["ADMIN_FILE"]) as f:
        admin = urlsplit(f.read().strip())
    user, password = os.environ["USERNAME"], secrets.token_urlsafe(24)
    if os.environ["KIND"] == "mysql":
        import pymysql

        conn = pymysql.connect(
            host=admin.hostname,
            port=admin.port or 3306,
            user=unquote(admin.username or ""),
            password=unquote(admin.password or ""),
            autocommit=True,
        )
        with conn, conn.cursor() as cur:
            cur.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (user, password))
    else:
        import redis

        with redis.Redis(
            host=admin.hostname or "127.0.0.1",
            port=admin.port or 6379,
            username=unquote(admin.username or ""),
            password=unquote(admin.password or ""),
        ) as r:
            r.execute_command("ACL", "SETUSER", user, "on", "resetpass", f">{password}", "~*", "+@all")
    payload = {"username": user, "password": password, "host": os.environ["HOST"], "port": int(os.environ["PORT"])}
    print(json.dumps({"payload": payload}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
