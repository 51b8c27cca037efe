"""The configuration: pydantic models of the YAML file, and the one place for defaults.

Loading validates everything once; an invalid file raises ``ConfigError`` with
one line per problem, each naming the field path (``credentials.0.output.mode``)
and the bad value. The config never holds a secret value itself: secrets are
referenced by file path (``admin_dsn_file``, ``token_file``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"1h"``, ``"250ms"``, ``2`` (seconds) -> seconds as float."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError("expected a duration like 30s, 5m, 1h")


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _parse_mode(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML reads 0440 as the octal int 288 only with YAML 1.1 `0o`; a bare
        # int here is taken as already numeric.
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        mode = int(value, 8)
    else:
        raise ValueError('expected an octal file mode like "0440"')
    if mode & 0o7000 or mode & 0o111:
        raise ValueError("a credential file must not be executable, setuid or sticky")
    if mode & 0o002:
        raise ValueError("a credential file must not be world-writable")
    return mode


FileMode = Annotated[int, BeforeValidator(_parse_mode)]


class Model(BaseModel):
    """Base: unknown keys are errors, values are frozen after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- stores


class LocalStoreConfig(Model):
    kind: Literal["local"] = "local"
    path: Path = Field(Path("./store.db"), description="SQLite database file of the embedded store.")


class VaultAuthConfig(Model):
    method: Literal["token", "token_file", "approle", "kubernetes"] = Field(
        "token", description="How to log in: token (VAULT_TOKEN env), token_file, approle, kubernetes."
    )
    token_file: Path | None = Field(None, description="File holding the token (method token_file).")
    role_id: str | None = Field(None, description="AppRole role_id (method approle).")
    secret_id_file: Path | None = Field(None, description="File holding the AppRole secret_id.")
    role: str | None = Field(None, description="Vault role for the kubernetes method.")
    jwt_file: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="Service account token for the kubernetes method.",
    )
    mount: str | None = Field(None, description="Auth mount path; default: the method's name.")


class VaultStoreConfig(Model):
    kind: Literal["vault"]
    url: str = Field(description="Vault address, e.g. https://vault:8200.")
    mount: str = Field("secret", description="KV v2 mount point.")
    namespace: str | None = Field(None, description="Vault Enterprise namespace.")
    auth: VaultAuthConfig = Field(default_factory=VaultAuthConfig, description="Login method.")
    poll_interval: Duration = Field(30.0, description="How often to read KV metadata for a new version.")
    timeout: Duration = Field(10.0, description="Per-request timeout.")
    verify: bool | Path = Field(True, description="TLS verification: true, false or a CA bundle path.")
    reports: Literal["metadata", "status_path"] = Field(
        "metadata", description="Node reports in custom_metadata, or one KV entry per node."
    )
    status_prefix: str = Field("baton/status", description="KV prefix for status_path reports.")
    retire: Literal["destroy", "delete"] = Field("destroy", description="How a retired version is removed.")


class AwsStoreConfig(Model):
    kind: Literal["aws"]
    region: str = Field("us-east-1", description="AWS region.")
    endpoint_url: str | None = Field(None, description="Custom endpoint (tests, VPC endpoints).")
    poll_interval: Duration = Field(30.0, description="How often to call DescribeSecret.")
    reports: Literal["tags", "dynamodb"] = Field(
        "tags", description="Node reports as per-node tags, or items in a DynamoDB table."
    )
    dynamodb_table: str | None = Field(None, description="Table for reports: dynamodb.")
    draining_label: str = Field("BATON_DRAINING", description="Staging label kept on draining versions.")
    timeout: Duration = Field(10.0, description="Connect and read timeout of each AWS request.")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts per AWS request, retries included.")

    @model_validator(mode="after")
    def _table(self) -> AwsStoreConfig:
        if self.reports == "dynamodb" and not self.dynamodb_table:
            raise ValueError("reports: dynamodb needs dynamodb_table")
        return self


class KubernetesStoreConfig(Model):
    kind: Literal["kubernetes"]
    namespace: str | None = Field(None, description="Namespace of the Secrets; default: the pod's own.")
    kubeconfig: Path | None = Field(None, description="kubeconfig file; default: in-cluster config.")
    reports: Literal["secret", "pod"] = Field(
        "secret", description="Node reports as annotations on the Secret, or on the sidecar's own Pod."
    )
    pod_selector: str = Field("baton.io/agent=true", description="Label selector of agent pods (rotator).")


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
    pidfile: Path | None = Field(None, description="File holding the consumer's main pid.")
    cmdline: str | None = Field(None, description="Regex searched in the joined command line.")
    exe: Path | None = Field(None, description="Path of the executable.")
    systemd_unit: str | None = Field(None, description="systemd unit whose cgroup holds the processes.")

    @model_validator(mode="after")
    def _one(self) -> MatchConfig:
        _exactly_one(self, "match")
        if self.cmdline is not None:
            try:
                re.compile(self.cmdline)
            except re.error as e:
                raise ValueError(f"cmdline is not a valid regex: {e}") from None
        return self


