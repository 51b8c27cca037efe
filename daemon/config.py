"""The configuration: pydantic models of the YAML file, and the one place for defaults.

Loading validates everything once; an invalid file raises ``ConfigError`` with
one line per problem, each naming the field path (``credentials.0.output.mode``)
and the bad value. The config never holds a secret value itself: secrets are
referenced by file path (``admin_dsn_file``, ``token_file``).
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daemon.errors import ConfigError
from daemon.model import CredentialName, NodeId
from daemon.schedule import Blackout, Cron, Schedule, check_cron, zone

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# No timer, interval or timeout of Baton's makes sense beyond this; a bigger
# number is a typo (or a unit mix-up) and would overflow some loop's arithmetic.
MAX_DURATION = 10 * 365 * 86400.0  # 10 years


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"1h"``, ``"250ms"``, ``2`` (seconds) -> seconds as float: finite, 0 to 10 years."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 1h")
    seconds: int | float
    if isinstance(value, int | float):
        seconds = value  # an int is compared as an int: float() of a 400-digit int overflows
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration like 30s, 5m, 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not seconds <= MAX_DURATION:  # also NaN and inf
        raise ValueError("a duration must be finite and at most 10 years")
    return float(seconds)


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


# A zero interval or timeout is a busy loop or an instant failure, so durations
# are > 0 unless the field says it may be 0 (``DurationOrZero``: debounce,
# alive_for, min_restart_interval, min_drain, where 0 means "no wait").
Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
DurationOrZero = Annotated[float, BeforeValidator(parse_duration)]


def _parse_mode(value: Any) -> int:
    if not isinstance(value, str):
        # YAML reads `mode: 400` as the decimal 400 (0620) and `mode: 0400` as
        # octal: never guess which one was meant.
        raise ValueError('a mode must be a quoted octal string like "0440", not a number')
    if not re.fullmatch(r"[0-7]{3,4}", value):
        raise ValueError('expected an octal file mode like "0440"')
    mode = int(value, 8)
    if mode & 0o7000:
        raise ValueError("a credential file must not be setuid, setgid or sticky")
    if mode & 0o111:
        raise ValueError("a credential file must not be executable")
    if mode & 0o022:
        raise ValueError("a credential file must not be writable by group or others")
    return mode


FileMode = Annotated[int, BeforeValidator(_parse_mode)]


def _path_text(value: Any) -> Any:
    # pydantic turns "" into Path("."), the current directory: refuse it first.
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if not isinstance(text, str) or not text:
            raise ValueError("a path must not be empty")
        if "\0" in text:
            raise ValueError("a path must not contain a NUL byte")
    return value


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    return path


FilePath = Annotated[Path, BeforeValidator(_path_text)]
AbsPath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_absolute)]
NonEmpty = Annotated[str, Field(min_length=1)]


def _http_url(value: str) -> str:
    try:
        url = urlsplit(value)
        ok = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:  # a bad port or IPv6 literal
        ok = False
    if not ok or any(c.isspace() for c in value):
        raise ValueError("expected an http:// or https:// URL with a host")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]
Argv = Annotated[list[NonEmpty], Field(min_length=1)]

# What the writer (daemon.files.writer) keeps in an output dir besides the credential
# files: ``..``-prefixed entries (``..current``, ``..v7-…``, ``..baton-state.json``,
# ``..baton.lock``) and temp names holding ``.tmp-``, which recovery deletes at
# every start. Kept here, not imported: the writer sits above the config.
STATE_FILE = "..baton-state.json"
LOCK_FILE = "..baton.lock"
TMP_INFIX = ".tmp-"
_WRITER_NAME = re.compile(r"\.\.v[A-Za-z0-9_.-]{1,12}-[0-9a-f]{8}|.+\.tmp-(?:[0-9a-f]{8}|[0-9a-f]{12})")


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a credential file name in an output dir, or None."""
    if not name:
        return "empty"
    if "/" in name or "\0" in name:
        return "no '/' or NUL"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "no control characters"
    if name in (".", "..") or name.startswith(".."):
        return "names starting with '..' are Baton's own"
    if TMP_INFIX in name:
        return f"names holding {TMP_INFIX!r} are temp files, deleted at every start"
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > 255:
        return "longer than 255 bytes"
    return None


# System directories an output dir must never be: pointed at one, the writer
# would put credentials where every user and tool looks and sweep its temp and
# version names there at every start. A non-empty dir that is not Baton's is
# refused by check_host anyway; this list also covers the ones that may be empty
# or missing on a given host (/srv, /mnt, /opt, /var/opt, ...).
SYSTEM_DIRS = frozenset(
    """
    / /bin /boot /dev /dev/shm /etc /home /lib /lib32 /lib64 /libx32 /lost+found /media /mnt /opt /root
    /run /run/lock /run/user /sbin /snap /srv /tmp /usr /usr/bin /usr/include /usr/lib /usr/lib64
    /usr/libexec /usr/local /usr/local/bin /usr/local/lib /usr/local/sbin /usr/sbin /usr/share /usr/src
    /var /var/backups /var/cache /var/lib /var/local /var/lock /var/log /var/mail /var/opt /var/run
    /var/spool /var/tmp
    """.split()  # noqa: SIM905 (a word per dir reads better than 48 quoted strings)
)
# Kernel file systems: nothing under them is a place for files.
VIRTUAL_ROOTS = ("/proc", "/sys")


def lexical(path: Path) -> Path:
    """``path`` made absolute and normalised without touching the disk (``a/../b`` -> ``b``)."""
    text = os.path.normpath(os.path.abspath(path))
    return Path("/" + text.lstrip("/"))  # POSIX keeps a leading "//"; it is "/"


def _under_virtual(path: Path) -> bool:
    return any(path == Path(root) or path.is_relative_to(root) for root in VIRTUAL_ROOTS)


def _output_dir(value: Any) -> Any:
    value = _path_text(value)
    if not isinstance(value, str | os.PathLike):
        return value  # pydantic names the type error
    path = Path(value)
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    norm = lexical(path)
    if str(norm) in SYSTEM_DIRS or _under_virtual(norm):
        raise ValueError(f"{str(norm)!r} is a system directory; use a directory of Baton's own")
    return norm


