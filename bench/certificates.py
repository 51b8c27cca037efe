"""Benchmark: an nginx's TLS certificate renewed by Baton and by ``bao agent``, side by side (issue 14.5).

One OpenBao dev server of its own (tests/fixtures/bao_database.py BaoDev) with
a ``pki`` engine (an internal root, role ``web`` for ``pki/sign`` and
``web-issue`` for ``pki/issue``, ``not_before_duration`` 1 s); each tool talks
to it through a loopback forwarder that counts PEM private keys and CSRs in the
bytes it carries (markers only, nothing kept).
Then, for each tool in turn, the same workload for ``--duration`` seconds with
certificates of ``--ttl`` seconds:

- the tool: ``baton agent`` with a ``certificate:`` credential (``pki/sign``,
  renew_at ``--renew-at``, the key made on the node), writing tls.crt/tls.key and
  SIGHUPing nginx; or ``bao agent`` with a ``pkiCert`` template (``pki/issue``:
  that is what pkiCert calls) rendering one PEM file (certificate, CA, key) whose
  ``exec`` SIGHUPs nginx, renewing on its own schedule;
- nginx (Debian's, a non-daemon master with one worker on a free loopback port)
  serving those files;
- a client thread doing verified TLS handshakes (against the root, host name
  ``localhost``) back to back, one request each.

Measured from outside the tools: failed handshakes; for each new certificate the
time from its appearance in the file nginx reads (polled every 5 ms) to the first
handshake that served it; renewals; and whether a private key crossed the
network (a private key in OpenBao's answers, as the forwarder saw them).

Prints ONE JSON object (progress on stderr) and writes bench/results/certificates.json and
certificates.png (the lifetime left on each served certificate over time).
Never prints a key or a token. Every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from cryptography import x509 as cx509  # noqa: E402

from bench._util import BATON, RESULTS, emit, machine, progress  # noqa: E402
from daemon.kit import x509  # noqa: E402
from tests.fixtures.bao_database import BAO, BaoDev  # noqa: E402
from tests.fixtures.nginx import NGINX, Nginx, client_context, handshake  # noqa: E402

NAME = "certificates"
ROLE = {
    "allowed_domains": "example.test,localhost",
    "allow_subdomains": True,
    "allow_bare_domains": True,
    "allow_localhost": True,
    "allow_ip_sans": True,
    "max_ttl": "1h",
    "not_before_duration": "1s",
}


def log(msg: str) -> None:
    progress(NAME, msg)


def setup_pki(bao: BaoDev) -> str:
    bao.request("POST", "sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "87600h"}})
    root = bao.request("POST", "pki/root/generate/internal", {"common_name": "Bench Root", "ttl": "87600h"})
    bao.request("POST", "pki/roles/web", {**ROLE, "key_type": "any"})
    bao.request("POST", "pki/roles/web-issue", {**ROLE, "key_type": "ec", "key_bits": 256})
    return str(root["data"]["certificate"])


class Clients(threading.Thread):
    def __init__(self, ctx: ssl.SSLContext, port: int) -> None:
        super().__init__(daemon=True)
        self.ctx, self.port = ctx, port
        self.served: list[tuple[float, str]] = []
        self.left: list[tuple[float, float]] = []  # (when, seconds the served certificate had left)
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                der = handshake(self.ctx, self.port)
            except (OSError, ssl.SSLError, ConnectionError) as e:
                self.failures.append(type(e).__name__)
                continue
            cert, now = cx509.load_der_x509_certificate(der), time.time()
            self.served.append((now, x509.serial_text(cert)))
            self.left.append((now, cert.not_valid_after_utc.timestamp() - now))


class FileWatch(threading.Thread):
    """When each certificate first appeared in the file nginx reads (the first PEM block's serial)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, Exception):
                text = self.path.read_text()
                certs = x509.load_certs(text, "the served file")
                if certs:
                    self.seen.setdefault(x509.serial_text(certs[0]), time.time())


def start_baton(work: Path, bao: BaoDev, nginx: Nginx, *, ttl: float, renew_at: float) -> subprocess.Popen[bytes]:
    token = bao.write_token(work / "token")
    config = {
        "node_id": "bench",
        "store": {"kind": "local", "path": str(work / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"format": "json"},
        "report": {"heartbeat": "2s"},
        "agent": {"scan_interval": "1s", "debounce": 0, "state_dir": str(work / "state"), "fanotify": "off"},
        "credentials": [
            {
                "name": "web-tls",
                "certificate": {
                    "issuer": {
                        "kind": "vault",
                        "path": "pki/sign/web",
                        "url": bao.url,
                        "auth": {"method": "token_file", "token_file": str(token)},
                    },
                    "common_name": "web.example.test",
                    "alt_names": ["localhost"],
                    "ip_sans": ["127.0.0.1"],
                    "ttl": f"{ttl}s",
                    "renew_at": renew_at,
                    "jitter": 0.02,
                },
                "output": {
                    "dir": str(work / "out"),
                    "mode": "0440",
                    "files": {"tls.crt": "{{ certificate }}\n{{ ca_chain }}\n", "tls.key": "{{ private_key }}\n"},
                },
                "consumers": [
                    {
                        "name": "nginx",
                        "match": {"pidfile": str(nginx.pidfile), "children": True},
                        "loads": "on-reload",
                        "reload": {"signal": "SIGHUP"},
                        "health": {"alive_for": 0},
                    }
                ],
            }
        ],
    }
    path = work / "baton.yaml"
    path.write_text(yaml.safe_dump(config))
    with (work / "baton.log").open("wb") as out:
        return subprocess.Popen([BATON, "agent", "--config", str(path)], cwd=work, stdout=out, stderr=subprocess.STDOUT)


def start_bao_agent(work: Path, bao: BaoDev, nginx: Nginx, *, ttl: float) -> subprocess.Popen[bytes]:
    token = bao.write_token(work / "token")
    contents = (
        '{{ with pkiCert "pki/issue/web-issue" "common_name=web.example.test" "alt_names=localhost" '
        f'"ip_sans=127.0.0.1" "ttl={int(ttl)}s" }}}}{{{{ .Cert }}}}{{{{ .CA }}}}{{{{ .Key }}}}{{{{ end }}}}'
    )
    hup = f"kill -HUP $(cat {nginx.pidfile}) 2>/dev/null || true"
    hcl = f"""
pid_file = "{work / "bao-agent.pid"}"
vault {{ address = "{bao.url}" }}
auto_auth {{
  method "token_file" {{ config {{ token_file_path = "{token}" }} }}
  sink "file" {{ config {{ path = "{work / "sink-token"}" }} }}
}}
template {{
  destination = "{work / "out" / "tls.pem"}"
  contents = {json.dumps(contents)}
  perms = "0400"
  exec {{ command = ["sh", "-c", {json.dumps(hup)}] }}
}}
"""
    (work / "out").mkdir(exist_ok=True)
    path = work / "agent.hcl"
    path.write_text(hcl)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    with (work / "bao-agent.log").open("wb") as out:
        return subprocess.Popen(
            [str(BAO), "agent", f"-config={path}"],
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**env, "HOME": str(work)},
        )


class Sniffer:
    """A loopback TCP forwarder in front of OpenBao that counts PEM private keys and CSRs in the bytes it carries.

    It looks for the markers only (never keeps or prints what it forwards): what
    crossed the network, seen from the network."""

    # The BEGIN lines only (each PEM block once): PKCS#8, EC and RSA keys; CSRs.
    MARKS = {"keys_from_server": rb"BEGIN (?:[A-Z]+ )?PRIVATE KEY", "csrs_to_server": rb"BEGIN CERTIFICATE REQUEST"}

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.counts = dict.fromkeys(self.MARKS, 0)
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.counts = dict.fromkeys(self.MARKS, 0)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, "csrs_to_server"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "keys_from_server"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, what: str) -> None:
        mark, tail = re.compile(self.MARKS[what]), b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                window = tail + data
                # A match wholly inside the kept tail was counted with the previous read.
                found = sum(1 for m in mark.finditer(window) if m.end() > len(tail))
                if found:
                    with self.lock:
                        self.counts[what] += found
                tail = window[-64:]  # longer than any mark: one split across two reads is still seen
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def run_tool(
    name: str, work: Path, bao: BaoDev, root_pem: str, sniffer: Sniffer, args: argparse.Namespace
) -> dict[str, Any]:
    work.mkdir()
    out = work / "out"
    if name == "baton":
        cert, key, watched, pki_path = out / "tls.crt", out / "tls.key", out / "tls.crt", "pki/sign/"
    else:
        cert = key = watched = out / "tls.pem"
        pki_path = "pki/issue/"
    nginx = Nginx(dir=work / "nginx", cert=cert, key=key)
    procs: list[subprocess.Popen[bytes]] = []
    sniffer.reset()
    via = BaoDev(log_path=bao.log_path, port=sniffer.port, root_token=bao.root_token)  # the tool talks through it
    clients: Clients | None = None
    watch = FileWatch(watched)
    try:
        tool = (
            start_baton(work, via, nginx, ttl=args.ttl, renew_at=args.renew_at)
            if name == "baton"
            else start_bao_agent(work, via, nginx, ttl=args.ttl)
        )
        procs.append(tool)
        deadline = time.monotonic() + 60
        while not (cert.exists() and key.exists()):
            if tool.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no certificate; see {work}")
            time.sleep(0.05)
        watch.start()
        nginx.start()
        clients = Clients(client_context(root_pem), nginx.port)
        clients.start()
        log(f"{name}: nginx serving on :{nginx.port}; running {args.duration:g} s")
        time.sleep(args.duration)  # the workload's length, not a synchronisation
        clients.stop.set()
        clients.join(30)
        watch.stop.set()
        watch.join(10)
    finally:
        if clients is not None:
            clients.stop.set()
        watch.stop.set()
        for p in procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.poll() is None:
                p.kill()
                p.wait()
        nginx.stop()
    assert clients is not None
    first_served: dict[str, float] = {}
    for at, serial in clients.served:
        first_served.setdefault(serial, at)
    appeared = sorted(watch.seen.items(), key=lambda kv: kv[1])
    delays = [first_served[s] - t for s, t in appeared[1:] if s in first_served]
    never = [s for s, _ in appeared[1:] if s not in first_served]
    t0 = clients.left[0][0] if clients.left else 0.0
    step = max(1, len(clients.left) // 600)
    return {
        "_left": [(round(t - t0, 3), round(left, 3)) for t, left in clients.left[::step]],
        "handshakes": len(clients.served),
        "failed_handshakes": len(clients.failures),
        "failure_kinds": sorted(set(clients.failures)),
        "renewals": max(0, len(appeared) - 1),
        "renewal_interval_s": round(statistics.mean(b[1] - a[1] for a, b in itertools.pairwise(appeared)), 2)
        if len(appeared) > 2
        else None,
        "renewal_to_served_s": {
            "max": round(max(delays), 3) if delays else None,
            "median": round(statistics.median(delays), 3) if delays else None,
            "samples": len(delays),
        },
        "renewals_never_served": len(never),
        "pki_endpoint": pki_path + ("web" if name == "baton" else "web-issue"),
        "private_key_crossed_network": sniffer.counts["keys_from_server"] > 0,
        "private_keys_seen_on_the_wire": sniffer.counts["keys_from_server"],
        "csrs_seen_on_the_wire": sniffer.counts["csrs_to_server"],
    }


def plot(results: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    colors = {"baton": "tab:blue", "bao agent": "tab:orange"}
    for name, res in results.items():
        xs, ys = [t for t, _ in res["_left"]], [v for _, v in res["_left"]]
        label = (
            f"{name}: {res['failed_handshakes']} failed of {res['handshakes']}, "
            f"renewal->served max {res['renewal_to_served_s']['max']} s, "
            f"key over the network: {'yes' if res['private_key_crossed_network'] else 'no'}"
        )
        ax.plot(xs, ys, ".", markersize=2, color=colors.get(name), label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("seconds since the client loop started")
    ax.set_ylabel("lifetime left on the served certificate (s)")
    ax.set_title(
        f"nginx under a TLS client loop, {args.ttl:g} s certificates: Baton (renew_at {args.renew_at:g}) vs bao agent",
        fontsize=10,
    )
    ax.set_ylim(bottom=-1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of workload per tool")
    parser.add_argument("--ttl", type=float, default=20.0, help="certificate TTL, seconds")
    parser.add_argument("--renew-at", type=float, default=0.67, help="Baton's renew_at")
    args = parser.parse_args()
    for binary in (NGINX, str(BAO)):
        if not os.path.exists(binary):
            print(json.dumps({"bench": NAME, "skipped": f"{binary} is not installed (make system-deps / install)"}))
            return 0
    with tempfile.TemporaryDirectory(prefix="baton-bench-certs-") as tmp:
        work = Path(tmp)
        work.chmod(0o700)
        bao = BaoDev(log_path=work / "bao.log").start()
        sniffer = Sniffer(bao.port)
        try:
            root_pem = setup_pki(bao)
            results = {
                name: run_tool(name, work / name.replace(" ", "-"), bao, root_pem, sniffer, args)
                for name in ("baton", "bao agent")
            }
        finally:
            sniffer.close()
            bao.stop()
    plot(results, args, RESULTS / f"{NAME}.png")
    for res in results.values():
        res.pop("_left")
    out = {
        "bench": NAME,
        "machine": machine(),
        "settings": {"duration_s": args.duration, "ttl_s": args.ttl, "baton_renew_at": args.renew_at},
        "results": results,
    }
    emit(NAME, out)
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like ^C: every finally runs, so no nginx, agent or OpenBao is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
