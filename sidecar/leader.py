"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

A contender takes the Lease when it is free (no holder) or expired, renews it
while it leads, and releases it on a clean stop so another takes over at once.
Every write is a PUT with the Lease's resourceVersion, so two contenders can
never both win a race (the loser gets 409). Expiry is judged by how long this
process has seen the same record unchanged (a local monotonic clock), never by
comparing the holder's wall clock with ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from daemon.clients.kube import KubeClient, kube_call
from daemon.errors import StoreError, StoreNotFound
from daemon.kit.election import Election

log = logging.getLogger(__name__)


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection(Election):
    """``async with LeaderElection(...) as le:`` runs the election; ``le.is_leader``, ``le.elected``."""

    def __init__(
        self,
        *,
        name: str,
        namespace: str,
        identity: str,
        kubeconfig: Path | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        release_on_stop: bool = True,
        request_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.kubeconfig = kubeconfig
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_stop = release_on_stop
        self.request_timeout = request_timeout
        self.elected = asyncio.Event()  # set while this contender leads
        self._kube = KubeClient(kubeconfig=kubeconfig)
        self._task: asyncio.Task[None] | None = None
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0

    async def _coord(self) -> Any:  # raw calls (dict bodies, _preload_content=False)
        return await self._kube.coordination()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> LeaderElection:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"leader-election:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.is_leader and self.release_on_stop:
            try:
                await self._release()
            except StoreError as e:
                log.warning("could not release the lease", extra={"lease": self.name, "error": str(e)})
        self._step_down()
        await self._kube.aclose()

    def _step_down(self) -> None:
        if self.is_leader:
            log.info("stopped leading", extra={"lease": self.name, "identity": self.identity})
        self.elected.clear()

    async def _run(self) -> None:
        while True:
            try:
                won = await self._try_acquire_or_renew()
            except StoreError as e:
                log.warning("lease update failed", extra={"lease": self.name, "error": str(e)})
                won = None  # unknown: keep leading until the renew deadline passes
            now = time.monotonic()
            if won:
                self._renewed_at = now
                if not self.is_leader:
                    log.info("became leader", extra={"lease": self.name, "identity": self.identity})
                    self.elected.set()
            elif won is False or now - self._renewed_at > self.renew_deadline:
                self._step_down()
            await asyncio.sleep(self.retry_period)

    # ------------------------------------------------------------ the protocol

    async def _get(self) -> dict[str, Any] | None:
        coord = await self._coord()
        try:
            return await kube_call(
                coord.read_namespaced_lease(
                    self.name, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="get lease",
                what=self.name,
            )
        except StoreNotFound:
            return None

    async def _put(self, lease: dict[str, Any]) -> bool:
        coord = await self._coord()
        try:
            await kube_call(
                coord.replace_namespaced_lease(
                    self.name, self.namespace, lease, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="replace lease",
                what=self.name,
            )
        except StoreError as e:
            if "HTTP 409" in str(e):
                return False  # another contender wrote first
            raise
        return True

    async def _try_acquire_or_renew(self) -> bool:
        lease = await self._get()
        now = _micro_time()
        duration = max(1, math.ceil(self.lease_duration))
        if lease is None:
            coord = await self._coord()
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            try:
                await kube_call(
                    coord.create_namespaced_lease(
                        self.namespace, body, _preload_content=False, _request_timeout=self.request_timeout
                    ),
                    op="create lease",
                    what=self.name,
                )
            except StoreError as e:
                if "HTTP 409" in str(e):
                    return False
                raise
            return True
        spec = dict(lease.get("spec") or {})
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"), spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        if holder and holder != self.identity:
            held_for = float(spec.get("leaseDurationSeconds") or duration)
            if time.monotonic() - self._observed_at < held_for:
                return False  # held by someone else and not expired
            log.info("taking over an expired lease", extra={"lease": self.name, "previous": holder})
        if holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=duration, renewTime=now)
        lease["spec"] = spec
        return await self._put(lease)

    async def _release(self) -> None:
        lease = await self._get()
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        spec = dict(lease["spec"])
        # As client-go: no holder and a 1 s duration, so the next contender takes it at once.
        spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=_micro_time())
        lease["spec"] = spec
        await self._put(lease)
        log.info("released the lease", extra={"lease": self.name, "identity": self.identity})
