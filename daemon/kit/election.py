"""``Election``: the Protocol of a rotator leader-election plug-in (``plugins.ELECTIONS``).

Among rotator replicas at most one leads; the rotator runs its schedules only
while ``is_leader``. It lives in the foundation, not in ``rotation/``, because
its implementation (``sidecar/leader.py``, a Kubernetes Lease) subclasses it and
sidecar never imports a role. Nothing here knows a store or a credential.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Election(Protocol):
    """One contender in a leader election, built with keyword arguments
    (``name``, ``namespace``, ``identity``, ``kubeconfig``) and started once."""

    # Seconds between the contender's attempts to take or renew the lead: the rotator
    # looks at ``is_leader`` no slower than this, so it stops leading before another can win.
    retry_period: float = 1.0
    elected: asyncio.Event  # set while this contender leads

    @property
    def is_leader(self) -> bool:
        """True while this contender leads."""
        return self.elected.is_set()

    def start(self) -> None:
        """Begin contending (in a task of its own); returns at once."""
        ...

    async def stop(self) -> None:
        """Stop contending and give the lead up, so another replica takes over at once."""
        ...
