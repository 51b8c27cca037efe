"""The rotator's actions on its endpoint (``POST /v1/actions/rotate``, ``/retire``): the token, and the bodies.

The token is what lets a caller rotate or retire: without ``api.token_file`` the
rotator makes a fresh one at each start in ``api.runtime_dir`` (the dir 0700 and
the file 0600, both the rotator's own, never through a symlink) and removes it
at a clean stop. Bodies come from any caller holding the token and are checked
here (names, version ids, a reason of printable text); a refusal is an
``ActionRefused`` with its HTTP status. Nothing here reads or prints a secret value.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import ActionRefused, ConfigError
from daemon.model import CredentialName, VersionId

TOKEN_NAME = "rotator.token"  # noqa: S105 (a file name, not a token)
MAX_REASON = 300
MAX_USER = 120
_VERSION = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def token_path(runtime_dir: Path, token_file: Path | None) -> Path:
    """Where the action token is: ``api.token_file``, or the one the rotator makes in ``api.runtime_dir``."""
    return token_file if token_file is not None else runtime_dir / TOKEN_NAME


def make_token(runtime_dir: Path) -> tuple[Path, int]:
    """A new token in ``runtime_dir`` (made 0700 if missing), written 0600; its path and inode.

    A dir that is a symlink, not ours, or writable by others is refused (``ConfigError``
    naming api.runtime_dir): anyone who could swap the file could read or plant the token."""
    try:
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(runtime_dir)
    except OSError as e:
        raise ConfigError([f"api.runtime_dir: cannot make {runtime_dir}: {e.strerror}"]) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError([f"api.runtime_dir: {runtime_dir} is not a directory (a symlink?)"])
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError([f"api.runtime_dir: {runtime_dir} must be the rotator's own, not writable by others"])
    path = runtime_dir / TOKEN_NAME
    tmp = runtime_dir / f".{TOKEN_NAME}.{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:  # read-only (a unit's ProtectSystem= without this dir), full
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError([f"api.runtime_dir: cannot write the token in {runtime_dir}: {e.strerror}"]) from None
    return path, inode


def remove_token(path: Path, inode: int) -> None:
    """Remove the token at a clean stop, if it is still the one this rotator made."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


def _text(body: dict[str, Any], key: str, *, limit: int, required: bool = True) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ActionRefused(400, f"{key} is required (a non-empty string)")
    if len(value) > limit or not value.isprintable():
        raise ActionRefused(400, f"{key} is printable text of at most {limit} characters")
    return value.strip()


def credential_of(body: dict[str, Any], known: set[str]) -> CredentialName:
    """The body's ``credential``, one this rotator rotates; 404 otherwise."""
    name = _text(body, "credential", limit=200)
    if name not in known:
        raise ActionRefused(404, f"unknown credential {name[:60]!r}: this rotator rotates {sorted(known)}")
    return CredentialName(name)


@dataclass(frozen=True)
class RetireRequest:
    """A forced retirement: which version, why, who says they asked, and who the kernel says asked."""

    credential: CredentialName
    version: VersionId
    reason: str
    user: str
    peer: str

    @classmethod
    def parse(cls, body: dict[str, Any], known: set[str]) -> RetireRequest:
        credential = credential_of(body, known)
        version = _text(body, "version", limit=128)
        if not _VERSION.fullmatch(version):
            raise ActionRefused(400, "version is a version id (letters, digits, . _ : -)")
        if body.get("force") is not True:
            raise ActionRefused(400, "a retirement the gate has not allowed needs force: true")
        return cls(
            credential=credential,
            version=VersionId(version),
            reason=_text(body, "reason", limit=MAX_REASON),
            user=_text(body, "user", limit=MAX_USER, required=False) or "?",
            peer=str(body.get("peer") or "?"),
        )