class RestartConfig(Model):
    stop_signal: SignalName = Field("SIGTERM", description="Signal that asks the process to stop.")
    timeout: Duration = Field(30.0, description="Wait this long before SIGKILL.")
    command: list[str] | None = Field(None, description="argv to start it again (supervised restart).")


class RolloutConfig(Model):
    kind: Literal["Deployment", "StatefulSet", "DaemonSet"] = Field("Deployment", description="Workload kind.")
    name: str = Field(description="Workload name.")
    namespace: str | None = Field(None, description="Namespace; default: the pod's own.")
    timeout: Duration = Field(600.0, description="How long to wait for the rollout to become available.")
    kubeconfig: Path | None = Field(
        None, description="kubeconfig file; default: in-cluster config, else $KUBECONFIG (as kubectl)."
    )


class ReloadConfig(Model):
    signal: SignalName | None = Field(None, description="Send this signal to each process.")
    exec: list[str] | None = Field(None, description="Run this argv (e.g. `nginx -s reload`).")
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
    alive_for: Duration | None = Field(None, description="Healthy when still running after this long.")
    http: str | None = Field(None, description="Healthy when this URL answers 2xx.")
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
    name: str = Field(description="Consumer name; the same name under two credentials is one consumer.")
    match: MatchConfig = Field(description="How to find the consumer's processes.")
    loads: Literal["at-start", "on-reload", "per-use"] = Field(
        "at-start", description="When it reads the credential: at start, on reload signal, on every use."
    )
    reload: ReloadConfig = Field(default_factory=lambda: ReloadConfig(none=True), description="Reload action.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health check after a reload.")
    min_restart_interval: Duration = Field(30.0, description="At most one restart per this interval.")


# ---------------------------------------------------------------- rotation


class GeneratorConfig(Model):
    kind: Literal["password"] = Field("password", description="Generator kind.")
    length: int = Field(32, ge=12, le=4096, description="Password length.")
    alphabet: Literal["alnum", "ascii", "hex"] = Field("alnum", description="Characters to draw from.")
    field: str | None = Field(None, description="Put the password in this JSON field (others kept).")


class ProviderConfig(Model):
    kind: Literal["postgres"] = Field(description="Provider kind.")
    admin_dsn_file: Path = Field(description="File holding the admin DSN; read at use, never logged.")
    strategy: Literal["alternating-users", "role-per-version", "single-user"] = Field(
        "alternating-users", description="How versions map to database roles."
    )
    username: str = Field(description="Base role name.")
    grant_role: str | None = Field(None, description="role-per-version: new login roles join this role.")
    host: str | None = Field(None, description="Host written into the payload for consumers.")
    port: int | None = Field(None, description="Port written into the payload for consumers.")
    database: str | None = Field(None, description="Database written into the payload for consumers.")

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


