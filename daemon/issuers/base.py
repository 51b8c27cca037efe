"""The ``Issuer`` Protocol: a credential minted for this node, not read from a shared store.

A Vault/OpenBao dynamic secret (a lease) or a certificate (a PKI or a local CA)
belongs to one node: no rotator decides when its old version retires, the
agent does, from what the processes on this node hold. An issuer is therefore
two things to the agent:

- the credential's *source*, with the read side of ``SecretStore`` (``watch``,
  ``read``, ``versions``), so ``agent.follow.Follower`` writes its versions and
  ``agent.tracker.Tracker`` cleans them up exactly as it does a store's: a new
  lease or certificate is a new version; ``versions`` marks one ``retired`` once
  the issuer has let it go, and the tracker then removes its files;
- told after every scan which versions processes on this node hold
  (``observe``): it keeps a held superseded version alive (renews its lease, up to
  its max TTL), and lets go of one nothing holds (revokes the lease, or the
  certificate with ``revoke_retired``). Never the current version.

What an issuer keeps across restarts (lease ids, serials) lives in a 0600 state
file under ``agent.state_dir``; after a restart or a kill -9 it adopts what it
had instead of minting anew. Lease ids, tokens and keys never reach a log line,
an exception or ``status()`` (a short hash may).

Implementations: ``issuers/lease.py`` (``lease:``), ``issuers/certificate.py``
(``certificate:``). They are chosen through ``kit/plugins.py`` ``ISSUERS``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from daemon.model import SecretVersion, VersionId, VersionInfo
from daemon.report.base import Holder
from daemon.stores.base import StatusHook


@runtime_checkable
class Issuer(Protocol):
    """One node-issued credential. The ``key`` arguments are the credential's name (an issuer serves one)."""

    def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        """Yield the version to use now (adopted or newly issued), then each new one (renewal, rollover).

        Trouble it can ride out (the issuer down, a denied renewal) is told to
        ``on_status`` and retried inside; the last good version stays in use while valid.
        """
        ...

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        """A version's payload (its template fields), current if not given."""
        ...

    async def versions(self, key: str) -> list[VersionInfo]:
        """Versions it still knows, oldest first; ``retired`` once let go (the tracker removes their files)."""
        ...

    async def observe(self, current: VersionId | None, held: Mapping[VersionId, Sequence[Holder]]) -> None:
        """After each scan: which versions this node's processes hold. Keep held ones alive, release the rest.

        ``current`` is the version on disk now; it is never released here.
        """
        ...

    def status(self) -> dict[str, Any]:
        """Per version: what the status API shows (TTL left, max TTL left, serial, not_after...); never a secret."""
        ...

    async def aclose(self) -> None: ...
