"""One booted container for the whole session, with Baton installed as docs/install.md says.

Skips (with the reason, shown at the end of ``make test`` by ``-ra``) when the
host cannot boot a container: not root, no systemd-nspawn or mmdebstrap, or a
kernel that refuses.
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.systemd.container import ROOT, CannotBoot, Container, rootfs, wheels, why_not

FILES = Path(__file__).parent / "files"
UNITS = ("baton.service", "baton-rotator.service", "consumer-signal.service", "consumer-restart.service")

INSTALL = """
set -e
# 1. The program, in its own venv; the units run /usr/bin/baton.
python3 -m venv /opt/baton
/opt/baton/bin/pip install --quiet --no-index --find-links /wheels 'baton[all]'
ln -sf /opt/baton/bin/baton /usr/bin/baton
# 2. A system user and group, no login, no home of its own; consumers of other users.
useradd --system --user-group --home-dir /var/lib/baton --no-create-home --shell /usr/sbin/nologin baton
for u in app app2; do
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin $u
    usermod -aG baton $u
done
# 3. The config: readable by the group baton, by nobody else.
install -d -m 0750 -o root -g baton /etc/baton
install -m 0640 -o root -g baton /baton-test/baton.yaml /etc/baton/baton.yaml
install -m 0640 -o root -g baton /baton-test/rotator.yaml /etc/baton/rotator.yaml
baton check-config /etc/baton/baton.yaml
baton check-config /etc/baton/rotator.yaml
# 4. The units, unchanged; the consumers and the polkit rule of docs/install.md.
install -m 0644 /baton-src/systemd/baton.service /baton-src/systemd/baton-rotator.service /etc/systemd/system/
install -m 0644 /baton-test/consumer-signal.service /baton-test/consumer-restart.service /etc/systemd/system/
install -m 0755 /baton-test/consumer.py /usr/local/bin/consumer.py
install -m 0644 /baton-test/50-baton.rules /etc/polkit-1/rules.d/50-baton.rules
# The first version, put by the operator (as baton: the store is the units' file).
install -d -m 0750 -o baton -g baton /var/lib/baton
"""


@dataclass
class Host:
    """The booted container and what the tests put in it."""

    c: Container
    values: list[str] = field(default_factory=list)  # every secret value put in the store
    started: float = 0.0  # monotonic time the units were started

    def put(self, key: str = "app/db") -> str:
        """Put a new version of ``key`` (as user baton); returns its id. The value is kept for the journal test."""
        value = secrets.token_urlsafe(24)
        self.values.append(value)
        payload = json.dumps({"password": value})
        out = self.c.run(
            f"printf %s {shlex.quote(payload)} | baton store --path /var/lib/baton/store.db put {key} --value-file -",
            user="baton",
        )
        return out.stdout.strip()

    def versions(self, key: str = "app/db") -> list[dict[str, object]]:
        out = self.c.run(f"baton store --path /var/lib/baton/store.db versions {key} --json", user="baton")
        rows: list[dict[str, object]] = json.loads(out.stdout)
        return rows

    def status(self, port: int = 8787) -> dict[str, object]:
        code = (
            f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/v1/status').read().decode())"
        )
        out = self.c.run(f"python3 -c {shlex.quote(code)}")
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def consumer(self, kind: str) -> dict[str, object]:
        out = self.c.run(f"cat /var/lib/consumer-{kind}/state.json")
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def prop(self, unit: str, name: str) -> str:
        return self.c.show(unit, name)[name]


@pytest.fixture(scope="session")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    if (why := why_not()) is not None:
        pytest.skip(f"cannot boot a systemd container here: {why}")
    try:
        root = rootfs()
    except CannotBoot as e:
        pytest.skip(f"cannot boot a systemd container here: {e}")
    tmp = tmp_path_factory.mktemp("systemd")
    wheel_dir = wheels(tmp / "wheels")
    c = Container(
        root,
        binds={wheel_dir: "/wheels", FILES: "/baton-test", ROOT: "/baton-src"},
        log=tmp / "nspawn.log",
    )
    try:
        c.boot()
    except CannotBoot as e:
        c.poweroff()
        pytest.skip(f"cannot boot a systemd container here: {e}")
    try:
        c.run(INSTALL, timeout=300)
        h = Host(c)
        h.put()
        h.put("app/outside")  # the credential whose output dir is outside ReadWritePaths
        c.run("systemctl daemon-reload")
        h.started = time.monotonic()
        c.run("systemctl enable --now " + " ".join(UNITS), timeout=120)
        yield h
    finally:
        c.poweroff()
