"""The benchmark's network: the namespaces and links of the lab (`tcpguard.devtools.labnet`) with the
benchmark's addresses and shaping, how a process is started in them, and the gateway configured as each
path (plain forwarding, the kernel's string match, the NFQUEUE loops, tcpguard with its rules).
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tcpguard.devtools.labnet import (
    CLIENT_IF,
    GW_CLIENT_IF,
    GW_SERVER_IF,
    SERVER_IF,
    Lab,
)

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_RULES = ROOT / "rules"

# ------------------------------------------------------------------------------------------- topology
# The addresses and interface names are the lab network's (tcpguard.devtools.labnet).

RR_PORT = 8080  # allowed by rules/firewall.py and inspected by rules/http_host.py
RR_PORT2 = 80  # a second listener, for more client ports when holding many connections open
# Client source addresses of the rr and bulk load (see BenchLab._build): enough that a flow hash spreads
# them evenly over the queues of one worker per core.
CLIENT_SOURCES = tuple(f"10.77.1.{i}" for i in range(100, 132))
BULK_PORT = 443  # allowed by the firewall, not HTTP: only the shell-code scanner reads it
# The TLS kind: its own server address (in the server namespace, on the lab's server subnet) so that its
# port can be 443 too, beside the bulk kind's plain listener. TLS_NAME is the SNI the client sends and
# the certificate's name; the sample SNI rule does not block it.
TLS_SERVER_V4 = "10.77.2.3"
TLS_PORT = 443
TLS_NAME = "bench.example"
QUEUE = 0
# The traffic kinds, in the order each path runs them. `bulk-gso` is `bulk` with the offloads on
# (BenchLab.offloads); `tls` is real TLS to port 443 (load._role_tls).
KINDS = ("rr", "bulk", "tls", "bulk-gso")
_CMD_TIMEOUT = 30.0


# ====================================================================================== the lab network
class BenchLab(Lab):
    """The lab network (`tcpguard.devtools.labnet.Lab`: client <-> gw <-> server namespaces, removed on exit),
    with offloads off so packet counts mean wire-sized segments on every path, and client and server
    tuned for many short connections."""

    def __init__(self) -> None:
        super().__init__(prefix="tgb")

    def __enter__(self) -> BenchLab:
        super().__enter__()
        return self

    def _build(self) -> None:
        super()._build()
        # Wire-sized segments everywhere (see the module docstring); `offloads(True)` for the bulk-gso kind.
        self.offloads(False)
        self.run("server", ["ip", "addr", "add", f"{TLS_SERVER_V4}/24", "dev", SERVER_IF])
        # The kernel's `--queue-balance` picks a queue from a hash of the two addresses only (not the
        # ports: nf_queue.h hash_v4/hash_v6), so traffic from one client address would all go to one
        # worker. The load generators spread their connections over several client addresses, as a
        # gateway's many clients do.
        for addr in CLIENT_SOURCES:
            self.run("client", ["ip", "addr", "add", f"{addr}/24", "dev", CLIENT_IF])
        # The client opens many short connections: a wide port range, and TIME_WAIT reuse.
        self.run(
            "client",
            ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"],
        )
        for role in ("client", "server"):
            self.run(
                role,
                ["sysctl", "-q", "-w", "net.core.somaxconn=65535", "net.ipv4.tcp_max_syn_backlog=65535"],
                check=False,
            )

    def offloads(self, on: bool) -> None:
        """All offloads of the four veths off, or on: the endpoints' TSO/GSO (with the transmit checksum,
        which TSO needs) hand the kernel 64 KB segments, and GRO on the gateway's interfaces aggregates what
        arrives there (veth's GRO runs in its NAPI, which `gro on` enables), so the gateway forwards, and
        an NFQUEUE sees, super-packets as behind a real NIC with its offloads on (issue 21)."""
        state = "on" if on else "off"
        for role, dev in (
            ("client", CLIENT_IF),
            ("gw", GW_CLIENT_IF),
            ("gw", GW_SERVER_IF),
            ("server", SERVER_IF),
        ):
            args = ["tx", state, "rx", state, "tso", state, "gso", state, "gro", state]
            self.run(role, ["ethtool", "-K", dev, *args])

    def pids(self, role: str) -> list[int]:
        return self._pids_in(self.ns[role])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one process we started (by its Popen object)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


# ============================================================================= roles (inside namespaces)
def _py_role(name: str, params: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "tcpguard.devtools.bench", "_role", name, json.dumps(params)]


# ================================================================================== the rules
# The benchmark opens thousands of connections per second from one client address, which is exactly what
# the sample rate limiter refuses. Its limits are raised in the benchmark's copy of the rules, so it still
# runs its bucket code on every new connection but lets the load through; every other rule runs as shipped.
RULE_OVERRIDES = {
    "ratelimit.py": (("RATE", "BURST"), "RATE = 1e9\nBURST = 1e9\n"),
}


def bench_rules(src: Path, dst: Path) -> Path:
    """Copy the rule modules of `src` into `dst`, with `RULE_OVERRIDES` appended where they apply."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.py")):
        text = f.read_text()
        names, extra = RULE_OVERRIDES.get(f.name, ((), ""))
        if extra and all(re.search(rf"^{n}\s*=", text, re.MULTILINE) for n in names):
            text += "\n\n# tcpguard bench: the load is one address opening connections at a high rate.\n"
            text += extra
        (dst / f.name).write_text(text)
    return dst


