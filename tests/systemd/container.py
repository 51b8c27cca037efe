"""A Debian 12 container booted with systemd as PID 1, for the tests in this package.

The rootfs is built once by mmdebstrap and cached under ``.cache/systemd-rootfs/<key>``
(the key hashes the suite and the package list; ``make clean`` removes it). Each test
session boots it with ``systemd-nspawn --volatile=overlay``: every write goes to a
tmpfs overlay, so the cache stays clean. Commands run inside through ``nsenter`` into
the container's PID 1. Baton is installed from wheels built on the host, as
docs/install.md says for a VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
SUITE = "bookworm"
# procps: /bin/kill for ExecReload=; passwd: useradd; polkitd: the rule of docs/install.md.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "polkitd", "procps", "passwd")


class CannotBoot(Exception):
    """This host cannot boot a container; the message says why (the tests skip with it)."""


def _rootfs_key() -> str:
    return hashlib.sha256(f"{SUITE} {' '.join(sorted(PACKAGES))}".encode()).hexdigest()[:16]


def why_not() -> str | None:
    """None when this host can boot a container; else the reason."""
    if os.geteuid() != 0:
        return "not root: systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make system-deps installs systemd-container and mmdebstrap)"
    return None


def rootfs() -> Path:
    """The cached rootfs, built first when missing (about 40 s)."""
    base = CACHE / "systemd-rootfs"
    done = base / _rootfs_key()
    if (done / "usr/lib/systemd/systemd").exists():
        return done
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f"{_rootfs_key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CannotBoot(f"mmdebstrap failed: {proc.stderr.strip()[-500:]}")
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)
    return done


# Dependencies the container's Python needs that the host's does not (see wheels()).
CONTAINER_ONLY = ("async-timeout>=4.0.3",)


def wheels(dest: Path) -> Path:
    """Wheels of Baton (the working tree) with every extra (docs/install.md installs ``.[all]``)
    and of its dependencies, built with the host's Python.

    Markers are resolved for the host's Python, not the container's: Debian bookworm's is
    3.11.2, and redis-py needs async-timeout below 3.11.3, so it is built here as well."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [str(ROOT / ".venv/bin/python"), "-m", "pip"]
    proc = subprocess.run(
        [*pip, "wheel", "--quiet", "--wheel-dir", str(dest), f"{ROOT}[all]", *CONTAINER_ONLY],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{proc.stderr[-2000:]}")
    return dest


class Container:
    """One booted container; ``run()`` a shell script inside it, as root."""

    def __init__(self, root: Path, *, binds: dict[Path, str], log: Path, extra: tuple[str, ...] = ()) -> None:
        self.root = root
        self.extra = extra
        self.binds = binds
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.last_boot_answer = "no systemd process yet"

    def boot(self, timeout: float = 60.0) -> None:
        argv = [
            "systemd-nspawn",
            "--quiet",
            "-D",
            str(self.root),
            "-b",
            # No machined on the host to register with; stay in the caller's scope.
            "--register=no",
            "--keep-unit",
            # Writes go to a tmpfs overlay: the cached rootfs stays as built.
            "--volatile=overlay",
            # Its own loopback: the units' 127.0.0.1:8787/8788 never meet the host's ports.
            "--private-network",
            # No console: boot output goes to the log file, not a tty we do not have.
            "--pipe",
            # nspawn's own seccomp filter answers fanotify_init with EPERM (even for root);
            # a host that wants open events in a container must allow the two calls.
            "--system-call-filter=fanotify_init fanotify_mark",
            *(f"--bind-ro={src}:{dst}" for src, dst in self.binds.items()),
            *self.extra,
        ]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CannotBoot(f"systemd-nspawn exited with {self.proc.returncode}: {self.log()[-800:]}")
            self.pid1 = self._find_pid1()
            if self.pid1 is not None:
                # Early on, systemctl finds no bus yet and says nothing: ask again.
                left = max(1.0, deadline - time.monotonic())
                got = self.run("systemctl is-system-running --wait", check=False, timeout=left)
                state = got.stdout.strip()
                if state in ("running", "degraded"):
                    return
                if state in ("stopping", "offline", "maintenance"):
                    raise CannotBoot(f"the container's systemd reached {state!r}: {got.stderr} {self.log()[-800:]}")
                self.last_boot_answer = f"{state!r} {got.stderr.strip()}"
            time.sleep(0.2)
        raise CannotBoot(
            f"the container's systemd was not up after {timeout:.0f}s ({self.last_boot_answer}): {self.log()[-800:]}"
        )

    def _find_pid1(self) -> int | None:
        assert self.proc is not None
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                for child in (task / "children").read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        return None

    def run(
        self, script: str, *, check: bool = True, timeout: float = 60.0, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash inside the container (as ``user`` when given) and a clean environment."""
        assert self.pid1 is not None
        cmd = ["bash", "-c", script]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
        argv = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *cmd]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the container: {script!r} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def until(self, script: str, *, timeout: float, what: str, every: float = 0.25) -> str:
        """Poll ``script`` until it exits 0 (a deadline, not a sleep standing in for an event)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.run(script, check=False)
            if last.returncode == 0:
                return last.stdout
            time.sleep(every)
        detail = f"{last.stdout}{last.stderr}" if last is not None else ""
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {detail[-1500:]}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def poweroff(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.pid1 is not None:
            self.run("systemctl poweroff --no-block", check=False, timeout=10)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
