"""Which rotator rotates which credential: one lease per credential, kept in the store.

Per credential, not per rotator process: what must never have two rotators is
a credential (its store key). Two rotator configs may share some credentials
and not others, and a lease kept next to the key it guards needs no access
beyond that key's. It costs one read and one write per credential per round.

A contender looks at the lease every ``ttl / 3``. It takes the lease when no
one holds it (never written, or released on a clean stop), when the record has
stayed unchanged for the holder's whole ttl by this process's own monotonic
clock (as client-go's leaderelection does: another machine's clock is never
compared with ours), or when the holder's own expiry lies more than a ttl in
the past (a lease left by a rotator that died long ago; clock skew up to a ttl
is tolerated). Every write is the store's check-and-set on the revision just
read (daemon.stores.lease), so of two contenders exactly one wins.

The holder renews every round and steps down (its schedules are cancelled)
once 2/3 of the ttl passed since the start of its last successful renewal,
which is before any standby can take over (a standby waits a whole ttl from
the last renewal it saw). A clean stop releases the lease.

Nothing here logs or shows more than holder ids and times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from daemon.errors import StoreConflict, StoreError
from daemon.kit.logs import event
from daemon.kit.tasks import cancel_all
from daemon.stores.lease import LeaseRecord, LeaseStore

log = logging.getLogger(__name__)


def holder_id(node_id: str) -> str:
    """This process's holder id: the node, the pid (for the operator), and a random tag (pid reuse, containers)."""
    return f"{node_id}/{os.getpid()}-{secrets.token_hex(3)}"


