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
QUEUE = 0
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
        for role, dev in (
            ("client", CLIENT_IF),
            ("gw", GW_CLIENT_IF),
            ("gw", GW_SERVER_IF),
            ("server", SERVER_IF),
        ):
            # Wire-sized segments everywhere: see the module docstring.
            self.run(
                role,
                ["ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off"],
            )
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
    mem_count: int
    hold_count: int
    capture_packets: int
    rules: Path
    workers: int
    profile: Path | None


def paths_for(workers: int) -> list[tuple[str, str]]:
    """(name, label) of every path, in the order they run; the last one has one worker per core."""
    return [
        ("none", "no filtering (plain forwarding)"),
        ("kernel", "kernel: iptables string match + REJECT tcp-reset"),
        ("nfq-bare", "bare NetfilterQueue loop, accept all"),
        ("nfq-scapy", "naive NetfilterQueue + scapy filter"),
        ("tcpguard-1", "tcpguard, sample rules, 1 worker"),
        (f"tcpguard-{workers}", f"tcpguard, sample rules, {workers} workers (1 per core)"),
    ]


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
            self.start_daemon(int(n.split("-")[1]))

    def queue_forwarded_tcp(self) -> None:
        """Send the gateway's forwarded TCP to QUEUE, for a filter that bound it already (the queue is
        bound first, the rule second: no packet meets an unbound queue). `stop` flushes the rule."""
        self.lab.run(
            "gw",
            ["iptables", "-w", "-A", "FORWARD", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", str(QUEUE)],
        )

    def start_daemon(self, workers: int, max_connections: int = 65536) -> None:
        cfg = self.work / f"{self.name}.yaml"
        cfg.write_text(
            f"rules_dir: {self.st.rules}\n"
            f"queue:\n  num: {QUEUE}\n  workers: {workers}\n  maxlen: 4096\n  bypass: false\n"
            f"iptables:\n  manage: true\n  hooks: [FORWARD]\n  ipv6: false\n"
            f"logging:\n  level: info\n  target: stderr\n"
            f"alerts:\n  file: null\n"
            f"control:\n  socket: {self.work / (self.name + '.sock')}\n"
            f"engine:\n  limits:\n    max_connections: {max_connections}\n"
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