class RotationConfig(Model):
    every: Duration = Field(description="Rotate this often.")
    generator: GeneratorConfig | None = Field(None, description="Mint a random value (no provider).")
    provider: ProviderConfig | None = Field(None, description="Mint/apply/test/retire through a provider.")
    max_draining: int = Field(1, ge=1, description="Postpone a rotation while this many versions drain.")
    max_drain: Duration = Field(86400.0, description="Alert when a version drains longer than this.")
    min_drain: Duration = Field(
        0.0, description="Keep a superseded version at least this long (for clients that read, close, connect later)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_generator(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("generator") is None and data.get("provider") is None:
            return {**data, "generator": {}}
        return data

    @model_validator(mode="after")
    def _source(self) -> RotationConfig:
        if self.generator is not None and self.provider is not None:
            raise ValueError("rotation needs one of: generator, provider")
        return self


# ---------------------------------------------------------------- credentials


class OutputConfig(Model):
    dir: Path = Field(description="Directory owned by Baton that holds the versions.")
    mode: FileMode = Field(0o400, description="File mode of credential files (octal string).")
    owner: str | int | None = Field(None, description="Owner of the files (name or uid).")
    group: str | int | None = Field(None, description="Group of the files (name or gid).")
    layout: Literal["symlink", "copy"] = Field("symlink", description="Versioned symlinks, or plain files.")
    files: dict[str, str] = Field(
        default_factory=lambda: {"value": "{{ value }}"}, description="File name -> Jinja2 template."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Env var -> template, for `baton exec`.")

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name or "/" in name or name in (".", "..") or name.startswith(".."):
                raise ValueError(f"bad file name {name!r}: no '/', no leading '..'")
        if not v:
            raise ValueError("at least one file is needed")
        return v


class CredentialConfig(Model):
    name: str = Field(description="Credential name, unique.")
    key: str = Field(description="The secret's key in the store.")
    required: bool = Field(True, description="/readyz waits for it.")
    output: OutputConfig = Field(description="Where and how the files are written.")
    consumers: list[ConsumerConfig] = Field(default_factory=list, description="Processes that use it.")
    rotation: RotationConfig | None = Field(None, description="Rotator role: how and when to rotate.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError("expected letters, digits, '-', '_', '.' (max 63)")
        return v


# ---------------------------------------------------------------- daemon


class ApiConfig(Model):
    listen: str = Field("127.0.0.1:8787", description='"host:port" or "unix:/path".')
    token_file: Path | None = Field(None, description="Token needed for state-changing calls.")
    max_connections: int = Field(256, ge=1, le=4096, description="Connections held at once; full: drop an idle one.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            if len(v) <= 5:
                raise ValueError("unix: needs a path")
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError('expected "host:port" or "unix:/path"')
        return v


class ReportConfig(Model):
    heartbeat: Duration = Field(30.0, description="Publish the node report at least this often.")
    ttl: Duration | None = Field(None, description="A report older than this is stale; default 3 heartbeats.")
    max_holders: int = Field(10, ge=0, le=100, description="Holder summaries per report.")
    forget_after: Duration | None = Field(None, description="Forget a node silent this long (default: never).")

    @property
    def report_ttl(self) -> float:
        return self.ttl if self.ttl is not None else 3 * self.heartbeat


class AgentConfig(Model):
    debounce: Duration = Field(2.0, description="Wait this long for more changes before reloading.")
    scan_interval: Duration = Field(5.0, description="How often to rescan processes for holders.")
    fanotify: Literal["auto", "off"] = Field("auto", description="Use fanotify open events when allowed.")
    retry_min: Duration = Field(1.0, description="First retry delay after a store error.")
    retry_max: Duration = Field(300.0, description="Longest retry delay after repeated store errors.")
    render_timeout: Duration = Field(
        2.0, gt=0, le=60, description="Longest a version's templates may render; past it the version is rejected."
    )
    max_file_size: int = Field(
        1 << 20, ge=1024, le=16 << 20, description="Largest rendered file or env value, in bytes; over it: rejected."
    )


class LogConfig(Model):
    format: Literal["json", "text"] = Field("text", description="Log line format.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum level.")


class Config(Model):
    node_id: str = Field(default_factory=socket.gethostname, description="This node's id; default: host name.")
    store: StoreConfig = Field(default_factory=LocalStoreConfig, description="The secret store.")
    api: ApiConfig = Field(default_factory=ApiConfig, description="Local endpoint.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Node reports.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Agent tuning.")
    credentials: list[CredentialConfig] = Field(description="Credentials to deliver.")

    @model_validator(mode="after")
    def _unique(self) -> Config:
        problems: list[str] = []
        names: set[str] = set()
        dirs: dict[Path, int] = {}
        consumers: dict[str, ConsumerConfig] = {}
        for i, cred in enumerate(self.credentials):
            if cred.name in names:
                problems.append(f"credentials.{i}.name: duplicate credential name {cred.name!r}")
            names.add(cred.name)
            d = Path(os.path.normpath(Path(cred.output.dir).absolute()))
            if d in dirs:
                problems.append(f"credentials.{i}.output.dir: same output dir as credentials.{dirs[d]}")
            dirs.setdefault(d, i)
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
_NAMED = re.compile(r"^[\w.]+: ")


def _path(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "store" and p in _TAGS)]
    return ".".join(parts)


def _shown(value: Any) -> str:
    # Only scalars are echoed, shortened: a config holds no secret values, but
    # a dump of a whole mapping would be unreadable anyway.
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
        shown = _shown(e.get("input")) if e["type"] != "missing" else ""
        lines.append(f"{path}: {msg}" + (f" (got {shown})" if shown else ""))
    return lines


def parse_config(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping"])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config. Raises ``ConfigError`` naming every problem."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}"]) from None
    return parse_config(data)