class CredentialLease:
    """This rotator's view of one credential's lease. ``run(lead)`` runs ``lead`` while it holds it."""

    def __init__(
        self,
        *,
        store: LeaseStore,
        credential: str,
        key: str,
        holder: str,
        ttl: float,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.on_change = on_change  # told when this rotator starts or stops leading, or the leader changes
        self.credential = credential
        self.key = key
        self.holder = holder
        self.ttl = ttl
        self.held = asyncio.Event()  # set while this rotator holds the lease
        self.record: LeaseRecord | None = None  # the lease as last read or written
        self._seen: tuple[str, str] | None = None  # (revision, holder) last read
        self._seen_at = 0.0  # monotonic time it was first read
        self._renewed_at = 0.0  # monotonic start of the last successful write
        self._standby_for: str | None = None  # the leader last logged as such

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    @property
    def renew_deadline(self) -> float:
        return self.ttl * 2 / 3

    @property
    def is_leader(self) -> bool:
        return self.held.is_set()

    def status(self) -> dict[str, Any]:
        """Leader id and expiry (by the holder's clock); ids and times only."""
        rec = self.record
        return {
            "leading": self.is_leader,
            "holder": self.holder,
            "leader": (rec.holder or None) if rec is not None else None,
            "expires": round(rec.expires, 3) if rec is not None and rec.holder else None,
            "ttl": self.ttl,
        }

    # ------------------------------------------------------------ one round

    async def step(self) -> None:
        """Read, and take or renew the lease if this rotator may; then set or clear ``held``."""
        started = time.monotonic()
        try:
            won: bool | None = await asyncio.wait_for(self._try(), self.renew_every)
        except (StoreError, TimeoutError) as e:
            log.warning("lease check failed", extra={"credential": self.credential, "error": str(e) or repr(e)})
            won = None  # unknown: a leader keeps leading until the renew deadline passes
        before = (self.is_leader, self._standby_for)
        if won:
            self._renewed_at = started
            if not self.is_leader:
                self.held.set()
                self._standby_for = None
                event(log, "rotator_leading", credential=self.credential, holder=self.holder)
        elif self.is_leader and (won is False or time.monotonic() - self._renewed_at >= self.renew_deadline):
            self.held.clear()
            leader = self.record.holder if self.record is not None else None
            event(log, "rotator_lost_lease", logging.WARNING, credential=self.credential, leader=leader)
        rec = self.record
        if not self.is_leader and rec is not None and rec.holder not in ("", self.holder, self._standby_for):
            self._standby_for = rec.holder  # said once per leader, not every round
            event(
                log,
                "rotator_standby",
                credential=self.credential,
                holder=self.holder,
                leader=rec.holder,
                expires=round(rec.expires, 3),
            )
        if (self.is_leader, self._standby_for) != before and self.on_change is not None:
            self.on_change()

    async def _try(self) -> bool:
        rec = await self.store.read_lease(self.key)
        expect: str | None = None
        if rec is not None:
            expect = rec.revision
            if (rec.revision, rec.holder) != self._seen:
                self._seen, self._seen_at = (rec.revision, rec.holder), time.monotonic()
            self.record = rec
            if rec.holder and rec.holder != self.holder:
                unchanged = time.monotonic() - self._seen_at >= rec.ttl
                abandoned = time.time() - rec.expires > rec.ttl
                if not (unchanged or abandoned):
                    return False
                log.info(
                    "taking over an expired lease",
                    extra={"credential": self.credential, "previous": rec.holder, "holder": self.holder},
                )
        wrote = await self.store.write_lease(self.key, LeaseRecord(self.holder, time.time(), self.ttl), expect=expect)
        if wrote is None:
            return False  # another contender wrote first
        self.record = wrote
        self._seen, self._seen_at = (wrote.revision, wrote.holder), time.monotonic()
        return True

    async def verify(self) -> None:
        """Raise ``StoreConflict`` unless the store still names this rotator the holder.

        Awaited right before each step that changes the credential (write, apply,
        promote): a leader that stalled past its lease while another took it over
        stops there, instead of applying a payload minted from a stale current.
        """
        if not self.is_leader or time.monotonic() - self._renewed_at >= self.renew_deadline:
            raise StoreConflict(f"{self.credential}: this rotator's lease has run out")
        rec = await self.store.read_lease(self.key)
        if rec is None or rec.holder != self.holder:
            leader = rec.holder if rec is not None else None
            raise StoreConflict(f"{self.credential}: the lease is held by {leader or 'no one'}, not this rotator")

    async def release(self) -> None:
        """Give the lease up (a clean stop), so a standby takes it at its next round."""
        rec, was = self.record, self.is_leader
        self.held.clear()
        if not was or rec is None or rec.holder != self.holder:
            return
        try:
            gone = await asyncio.wait_for(self._write_release(rec), self.renew_every)
        except (StoreError, TimeoutError) as e:
            log.warning("could not release the lease", extra={"credential": self.credential, "error": repr(e)})
            return
        except Exception as e:  # on the way out the store may be closed under us; it expires then
            log.warning("could not release the lease", extra={"credential": self.credential, "error": repr(e)})
            return
        if gone is not None:
            self.record = gone
            event(log, "rotator_released_lease", credential=self.credential, holder=self.holder)

    async def _write_release(self, rec: LeaseRecord) -> LeaseRecord | None:
        gone = await self.store.write_lease(self.key, LeaseRecord("", time.time(), self.ttl), expect=rec.revision)
        if gone is None:
            # A renewal cancelled by the stop may still have landed (its write runs in a
            # thread): the store then holds a newer revision of our own lease.
            fresh = await self.store.read_lease(self.key)
            if fresh is not None and fresh.holder == self.holder:
                gone = await self.store.write_lease(
                    self.key, LeaseRecord("", time.time(), self.ttl), expect=fresh.revision
                )
        return gone

    async def _release_on_the_way_out(self) -> None:
        """Release, riding out a stop's re-cancels (daemon.kit.tasks repeats them every 0.2 s, which would
        cut a release short on a busy store) for at most ``renew_every`` (2 s at most); then re-raise."""
        job = asyncio.ensure_future(self.release())
        deadline = time.monotonic() + min(self.renew_every, 2.0)
        cancelled = False
        while not job.done():
            left = deadline - time.monotonic()
            if left <= 0:
                job.cancel()  # the lease then simply expires
                break
            try:
                await asyncio.wait({job}, timeout=left)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    # ------------------------------------------------------------ the loop

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Take part in the election until cancelled; run ``lead()`` while leading, cancel it when the lease
        is lost. A failure of ``lead()`` is raised; the lease is released on the way out."""
        task: asyncio.Task[None] | None = None
        try:
            while True:
                await self.step()
                if self.is_leader and task is None:
                    task = asyncio.ensure_future(lead())
                elif not self.is_leader and task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    task = None
                if task is not None:
                    done, _ = await asyncio.wait({task}, timeout=self.renew_every)
                    if done:
                        task.result()  # a failure ends the rotator; a return is not expected either
                        return
                else:
                    await asyncio.sleep(self.renew_every)
        finally:
            try:
                if task is not None:
                    # Bounded, and it holds a re-cancel of this task (a stop repeats them) until
                    # the schedules have ended, then raises it: the release below runs either way.
                    await cancel_all([task], min(self.renew_every, 2.0))
            finally:
                await self._release_on_the_way_out()


class Leadership:
    """The leases of all of a rotator's credentials; ``is_leader`` / ``standing_by`` for STATUS= lines."""

    def __init__(
        self,
        *,
        store: object,
        holder: str,
        credentials: Mapping[str, tuple[str, float]],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """``credentials``: name -> (store key, lease ttl). A store without leases leaves every credential
        unguarded (led at once), as before leases existed."""
        self.holder = holder
        self.leases: dict[str, CredentialLease] = {}
        if isinstance(store, LeaseStore):
            self.leases = {
                name: CredentialLease(
                    store=store, credential=name, key=key, holder=holder, ttl=ttl, on_change=on_change
                )
                for name, (key, ttl) in credentials.items()
            }

    @property
    def is_leader(self) -> bool:
        """True while this rotator leads at least one of its credentials."""
        return any(lease.is_leader for lease in self.leases.values())

    @property
    def standing_by(self) -> bool:
        """True while it leads none (and leases are in use)."""
        return bool(self.leases) and not self.is_leader

    async def lead(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        lease = self.leases.get(name)
        if lease is None:
            await run()
        else:
            await lease.run(run)

    def status(self) -> dict[str, Any]:
        return {name: lease.status() for name, lease in self.leases.items()}
