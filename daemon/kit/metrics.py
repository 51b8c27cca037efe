"""Every Prometheus metric object of Baton, in one place.

Labels carry names and version ids only, never a secret value. Metrics live in
a private registry so tests and several in-process agents do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

credential_version_info = Gauge(
    "baton_credential_version_info",
    "1 for the version currently written for a credential.",
    ["credential", "version"],
    registry=REGISTRY,
)
writes_total = Counter("baton_writes_total", "Versions written to disk.", ["credential", "result"], registry=REGISTRY)
payload_rejected_total = Counter(
    "baton_payload_rejected_total",
    "Versions whose payload could not be rendered, by reason (errors.PAYLOAD_REASONS).",
    ["credential", "reason"],
    registry=REGISTRY,
)
store_errors_total = Counter(
    "baton_store_errors_total", "Failed store operations.", ["store", "operation"], registry=REGISTRY
)
last_change_timestamp_seconds = Gauge(
    "baton_last_change_timestamp_seconds",
    "Unix time of the last version swap for a credential.",
    ["credential"],
    registry=REGISTRY,
)
versions_in_use = Gauge(
    "baton_versions_in_use",
    "Holders of a credential version on this node.",
    ["credential", "version"],
    registry=REGISTRY,
)
reloads_total = Counter("baton_reloads_total", "Consumer reloads by result.", ["consumer", "result"], registry=REGISTRY)
rotations_total = Counter("baton_rotations_total", "Rotations by result.", ["credential", "result"], registry=REGISTRY)
rotation_failures_total = Counter(
    "baton_rotation_failures_total",
    "Rotation steps that failed.",
    ["credential", "step"],
    registry=REGISTRY,
)
pending_retirements = Gauge(
    "baton_pending_retirements",
    "Superseded versions waiting for retirement.",
    ["credential"],
    registry=REGISTRY,
)
oldest_pending_seconds = Gauge(
    "baton_oldest_pending_retirement_seconds",
    "Age of the oldest version waiting for retirement.",
    ["credential"],
    registry=REGISTRY,
)
live_unrecorded = Gauge(
    "baton_live_unrecorded_principals",
    "Principals (roles, slots) the provider says are live that no version in the store names; left as they are.",
    ["credential"],
    registry=REGISTRY,
)
rotation_blocked = Gauge(
    "baton_rotation_blocked",
    "1 while a credential's rotation is stopped until an operator acts (the rotation_blocked event says why).",
    ["credential"],
    registry=REGISTRY,
)
drain_seconds = Histogram(
    "baton_drain_seconds",
    "Time from a version being superseded to it being retired.",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
    registry=REGISTRY,
)
propagation_seconds = Histogram(
    "baton_propagation_seconds",
    "Time from a store change to every consumer of the credential reloaded (once per change).",
    buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
report_publishes_total = Counter("baton_report_publishes_total", "Node reports written.", ["result"], registry=REGISTRY)
lease_ttl_seconds = Gauge(
    "baton_lease_ttl_seconds",
    "Seconds left before a Vault lease of this node expires unless renewed (issuers/lease.py).",
    ["credential", "version"],
    registry=REGISTRY,
)
lease_max_ttl_seconds = Gauge(
    "baton_lease_max_ttl_seconds",
    "Seconds left before a lease reaches its max TTL, where renewal cannot extend it (-1: not known yet).",
    ["credential", "version"],
    registry=REGISTRY,
)
leases_outstanding = Gauge(
    "baton_leases_outstanding",
    "Leases of this node not yet revoked or expired, by state (current, held, revoking).",
    ["credential", "state"],
    registry=REGISTRY,
)
lease_operations_total = Counter(
    "baton_lease_operations_total",
    "Lease calls by operation (issue, renew, lookup, revoke) and result (ok, failed, gone).",
    ["credential", "operation", "result"],
    registry=REGISTRY,
)
lease_expiring_held = Gauge(
    "baton_lease_expiring_held",
    "Leases still held by a process on this node that will reach their max TTL within warn_before.",
    ["credential"],
    registry=REGISTRY,
)
lease_revoke_seconds = Histogram(
    "baton_lease_revoke_seconds",
    "Time from the last holder of a superseded lease gone (the scan that saw it) to its revocation.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 15, 60, 300),
    registry=REGISTRY,
)

certificate_not_after_seconds = Gauge(
    "baton_certificate_not_after_seconds",
    "Unix time a certificate of this node expires, per version still known (issuers/certificate.py).",
    ["credential", "version"],
    registry=REGISTRY,
)
certificate_not_before_seconds = Gauge(
    "baton_certificate_not_before_seconds",
    "Unix time a certificate's lifetime began (its renew window is a fraction of not_after - not_before).",
    ["credential", "version"],
    registry=REGISTRY,
)
certificate_renew_at_seconds = Gauge(
    "baton_certificate_renew_at_seconds",
    "Unix time the current certificate is (or was) due for renewal; past it while renewals fail: alert.",
    ["credential"],
    registry=REGISTRY,
)
certificate_renewal_failures_total = Counter(
    "baton_certificate_renewal_failures_total",
    "Certificates not issued or refused, by reason (errors.CERTIFICATE_REASONS); the current one stays.",
    ["credential", "reason"],
    registry=REGISTRY,
)
certificate_issued_total = Counter(
    "baton_certificate_issued_total", "Certificates issued and taken.", ["credential"], registry=REGISTRY
)
certificate_revocations_total = Counter(
    "baton_certificate_revocations_total",
    "Superseded certificates revoked at the CA once nothing held them (revoke_retired), by result.",
    ["credential", "result"],
    registry=REGISTRY,
)

rollouts_total = Counter(
    "baton_rollouts_total",
    "Reloader-style workload restarts the rotator asked for (sidecar/podholders.py), by result (requested, failed).",
    ["credential", "kind", "result"],
    registry=REGISTRY,
)
rollout_stuck = Gauge(
    "baton_rollout_stuck",
    "1 while a workload restarted for a credential's new version is not available after store.pods.rollout_timeout.",
    ["credential", "workload"],
    registry=REGISTRY,
)

notify_deliveries_total = Counter(
    "baton_notify_deliveries_total",
    "Notification attempts per sink (webhook:<host>, kubernetes-events) and result (ok, retry, dropped, queue_full).",
    ["sink", "result"],
    registry=REGISTRY,
)


def render() -> bytes:
    """The Prometheus text exposition of every Baton metric."""
    return generate_latest(REGISTRY)
