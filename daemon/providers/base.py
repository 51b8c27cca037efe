"""The ``Provider`` Protocol: how a credential is minted, applied, tested, retired.

Every step is idempotent: the rotator may run a step again after a crash, with
the same arguments, and the provider must converge to the same state.
``previous`` is the payload of the version being superseded (None on the first
rotation); providers with slots (alternating users) use it to pick the other one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from daemon.errors import PayloadError, ProviderError
from daemon.model import Secret
from daemon.payload import payload_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Session:
    """A provider-side user of a credential (for example a database session)."""

    principal: str  # e.g. the role name; never a secret
    client: str  # address or application name
    count: int = 1


class Provider(Protocol):
    """A credential provider. Its capabilities default here (a provider subclasses this to inherit them):
    ``slots`` None (unbounded), ``principal`` None and ``live`` empty (no principals of its own)."""

    # How many credentials can be live at once (two alternating users: 2);
    # None when unbounded. The rotator keeps superseded versions below it.
    # An attribute, not a ClassVar: the password provider's depends on its config.
    slots: int | None = None

    async def create(self, *, current: Secret | None) -> Secret:
        """Mint a new payload. Nothing outside the store knows it yet.

        Before it picks a slot or a name to (re)use it asks the target system, not
        only ``current``: one that is live (can log in, has sessions) is never
        re-passworded, a name that exists is never minted again.
        """
        ...

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        """Make ``new`` valid in the target system (``current`` stays valid)."""
        ...

    async def test(self, new: Secret) -> None:
        """Raise ``ProviderError`` unless ``new`` works."""
        ...

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        """Make ``old`` unusable (NOLOGIN, DROP ROLE, revoke). Idempotent.

        ``keep``: principals that the current or a newer version names; a provider
        refuses (``ProviderError``) to revoke one of them, whatever ``old`` says.
        """
        ...

    def principal(self, payload: Secret) -> str | None:
        """What ``payload`` stands for in the target system (a role, a slot, a key id),
        never a secret; None when the provider has no such thing or does not own it."""
        return None

    async def sessions(self, old: Secret) -> list[Session]:
        """Who still uses ``old`` on the provider's side; empty when unknown-free."""
        ...

    async def live(self) -> list[str]:
        """Every principal of this credential the target system says is live (can log in, or
        has sessions), whatever the store says; empty when the provider has no principals."""
        return []

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Login:
    """A username and password: the payload the database and ACL providers mint. ``repr`` hides the password."""

    username: str
    password: str = field(repr=False)


def parse_login(payload: Secret, *, system: str, account: str, owns: Callable[[str], bool], naming: str) -> Login:
    """The payload's ``username``/``password``, checked as the agent checks a payload (a lone
    surrogate or deep nesting is a ``ProviderError`` here, not a driver's surprise later), and
    refused unless ``owns`` says the name is one of this provider's ``account``s (``naming``:
    its strategy and base name, for the message)."""
    try:
        data = payload_object(payload)
    except PayloadError:
        data = None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("username"), str)
        or not isinstance(data.get("password"), str)
    ):
        raise ProviderError(f"payload is not a {system} credential (JSON with username and password)")
    username, password = data["username"], data["password"]
    if not owns(username):
        raise ProviderError(
            f"payload names {account} {username!r}, which is not one of this provider's {account}s ({naming})"
        )
    return Login(username=username, password=password)


def login_name(current: Secret | None, parse: Callable[[Secret], Login]) -> str | None:
    """The current payload's username, or None (the first rotation, or a value this provider did not mint)."""
    if current is None:
        return None
    try:
        return parse(current).username
    except ProviderError:
        log.warning("the current payload is not a credential of this provider; starting afresh")
        return None


class AdminFile:
    """A provider's admin credential file (a DSN or URL holding a password), read at each use.

    Its text is never logged. One readable by group or others still works, and is warned
    about at most once per ``WARN_EVERY`` seconds.
    """

    WARN_EVERY = 3600.0

    def __init__(self, path: Path, field: str) -> None:
        self.path = path
        self.field = field  # the config field that names it, for messages
        self._warned = 0.0

    async def read(self) -> str:
        """The file's text, stripped; ``ProviderError`` naming the field if it cannot be read."""
        try:
            text, mode = await asyncio.to_thread(_read_with_mode, self.path)
        except OSError as e:
            raise ProviderError(f"cannot read {self.field} {self.path}: {e.strerror}") from None
        if mode & 0o077 and time.monotonic() - self._warned > self.WARN_EVERY:
            self._warned = time.monotonic()
            log.warning("%s %s is readable by group or others (mode %o)", self.field, self.path, mode & 0o777)
        return text.strip()


def _read_with_mode(path: Path) -> tuple[str, int]:
    with path.open() as f:
        return f.read(), os.fstat(f.fileno()).st_mode
