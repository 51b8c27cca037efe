"""Following one credential: the current version, then every new one, from the store to the files.

``Follower.follow`` iterates the store's watch; each version is read, rendered in the
render worker's child and written by the credential's ``Writer``. Store errors and
refused payloads never end it: the last good files stay and it retries with backoff.
What happens next (reload, rescan) is the agent's, told through ``on_written``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from enum import StrEnum

from daemon.agent.state import CredentialState
from daemon.config import Config
from daemon.errors import BatonError, PayloadError, StoreError, WriteError
from daemon.files.renderworker import RenderWorker
from daemon.issuers.base import Issuer
from daemon.kit import metrics
from daemon.kit.backoff import Backoff
from daemon.kit.logs import bound, event
from daemon.model import VersionId, VersionInfo
from daemon.stores.base import SecretStore
from daemon.usage.environ import fingerprint

log = logging.getLogger(__name__)

# (state, the version it replaced, whether the files changed): called once a version is on disk.
OnWritten = Callable[[CredentialState, VersionId | None, bool], None]


class WriteResult(StrEnum):
    """How one version's write ended (the writes metric's ``result`` label)."""

    OK = "ok"  # on disk, the files changed
    REJECTED = "rejected"  # the payload or its rendering was refused for good; the last good files stay
    FAILED = "failed"  # the write failed; retried with backoff


class Follower:
    """Writes one credential's versions as the store makes them current."""

    def __init__(
        self,
        *,
        config: Config,
        store: SecretStore | Issuer,
        renderer: RenderWorker,
        env_key: bytes,
        on_written: OnWritten,
    ) -> None:
        # ``store`` is the credential's source: the store, or its issuer for an issued one
        # (daemon/issuers/): both have watch and read.
        self.config = config
        self.store = store
        self.renderer = renderer
        self.env_key = env_key
        self.on_written = on_written

    async def follow(self, state: CredentialState) -> None:
        """Write the current version, then every new one; on store errors keep files and back off."""
        cred = state.config
        backoff = Backoff(self.config.agent.retry_min, self.config.agent.retry_max)
        await asyncio.to_thread(state.writer.recover)
        state.version = await asyncio.to_thread(state.writer.current)
        kind = cred.issued_kind() or self.config.store.kind

        def on_status(error: StoreError | None) -> None:
            if error is not None:
                metrics.store_errors_total.labels(kind, "watch").inc()
            state.store_error = None if error is None else str(error)

        with bound(credential=cred.name):
            while True:
                try:
                    async for info in self.store.watch(cred.key, on_status=on_status):
                        state.store_error = None
                        await self._apply(state, info)
                        backoff.reset()
                except StoreError as e:
                    metrics.store_errors_total.labels(kind, "watch").inc()
                    state.store_error = str(e)
                    delay = backoff.next()
                    log.warning("store error; keeping the last good files", extra={"error": str(e), "retry_in": delay})
                    await asyncio.sleep(delay)
                except (PayloadError, WriteError, OSError) as e:
                    # A version the store cannot even hand over, or a write that failed
                    # (disk full...): keep the last good files and try the same again.
                    state.last_error = str(e)
                    delay = backoff.next()
                    log.warning("version not written; retrying", extra={"error": str(e), "retry_in": delay})
                    await asyncio.sleep(delay)
                except Exception as e:
                    # Anything else (a bug, a library's surprise at a hostile payload) is
                    # this credential's trouble, never the agent's: keep the files, back
                    # off, follow on. Its message may quote the value: name the kind only.
                    state.last_error = f"unexpected {type(e).__name__}"
                    delay = backoff.next()
                    log.warning("version not written; retrying", extra={"error": state.last_error, "retry_in": delay})
                    await asyncio.sleep(delay)

    async def _apply(self, state: CredentialState, info: VersionInfo) -> None:
        cred = state.config
        if info.id == state.version and state.written:
            return
        received = time.time()
        limits = self.config.agent
        try:
            secret = await self.store.read(cred.key, info.id)
            rendered = await self.renderer.render(
                files=cred.output.files,
                env=cred.output.env,
                payload=secret.payload,
                time_limit=limits.render_timeout,
                max_bytes=limits.max_file_size,
            )
        except PayloadError as e:
            # This version is refused for good (the last good files stay); the next one may do.
            metrics.writes_total.labels(cred.name, WriteResult.REJECTED).inc()
            metrics.payload_rejected_total.labels(cred.name, e.reason).inc()
            state.last_error = f"version {info.id}: {e}"
            event(log, "version_rejected", logging.ERROR, version=info.id, reason=e.reason, error=str(e))
            return
        files, env = rendered.files, rendered.env
        try:
            changed = await asyncio.to_thread(state.writer.write, info.id, files)
        except (BatonError, OSError) as e:
            metrics.writes_total.labels(cred.name, WriteResult.FAILED).inc()
            event(log, "write_failed", logging.ERROR, version=info.id, error=str(e))
            raise WriteError(f"version {info.id}: {e}") from None  # follow() backs off and tries again
        if env:
            state.fingerprints[info.id] = tuple(fingerprint(self.env_key, k, v) for k, v in env.items())
        previous, state.version = state.version, info.id
        state.written = True
        state.last_error = None
        state.swapped.set()
        if previous is not None and previous != info.id:
            with contextlib.suppress(KeyError):
                metrics.credential_version_info.remove(cred.name, previous)
        metrics.credential_version_info.labels(cred.name, info.id).set(1)
        if changed:
            state.last_change = time.time()
            # The store's own time of the change where it has one, else when we saw it.
            state.changed_at = info.created if 0 < info.created <= received else received
            state.waiting_for = {c.name for c in cred.consumers if c.loads != "per-use"}
            metrics.writes_total.labels(cred.name, WriteResult.OK).inc()
            metrics.last_change_timestamp_seconds.labels(cred.name).set(state.last_change)
            event(log, "version_written", version=info.id, previous=previous)
        self.on_written(state, previous, changed)