def hollow_rules(src: Path, dst: Path) -> Path:
    """Copy the rule modules of `src` into `dst` with the body of every listener replaced by `pass`.

    The copies subscribe to the same events with the same filters (direction, ports, look-back, streamed)
    and run the same module-level code, but do none of the listeners' work: tcpguard with them costs what
    the engine and the dispatch to those listeners cost, and the difference to the real rules is what the
    listener bodies cost (`tools/live_decompose.py`, variant `hollow-1`). Emptied listeners never act, so
    they are called on every connection; a streamed one's coroutine starts and ends at once. A listener is
    found as a module-level `def` decorated with `rule(...)` (`@rule`, `@tcpguard.rule`): one registered
    any other way keeps its body. Comments are not kept."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                _is_rule_decorator(d) for d in node.decorator_list
            ):
                node.body = [ast.Pass()]
        (dst / f.name).write_text(ast.unparse(ast.fix_missing_locations(tree)) + "\n", encoding="utf-8")
    return dst


def _is_rule_decorator(node: ast.expr) -> bool:
    """`@rule(...)` or `@tcpguard.rule(...)`."""
    func = node.func if isinstance(node, ast.Call) else node
    return (isinstance(func, ast.Name) and func.id == "rule") or (
        isinstance(func, ast.Attribute) and func.attr == "rule"
    )


# ================================================================================== the gateway paths
@dataclass
class Settings:
    short: bool
    duration: float
    warmup: float
    rr_conns: int
    per_conn: int
    bulk_up: int
    bulk_down: int
    lat_count: int
    tls_up: int
    tls_down: int
    tls_size: int
    mem_count: int
    hold_count: int
    capture_packets: int
    rules: Path
    workers: int
    profile: Path | None
    tls_cert: Path | None = None  # made for the run (load.make_certificate)
    kinds: tuple[str, ...] = KINDS


BYPASS_SUFFIX = "+bypass"


def paths_for(workers: int) -> list[tuple[str, str]]:
    """(name, label) of every path, in the order they run; the last one has one worker per core.

    Every tcpguard path runs with `engine.inspection.bypass: false` (the figures of earlier rounds, every
    packet through the daemon) except `tcpguard-1+bypass`, which sets it true (issue 20)."""
    return [
        ("none", "no filtering (plain forwarding)"),
        ("kernel", "kernel: iptables string match + REJECT tcp-reset"),
        ("nfq-bare", "bare NetfilterQueue loop, accept all"),
        ("nfq-scapy", "naive NetfilterQueue + scapy filter"),
        ("tcpguard-1", "tcpguard, sample rules, 1 worker, bypass off"),
        ("tcpguard-1" + BYPASS_SUFFIX, "tcpguard, sample rules, 1 worker, bypass on"),
        (f"tcpguard-{workers}", f"tcpguard, sample rules, {workers} workers (1 per core), bypass off"),
    ]


def bypass_supported() -> bool:
    """Whether this checkout's daemon knows `engine.inspection.bypass` (issue 20). Without it the key
    would be refused as unknown, so the bypass path runs without it, and the report says so."""
    import dataclasses

    from tcpguard.core.settings import EngineSettings

    return "inspection" in {f.name for f in dataclasses.fields(EngineSettings)}


class GatewayPath:
    """Sets up and tears down one way of filtering in the gw namespace."""

    def __init__(self, name: str, lab: BenchLab, work: Path, st: Settings) -> None:
        self.name = name
        self.lab = lab
        self.work = work
        self.st = st
        self.proc: subprocess.Popen[Any] | None = None
        self.log = work / f"{name}.log"

    def start(self) -> None:
        n = self.name
        if n == "kernel":
            self.lab.run(
                "gw",
                [
                    "iptables",
                    "-w",
                    "-A",
                    "FORWARD",
                    "-p",
                    "tcp",
                    "-m",
                    "string",
                    "--algo",
                    "bm",
                    "--string",
                    "/bin/sh",
                    "-j",
                    "REJECT",
                    "--reject-with",
                    "tcp-reset",
                ],
            )
        elif n in ("nfq-bare", "nfq-scapy"):
            ready = self.work / f"{n}.ready"
            params = {"kind": n[4:], "queue": QUEUE, "max_len": 4096, "ready": str(ready)}
            self._spawn(_py_role("nfq", params), ready.exists)
            self.queue_forwarded_tcp()
        elif n.startswith("tcpguard-"):
            bypass = n.endswith(BYPASS_SUFFIX)
            self.start_daemon(int(n.removesuffix(BYPASS_SUFFIX).split("-")[1]), bypass=bypass)

    def queue_forwarded_tcp(self) -> None:
        """Send the gateway's forwarded TCP to QUEUE, for a filter that bound it already (the queue is
        bound first, the rule second: no packet meets an unbound queue). `stop` flushes the rule."""
        self.lab.run(
            "gw",
            ["iptables", "-w", "-A", "FORWARD", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", str(QUEUE)],
        )

    @property
    def control_socket(self) -> Path:
        return self.work / (self.name + ".sock")

    def start_daemon(self, workers: int, max_connections: int = 65536, bypass: bool = False) -> None:
        """`tcpguard run` in the gw namespace. `bypass` sets `engine.inspection.bypass` where the daemon
        knows the key; the key is written either way where it exists, since its default is on."""
        inspection = (
            f"  inspection:\n    bypass: {'true' if bypass else 'false'}\n" if bypass_supported() else ""
        )
        cfg = self.work / f"{self.name}.yaml"
        cfg.write_text(
            f"rules_dir: {self.st.rules}\n"
            f"queue:\n  num: {QUEUE}\n  workers: {workers}\n  maxlen: 4096\n  bypass: false\n"
            f"iptables:\n  manage: true\n  hooks: [FORWARD]\n  ipv6: false\n"
            f"logging:\n  level: info\n  target: stderr\n"
            f"alerts:\n  file: null\n"
            f"control:\n  socket: {self.control_socket}\n"
            f"engine:\n  limits:\n    max_connections: {max_connections}\n" + inspection
        )
        argv = [sys.executable, "-m", "tcpguard.app.cli", "run", "--config", str(cfg)]
        self._spawn(argv, lambda: "running:" in self.log.read_text(errors="replace"), timeout=60)

    def _spawn(self, argv: list[str], ready: Callable[[], bool], timeout: float = 30) -> None:
        with open(self.log, "ab") as log:
            self.proc = self.lab.popen("gw", argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.work)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not ready after {timeout} s: {self.tail()}")
            time.sleep(0.05)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-600:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.name.startswith("tcpguard-"):
            # The daemon removes its own rules on SIGTERM, after answering every packet it holds.
            stop_process(self.proc, timeout=30)
        # Baselines: rules first, so nothing is queued to a queue that is going away.
        self.lab.run("gw", ["iptables", "-w", "-F", "FORWARD"], check=False)
        if self.proc is not None:
            stop_process(self.proc)
            with contextlib.suppress(ValueError):
                self.lab.procs.remove(self.proc)
            self.proc = None
