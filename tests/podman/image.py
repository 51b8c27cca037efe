"""The Baton image, built from the Dockerfile unchanged, with podman (no Docker engine runs here).

The pinned base (``python:3.11.11-slim-bookworm``) cannot be pulled, so a
stand-in is made from Debian's packages: an mmdebstrap rootfs (Python 3.11,
venv, CA certificates; ``/usr/local/bin/python3.11`` linked as in the official
image; this machine's CA bundle copied in and ``PIP_CERT`` set, so that pip
in the build reaches the package index), ``podman import``-ed under the
base's tag. Then ``podman build --pull=never --network host``. The rootfs tar
is cached in ``.cache/podman/`` and the images stay in podman's store: a
second session with the same sources builds nothing. Every podman call runs
with ``--runtime runc`` and a ``CONTAINERS_CONF`` whose ``[containers]``
table sets ``default_ulimits = []`` (this kernel refuses the runtime's
rlimit calls otherwise).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "podman"
BASE = "python:3.11.11-slim-bookworm"  # the Dockerfile's FROM
PACKAGES = ("python3", "python3-venv", "ca-certificates", "procps")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_CA = "/etc/ssl/certs/host-ca.crt"
# What goes into the image: the Dockerfile and what .dockerignore admits.
SOURCES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "daemon", "sidecar")


class CannotRun(Exception):
    """podman cannot build or run here; the message says why (the tests skip with it)."""


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "not root: rootless podman needs subuid maps this machine does not have"
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make system-deps installs podman, runc and mmdebstrap)"
    return None


def env() -> dict[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout, env=env()
    )
    if check and proc.returncode != 0:
        raise CannotRun(f"podman {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def _key(*parts: str) -> str:
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:12]


def base_image() -> str:
    """The stand-in base, imported under the Dockerfile's FROM tag (once per package set)."""
    key = _key(*PACKAGES, hashlib.sha256(HOST_CA.read_bytes()).hexdigest())
    if podman("image", "exists", f"baton-stand-in-base:{key}", check=False).returncode == 0:
        podman("tag", f"baton-stand-in-base:{key}", BASE)
        return BASE
    tar = CACHE / f"base-{key}.tar"
    if not tar.exists():
        tmp = tar.with_suffix(f".tmp-{os.getpid()}")
        hooks = [
            f'--customize-hook=cp {HOST_CA} "$1{IMAGE_CA}"',
            '--customize-hook=ln -sf /usr/bin/python3.11 "$1/usr/local/bin/python3.11"',
            '--customize-hook=ln -sf python3.11 "$1/usr/local/bin/python3"',
            '--customize-hook=ln -sf python3.11 "$1/usr/local/bin/python"',
        ]
        proc = subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                *hooks,
                "--format=tar",
                "bookworm",
                str(tmp),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise CannotRun(f"mmdebstrap failed: {proc.stderr.strip()[-800:]}")
        tmp.rename(tar)
    podman(
        "import",
        "--change",
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        f"ENV PIP_CERT={IMAGE_CA}",
        "--change",
        'CMD ["python3"]',
        str(tar),
        f"baton-stand-in-base:{key}",
        timeout=600,
    )
    podman("tag", f"baton-stand-in-base:{key}", BASE)
    return BASE


def sources_key() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        path = ROOT / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts or f.suffix in (".pyc", ".so"):
                continue
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def image_tag() -> str:
    return f"localhost/baton:podman-{sources_key()}"


def image_built() -> bool:
    return podman("image", "exists", image_tag(), check=False).returncode == 0


def baton_image() -> str:
    """``baton:podman-<sources>``, built from the Dockerfile unchanged (once per source tree)."""
    tag = image_tag()
    if image_built():
        return tag
    base_image()
    # The docker format: an OCI image config has no HEALTHCHECK (podman drops it from one).
    podman(
        "build", "--format", "docker", "--pull=never", "--network", "host", "-t", tag, "-f", "Dockerfile", str(ROOT),
        timeout=1500,
    )  # fmt: skip
    return tag
