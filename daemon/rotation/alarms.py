"""``retirement_pending_too_long``: a superseded version that has waited longer than ``rotation.max_drain``.

Said once per version (again only if this rotator restarts), after a retire
pass, with the gate's first reasons and the nodes that hold it: names and
counts, never a secret value. The wait is counted from the first pass of this
rotator that saw the version pending, or from the newer version's creation
when the caller passes the versions (whichever is earlier), so a restarted
rotator need not start the clock again for a version that has waited a day.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from daemon.kit.logs import event
from daemon.model import VersionInfo
from daemon.rotation.gate import Decision

log = logging.getLogger(__name__)

MAX_REASONS = 5


class PendingAlarm:
    """One credential's pending retirements, watched for ``max_drain``."""

    def __init__(self, credential: str, max_drain: float) -> None:
        self.credential = credential
        self.max_drain = max_drain
        self._since: dict[str, float] = {}  # version -> wall time it was first seen waiting
        self._said: set[str] = set()

    def check(
        self, decisions: Sequence[Decision], versions: Sequence[VersionInfo] = (), now: float | None = None
    ) -> list[str]:
        """Say it for every decision pending past ``max_drain``; returns the versions newly said."""
        now = time.time() if now is None else now
        pending = {d.version: d for d in decisions if not d.retire}
        for gone in set(self._since) - set(pending):
            self._since.pop(gone, None)
            self._said.discard(gone)
        created = sorted((v.created, v.id) for v in versions if v.created)
        said: list[str] = []
        for version, decision in pending.items():
            since = self._since.setdefault(version, now)
            newer = [c for c, vid in created if vid != version and c > _created(versions, version)]
            if newer:
                since = min(since, newer[0])
            waited = now - since
            if waited <= self.max_drain or version in self._said:
                continue
            self._said.add(version)
            said.append(version)
            event(
                log,
                "retirement_pending_too_long",
                logging.WARNING,
                credential=self.credential,
                version=version,
                pending_seconds=round(waited),
                max_drain=self.max_drain,
                reasons=list(decision.reasons[:MAX_REASONS]),
                nodes=sorted(decision.holders),
            )
        return said


def _created(versions: Sequence[VersionInfo], version: str) -> float:
    return next((v.created for v in versions if v.id == version), 0.0)
