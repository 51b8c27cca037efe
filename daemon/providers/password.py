"""The ``password`` generator: a random value; nothing to apply or retire."""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Collection

from daemon.config import GeneratorConfig
from daemon.errors import PayloadError
from daemon.kit.logs import event
from daemon.model import Secret
from daemon.payload import payload_object, salvage_fields
from daemon.providers.base import Provider, Session

log = logging.getLogger(__name__)

_ALPHABETS = {
    "alnum": string.ascii_letters + string.digits,
    "ascii": string.ascii_letters + string.digits + "!#%+,-.:=?@^_~",
    "hex": "0123456789abcdef",
}


class PasswordProvider(Provider):
    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.slots: int | None = None

    async def create(self, *, current: Secret | None) -> Secret:
        alphabet = _ALPHABETS[self.config.alphabet]
        value = "".join(secrets.choice(alphabet) for _ in range(self.config.length))
        if self.config.field is None:
            return Secret(value)
        fields: dict[str, object] = {}
        if current is not None:
            try:
                fields = payload_object(current) or {}
            except PayloadError as e:
                # A payload no agent can render (too deep, lone surrogates, too big):
                # keep only the fields that are fine on their own, so that this
                # rotation replaces the bad version rather than copies it.
                fields = salvage_fields(current)
                event(log, "generator_fields_dropped", logging.WARNING, reason=e.reason, kept=len(fields))
        fields[self.config.field] = value
        return Secret(json.dumps(fields))

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        return None

    async def test(self, new: Secret) -> None:
        return None

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        return None

    def principal(self, payload: Secret) -> str | None:
        return None

    async def sessions(self, old: Secret) -> list[Session]:
        return []

    async def live(self) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None
