"""The agent's own small state files (an issuer's lease ids): JSON, 0600, written atomically, distrusted on read.

``save_state`` writes a temp file beside the target (O_EXCL, 0600), fsyncs it and
renames it over the old one, so a kill -9 leaves the old file or the new, never
half of one. ``load_state`` treats what it finds as hostile: a symlink, a file
that is not ours or is open to others, one in a directory others may write, an
oversized file or one that is not a JSON object is a ``StateFileError`` (the
caller says so in an event and starts fresh); it never crashes on one. The
directory is made 0700 when missing. Nothing here knows what the state means.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from daemon.errors import StateFileError

MAX_BYTES = 1 << 20


def _trusted_dir(path: Path) -> None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateFileError(f"state dir {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateFileError(f"state dir {path} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StateFileError(f"state dir {path} is not ours alone (owner {st.st_uid}, mode {st.st_mode & 0o777:o})")


def load_state(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if there is none. ``StateFileError`` when it cannot be trusted."""
    _trusted_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateFileError(f"state file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError(f"state file {path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise StateFileError(
                f"state file {path} is not ours alone (owner {st.st_uid}, mode {st.st_mode & 0o777:o})"
            )
        if st.st_size > MAX_BYTES:
            raise StateFileError(f"state file {path} is {st.st_size} bytes (at most {MAX_BYTES})")
        raw = os.read(fd, MAX_BYTES + 1)
    except OSError as e:
        raise StateFileError(f"state file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StateFileError(f"state file {path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise StateFileError(f"state file {path} does not hold a JSON object")
    return data


def save_state(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically, mode 0600 (the directory 0700 if made here)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _trusted_dir(path.parent)
    body = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
