"""Baton's ledger in a key's metadata: ``baton.own.<version>`` records what Baton applied (its state and principal).

Read by the rotator's workflow and by the read-only gate; it decides which versions wait
for retirement (``superseded``). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from daemon.model import CURRENT, PENDING, VersionId, VersionInfo

OWN_PREFIX = "baton.own."


class OwnState(StrEnum):
    """Where Baton's own handling of one version stands."""

    APPLYING = "applying"  # written and being applied (the provider may have made it valid)
    PROMOTED = "promoted"  # made current by Baton: retired only through the provider
    RETIRING = "retiring"  # Baton began retiring it through the provider


APPLYING, PROMOTED, RETIRING = OwnState.APPLYING, OwnState.PROMOTED, OwnState.RETIRING


@dataclass(frozen=True)
class Own:
    """What Baton recorded of one version it applied: its state and the principal it names."""

    state: OwnState
    principal: str  # "" when the provider has none (a generated password)

    def encode(self) -> str:
        return f"{self.state}:{self.principal}"


def own_key(version: VersionId) -> str:
    return OWN_PREFIX + version


def ledger(meta: Mapping[str, str]) -> dict[VersionId, Own]:
    """The ``baton.own.*`` entries of a key's metadata: version id -> what Baton applied."""
    out = {}
    for k, v in meta.items():
        if k.startswith(OWN_PREFIX):
            state, _, principal = v.partition(":")
            if state in OwnState.__members__.values():
                out[VersionId(k[len(OWN_PREFIX) :])] = Own(OwnState(state), principal)
    return out


def superseded(versions: list[VersionInfo], owned: Mapping[VersionId, Own] | None = None) -> list[VersionInfo]:
    """Versions that are neither current nor pending nor retired: waiting for retirement.

    A version Baton promoted and has not retired itself is still waiting even when
    the store calls it retired (labels removed by hand): only Baton's retirement ends it.
    """
    owned = owned or {}
    current = [v for v in versions if v.is_current]
    newest_current = max((v.created for v in current), default=0.0)
    return [
        v
        for v in versions
        if (not v.retired or draining(owned.get(v.id)))
        and CURRENT not in v.stages
        and PENDING not in v.stages
        and v.created <= newest_current
    ]


def draining(own: Own | None) -> bool:
    return own is not None and own.state == PROMOTED


def retired_by_provider(own: Own | None) -> bool:
    """Baton promoted it, or had begun retiring it through the provider (a rotator killed
    between the ``retiring`` record and the provider's revoke): the provider finishes it."""
    return own is not None and own.state in (PROMOTED, RETIRING)
