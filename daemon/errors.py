"""The one exception hierarchy of Baton.

Every error Baton raises on purpose is a ``BatonError``. Errors of client
libraries (sqlite3, hvac, botocore, kubernetes, psycopg) are mapped at the
boundary of the module that imports them, with ``raise ... from e``. A message
never carries a secret value or a response body that might hold one.

    BatonError
    ├── ConfigError              bad config: exit status 2, names the field path
    ├── ListenError              api.listen cannot be bound (in use, not a socket): exit status 2
    ├── StoreError               a secret store failed
    │   ├── StoreUnavailable     down, timed out, 5xx: retry with backoff
    │   │   └── ResourceExpired  Kubernetes 410 Gone: the watch's resourceVersion is too old, re-list
    │   ├── StoreAuthError       401/403 or bad credentials
    │   ├── StoreNotFound        no such key or version
    │   ├── StoreConflict        check-and-set or precondition lost
    │   ├── CertificateError     a certificate not issued, or refused (key mismatch, chain, validity, PEM)
    │   └── LeaseError           a Vault lease not had, renewed or revoked (issuers/lease.py)
    ├── PayloadError             a secret payload is rejected (size, encoding, template)
    ├── WriteError               the writer refused or failed (symlink, owner, name)
    ├── ProviderError            a credential provider failed a step
    │   └── ProviderBlocked      it will not go on until an operator acts (something live no version names)
    ├── ReloadError              a consumer could not be reloaded or failed its health check
    │   └── ReloadGone           the process exited (or its pid was reused): nothing holds the old version there
    ├── PluginError              a configured backend is unknown or its module cannot be imported
    ├── StateFileError           an issuer's state file is unreadable or untrusted: start fresh
    ├── SupervisorError          ``baton exec`` could not start its child
    ├── FanotifyUnavailable      open events cannot be used here (the scans carry on without them)
    ├── NotifyError              a notification was not delivered (retried with backoff, then counted and dropped)
    ├── RotationError            a rotation step failed (wraps the cause)
    └── ActionRefused            an endpoint action is refused (unknown credential, current version): its HTTP status

    OSError
    └── RenderUnavailable        the render child could not be started: an I/O failure, not the
                                 payload's fault, so it is caught with OSError and retried with backoff

Two private exceptions never leave their module (``files.writer._BadState``,
``files.renderworker._WorkerDied``): control flow, not errors a caller sees.
"""

from __future__ import annotations


class BatonError(Exception):
    """Root of every error Baton raises on purpose."""


class ConfigError(BatonError):
    """The configuration is invalid. ``problems`` holds one line per error."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class ListenError(BatonError):
    """The endpoint cannot listen on ``api.listen``; the message names it. Exit status 2."""


class StoreError(BatonError):
    """A secret store operation failed."""


class StoreUnavailable(StoreError):
    """The store is down, slow or answered 5xx; the caller retries with backoff."""


class ResourceExpired(StoreUnavailable):
    """410 Gone: the resourceVersion is older than the apiserver's history; re-list."""


class StoreAuthError(StoreError):
    """The store refused our credentials."""


class StoreNotFound(StoreError):
    """No such key or version."""


class StoreConflict(StoreError):
    """A check-and-set or precondition failed: someone else wrote first."""


# Why a certificate was not taken: a small fixed set, safe as a metric label.
CERTIFICATE_REASONS = frozenset(
    {"unavailable", "denied", "rejected", "pem", "key_mismatch", "chain", "not_yet_valid", "expired", "names", "error"}
)


class CertificateError(StoreError):
    """A certificate could not be issued, or what the CA sent is refused; the current one stays.

    A ``StoreError`` because an issuer is the credential's source (the agent rides it out
    like a store outage). ``reason`` is one of ``CERTIFICATE_REASONS``.
    """

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason if reason in CERTIFICATE_REASONS else "error"


class LeaseError(StoreError):
    """A Vault lease could not be had, renewed or revoked, or the path returned none (``issuers/lease.py``).

    A ``StoreError``: the agent rides it out like a store outage, the last good files stay.
    """


class StateFileError(BatonError):
    """An issuer's state file is unreadable or untrusted (owner, mode, size, JSON): it starts fresh."""


# Why a payload was rejected: a small fixed set, safe as a metric label.
PAYLOAD_REASONS = frozenset(
    {"empty", "size", "encoding", "depth", "template", "timeout", "output_size", "memory", "worker", "invalid"}
)


class PayloadError(BatonError):
    """A secret payload was rejected; the last good version stays.

    ``reason`` is one of ``PAYLOAD_REASONS`` (``baton_payload_rejected_total``).
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason if reason in PAYLOAD_REASONS else "invalid"


class WriteError(BatonError):
    """The writer refused to write or failed; the last good version stays."""


class ProviderError(BatonError):
    """A credential provider failed a step."""


class ProviderBlocked(ProviderError):
    """The provider will not go on until an operator acts: going on would change something
    live that no version in the store names. ``live`` names it (roles, slots: never a
    secret), ``action`` says what the operator can do."""

    def __init__(self, message: str, *, live: tuple[str, ...], action: str) -> None:
        self.live = live
        self.action = action
        super().__init__(message)


class ReloadError(BatonError):
    """A consumer could not be reloaded, or failed its health check."""


class RotationError(BatonError):
    """A rotation step failed; the current credential is untouched."""


class ActionRefused(BatonError):
    """An action asked of the endpoint (``POST /v1/actions/NAME``) is refused; ``status`` is the HTTP status
    the endpoint answers with (400 a bad body, 404 an unknown credential or version, 409 not now)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class ReloadGone(ReloadError):
    """The process exited, or its pid now names another process: nothing holds the old version there."""


class SupervisorError(BatonError):
    """The child could not be started."""


class FanotifyUnavailable(BatonError):
    """fanotify cannot be used here; the message says why."""


class RenderUnavailable(OSError):
    """The render child could not be started. Not the payload's fault: retry with backoff."""


class PluginError(BatonError):
    """A backend named by the config is unknown, or its module (an optional extra) cannot be imported."""


class NotifyError(BatonError):
    """A notification sink did not take an event (HTTP status, connection); never names a URL's path or a body."""