class Model(BaseModel):
    """Base: unknown keys are errors, values are frozen after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- stores


class LocalStoreConfig(Model):
    kind: Literal["local"] = "local"
    path: FilePath = Field(Path("./store.db"), description="SQLite database file of the embedded store.")


class VaultAuthConfig(Model):
    method: Literal["token", "token_file", "approle", "kubernetes"] = Field(
        "token", description="How to log in: token (VAULT_TOKEN env), token_file, approle, kubernetes."
    )
    token_file: FilePath | None = Field(None, description="File holding the token (method token_file).")
    role_id: NonEmpty | None = Field(None, description="AppRole role_id (method approle).")
    secret_id_file: FilePath | None = Field(None, description="File holding the AppRole secret_id.")
    role: NonEmpty | None = Field(None, description="Vault role for the kubernetes method.")
    jwt_file: FilePath = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="Service account token for the kubernetes method.",
    )
    mount: NonEmpty | None = Field(None, description="Auth mount path; default: the method's name.")


class VaultStoreConfig(Model):
    kind: Literal["vault"]
    url: HttpUrl = Field(description="Vault address, e.g. https://vault:8200.")
    mount: NonEmpty = Field("secret", description="KV v2 mount point.")
    namespace: NonEmpty | None = Field(None, description="Vault Enterprise namespace.")
    auth: VaultAuthConfig = Field(default_factory=VaultAuthConfig, description="Login method.")
    poll_interval: Duration = Field(30.0, description="How often to read KV metadata for a new version.")
    timeout: Duration = Field(10.0, description="Per-request timeout.")
    verify: bool | FilePath = Field(True, description="TLS verification: true, false or a CA bundle path.")
    reports: Literal["metadata", "status_path"] = Field(
        "metadata", description="Node reports in custom_metadata, or one KV entry per node."
    )
    status_prefix: NonEmpty = Field("baton/status", description="KV prefix for status_path reports.")
    lease_prefix: NonEmpty = Field("baton/lease", description="KV prefix of the rotators' leases (one per key).")
    retire: Literal["destroy", "delete"] = Field("destroy", description="How a retired version is removed.")


class AwsStoreConfig(Model):
    kind: Literal["aws"]
    region: NonEmpty = Field("us-east-1", description="AWS region.")
    endpoint_url: HttpUrl | None = Field(None, description="Custom endpoint (tests, VPC endpoints).")
    poll_interval: Duration = Field(30.0, description="How often to call DescribeSecret.")
    reports: Literal["tags", "dynamodb"] = Field(
        "tags", description="Node reports as per-node tags, or items in a DynamoDB table."
    )
    dynamodb_table: str | None = Field(None, description="Table for reports: dynamodb.")
    draining_label: NonEmpty = Field("BATON_DRAINING", description="Staging label kept on draining versions.")
    lease_prefix: NonEmpty = Field("baton-lease/", description="Name prefix of the rotators' lease secrets.")
    timeout: Duration = Field(10.0, description="Connect and read timeout of each AWS request.")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts per AWS request, retries included.")

    @model_validator(mode="after")
    def _table(self) -> AwsStoreConfig:
        if self.reports == "dynamodb" and not self.dynamodb_table:
            raise ValueError("reports: dynamodb needs dynamodb_table")
        return self


class KubernetesPodsConfig(Model):
    holders: bool = Field(
        True,
        description="The rotator watches the namespace's pods and counts each one that uses the credential's Secret "
        "(env, envFrom, secret or projected volumes, in containers and init containers) as a holder: a pod whose "
        "spec it cannot read counts as one (unknown is in use). Needs pods list/watch (manifests/rotator-rbac.yaml).",
    )
    rollouts: bool = Field(
        True,
        description="The leading rotator rolls every Deployment, StatefulSet, DaemonSet or Argo Rollout annotated "
        "baton.io/reload: <credential>[,...] once per new version, and retirement waits until the rollout is "
        "available. Needs list/watch/patch on those kinds.",
    )
    volume_sync_delay: Duration = Field(
        120.0,
        description="How long a running pod's plain secret volume may still show the old version: the kubelet "
        "refreshes it on its periodic sync (syncFrequency, default 1m) from its Secret cache (TTL default 1m), "
        "'kubelet sync period + cache propagation delay' "
        "(https://kubernetes.io/docs/concepts/configuration/secret/#using-secrets-as-files-from-a-pod, "
        "https://kubernetes.io/docs/reference/config-api/kubelet-config.v1beta1/). Raise it with those.",
    )
    start_margin: Duration = Field(
        5.0,
        description="A container whose environment (env, envFrom, subPath) was set up less than this after the "
        "Secret changed still counts as holding the old version: the kubelet reads it through its Secret cache.",
    )
    rollout_timeout: Duration = Field(
        600.0,
        description="A rollout not available this long after Baton asked for it is an event and a metric "
        "(baton_rollout_stuck); retirement keeps waiting for it.",
    )


class KubernetesStoreConfig(Model):
    kind: Literal["kubernetes"]
    namespace: NonEmpty | None = Field(None, description="Namespace of the Secrets; default: the pod's own.")
    kubeconfig: FilePath | None = Field(None, description="kubeconfig file; default: in-cluster config.")
    reports: Literal["secret", "pod"] = Field(
        "secret", description="Node reports as annotations on the Secret, or on the sidecar's own Pod."
    )
    pod_selector: NonEmpty = Field("baton.io/agent=true", description="Label selector of agent pods (rotator).")
    pods: KubernetesPodsConfig = Field(
        default_factory=KubernetesPodsConfig,
        description="The rotator's view of pods that use the Secrets natively, and Reloader-style rollouts.",
    )


StoreConfig = Annotated[
    LocalStoreConfig | VaultStoreConfig | AwsStoreConfig | KubernetesStoreConfig,
    Field(discriminator="kind"),
]

# ---------------------------------------------------------------- consumers


def _signal_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a signal name like SIGHUP")
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if not hasattr(signal.Signals, name):
        raise ValueError(f"unknown signal {value!r}")
    return name


SignalName = Annotated[str, BeforeValidator(_signal_name)]


def _exactly_one(model: BaseModel, what: str) -> None:
    chosen = [k for k, v in model if v is not None]
    if len(chosen) != 1:
        names = ", ".join(type(model).model_fields)
        raise ValueError(f"{what} needs exactly one of: {names}")


class MatchConfig(Model):
    pidfile: AbsPath | None = Field(None, description="File holding the consumer's main pid.")
    cmdline: str | None = Field(None, description="Regex searched in the joined command line.")
    exe: AbsPath | None = Field(None, description="Path of the executable.")
    systemd_unit: NonEmpty | None = Field(None, description="systemd unit whose cgroup holds the processes.")
    children: bool = Field(
        False,
        description="Also count the matched processes' descendants as holders (the workers of nginx, HAProxy, "
        "Apache: started before a swap, they hold the old version until they exit); reloads still go to the "
        "matched processes only.",
    )

    @field_validator("cmdline")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            pattern = re.compile(v)
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f"cmdline is not a valid regex: {e}") from None
        # A pattern that matches "" matches every process on the host, which
        # would all be signalled or restarted as this consumer.
        if pattern.search(""):
            raise ValueError("cmdline matches every process (it matches the empty string)")
        return v

    @model_validator(mode="after")
    def _one(self) -> MatchConfig:
        chosen = [k for k, v in self if v is not None and k != "children"]
        if len(chosen) != 1:
            raise ValueError("match needs exactly one of: pidfile, cmdline, exe, systemd_unit")
        return self


class RestartConfig(Model):
    stop_signal: SignalName = Field("SIGTERM", description="Signal that asks the process to stop.")
    timeout: Duration = Field(30.0, description="Wait this long before SIGKILL.")
    command: Argv | None = Field(None, description="argv to start it again (supervised restart).")


class RolloutConfig(Model):
    kind: Literal["Deployment", "StatefulSet", "DaemonSet", "Rollout"] = Field(
        "Deployment", description="Workload kind (Rollout: an Argo Rollout, restarted through spec.restartAt)."
    )
    name: NonEmpty = Field(description="Workload name.")
    namespace: NonEmpty | None = Field(None, description="Namespace; default: the pod's own.")
    timeout: Duration = Field(600.0, description="How long to wait for the rollout to become available.")
    kubeconfig: FilePath | None = Field(
        None, description="kubeconfig file; default: in-cluster config, else $KUBECONFIG (as kubectl)."
    )


class ReloadConfig(Model):
    signal: SignalName | None = Field(None, description="Send this signal to each process.")
    exec: Argv | None = Field(None, description="Run this argv (e.g. `nginx -s reload`).")
    restart: RestartConfig | None = Field(None, description="Stop each process; start it again if a command is set.")
    systemd: Literal["restart", "reload"] | None = Field(None, description="systemctl try-restart/reload the unit.")
    container_restart: dict[str, Any] | None = Field(None, description="Stop the container's main process.")
    rollout: RolloutConfig | None = Field(None, description="Rollout-restart a Kubernetes workload.")
    none: bool | None = Field(None, description="Do nothing (the consumer re-reads by itself).")

    @model_validator(mode="before")
    @classmethod
    def _none_string(cls, data: Any) -> Any:
        return {"none": True} if data in ("none", None) else data

    @model_validator(mode="after")
    def _one(self) -> ReloadConfig:
        _exactly_one(self, "reload")
        if self.exec is not None and not self.exec:
            raise ValueError("exec needs a non-empty argv")
        return self

    @property
    def action(self) -> str:
        return next(k for k, v in self if v is not None)

    @property
    def restarts(self) -> bool:
        """True when the action restarts the process (then ``min_restart_interval`` applies)."""
        return self.action in ("restart", "container_restart", "rollout") or self.systemd == "restart"


class HealthConfig(Model):
    alive_for: DurationOrZero | None = Field(None, description="Healthy when still running after this long.")
    http: HttpUrl | None = Field(None, description="Healthy when this URL answers 2xx.")
    timeout: Duration = Field(30.0, description="Give up (unhealthy) after this long.")

    @model_validator(mode="before")
    @classmethod
    def _default_check(cls, data: Any) -> Any:
        # Filled in before validation: an "after" validator returning a copy
        # makes pydantic warn (an error under the tests' filterwarnings).
        if isinstance(data, dict) and data.get("alive_for") is None and data.get("http") is None:
            return {**data, "alive_for": 2.0}
        return data

    @model_validator(mode="after")
    def _one(self) -> HealthConfig:
        if self.alive_for is not None and self.http is not None:
            raise ValueError("health needs one of: alive_for, http")
        return self


class ConsumerConfig(Model):
    name: NonEmpty = Field(description="Consumer name; the same name under two credentials is one consumer.")
    match: MatchConfig = Field(description="How to find the consumer's processes.")
    loads: Literal["at-start", "on-reload", "per-use"] = Field(
        "at-start", description="When it reads the credential: at start, on reload signal, on every use."
    )
    reload: ReloadConfig = Field(default_factory=lambda: ReloadConfig(none=True), description="Reload action.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health check after a reload.")
    min_restart_interval: DurationOrZero = Field(30.0, description="At most one restart per this interval.")


# ---------------------------------------------------------------- certificates (issuers/, providers/certificate.py)

_PKI_PATH = re.compile(
    r"(?P<mount>[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*)/(?P<mode>sign|issue)/[A-Za-z0-9_.-]+", re.ASCII
)
_DNS_NAME = re.compile(
    r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*",
    re.ASCII,
)


def _dns_name(v: str) -> str:
    if len(v) > 253 or not _DNS_NAME.fullmatch(v):
        raise ValueError(f"{v[:60]!r} is not a DNS name")
    return v.lower()


def _ip(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v[:60]!r} is not an IP address") from None


DnsName = Annotated[str, AfterValidator(_dns_name)]
IpText = Annotated[str, AfterValidator(_ip)]


class VaultIssuerConfig(Model):
    kind: Literal["vault"] = Field(description="An OpenBao/Vault PKI secrets engine.")
    path: str = Field(
        description="pki/sign/<role> (a CSR made on this node: the key never leaves it) or pki/issue/<role> "
        "(the CA makes the key, for CAs that require it); <mount>/revoke is derived from it."
    )
    url: HttpUrl | None = Field(None, description="Vault address; default: the store's (store.kind vault).")
    auth: VaultAuthConfig | None = Field(None, description="Login method; default: the store's.")
    namespace: NonEmpty | None = Field(None, description="Vault Enterprise namespace; default: the store's.")
    verify: bool | FilePath = Field(True, description="TLS verification of the Vault address: true, false, a CA file.")
    timeout: Duration = Field(10.0, description="Per-request timeout.")
    ca_file: FilePath | None = Field(None, description="A trusted root the issued chain must end at (else any chain).")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not _PKI_PATH.fullmatch(v) or any(p in (".", "..") for p in v.split("/")):
            raise ValueError("expected <mount>/sign/<role> or <mount>/issue/<role>, e.g. pki/sign/web")
        return v

    @property
    def mode(self) -> Literal["sign", "issue"]:
        m = _PKI_PATH.fullmatch(self.path)
        assert m is not None
        return "sign" if m.group("mode") == "sign" else "issue"

    @property
    def mount(self) -> str:
        m = _PKI_PATH.fullmatch(self.path)
        assert m is not None
        return m.group("mount")


class LocalCaIssuerConfig(Model):
    kind: Literal["local-ca"] = Field(description="A CA certificate and key on this node's disk.")
    cert_file: AbsPath = Field(description="The CA certificate (PEM).")
    key_file: AbsPath = Field(
        description="The CA's private key (PEM, unencrypted); read at each signing, never logged."
    )


class CertificateKeyConfig(Model):
    type: Literal["ec", "rsa", "ed25519"] = Field("ec", description="Key algorithm, generated on this node.")
    curve: Literal["p256", "p384", "p521"] = Field("p256", description="EC curve (type ec).")
    bits: Literal[2048, 3072, 4096] = Field(3072, description="RSA key size (type rsa).")


class CertificateConfig(Model):
    issuer: Annotated[VaultIssuerConfig | LocalCaIssuerConfig, Field(discriminator="kind")] = Field(
        description="Who signs: {kind: vault, path: pki/sign/web} or {kind: local-ca, cert_file, key_file}."
    )
    common_name: DnsName = Field(description="The certificate's CN (also its first DNS SAN).")
    alt_names: list[DnsName] = Field(default_factory=list, description="More DNS SANs.")
    ip_sans: list[IpText] = Field(default_factory=list, description="IP SANs.")
    ttl: Duration = Field(86400.0, ge=2.0, description="Lifetime asked for (the CA may cap it).")
    key: CertificateKeyConfig = Field(default_factory=CertificateKeyConfig, description="The private key.")
    renew_at: float = Field(0.67, gt=0, lt=1, description="Renew when this fraction of the lifetime has passed.")
    jitter: float = Field(
        0.05, ge=0, lt=0.5, description="Renew up to this fraction of the lifetime earlier, at random (fleets spread)."
    )
    revoke_retired: bool = Field(
        False, description="Revoke a superseded certificate at the CA once no process holds it."
    )

    @model_validator(mode="after")
    def _jitter(self) -> CertificateConfig:
        if self.jitter >= self.renew_at:
            raise ValueError(f"jitter ({self.jitter:g}) must be below renew_at ({self.renew_at:g})")
        return self


class CertificateGeneratorConfig(CertificateConfig):
    """``rotation.generator: {kind: certificate, ...}``: one certificate shared through the store (a TLS Secret)."""

    kind: Literal["certificate"] = Field(description="Generator kind: a certificate from a PKI or a local CA.")
    cert_field: NonEmpty = Field("tls.crt", description="Payload field (Secret key) of the certificate and its chain.")
    key_field: NonEmpty = Field("tls.key", description="Payload field (Secret key) of the private key.")
    ca_field: NonEmpty = Field("ca.crt", description="Payload field (Secret key) of the issuing CA.")


# ---------------------------------------------------------------- rotation


class GeneratorConfig(Model):
    kind: Literal["password"] = Field("password", description="Generator kind.")
    length: int = Field(32, ge=12, le=4096, description="Password length.")
    alphabet: Literal["alnum", "ascii", "hex"] = Field("alnum", description="Characters to draw from.")
    field: NonEmpty | None = Field(None, description="Put the password in this JSON field (others kept).")


class ProviderConfig(Model):
    kind: Literal["postgres"] = Field(description="Provider kind.")
    admin_dsn_file: FilePath = Field(description="File holding the admin DSN; read at use, never logged.")
    strategy: Literal["alternating-users", "role-per-version", "single-user"] = Field(
        "alternating-users", description="How versions map to database roles."
    )
    username: str = Field(description="Base role name.")
    grant_role: NonEmpty | None = Field(None, description="role-per-version: new login roles join this role.")
    host: NonEmpty | None = Field(None, description="Host written into the payload for consumers.")
    port: int | None = Field(None, ge=1, le=65535, description="Port written into the payload for consumers.")
    database: NonEmpty | None = Field(None, description="Database written into the payload for consumers.")

    @field_validator("username")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", v):
            raise ValueError("expected a lower-case SQL identifier")
        return v

    @model_validator(mode="after")
    def _grant_role_for_versions(self) -> ProviderConfig:
        # A role minted per version owns nothing; without a group role it could do nothing.
        if self.strategy == "role-per-version" and not self.grant_role:
            raise ValueError("strategy role-per-version needs grant_role")
        return self


class MysqlProviderConfig(Model):
    kind: Literal["mysql"] = Field(description="Provider kind: MySQL 8 / MariaDB accounts.")
    admin_dsn_file: FilePath = Field(
        description="File holding the admin DSN (mysql://user:password@host:port); read at use, never logged."
    )
    strategy: Literal["alternating-users", "dual-password"] = Field(
        "alternating-users",
        description="alternating-users: accounts <username>_a and _b; dual-password: one account keeping its "
        "old password (RETAIN CURRENT PASSWORD: MySQL 8.0.14+, refused by MariaDB).",
    )
    username: str = Field(description="Base account name (alternating-users adds _a and _b).")
    account_host: str = Field("%", description="The host part of Baton's accounts ('user'@'host').")
    grant_role: str | None = Field(None, description="A role granted to each account Baton creates, as its default.")
    host: NonEmpty | None = Field(None, description="Host written into the payload for consumers.")
    port: int | None = Field(None, ge=1, le=65535, description="Port written into the payload for consumers.")
    database: NonEmpty | None = Field(None, description="Database written into the payload for consumers.")

    @field_validator("username")
    @classmethod
    def _ident(cls, v: str) -> str:
        # 32 characters is MySQL 8's limit for a user name, with room for the _a / _b suffix.
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,29}", v):
            raise ValueError("expected a lower-case identifier of at most 30 characters")
        return v

    @field_validator("account_host")
    @classmethod
    def _account_host(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.%_:-]{1,255}", v):
            raise ValueError("expected a host name, address or pattern like % or 10.0.%")
        return v

    @field_validator("grant_role")
    @classmethod
    def _role(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,32}", v):
            raise ValueError("expected a role name (letters, digits, _)")
        return v


# Password and state rules are Baton's to set: a configured one would undo a rotation.
_REDIS_OWN_RULES = {"on", "off", "nopass", "resetpass", "reset"}


def _redis_rule(v: str) -> str:
    if not v or v.strip() != v or v.lower() in _REDIS_OWN_RULES or v[0] in "<>#!":
        raise ValueError(
            "expected a key, channel or command rule (~keys, &channels, +@category); "
            "passwords and on/off/nopass/reset are set by Baton"
        )
    return v


class RedisProviderConfig(Model):
    kind: Literal["redis"] = Field(description="Provider kind: Redis ACL users.")
    admin_url_file: FilePath = Field(
        description="File holding the admin URL (redis://user:password@host:port, or rediss://); "
        "read at use, never logged."
    )
    strategy: Literal["alternating-users", "dual-password"] = Field(
        "alternating-users",
        description="alternating-users: users <username>_a and _b; dual-password: one user, the old password "
        "kept beside the new one until retired.",
    )
    username: str = Field(description="Base ACL user name (alternating-users adds _a and _b).")
    acl_rules: list[Annotated[str, AfterValidator(_redis_rule)]] = Field(
        ["~*", "&*", "+@all"], description="ACL rules of the users Baton creates (ACL SETUSER syntax, one per item)."
    )
    host: NonEmpty | None = Field(None, description="Host written into the payload for consumers.")
    port: int | None = Field(None, ge=1, le=65535, description="Port written into the payload for consumers.")
    db: int | None = Field(None, ge=0, description="Database number written into the payload for consumers.")

    @field_validator("username")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", v):
            raise ValueError("expected a user name of letters, digits, '_', '-', '.'")
        return v


class AwsIamProviderConfig(Model):
    kind: Literal["aws-iam"] = Field(description="Provider kind: the access keys of one IAM user.")
    user_name: str = Field(description="The IAM user whose access keys rotate (at most two: AWS's limit).")
    region: NonEmpty = Field("us-east-1", description="Region of the STS call that tests a new key.")
    endpoint_url: HttpUrl | None = Field(None, description="Custom IAM and STS endpoint (tests, VPC endpoints).")
    delete_after: DurationOrZero = Field(
        86400.0, description="A retired key is made Inactive, and deleted once it has been Inactive this long."
    )
    idle_for: Duration = Field(
        3600.0, description="A superseded key used after the swap blocks retirement until unused this long."
    )
    propagation: DurationOrZero = Field(
        30.0, description="How long a new key may take to work (IAM is eventually consistent) before test fails."
    )
    timeout: Duration = Field(10.0, description="Connect and read timeout of each AWS request.")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts per AWS request, retries included.")

    @field_validator("user_name")
    @classmethod
    def _iam_name(cls, v: str) -> str:
        if not re.fullmatch(r"[\w+=,.@-]{1,64}", v, re.ASCII):
            raise ValueError("expected an IAM user name (1-64 of letters, digits and +=,.@_-)")
        return v


def _command_argv(v: list[str]) -> list[str]:
    if not v or not v[0].startswith("/"):
        raise ValueError("expected [absolute path of the executable, arguments...] (run without a shell)")
    if any("\0" in a for a in v):
        raise ValueError("an argument holds a NUL character")
    return v


class CommandProviderConfig(Model):
    kind: Literal["command"] = Field(description="Provider kind: a user-supplied executable per step.")
    command: Annotated[list[str], AfterValidator(_command_argv)] = Field(
        description="argv: the executable's absolute path, then arguments (the step name is appended); no shell."
    )
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str] = Field(
        default_factory=dict,
        description="Environment of the command besides PATH and LANG (never put a secret here: it is config).",
    )
    timeout: Duration = Field(30.0, description="Each step is killed (with its process group) after this long.")
    max_output: int = Field(65536, ge=256, le=16 << 20, description="Most bytes a step may print on stdout.")
    slots: int | None = Field(None, ge=2, description="How many credentials the system holds at once; none: no limit.")
    principal_field: NonEmpty | None = Field(
        None, description="Payload field naming what a credential stands for (token id, user); never the secret."
    )


AnyProviderConfig = Annotated[
    ProviderConfig | MysqlProviderConfig | RedisProviderConfig | AwsIamProviderConfig | CommandProviderConfig,
    Field(discriminator="kind"),
]


def _zone(value: str) -> str:
    zone(value)
    return value


CronText = Annotated[str, AfterValidator(check_cron)]
ZoneName = Annotated[str, AfterValidator(_zone)]
EveryDuration = Annotated[float, BeforeValidator(parse_duration), Field(ge=1.0)]


class NotDuringConfig(Model):
    start: CronText = Field(description='When each window opens, a cron expression ("0 9 * * 1-5").')
    duration: Duration = Field(description="How long each window lasts (8h).")


def _generator_kind(value: Any) -> str:
    kind = value.get("kind", "password") if isinstance(value, dict) else getattr(value, "kind", "password")
    return kind if kind in ("password", "certificate") else "password"


AnyGeneratorConfig = Annotated[
    Annotated[GeneratorConfig, Tag("password")] | Annotated[CertificateGeneratorConfig, Tag("certificate")],
    Discriminator(_generator_kind),
]


class RotationConfig(Model):
    every: EveryDuration | None = Field(None, description="Rotate this often (at least 1s); or cron.")
    cron: CronText | None = Field(
        None, description='Rotate at these times: 5-field cron ("0 3 * * 1-5") or @daily; or every.'
    )
    timezone: ZoneName = Field("UTC", description="IANA time zone that cron and not_during are read in.")
    window: Duration = Field(
        3600.0, description="With cron: how long after a cron time a rotation may still start (then the next time)."
    )
    jitter: DurationOrZero = Field(
        0.0, description="Start each rotation up to this much later (fixed per credential and time, spreads a fleet)."
    )
    not_during: list[NotDuringConfig] = Field(
        default_factory=list, description="Windows in which no rotation starts (moved to the window's end)."
    )
    generator: AnyGeneratorConfig | None = Field(
        None, description="Mint a value with no provider: a password (default) or a certificate (kind: certificate)."
    )
    provider: AnyProviderConfig | None = Field(None, description="Mint/apply/test/retire through a provider.")
    max_draining: int = Field(1, ge=1, description="Postpone a rotation while this many versions drain.")
    max_drain: Duration = Field(86400.0, description="Alert when a version drains longer than this.")
    min_drain: DurationOrZero = Field(
        0.0, description="Keep a superseded version at least this long (for clients that read, close, connect later)."
    )
    lease_ttl: Duration = Field(
        15.0, ge=0.3, description="The rotator's lease on this credential in the store: renewed every third of it."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_generator(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("generator") is None and data.get("provider") is None:
            return {**data, "generator": {}}
        gen = data.get("generator") if isinstance(data, dict) else None
        if isinstance(gen, dict) and gen.get("kind") == "certificate" and data.get("every") is data.get("cron") is None:
            # A certificate is rotated from its own lifetime: at renew_at of its ttl.
            try:
                every = parse_duration(gen.get("ttl", 86400.0)) * float(gen.get("renew_at", 0.67))
            except (ValueError, TypeError):
                return data  # the generator's own fields name the problem
            return {**data, "every": max(every, 1.0)}
        return data

    @model_validator(mode="after")
    def _source(self) -> RotationConfig:
        if self.generator is not None and self.provider is not None:
            raise ValueError("rotation needs one of: generator, provider")
        if (self.every is None) == (self.cron is None):
            raise ValueError("rotation needs one of: every, cron")
        return self

    def timing(self, name: str) -> Schedule:
        """When the credential ``name`` rotates (``daemon.schedule``)."""
        tz = zone(self.timezone)
        return Schedule(
            name=name,
            every=self.every,
            cron=Cron(self.cron, tz) if self.cron is not None else None,
            window=self.window,
            jitter=self.jitter,
            not_during=tuple(Blackout(Cron(w.start, tz), w.duration) for w in self.not_during),
        )


# ---------------------------------------------------------------- credentials


class OutputConfig(Model):
    dir: Annotated[Path, BeforeValidator(_output_dir)] = Field(
        description="Absolute path of a directory Baton owns, not a system one; holds the versions."
    )
    mode: FileMode = Field(0o400, description="File mode of credential files (octal string).")
    owner: str | int | None = Field(None, description="Owner of the files (name or uid).")
    group: str | int | None = Field(None, description="Group of the files (name or gid).")
    layout: Literal["symlink", "copy"] = Field("symlink", description="Versioned symlinks, or plain files.")
    files: dict[str, str] = Field(
        default_factory=lambda: {"value": "{{ value }}"}, description="File name -> Jinja2 template."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Env var -> template, for `baton exec`.")
    keep_previous: int = Field(
        1, ge=0, le=1000, description="Superseded versions kept on disk; older ones go once nothing holds them."
    )

    @field_validator("owner", "group", mode="before")
    @classmethod
    def _id(cls, v: Any) -> Any:
        # A name is looked up on the host by check_host; a number is taken as is
        # (containers run as uids without a passwd entry), but -1 means "leave
        # unchanged" to chown and 4294967295 is the same -1.
        if isinstance(v, bool) or (isinstance(v, int) and not 0 <= v < 2**32 - 1):
            raise ValueError("expected a name, or a uid/gid from 0 to 4294967294")
        if isinstance(v, str) and not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if (why := file_name_problem(name)) is not None:
                raise ValueError(f"bad file name {name!r}: {why}")
        if not v:
            raise ValueError("at least one file is needed")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
                raise ValueError(f"bad env var name {name!r}: expected letters, digits and '_', not a digit first")
        return v


_LEASE_PATH = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*", re.ASCII)


def _lease_path(v: str) -> str:
    # Joined into /v1/<path>: no empty, "." or ".." segment, no query or odd characters.
    if not _LEASE_PATH.fullmatch(v) or any(part in (".", "..") for part in v.split("/")) or len(v) > 512:
        raise ValueError("expected a Vault path like database/creds/app (letters, digits, '_', '-', '.', '/')")
    return v


class LeaseConfig(Model):
    path: Annotated[str, AfterValidator(_lease_path)] = Field(
        description="Vault path whose read returns a leased secret for this node (database/creds/app)."
    )
    renew_at: float = Field(
        0.67, gt=0, lt=1, description="Renew a lease when this fraction of its current duration has passed."
    )
    rotate_before: float = Field(
        0.33, gt=0, lt=1, description="Get a new lease when less than this fraction of its max lifetime is left."
    )
    max_ttl: Duration | None = Field(
        None,
        description="The lease's max lifetime if known (the role's max_ttl); default: learned from a capped renewal.",
    )
    warn_before: Duration = Field(
        60.0, description="A lease still held this close to its max TTL is an event and a metric (lease_expiring)."
    )
    revoke_retry_max: Duration = Field(60.0, description="Longest wait between attempts to revoke a released lease.")


# The fields that make a credential issued to this node (daemon/issuers/) instead of read from the store.
ISSUED_KINDS = ("lease", "certificate")


class CredentialConfig(Model):
    name: CredentialName = Field(description="Credential name, unique.")
    key: NonEmpty = Field(
        description="The secret's key in the store; for an issued credential (lease:, certificate:) optional, "
        "default its name, where its node reports go."
    )
    required: bool = Field(True, description="/readyz waits for it.")
    output: OutputConfig = Field(description="Where and how the files are written.")
    consumers: list[ConsumerConfig] = Field(default_factory=list, description="Processes that use it.")
    rotation: RotationConfig | None = Field(None, description="Rotator role: how and when to rotate.")
    lease: LeaseConfig | None = Field(
        None, description="Issued to this node as a Vault lease (dynamic secret), renewed and revoked by the agent."
    )
    certificate: CertificateConfig | None = Field(
        None,
        description="Issued to this node as an X.509 certificate (key made here, CSR signed by a PKI or a local CA), "
        "renewed from its own lifetime by the agent.",
    )

    @model_validator(mode="before")
    @classmethod
    def _issued_key(cls, data: Any) -> Any:
        # An issued credential has no key in the store; its name files its node reports.
        if isinstance(data, dict) and "key" not in data and any(data.get(k) is not None for k in ISSUED_KINDS):
            return {**data, "key": data.get("name")}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> CredentialConfig:
        kinds = [k for k in ISSUED_KINDS if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"a credential is issued one way: choose one of {', '.join(kinds)}")
        if kinds and self.rotation is not None:
            raise ValueError(f"an issued credential ({kinds[0]}:) is renewed by the agent; remove rotation")
        return self

    def issued_kind(self) -> str | None:
        """The issuer kind (a key of ``kit.plugins.ISSUERS``) when this node issues it, else None (the store's)."""
        return next((k for k in ISSUED_KINDS if getattr(self, k) is not None), None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError("expected letters, digits, '-', '_', '.' (max 63)")
        return v


# ---------------------------------------------------------------- daemon


class ApiConfig(Model):
    listen: str = Field("127.0.0.1:8787", description='"host:port" or "unix:/path".')
    token_file: FilePath | None = Field(None, description="Token needed for state-changing calls.")
    runtime_dir: AbsPath = Field(
        Path("/run/baton-rotator"),  # the rotator unit's RuntimeDirectory= (systemd/baton-rotator.service)
        description="Without token_file: the rotator makes its token here (0600, rotator.token) for baton rotate.",
    )
    max_connections: int = Field(256, ge=1, le=4096, description="Connections held at once; full: drop an idle one.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            path = v[5:]
            if not path.startswith("/") or "\0" in path:
                raise ValueError("unix: needs an absolute path")
            if len(path.encode(errors="replace")) > 107:  # sun_path holds 108 bytes with the NUL
                raise ValueError("a unix socket path is at most 107 bytes")
            return v
        host, sep, port = v.rpartition(":")
        if (
            not sep
            or not host.strip("[]")
            or any(c.isspace() or c in "/\0" for c in host)
            or not re.fullmatch(r"[0-9]{1,5}", port)
            # Port 0 asks the kernel for a free port (the demo and the tests; the
            # bound address is in the agent_started event and the status).
            or not 0 <= int(port) < 65536
        ):
            raise ValueError('expected "host:port" (port 0-65535) or "unix:/path"')
        return v

    @property
    def unix_path(self) -> Path | None:
        return Path(self.listen[5:]) if self.listen.startswith("unix:") else None


class ReportConfig(Model):
    heartbeat: Duration = Field(30.0, description="Publish the node report at least this often.")
    ttl: Duration | None = Field(None, description="A report older than this is stale; default 3 heartbeats.")
    max_holders: int = Field(10, ge=0, le=100, description="Holder summaries per report.")
    forget_after: Duration | None = Field(None, description="Forget a node silent this long (default: never).")
    drain_poll: Duration = Field(
        0.25,
        le=60,
        description="While a version drains, the rotator re-reads node reports and sessions this often "
        "(pausing at least as long as a pass took).",
    )

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: float | None, info: ValidationInfo) -> float | None:
        heartbeat = info.data.get("heartbeat")
        if v is not None and heartbeat is not None and v <= heartbeat:
            raise ValueError(f"must be longer than report.heartbeat ({heartbeat:g}s), or every report goes stale")
        return v

    @field_validator("forget_after")
    @classmethod
    def _forget_after(cls, v: float | None, info: ValidationInfo) -> float | None:
        # Forgetting a node between two of its heartbeats drops a live node's
        # holders from the gate: its old version could be retired under it.
        heartbeat, ttl = info.data.get("heartbeat"), info.data.get("ttl")
        if v is None or heartbeat is None or "ttl" not in info.data:
            return v
        stale = ttl if ttl is not None else 3 * heartbeat
        if v <= stale:
            raise ValueError(f"must be longer than the report TTL ({stale:g}s), or live nodes are forgotten")
        return v

    @property
    def report_ttl(self) -> float:
        return self.ttl if self.ttl is not None else 3 * self.heartbeat


class AgentConfig(Model):
    debounce: DurationOrZero = Field(2.0, description="Wait this long for more changes before reloading.")
    scan_interval: Duration = Field(5.0, description="How often to rescan processes for holders.")
    drain_rescan: Duration = Field(
        0.25,
        le=60,
        description="While a version drains, look again at just its holders this often, less while none lets go "
        "(exits: at once).",
    )
    fanotify: Literal["auto", "off"] = Field("auto", description="Use fanotify open events when allowed.")
    retry_min: Duration = Field(1.0, description="First retry delay after a store error.")
    retry_max: Duration = Field(300.0, description="Longest retry delay after repeated store errors.")
    render_timeout: Duration = Field(
        2.0, gt=0, le=60, description="Longest a version's templates may render; past it the version is rejected."
    )
    max_file_size: int = Field(
        1 << 20, ge=1024, le=16 << 20, description="Largest rendered file or env value, in bytes; over it: rejected."
    )
    state_dir: AbsPath = Field(
        Path("/var/lib/baton"),
        description="Where issuers keep their 0600 state files (lease ids); must survive restarts, unlike /run.",
    )

    @field_validator("retry_max")
    @classmethod
    def _retry_max(cls, v: float, info: ValidationInfo) -> float:
        retry_min = info.data.get("retry_min")
        if retry_min is not None and v < retry_min:
            raise ValueError(f"must be at least agent.retry_min ({retry_min:g}s)")
        return v


# ---------------------------------------------------------------- notifications

# The events a notification sink is told of (``notify[].events`` picks some).
NOTIFY_EVENTS = (
    "rotated",
    "rotation_failed",
    "retired",
    "retirement_pending_too_long",
    "force_retired",
    "lease_expiring",  # issuers/lease.py: a lease still held close to its max TTL
    "certificate_not_renewed",  # issuers/certificate.py: the renewal failed; it names expires_in
)


def _events(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    unknown = sorted(set(v) - set(NOTIFY_EVENTS))
    if unknown:
        raise ValueError(f"unknown event(s) {', '.join(map(repr, unknown))}; known: {', '.join(NOTIFY_EVENTS)}")
    if not v:
        raise ValueError("an empty list would send nothing: leave it out for every event")
    return v


NotifyEvents = Annotated[list[str] | None, AfterValidator(_events)]


class WebhookNotifyConfig(Model):
    kind: Literal["webhook"] = Field(description="POST each event to an HTTP(S) endpoint.")
    url: NonEmpty = Field(description="http(s)://host[:port]/path; no user:password@ (use secret_file to sign).")
    secret_file: FilePath | None = Field(
        None, description="HMAC-SHA256 key: each body is signed in X-Baton-Signature (sha256=<hex>)."
    )
    format: Literal["json", "slack"] = Field("json", description="json: the event as an object; slack: {text: ...}.")
    events: NotifyEvents = Field(None, description="Only these events (default: every one in NOTIFY_EVENTS).")
    timeout: Duration = Field(5.0, le=60, description="One delivery attempt's limit.")
    retries: int = Field(5, ge=0, le=20, description="Attempts after the first, with backoff; then dropped, counted.")
    queue: int = Field(100, ge=1, le=10000, description="Events waiting for delivery; when full, new ones are dropped.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("no user:password@ in the URL (it would be a secret in the config); sign with secret_file")
        try:
            parts.port  # noqa: B018 (raises on a port that is not a number from 0 to 65535)
        except ValueError:
            raise ValueError("the port is a number from 0 to 65535") from None
        if any(c.isspace() or ord(c) < 32 for c in v):
            raise ValueError("no spaces or control characters in the URL")
        return v


class KubernetesEventsNotifyConfig(Model):
    kind: Literal["kubernetes-events"] = Field(
        description="A core/v1 Event on this Pod (POD_NAME/POD_NAMESPACE) per event (sidecar/events.py)."
    )
    events: NotifyEvents = Field(None, description="Only these events (default: every one in NOTIFY_EVENTS).")
    kubeconfig: FilePath | None = Field(None, description="Kubeconfig file; default: in-cluster, then ~/.kube/config.")
    queue: int = Field(100, ge=1, le=10000, description="Events waiting for delivery; when full, new ones are dropped.")
    retries: int = Field(3, ge=0, le=20, description="Attempts after the first, with backoff; then dropped, counted.")


NotifyConfig = Annotated[WebhookNotifyConfig | KubernetesEventsNotifyConfig, Field(discriminator="kind")]


class LogConfig(Model):
    format: Literal["json", "text"] = Field("text", description="Log line format.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum level.")


class Config(Model):
    node_id: NodeId = Field(
        default_factory=lambda: NodeId(socket.gethostname()),
        validate_default=True,
        description="This node's id: letters, digits, '.', '_', '-' (not '.' first), max 253; default: host name.",
    )
    store: StoreConfig = Field(default_factory=LocalStoreConfig, description="The secret store.")
    api: ApiConfig = Field(default_factory=ApiConfig, description="Local endpoint.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Node reports.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Agent tuning.")
    credentials: list[CredentialConfig] = Field(description="Credentials to deliver.")
    notify: list[NotifyConfig] = Field(
        default_factory=list, description="Where the events that matter are sent (webhook, kubernetes-events)."
    )

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> NodeId:
        # The id names report keys, tags, annotations and status entries in the
        # store: a path-like or odd one could land on another node's entry.
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,252}", v):
            raise ValueError("expected letters, digits, '.', '_', '-', not '.' first, max 253 (default: the host name)")
        return NodeId(v)

    @model_validator(mode="after")
    def _unique(self) -> Config:
        problems: list[str] = []
        names: set[str] = set()
        dirs: dict[Path, int] = {}
        above: dict[Path, int] = {}  # every ancestor of a dir seen so far
        consumers: dict[str, ConsumerConfig] = {}
        for i, cred in enumerate(self.credentials):
            if cred.name in names:
                problems.append(f"credentials.{i}.name: duplicate credential name {cred.name!r}")
            names.add(cred.name)
            # One writer per dir, and none inside another's: a writer owns its
            # whole dir (chmod, ..-names, temp clean-up at start).
            d = lexical(cred.output.dir)
            inside = next((dirs[p] for p in d.parents if p in dirs), None)
            if d in dirs:
                problems.append(f"credentials.{i}.output.dir: same output dir as credentials.{dirs[d]}")
            elif inside is not None:
                problems.append(f"credentials.{i}.output.dir: inside the output dir of credentials.{inside}")
            elif d in above:
                problems.append(f"credentials.{i}.output.dir: contains the output dir of credentials.{above[d]}")
            dirs.setdefault(d, i)
            for p in d.parents:
                above.setdefault(p, i)
            if cred.lease is not None and self.store.kind != "vault":
                problems.append(f"credentials.{i}.lease: needs store kind vault (store.kind is {self.store.kind})")
            gen = cred.rotation.generator if cred.rotation is not None else None
            gen_issuer = gen.issuer if isinstance(gen, CertificateGeneratorConfig) else None
            if isinstance(gen_issuer, VaultIssuerConfig) and gen_issuer.url is None:
                problems.append(f"credentials.{i}.rotation.generator.issuer.url: the rotator's generator needs one")
            cert_issuer = cred.certificate.issuer if cred.certificate is not None else None
            if isinstance(cert_issuer, VaultIssuerConfig) and cert_issuer.url is None and self.store.kind != "vault":
                problems.append(
                    f"credentials.{i}.certificate.issuer.url: needed unless the store is vault (store.kind is "
                    f"{self.store.kind})"
                )
            if cred.rotation is not None and (never := cred.rotation.timing(cred.name).never_fires(time.time())):
                problems.append(f"credentials.{i}.rotation.{never[0]}: {never[1]}")
            if self.store.kind == "kubernetes" and cred.rotation is not None and cred.rotation.max_draining > 1:
                problems.append(
                    f"credentials.{i}.rotation.max_draining: the kubernetes store keeps one previous version; use 1"
                )
            for j, cons in enumerate(cred.consumers):
                seen = consumers.setdefault(cons.name, cons)
                if seen != cons:
                    problems.append(
                        f"credentials.{i}.consumers.{j}: consumer {cons.name!r} is declared twice differently"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def credential(self, name: str) -> CredentialConfig:
        for cred in self.credentials:
            if cred.name == name:
                return cred
        raise KeyError(name)


# ---------------------------------------------------------------- loading

_TAGS = {"local", "vault", "aws", "kubernetes"}
_PROVIDER_TAGS = {"postgres", "mysql", "redis", "aws-iam", "command"}
_NAMED = re.compile(r"^[\w.]+: ")


def path_part(p: int | str) -> str:
    """One component of a field path, quoted when the file's key is not a plain name."""
    # A key from the file (a file name, an unknown key) may hold anything, a
    # newline or ": " included: quote it then, so a problem stays one line.
    text = str(p)
    plain = len(text) <= 60 and re.fullmatch(r"[\w-]+(?:\.[\w-]+)*", text)  # "db.json", not "." or "a."
    return text if plain else repr(text)[:62]


def _path(loc: tuple[int | str, ...]) -> str:
    tags = {"store": _TAGS, "provider": _PROVIDER_TAGS}
    parts = [path_part(p) for i, p in enumerate(loc) if not (i > 0 and p in tags.get(str(loc[i - 1]), ()))]
    return ".".join(parts)


# A config holds no secret values, but an operator may paste one where it does
# not belong: into a template, the auth section, a field named like a secret, or
# a key that does not exist. The values found there are never echoed.
# A misplaced ">password" ACL rule is not echoed, nor a webhook URL (a Slack hook's path is its secret).
_QUIET_KEYS = {"files", "env", "auth", "acl_rules", "url"}
_QUIET_WORDS = ("token", "secret", "passw", "dsn", "jwt", "private", "api_key", "apikey")


def _quiet(loc: tuple[int | str, ...]) -> bool:
    return any(isinstance(p, str) and (p in _QUIET_KEYS or any(w in p.lower() for w in _QUIET_WORDS)) for p in loc)


def _shown(value: Any) -> str:
    # Only scalars are echoed, shortened: a dump of a whole mapping would be unreadable.
    if isinstance(value, str | int | float | bool):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return ""


def format_errors(err: ValidationError) -> list[str]:
    lines: list[str] = []
    for e in err.errors(include_url=False):
        msg = str(e["msg"]).removeprefix("Value error, ")
        path = _path(tuple(e["loc"])) or "(top level)"
        if "\n" in msg or (not e["loc"] and _NAMED.match(msg)):  # our own validators already name paths
            lines.extend(m if ":" in m.split(" ")[0] else f"{path}: {m}" for m in msg.splitlines())
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        quiet = e["type"] in ("missing", "extra_forbidden") or _quiet(tuple(e["loc"]))
        shown = "" if quiet else _shown(e.get("input"))
        lines.append(f"{path}: {msg}" + (f" (got {shown})" if shown else ""))
    return lines


def parse_config(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping"])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e)) from None


def load_config(path: str | os.PathLike[str], *, more: Callable[[Config], list[str]] | None = None) -> Config:
    """Read and validate a YAML config, then check it against this host (``check_host``)
    and with ``more`` (checks of layers above this one: the templates).

    Raises ``ConfigError`` naming every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or "unreadable").split())
        raise ConfigError([f"{path}:{where} invalid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from None
    try:
        config = parse_config(data)
    except RecursionError:
        raise ConfigError(["(top level): nested too deeply"]) from None
    problems = check_host(config) + (more(config) if more is not None else [])
    if problems:
        raise ConfigError(problems)
    return config


# ---------------------------------------------------------------- checks against this host


def _ancestor_problem(path: Path) -> str | None:
    """The nearest existing ancestor of a path still to be created must be a directory."""
    for parent in path.parents:
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None  # not ours to see (permissions): the agent's own open decides
        return None if stat.S_ISDIR(st.st_mode) else f"{parent} is not a directory"
    return None


def store_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be the embedded store's database file, or None.

    It may not exist yet (the store creates it and its parents), but it must not
    be empty, a directory, anything but a regular file, on /proc or /sys, or
    under something that is not a directory."""
    text = os.fspath(path)
    if not text:
        return "must not be empty"
    if "\0" in text:
        return "must not contain a NUL byte"
    if _under_virtual(lexical(Path(text))):
        return f"{text} is on a kernel file system"
    try:
        st = os.stat(text)
    except (FileNotFoundError, NotADirectoryError):
        return _ancestor_problem(Path(text))
    except PermissionError:
        return None  # an operator checking the agent's config: the agent's own open decides
    except OSError as e:
        return f"{text}: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return f"{text} is a directory; give the database file's path"
    if not stat.S_ISREG(st.st_mode):
        return f"{text} is not a regular file"
    return None


def _batons(name: str, files: set[str]) -> bool:
    """A name the writer makes (as ``Writer._ours`` in daemon/files/writer.py): its own
    files, version dirs, temp files and the credential files."""
    return name in (STATE_FILE, LOCK_FILE, "..current") or name in files or bool(_WRITER_NAME.fullmatch(name))


def output_dir_problem(path: Path, files: set[str]) -> str | None:
    """Why Baton must not take ``path`` as an output dir, or None.

    A missing dir is fine (the writer creates it). An existing one must be a real
    directory (not a symlink) that is Baton's, as the writer decides: it holds the
    writer's lock file, or nothing but entries the writer makes (empty, or a first
    write interrupted before the lock)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return _ancestor_problem(path)
    except PermissionError:
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink; Baton never writes through one"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} exists and is not a directory"
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except PermissionError:
        return None  # the agent, running as its own user, checks again when it writes
    except OSError as e:
        return f"{path}: {e.strerror}"
    if any(e.name == LOCK_FILE for e in entries):
        return None
    foreign = sorted(e.name for e in entries if not _batons(e.name, files))
    if foreign:
        return (
            f"{path} is a non-empty directory Baton did not create (it holds {foreign[0]!r}"
            f" and no {LOCK_FILE}); use a new or empty directory"
        )
    return None


def _id_problem(value: str | int | None, *, group: bool) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        (grp.getgrnam if group else pwd.getpwnam)(value)
    except (KeyError, ValueError):
        return f"no such {'group' if group else 'user'} {value!r} on this host"
    return None


def check_host(config: Config) -> list[str]:
    """What the config asks of this host that the host cannot give, one line per field.

    Kept apart from the models because it reads the file system and the user
    database: ``parse_config`` stays pure (the demo and the tests build configs
    for paths that do not exist yet)."""
    problems: list[str] = []
    if config.store.kind == "local" and (why := store_path_problem(config.store.path)):
        problems.append(f"store.path: {why}")
    if (sock := config.api.unix_path) is not None:
        try:
            if not stat.S_ISSOCK(os.lstat(sock).st_mode):
                problems.append(f"api.listen: {sock} exists and is not a socket; Baton will not replace it")
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            pass
        except OSError as e:
            problems.append(f"api.listen: {sock}: {e.strerror}")
    for i, cred in enumerate(config.credentials):
        out = cred.output
        if (why := output_dir_problem(out.dir, set(out.files))) is not None:
            problems.append(f"credentials.{i}.output.dir: {why}")
        if (why := _id_problem(out.owner, group=False)) is not None:
            problems.append(f"credentials.{i}.output.owner: {why}")
        if (why := _id_problem(out.group, group=True)) is not None:
            problems.append(f"credentials.{i}.output.group: {why}")
    for i, sink in enumerate(config.notify):
        key = getattr(sink, "secret_file", None)
        if key is not None and not os.access(key, os.R_OK):
            problems.append(f"notify.{i}.secret_file: {key} cannot be read")
    return problems
