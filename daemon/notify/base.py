"""A notification (``Notice``), what a sink is (``Sink``), and what an event may carry into one.

A notice is built from an event's fields (``kit.logs.event``), which by the
house rules never hold a secret value; as a second fence only scalars and
short lists of them pass, long strings are cut, and a field whose name looks
like a secret (password, token, payload, value...) is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

Scalar = str | int | float | bool | None
FieldValue = Scalar | tuple[Scalar, ...]

MAX_FIELDS = 24
MAX_TEXT = 300
MAX_ITEMS = 20
_SECRET_WORDS = ("passw", "secret", "token", "payload", "value", "dsn", "private", "key_pem", "jwt")


@dataclass(frozen=True)
class Notice:
    """One event worth telling people about: names, ids, times and counts, never a secret value."""

    event: str
    node: str
    role: str
    credential: str | None = None
    level: str = "info"
    at: float = field(default_factory=time.time)
    fields: Mapping[str, FieldValue] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "event": self.event,
            "credential": self.credential,
            "node": self.node,
            "role": self.role,
            "level": self.level,
            "at": round(self.at, 3),
            "fields": {k: list(v) if isinstance(v, tuple) else v for k, v in self.fields.items()},
        }

    def text(self) -> str:
        """One line for people (Slack, Kubernetes Event messages)."""
        what = f"{self.event}" + (f" {self.credential}" if self.credential else "")
        details = ", ".join(
            f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in self.fields.items()
        )
        return f"baton {self.role} on {self.node}: {what}" + (f" ({details})" if details else "")


def clean_fields(fields: Mapping[str, object]) -> dict[str, FieldValue]:
    """The fields a notice may carry: scalars and short lists, cut short, secret-looking names dropped."""
    out: dict[str, FieldValue] = {}
    for name, raw in fields.items():
        if len(out) >= MAX_FIELDS:
            break
        if not isinstance(name, str) or name == "credential" or any(w in name.lower() for w in _SECRET_WORDS):
            continue
        if isinstance(raw, list | tuple | set | frozenset):
            items = [_scalar(x) for x in list(raw)[:MAX_ITEMS]]
            out[name[:60]] = tuple(x for x in items if x is not None)
        elif (value := _scalar(raw)) is not None:
            out[name[:60]] = value
    return out


def _scalar(v: object) -> Scalar:
    if isinstance(v, bool | int | float):
        return v
    if isinstance(v, str):
        return v if len(v) <= MAX_TEXT else v[: MAX_TEXT - 3] + "..."
    return None  # mappings, objects: not shown (their repr could be anything)


class Sink(Protocol):
    """Where notices go. ``send`` raises ``NotifyError`` on a failed attempt (the hub retries)."""

    name: str  # the metrics label: "webhook:<host>", "kubernetes-events"; never a URL path

    async def send(self, notice: Notice) -> None: ...

    async def aclose(self) -> None: ...
