"""`tcpguard bench`: tcpguard side by side with the alternatives, on the network-namespace test network.

    tcpguard bench [--short] [--duration S] [--doc docs/BENCHMARKS.md] [--profile DIR]

One run builds a throwaway client <-> gw <-> server network of namespaces (the topology of
`tests/netns.py`: veth pairs created inside their namespaces, addresses only there, removed at the end,
also on failure or SIGTERM) and sends the same traffic through the gateway configured as each of:

* `none`: plain forwarding, no filter: the link's own figure;
* `kernel`: one iptables rule, `-m string --algo bm --string /bin/sh -j REJECT --reject-with tcp-reset`
  (what operators use without user space; no reassembly, so a split pattern passes);
* `nfq-bare`: a tiny separate process that binds the NFQUEUE with NetfilterQueue and accepts every
  packet (the floor cost of any Python NFQUEUE filter);
* `nfq-scapy`: the tutorial filter: every packet parsed with scapy, its payload searched for `/bin/sh`;
* `tcpguard-1`, `tcpguard-N`: `tcpguard run` with the shipped sample rules (`rules/`), one worker, and
  one worker per core (N = the number of cores; `--queue-balance`).

Every NFQUEUE path fails closed (no `--queue-bypass`, no fail-open flag): a packet the filter is too slow
for is dropped, never waved through uninspected, so every packet counted went through the filter.
Offloads (TSO, GSO, GRO, checksums) are off on every veth, so each packet is a wire-sized segment, as a
gateway on a real link sees it, and packet counts mean the same thing on every path.

Traffic, per path (a Python load generator, `_role_*` below, bounded in count and time):

* `latency`: one connection doing sequential small HTTP-like request/responses on an idle path
  (p50/p99 of the round trip; "added" is the difference to the `none` path);
* `rr`: many concurrent connections (64 by default), each doing 10 small request/response exchanges
  (HTTP/1.1 keep-alive), then closing and reconnecting, to port 8080 (so every sample rule runs: the
  allow-list, the rate limit, the Host-header reader and the shell-code scanner). The client closes
  first, so TIME_WAIT stays on the client side, where the load generator's port allocation skips it: when
  the server closed first, a whole benchmark run (~200,000 connections) filled the server's TIME_WAIT
  table (131,072 entries), after which reused ports met old connections and every path stalled on SYN
  retransmissions, more or less depending on what ran before it;
* `bulk`: two uploads and two downloads running at once, to port 443 (the shell-code scanner reads every
  uploaded byte).

Figures: packets and bytes per second forwarded by the gateway (the gw's veth `tx` counters, both
directions, over a steady-state window that excludes ramp-up and ramp-down); CPU per packet (CPU time
of every process in the gw namespace, from /proc/PID/task/*/schedstat, divided by those packets; the
kernel's forwarding work is charged to them when it runs in their system calls) and the whole machine's
busy share (/proc/stat, load generator included); the kernel's NFQUEUE drop counters. Then, without the
network: resident memory per idle tracked connection (100,000 connections fabricated through the engine in
a fresh process, RSS delta / count; and, on the network, real connections held open through the daemon),
and offline `tcpguard replay` and `tcpguard trace` throughput on a generated capture of >= 200,000 packets.

The machine has few cores and the load generator shares them with the gateway, so each row also says how
busy the machine was: a path that leaves the machine idle was limited by the filter, one that saturates
it may be limited by the load generator. `--short` is the CI mode: everything runs, with small counts.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tcpguard import core
from tcpguard.app.labnet import (
    CLIENT_IF,
    GW_CLIENT_IF,
    GW_SERVER_IF,
    SERVER_IF,
    SERVER_V4,
    Lab,
)

__all__ = ["add_subparser", "main"]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RULES = ROOT / "rules"

# ------------------------------------------------------------------------------------------- topology
# The addresses and interface names are the lab network's (tcpguard.app.labnet).

RR_PORT = 8080  # allowed by rules/firewall.py and inspected by rules/http_host.py
RR_PORT2 = 80  # a second listener, for more client ports when holding many connections open
# Client source addresses of the rr and bulk load (see BenchLab._build): enough that a flow hash spreads
# them evenly over the queues of one worker per core.
CLIENT_SOURCES = tuple(f"10.77.1.{i}" for i in range(100, 132))
BULK_PORT = 443  # allowed by the firewall, not HTTP: only the shell-code scanner reads it
QUEUE = 0
_CMD_TIMEOUT = 30.0

# ------------------------------------------------------------------------------------ the load's bytes
RESP_BODY = 512
REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: tcpguard-bench/1\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
    + str(RESP_BODY).encode()
    + b"\r\n\r\n"
    + bytes(random.Random(5).choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(RESP_BODY))
)
BULK_BLOCK = 256 * 1024


# ====================================================================================== the lab network
class BenchLab(Lab):
    """The lab network (`tcpguard.app.labnet.Lab`: client <-> gw <-> server namespaces, removed on exit),
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


# ====================================================================================== measurements
@dataclass(slots=True)
class Sample:
    t: float
    tx_packets: int
    tx_bytes: int
    gw_cpu_ns: int
    load_cpu_ns: int
    busy: int  # /proc/stat busy jiffies, all cores
    total: int  # /proc/stat jiffies, all cores


def _link_tx(lab: BenchLab) -> tuple[int, int]:
    """Packets and bytes the gateway sent out of both its interfaces: what it forwarded."""
    out = lab.run("gw", ["ip", "-s", "-j", "link", "show"]).stdout
    pk = by = 0
    for link in json.loads(out):
        if link.get("ifname") in (GW_CLIENT_IF, GW_SERVER_IF):
            tx = link["stats64"]["tx"]
            pk += int(tx["packets"])
            by += int(tx["bytes"])
    return pk, by


def syn_retransmissions(lab: BenchLab) -> int:
    """SYNs the client namespace's TCP sent again (TcpExt TCPSynRetrans): each is a connection attempt
    that waited a second or more, lost or refused on the way. Zero on a healthy path."""
    out = lab.run("client", ["cat", "/proc/net/netstat"]).stdout.splitlines()
    for head, values in zip(out[::2], out[1::2], strict=False):
        if head.startswith("TcpExt:"):
            fields = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("TCPSynRetrans", 0))
    return 0


def proc_cpu_ns(pid: int) -> int:
    """CPU time (ns, all threads) of a process; 0 if it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def _machine_cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def take_sample(lab: BenchLab, load_pids: list[int]) -> Sample:
    t = time.monotonic()
    pk, by = _link_tx(lab)
    gw = sum(proc_cpu_ns(p) for p in lab.pids("gw"))
    load = sum(proc_cpu_ns(p) for p in load_pids)
    busy, total = _machine_cpu()
    return Sample(t, pk, by, gw, load, busy, total)


def queue_drops(lab: BenchLab) -> int:
    """queue_dropped + user_dropped of every NFQUEUE in the gw namespace (0 if none is bound)."""
    r = lab.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False)
    drops = 0
    for line in r.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 7:
            drops += int(cols[5]) + int(cols[6])
    return drops


@dataclass(slots=True)
class PhaseResult:
    seconds: float = 0.0
    packets: int = 0
    bytes: int = 0
    gw_cpu_ns: int = 0
    load_cpu_ns: int = 0
    busy_share: float = 0.0
    transactions: int = 0
    app_bytes: int = 0
    errors: int = 0
    syn_retrans: int = 0
    note: str = ""

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0

    @property
    def bps(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_packet(self) -> float:
        return self.gw_cpu_ns / 1000 / self.packets if self.packets else 0.0


@dataclass(slots=True)
class PathResult:
    name: str
    label: str
    latency: dict[str, float] = field(default_factory=dict)
    # The unfiltered link measured just before this path's filter started: the machine is shared, so
    # "added latency" compares against the link at that moment, not at the start of the run.
    base_latency: dict[str, float] = field(default_factory=dict)
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    queue_drops: int = 0
    error: str = ""


def phase_between(a: Sample, b: Sample) -> PhaseResult:
    jiffies = b.total - a.total
    return PhaseResult(
        seconds=b.t - a.t,
        packets=b.tx_packets - a.tx_packets,
        bytes=b.tx_bytes - a.tx_bytes,
        gw_cpu_ns=b.gw_cpu_ns - a.gw_cpu_ns,
        load_cpu_ns=b.load_cpu_ns - a.load_cpu_ns,
        busy_share=(b.busy - a.busy) / jiffies if jiffies > 0 else 0.0,
    )


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


# ============================================================================= roles (inside namespaces)
def _py_role(name: str, params: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "tcpguard.app.bench", "_role", name, json.dumps(params)]


def _raise_nofile(n: int) -> int:
    """Raise the open-file limit towards `n` (the hard limit too, which needs CAP_SYS_RESOURCE); returns
    the soft limit in force."""
    import resource

    want = max(n, 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def max_open_files() -> int:
    """The most descriptors one of our processes can have open (the hard limit, or what root can raise)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    probe = max(hard, 1024)
    if os.geteuid() == 0 and nr_open > hard:
        # Can we raise the hard limit (CAP_SYS_RESOURCE)? Try in place, then put it back.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, nr_open))
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            probe = nr_open
        except (ValueError, OSError):
            pass
    return probe


def _role_server(p: dict[str, Any]) -> None:
    """Request/response listeners (epoll, any number of connections) and a bulk listener (threads)."""
    import select

    _raise_nofile(int(p.get("nofile", 1024)))
    threading.Thread(target=_bulk_listener, args=(int(p["bulk_port"]),), daemon=True).start()
    ep = select.epoll()
    listeners: dict[int, socket.socket] = {}
    for port in p["rr_ports"]:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", int(port)))
        ls.listen(65535)
        ls.setblocking(False)
        listeners[ls.fileno()] = ls
        ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    Path(p["ready"]).touch()
    end = time.monotonic() + float(p["max_seconds"])
    while time.monotonic() < end:
        for fd, _ev in ep.poll(0.5):
            ls_ = listeners.get(fd)
            if ls_ is not None:
                while True:
                    try:
                        c, _ = ls_.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[c.fileno()] = (c, bytearray())
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            entry = conns.get(fd)
            if entry is None:
                continue
            c, buf = entry
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            close = not data
            buf += data
            while not close:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                head = bytes(buf[:i])
                del buf[: i + 4]
                try:
                    c.send(RESPONSE)  # small, and the send buffer is empty: it goes whole
                except OSError:
                    close = True
                if b"Connection: close" in head:
                    close = True
            if close:
                ep.unregister(fd)
                del conns[fd]
                c.close()


def _bulk_listener(port: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(64)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=_bulk_conn, args=(c,), daemon=True).start()


def _bulk_conn(c: socket.socket) -> None:
    c.settimeout(60)
    block = random.Random(11).randbytes(BULK_BLOCK)
    buf = bytearray(BULK_BLOCK)
    try:
        mode = c.recv(1)
        if mode == b"U":
            while c.recv_into(buf):
                pass
        elif mode == b"D":
            while True:
                c.sendall(block)
    except OSError:
        pass
    finally:
        c.close()


class _RRConn:
    __slots__ = ("connecting", "done", "got", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.connecting = True
        self.got = 0
        self.done = 0


def _role_rr(p: dict[str, Any]) -> None:
    """Concurrent keep-alive connections doing request/response, reconnecting after `per_conn`.
    Counts the transactions completed inside [win_start, win_end) (monotonic clock, shared by all
    namespaces)."""
    import errno
    import select

    host, port = p["host"], int(p["port"])
    nconn, per_conn = int(p["conns"]), int(p["per_conn"])
    win_start, win_end, stop_at = float(p["win_start"]), float(p["win_end"]), float(p["stop_at"])
    ep = select.epoll()
    live: dict[int, _RRConn] = {}
    stats = {"transactions": 0, "window_transactions": 0, "connections": 0, "errors": 0}
    need = len(RESPONSE)

    sources = list(p.get("sources") or [""])
    opened = [0]

    def open_one() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((sources[opened[0] % len(sources)], 0))
        opened[0] += 1
        rc = s.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            stats["errors"] += 1
            s.close()
            return
        live[s.fileno()] = _RRConn(s)
        ep.register(s.fileno(), select.EPOLLOUT)

    def close_one(fd: int, c: _RRConn) -> None:
        ep.unregister(fd)
        del live[fd]
        c.sock.close()

    for _ in range(nconn):
        open_one()
    while live:
        now = time.monotonic()
        if now >= stop_at + 5:
            break
        for fd, ev in ep.poll(0.2):
            c = live.get(fd)
            if c is None:
                continue
            if c.connecting:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err or ev & (select.EPOLLERR | select.EPOLLHUP):
                    stats["errors"] += 1
                    close_one(fd, c)
                    if time.monotonic() < stop_at:
                        open_one()
                    continue
                c.connecting = False
                stats["connections"] += 1
                c.sock.send(REQUEST)
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                if c.done < per_conn:
                    stats["errors"] += 1
                close_one(fd, c)
                if time.monotonic() < stop_at:
                    open_one()
                continue
            c.got += len(data)
            if c.got < need:
                continue
            c.got -= need
            c.done += 1
            stats["transactions"] += 1
            t = time.monotonic()
            if win_start <= t < win_end:
                stats["window_transactions"] += 1
            if c.done >= per_conn or t >= stop_at:
                close_one(fd, c)  # the client closes first (see the module docstring)
                if t < stop_at:
                    open_one()
                continue
            c.sock.send(REQUEST)
    for fd, c in list(live.items()):
        close_one(fd, c)
    print(json.dumps(stats), flush=True)


def _role_bulk(p: dict[str, Any]) -> None:
    """`up` uploads and `down` downloads at once until `stop_at`; bytes moved inside the window."""
    host, port = p["host"], int(p["port"])
    win_start, win_end, stop_at = float(p["win_start"]), float(p["win_end"]), float(p["stop_at"])
    lock = threading.Lock()
    stats = {"window_bytes": 0, "bytes": 0, "errors": 0}
    block = random.Random(13).randbytes(BULK_BLOCK)

    def count(n: int) -> None:
        t = time.monotonic()
        with lock:
            stats["bytes"] += n
            if win_start <= t < win_end:
                stats["window_bytes"] += n

    def worker(mode: bytes, source: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.bind((source, 0))
            s.connect((host, port))
            s.sendall(mode)
            view = memoryview(block)
            buf = bytearray(BULK_BLOCK)
            while time.monotonic() < stop_at:
                count(s.send(view) if mode == b"U" else s.recv_into(buf))
        except OSError:
            with lock:
                stats["errors"] += 1
        finally:
            s.close()

    sources = list(p.get("sources") or [""])
    modes = [b"U"] * int(p["up"]) + [b"D"] * int(p["down"])
    threads = [
        threading.Thread(target=worker, args=(mode, sources[i % len(sources)]))
        for i, mode in enumerate(modes)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(stop_at - time.monotonic() + 15)
    print(json.dumps(stats), flush=True)


def _role_latency(p: dict[str, Any]) -> None:
    """One keep-alive connection, sequential request/responses; round-trip times in microseconds."""
    host, port = p["host"], int(p["port"])
    count, warm = int(p["count"]), int(p["warmup"])
    end = time.monotonic() + float(p["max_seconds"])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(5)
    rtts: list[float] = []
    errors = 0
    need = len(RESPONSE)
    buf = bytearray(65536)
    try:
        s.connect((host, port))
        for i in range(count + warm):
            if time.monotonic() > end:
                break
            t0 = time.perf_counter_ns()
            s.sendall(REQUEST)
            got = 0
            while got < need:
                n = s.recv_into(buf)
                if not n:
                    raise ConnectionError("closed")
                got += n
            if i >= warm:
                rtts.append((time.perf_counter_ns() - t0) / 1000)
    except OSError:
        errors += 1
    finally:
        s.close()
    rtts.sort()
    print(
        json.dumps(
            {
                "n": len(rtts),
                "errors": errors,
                "p50": percentile(rtts, 0.50),
                "p90": percentile(rtts, 0.90),
                "p99": percentile(rtts, 0.99),
                "mean": sum(rtts) / len(rtts) if rtts else 0.0,
            }
        ),
        flush=True,
    )


def _role_hold(p: dict[str, Any]) -> None:
    """Open `count` connections (at most `inflight` handshakes at once), one request/response on each,
    then keep them open until stdin closes or `max_seconds` pass. Prints one JSON line when all are up."""
    import errno
    import select

    host, ports, count = p["host"], [int(x) for x in p["ports"]], int(p["count"])
    inflight, end = int(p["inflight"]), time.monotonic() + float(p["max_seconds"])
    count = min(count, _raise_nofile(count + 1024) - inflight - 64)
    ep = select.epoll()
    pending: dict[int, list[Any]] = {}  # fd -> [sock, state, got]; state 0 connecting, 1 reading
    held: list[socket.socket] = []
    started = failed = 0
    need = len(RESPONSE)
    while (started < count or pending) and time.monotonic() < end:
        while started < count and len(pending) < inflight:
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:  # out of descriptors after all: hold what we have
                count = started
                break
            s.setblocking(False)
            started += 1
            rc = s.connect_ex((host, ports[started % len(ports)]))
            if rc not in (0, errno.EINPROGRESS):
                failed += 1
                s.close()
                continue
            pending[s.fileno()] = [s, 0, 0]
            ep.register(s.fileno(), select.EPOLLOUT)
        for fd, ev in ep.poll(0.2):
            entry = pending.get(fd)
            if entry is None:
                continue
            s = entry[0]
            ok = True
            if entry[1] == 0:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or ev & select.EPOLLERR:
                    ok = False
                else:
                    s.send(REQUEST)
                    entry[1] = 1
                    ep.modify(fd, select.EPOLLIN)
                    continue
            else:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    ok = False
                else:
                    entry[2] += len(data)
                    if entry[2] < need:
                        continue
            ep.unregister(fd)
            del pending[fd]
            if ok:
                held.append(s)
            else:
                failed += 1
                s.close()
    failed += len(pending)
    print(json.dumps({"held": len(held), "failed": failed}), flush=True)
    # Hold until the orchestrator closes our stdin (or the time bound passes).
    while time.monotonic() < end:
        r, _, _ = select.select([sys.stdin], [], [], 0.5)
        if r and not sys.stdin.readline():
            break
    for s in held:
        s.close()


def _role_nfq(p: dict[str, Any]) -> None:
    """The baselines: a bare NetfilterQueue loop accepting everything, or the scapy tutorial filter."""
    from netfilterqueue import COPY_PACKET, NetfilterQueue

    kind = p["kind"]
    if kind == "bare":

        def callback(pkt: Any) -> None:
            pkt.accept()

    else:
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6
        from scapy.packet import Raw

        def callback(pkt: Any) -> None:
            raw = pkt.get_payload()
            sp = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
            if sp.haslayer(Raw) and b"/bin/sh" in sp[Raw].load:
                pkt.drop()
            else:
                pkt.accept()

    nfq = NetfilterQueue()
    nfq.bind(int(p["queue"]), callback, max_len=int(p["max_len"]), mode=COPY_PACKET, range=65535)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Path(p["ready"]).touch()
    try:
        nfq.run()
    finally:
        nfq.unbind()


def _role_mem(p: dict[str, Any]) -> None:
    """Fabricate `count` idle connections through an engine with the rules; print the RSS delta."""
    import gc

    from tcpguard.app.ruleload import load_rules
    from tcpguard.core.engine import Engine
    from tcpguard.core.settings import EngineSettings

    count, exchanged = int(p["count"]), bool(p["exchanged"])
    use_tracemalloc = bool(p.get("tracemalloc"))
    settings = EngineSettings()
    settings.limits.max_connections = count * 2 + 16
    engine = Engine(settings, load_rules(Path(p["rules"])))
    server = bytes([10, 2, 0, 1])
    now = 1000.0
    # Warm up (first-use allocations: greenlet machinery, rule code paths) outside the measurement.
    for i in range(64):
        for raw in _fabricated_connection(bytes([10, 9, 0, i]), 40000 + i, server, exchanged):
            engine.handle_packet(raw, now)
    gc.collect()
    if use_tracemalloc:
        import tracemalloc

        tracemalloc.start()
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    for i in range(count):
        client, cport = fabricated_client(i)
        for raw in _fabricated_connection(client, cport, server, exchanged):
            engine.handle_packet(raw, now)
    secs = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    traced = 0
    if use_tracemalloc:
        import tracemalloc

        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    tracked = len(engine.table) - 64
    print(
        json.dumps(
            {
                "count": count,
                "tracked": tracked,
                "rss_delta": after - before,
                "per_conn": (after - before) / max(1, tracked),
                "traced_per_conn": traced / max(1, tracked) if use_tracemalloc else None,
                "seconds": secs,
                "states": sorted({c.state.name for c in list(engine.table)[:1000]}),
            }
        ),
        flush=True,
    )


ROLE_FUNCS: dict[str, Callable[[dict[str, Any]], None]] = {
    "server": _role_server,
    "rr": _role_rr,
    "bulk": _role_bulk,
    "latency": _role_latency,
    "hold": _role_hold,
    "nfq": _role_nfq,
    "mem": _role_mem,
}


# ============================================================================== fabricated packets
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_SYN_OPTS = bytes.fromhex("020405b401030307")  # MSS 1460, NOP, window scale 7
F_FIN, F_SYN, F_RST, F_PSH, F_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MSS = 1448


def ipv4_tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    options: bytes = b"",
    window: int = 502,
) -> bytes:
    """One IPv4/TCP packet with real checksums."""
    from tcpguard.core.packet import checksum, tcp_checksum

    hlen = 20 + len(options)
    seg = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hlen // 4) << 4, flags, window, 0, 0)
    seg += options + payload
    csum = tcp_checksum(src, dst, seg)
    seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
    hdr = _IP4.pack(0x45, 0, 20 + len(seg), 0, 0x4000, 64, 6, 0, src, dst)
    return hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:] + seg


def fabricated_client(i: int) -> tuple[bytes, int]:
    """Address and port of the i-th fabricated connection: 1,000 clients with up to 60,000 ports each."""
    return bytes([10, 1, (i % 1000) >> 8, i % 1000 & 0xFF]), 1024 + i // 1000


def _fabricated_connection(client: bytes, cport: int, server: bytes, exchanged: bool) -> list[bytes]:
    """Handshake (and optionally one HTTP request/response), leaving the connection established."""
    c_isn, s_isn = 1000, 5000
    pk = [
        ipv4_tcp(client, server, cport, RR_PORT, c_isn, 0, F_SYN, options=_SYN_OPTS, window=64240),
        ipv4_tcp(
            server, client, RR_PORT, cport, s_isn, c_isn + 1, F_SYN | F_ACK, options=_SYN_OPTS, window=65160
        ),
        ipv4_tcp(client, server, cport, RR_PORT, c_isn + 1, s_isn + 1, F_ACK),
    ]
    if exchanged:
        pk.append(ipv4_tcp(client, server, cport, RR_PORT, c_isn + 1, s_isn + 1, F_PSH | F_ACK, REQUEST))
        cs = c_isn + 1 + len(REQUEST)
        pk.append(ipv4_tcp(server, client, RR_PORT, cport, s_isn + 1, cs, F_PSH | F_ACK, RESPONSE))
        pk.append(ipv4_tcp(client, server, cport, RR_PORT, cs, s_isn + 1 + len(RESPONSE), F_ACK))
    return pk


def generate_capture(path: Path, packets: int, concurrency: int = 200, seed: int = 3) -> tuple[int, int]:
    """A classic pcap (Ethernet) of at least `packets` frames: `concurrency` interleaved connections, each
    a handshake, 1-4 HTTP-like request/responses (responses of 1-8 MSS-sized segments, the client
    acknowledging every second one) and a FIN exchange (one in twenty is reset instead). Port 8080, so
    every sample rule runs. Returns (frames, connections)."""
    from tcpguard.io.pcap import LINKTYPE_ETHERNET, PcapWriter

    rng = random.Random(seed)
    pool = rng.randbytes(1 << 16).replace(b"/", b"_")  # no accidental shell-code pattern
    eth = bytes.fromhex("0200000000020200000000010800")
    server = bytes([10, 2, 0, 1])
    frames = conns = 0
    live: list[list[bytes]] = []
    ts = 1_700_000_000.0
    with PcapWriter(path, LINKTYPE_ETHERNET) as w:
        while frames < packets or live:
            while frames < packets and len(live) < concurrency:
                client = bytes([10, 1, (conns >> 8) & 0xFF, conns & 0xFF])
                script = _capture_script(client, 1024 + conns % 64000, server, rng, pool)
                script.reverse()
                live.append(script)
                conns += 1
            i = rng.randrange(len(live))
            script = live[i]
            w.write(eth + script.pop(), ts)
            frames += 1
            ts += 0.00001
            if not script:
                live[i] = live[-1]
                live.pop()
    return frames, conns


def _capture_script(client: bytes, cport: int, server: bytes, rng: random.Random, pool: bytes) -> list[bytes]:
    cs, ss = rng.getrandbits(32), rng.getrandbits(32)

    def up(seq: int, ack: int, flags: int, payload: bytes = b"") -> bytes:
        return ipv4_tcp(client, server, cport, RR_PORT, seq, ack, flags, payload)

    def down(seq: int, ack: int, flags: int, payload: bytes = b"") -> bytes:
        return ipv4_tcp(server, client, RR_PORT, cport, seq, ack, flags, payload)

    out = [
        ipv4_tcp(client, server, cport, RR_PORT, cs, 0, F_SYN, options=_SYN_OPTS, window=64240),
        ipv4_tcp(server, client, RR_PORT, cport, ss, cs + 1, F_SYN | F_ACK, options=_SYN_OPTS, window=65160),
    ]
    cs, ss = cs + 1, ss + 1
    out.append(up(cs, ss, F_ACK))
    for _ in range(rng.randint(1, 4)):
        req = b"GET /%d HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: x\r\n\r\n" % rng.randrange(10**6)
        out.append(up(cs, ss, F_PSH | F_ACK, req))
        cs += len(req)
        for k in range(rng.randint(1, 8)):
            n = MSS if rng.random() < 0.7 else rng.randint(1, MSS)
            at = rng.randrange(len(pool) - n)
            out.append(down(ss, cs, F_ACK, pool[at : at + n]))
            ss += n
            if k % 2:
                out.append(up(cs, ss, F_ACK))
        out.append(up(cs, ss, F_ACK))
    if rng.random() < 0.05:
        out.append(up(cs, ss, F_RST | F_ACK))
    else:
        out.append(up(cs, ss, F_FIN | F_ACK))
        out.append(down(ss, cs + 1, F_FIN | F_ACK))
        out.append(up(cs + 1, ss + 1, F_ACK))
    return out


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


def start_load_server(lab: BenchLab, work: Path, nofile: int) -> subprocess.Popen[Any]:
    """The load generator's server (request/response and bulk listeners) in the server namespace, once it
    listens; the lab stops it at the latest."""
    ready = work / "server.ready"
    ready.unlink(missing_ok=True)
    params = {
        "rr_ports": [RR_PORT, RR_PORT2],
        "bulk_port": BULK_PORT,
        "ready": str(ready),
        "max_seconds": 3600,
        "nofile": nofile,
    }
    server = lab.popen("server", _py_role("server", params), cwd=work)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the load server did not start")
        time.sleep(0.05)
    return server


def _run_load(lab: BenchLab, role: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = lab.popen(
        "client", _py_role(role, params), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise RuntimeError(f"load generator {role} did not finish in {timeout} s") from None
    finally:
        with contextlib.suppress(ValueError):
            lab.procs.remove(proc)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"load generator {role} failed ({proc.returncode}): {err[-600:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def _phase(
    lab: BenchLab,
    st: Settings,
    kind: str,
    server_pid: int,
    profile: Callable[[str, float], subprocess.Popen[Any] | None] | None = None,
) -> PhaseResult:
    """Run one traffic kind; sample the gateway over the steady-state window."""
    start = time.monotonic() + 0.6  # the load generator's own start-up
    win_start = start + st.warmup
    win_end = win_start + st.duration
    stop_at = win_end + 0.3
    common = {
        "host": SERVER_V4,
        "win_start": win_start,
        "win_end": win_end,
        "stop_at": stop_at,
        "sources": list(CLIENT_SOURCES),
    }
    if kind == "rr":
        role, params = "rr", {**common, "port": RR_PORT, "conns": st.rr_conns, "per_conn": st.per_conn}
    else:
        role, params = "bulk", {**common, "port": BULK_PORT, "up": st.bulk_up, "down": st.bulk_down}
    syn0 = syn_retransmissions(lab)
    proc = lab.popen(
        "client", _py_role(role, params), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    prof: subprocess.Popen[Any] | None = None
    try:
        load_pids = [proc.pid, server_pid]
        _sleep_until(win_start)
        a = take_sample(lab, load_pids)
        if profile is not None:
            prof = profile(kind, st.duration)
        _sleep_until(win_end)
        b = take_sample(lab, load_pids)
        try:
            out, err = proc.communicate(timeout=st.duration + 60)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"load generator {role} did not finish") from None
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"load generator {role} failed ({proc.returncode}): {err[-600:]}")
        res = json.loads(out.strip().splitlines()[-1])
    finally:
        stop_process(proc)
        with contextlib.suppress(ValueError):
            lab.procs.remove(proc)
        if prof is not None:
            try:
                prof.wait(timeout=st.duration + 30)
            except subprocess.TimeoutExpired:
                stop_process(prof)
    ph = phase_between(a, b)
    ph.errors = int(res.get("errors", 0))
    ph.syn_retrans = syn_retransmissions(lab) - syn0
    if kind == "rr":
        ph.transactions = int(res["window_transactions"])
        ph.app_bytes = ph.transactions * (len(REQUEST) + len(RESPONSE))
    else:
        ph.app_bytes = int(res["window_bytes"])
    return ph


def _latency(lab: BenchLab, st: Settings) -> dict[str, float]:
    params = {
        "host": SERVER_V4,
        "port": RR_PORT,
        "count": st.lat_count,
        "warmup": 20,
        "max_seconds": 4.0 if st.short else 15.0,
    }
    res = _run_load(lab, "latency", params, timeout=60)
    return {k: float(v) for k, v in res.items()}


def measure_path(
    lab: BenchLab,
    work: Path,
    st: Settings,
    name: str,
    label: str,
    server_pid: int,
    log: Callable[[str], None],
) -> PathResult:
    result = PathResult(name, label)
    gp = GatewayPath(name, lab, work, st)
    try:
        log(f"[{name}] latency")
        result.base_latency = _latency(lab, st)
        gp.start()
        drops0 = queue_drops(lab)
        result.latency = _latency(lab, st) if name != "none" else result.base_latency
        profile = _profiler(lab, st, name) if st.profile is not None and name == "tcpguard-1" else None
        for kind in ("rr", "bulk"):
            log(f"[{name}] {kind} for {st.duration:g} s")
            result.phases[kind] = _phase(lab, st, kind, server_pid, profile)
        result.queue_drops = queue_drops(lab) - drops0
        if not gp.alive():
            result.error = f"filter process exited: {gp.tail()}"
    except Exception as e:  # one path failing must not hide the others' figures
        result.error = f"{type(e).__name__}: {e}"
        log(f"[{name}] failed: {result.error}")
    finally:
        gp.stop()
    return result


def _profiler(
    lab: BenchLab, st: Settings, name: str
) -> Callable[[str, float], subprocess.Popen[Any] | None] | None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(pyspy, os.X_OK) or st.profile is None:
        return None
    outdir = st.profile

    def start(kind: str, seconds: float) -> subprocess.Popen[Any] | None:
        pids = lab.pids("gw")
        if not pids:
            return None
        outdir.mkdir(parents=True, exist_ok=True)
        out = outdir / f"{name}-{kind}.txt"
        return subprocess.Popen(
            [
                pyspy,
                "record",
                "--nonblocking",
                "-r",
                "200",
                "-d",
                str(max(1, int(seconds))),
                "-f",
                "raw",
                "-o",
                str(out),
                "-p",
                str(pids[0]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return start


# ============================================================================ memory and offline
@dataclass(slots=True)
class MemResult:
    label: str
    count: int = 0
    per_conn: float = 0.0
    traced_per_conn: float | None = None
    note: str = ""


def fabricated_memory(st: Settings, exchanged: bool) -> MemResult:
    label = "fabricated, after 1 request/response" if exchanged else "fabricated, handshake only"
    res = MemResult(label)
    for tm in (False, True):
        # tracemalloc slows allocation several times over: its figure comes from a smaller run.
        count = min(st.mem_count, 20_000) if tm else st.mem_count
        params = {"count": count, "exchanged": exchanged, "rules": str(st.rules), "tracemalloc": tm}
        r = subprocess.run(_py_role("mem", params), capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            res.note = f"failed: {r.stderr.strip()[-300:]}"
            return res
        d = json.loads(r.stdout.strip().splitlines()[-1])
        if tm:
            res.traced_per_conn = float(d["traced_per_conn"])
            res.note += f"; traced on {int(d['tracked']):,}"
        else:
            res.count = int(d["tracked"])
            res.per_conn = float(d["per_conn"])
            res.note = f"states {','.join(d['states'])}; {d['count'] / d['seconds']:,.0f} conns/s"
    return res


def held_open_memory(lab: BenchLab, work: Path, st: Settings, log: Callable[[str], None]) -> MemResult:
    """Real connections through a fresh one-worker daemon: daemon RSS delta / connections."""
    res = MemResult("real connections held open through the daemon")
    gp = GatewayPath("tcpguard-hold", lab, work, st)
    count = min(st.hold_count, max_open_files() - 2048)
    hold: subprocess.Popen[Any] | None = None
    try:
        gp.start_daemon(1, max_connections=max(65536, count * 2))
        assert gp.proc is not None
        pid = gp.proc.pid
        # One connection first, so one-time allocations are not charged to the measured ones.
        _latency_once(lab)
        time.sleep(0.3)
        before = rss_bytes(pid)
        log(f"[hold] opening {count} connections")
        params = {
            "host": SERVER_V4,
            "ports": [RR_PORT, RR_PORT2],
            "count": count,
            "inflight": 256,
            "max_seconds": 600,
        }
        hold = lab.popen(
            "client", _py_role("hold", params), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert hold.stdout is not None
        line = _readline_timeout(hold.stdout, 600)
        d = json.loads(line)
        time.sleep(0.5)
        after = rss_bytes(pid)
        res.count = int(d["held"])
        res.per_conn = (after - before) / max(1, res.count)
        res.note = f"{d['failed']} failed" if d["failed"] else ""
    except Exception as e:
        res.note = f"failed: {type(e).__name__}: {e}"
    finally:
        gp.stop()  # stop the daemon first: 100k closes need not go through it
        if hold is not None:
            stop_process(hold)
    return res


def _latency_once(lab: BenchLab) -> None:
    params = {"host": SERVER_V4, "port": RR_PORT, "count": 5, "warmup": 0, "max_seconds": 5}
    _run_load(lab, "latency", params, timeout=30)


def _readline_timeout(f: IO[str], timeout: float) -> str:
    import select

    r, _, _ = select.select([f], [], [], timeout)
    if not r:
        raise TimeoutError(f"no answer in {timeout} s")
    line = f.readline()
    if not line:
        raise RuntimeError("the holder exited")
    return line


@dataclass(slots=True)
class OfflineResult:
    label: str
    frames: int = 0
    seconds: float = 0.0  # wall time of the whole command, start-up included
    cpu: float = 0.0  # its CPU time (user + system): what other load on the machine cannot inflate
    note: str = ""

    @property
    def pps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_pps(self) -> float:
        return self.frames / self.cpu if self.cpu > 0 else 0.0


def offline(st: Settings, work: Path, log: Callable[[str], None]) -> tuple[list[OfflineResult], str]:
    cap = work / "bench.pcap"
    t = time.perf_counter()
    frames, conns = generate_capture(cap, st.capture_packets)
    info = (
        f"generated capture: {frames} frames, {conns} connections, {cap.stat().st_size / 1e6:.1f} MB "
        f"({time.perf_counter() - t:.1f} s)"
    )
    log(info)
    cli = [sys.executable, "-m", "tcpguard.app.cli"]
    # A warm-up run of each command on a tiny capture, untimed, so that the timed runs import byte-compiled
    # modules as an installed tcpguard does (pip compiles them at install; an editable checkout compiles
    # them on first use, and not at all under PYTHONDONTWRITEBYTECODE, which _timed leaves out).
    tiny = work / "warmup.pcap"
    generate_capture(tiny, 20)
    _timed([*cli, "replay", str(tiny), "--rules", str(st.rules)])
    warm_out = Path(tempfile.mkdtemp(prefix="tcpguard-bench-warmup-", dir=work))
    _timed([*cli, "trace", str(tiny), "-o", str(warm_out / "flows")])
    shutil.rmtree(warm_out, ignore_errors=True)
    results = []
    rep = OfflineResult("tcpguard replay (sample rules)", frames)
    r, rep.seconds, rep.cpu = _timed([*cli, "replay", str(cap), "--rules", str(st.rules)])
    if r.returncode != 0:
        rep.note = f"failed: {r.stderr.strip()[-300:]}"
        rep.seconds = 0.0
    elif f"frames {frames}" not in r.stdout:
        rep.note = "unexpected summary: " + r.stdout.strip().splitlines()[0]
    results.append(rep)
    # Trace writes a file per flow. The tmpfs row measures the tool; the disk row adds the file system,
    # whose cost depends on its state: on the journal-less ext4 of the development machine, creating a
    # file within 30 s of mass deletions scans past every recently deleted inode (ext4's
    # recently_deleted()), which took a quarter of a trace's time after a test run had removed thousands
    # of files (perf, 2026-12-02).
    for where, parent in (("tmpfs", _tmpfs_dir()), ("disk", work)):
        tr = OfflineResult(f"tcpguard trace (output on {where})", frames)
        if parent is None:
            tr.frames = 0
            tr.note = "no writable tmpfs (/dev/shm) on this machine"
            results.append(tr)
            continue
        out = Path(tempfile.mkdtemp(prefix="tcpguard-bench-trace-", dir=parent))
        try:
            r, tr.seconds, tr.cpu = _timed([*cli, "trace", str(cap), "-o", str(out / "flows")])
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if r.returncode != 0:
            tr.note = f"failed: {(r.stderr or r.stdout).strip()[-300:]}"
            tr.seconds = 0.0
        results.append(tr)
    return results, info


def _tmpfs_dir() -> Path | None:
    """/dev/shm if it is a writable tmpfs, else None."""
    shm = Path("/dev/shm")
    try:
        with open("/proc/mounts", encoding="ascii", errors="replace") as f:
            mounts = {cols[1]: cols[2] for cols in (line.split() for line in f) if len(cols) > 2}
    except OSError:
        return None
    return shm if mounts.get(str(shm)) == "tmpfs" and os.access(shm, os.W_OK) else None


def _timed(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run a command; (result, wall seconds, CPU seconds of the command)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=1800, check=False, stdin=subprocess.DEVNULL, env=env
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return r, wall, cpu


# ================================================================================== reporting
def background_load(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds`, before we start anything."""
    b0, t0 = _machine_cpu()
    time.sleep(seconds)
    b1, t1 = _machine_cpu()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def machine_description() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for mod in ("netfilterqueue", "scapy", "greenlet"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{mod} {version(mod)}")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": f"Linux {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
        "tcpguard": f"{commit or 'unknown'}, core {core.MODE}",
    }


def _f(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a > 0 and b > 0 else "-"


@dataclass
class Report:
    paths: list[PathResult]
    mem: list[MemResult]
    offline: list[OfflineResult]
    capture_info: str
    machine: dict[str, str]
    command: str
    per_core: str = "tcpguard-2"
    wall: float = 0.0

    def path(self, name: str) -> PathResult | None:
        return next((p for p in self.paths if p.name == name), None)

    def pps(self, name: str, kind: str) -> float:
        p = self.path(name)
        ph = p.phases.get(kind) if p is not None else None
        return ph.pps if ph is not None else 0.0

    def tables(self) -> list[str]:
        """Markdown tables (also printed on the terminal)."""
        out = [
            "### Through the gateway",
            "",
            "| path | traffic | packets/s | x bare | MB/s | req/s | gw CPU us/pkt | CPU x bare "
            "| pkt/s per gw core | machine busy | queue drops | errors | SYN retrans |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        bare = self.path("nfq-bare")
        for p in self.paths:
            for kind in ("rr", "bulk"):
                ph = p.phases.get(kind)
                if ph is None:
                    failed = f"failed: {p.error or 'no result'}"
                    out.append(f"| {p.name} | {kind} | {failed} |" + " |" * 10)
                    continue
                bph = bare.phases.get(kind) if bare is not None else None
                cpu = _f(ph.cpu_us_per_packet, 1) if ph.gw_cpu_ns else "(kernel)"
                cpu_x = _ratio(ph.cpu_us_per_packet, bph.cpu_us_per_packet) if bph and ph.gw_cpu_ns else "-"
                per_core = _f(1e6 / ph.cpu_us_per_packet) if ph.gw_cpu_ns else "-"
                out.append(
                    f"| {p.name} | {kind} | {_f(ph.pps)} | {_ratio(ph.pps, bph.pps) if bph else '-'} "
                    f"| {_f(ph.bps / 1e6, 1)} | {_f(ph.transactions / ph.seconds) if kind == 'rr' else '-'} "
                    f"| {cpu} | {cpu_x} | {per_core} | {ph.busy_share * 100:.0f}% "
                    f"| {p.queue_drops if p.name.startswith(('nfq', 'tcpguard')) else '-'} | {ph.errors} "
                    f"| {ph.syn_retrans} |"
                )
        out += [
            "",
            "### Latency of one small request/response (idle path, microseconds)",
            "",
            "| path | p50 | p99 | unfiltered p50 | unfiltered p99 | added p50 | added p99 "
            "| added p50 x bare |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        bare_added = 0.0
        if bare is not None and bare.latency.get("n") and bare.base_latency.get("n"):
            bare_added = bare.latency["p50"] - bare.base_latency["p50"]
        for p in self.paths:
            lat, b = p.latency, p.base_latency
            if not lat or not lat.get("n") or not b.get("n"):
                out.append(f"| {p.name} | failed: {p.error or 'no result'} | | | | | | |")
                continue
            a50, a99 = lat["p50"] - b["p50"], lat["p99"] - b["p99"]
            out.append(
                f"| {p.name} | {lat['p50']:.0f} | {lat['p99']:.0f} | {b['p50']:.0f} | {b['p99']:.0f} "
                f"| {a50:+.0f} | {a99:+.0f} | {_ratio(a50, bare_added) if p.name != 'none' else '-'} |"
            )
        out += [
            "",
            "### Memory per idle tracked connection (sample rules)",
            "",
            "| measurement | connections | RSS bytes/conn | traced bytes/conn | notes |",
            "|---|--:|--:|--:|---|",
        ]
        for m in self.mem:
            traced = _f(m.traced_per_conn) if m.traced_per_conn is not None else "-"
            out.append(f"| {m.label} | {m.count:,} | {_f(m.per_conn)} | {traced} | {m.note} |")
        out += [
            "",
            f"### Offline ({self.capture_info})",
            "",
            "| command | frames | wall s | packets/s (wall) | CPU s | packets/s (CPU) | notes |",
            "|---|--:|--:|--:|--:|--:|---|",
        ]
        for o in self.offline:
            if not o.seconds:
                out.append(f"| {o.label} | {o.frames:,} | - | - | - | - | {o.note} |")
                continue
            out.append(
                f"| {o.label} | {o.frames:,} | {o.seconds:.2f} | {_f(o.pps)} | {o.cpu:.2f} | {_f(o.cpu_pps)} "
                f"| {o.note} |"
            )
        out += ["", "### Targets (issue 7)", "", "| target | measured | met |", "|---|---|---|"]
        out += self.targets()
        return out

    def targets(self) -> list[str]:
        rows = []

        def row(what: str, value: float, goal: float, fmt: str, higher: bool = True) -> None:
            if value <= 0:
                rows.append(f"| {what} | not measured | - |")
                return
            ok = value >= goal if higher else value < goal
            rows.append(f"| {what} | {fmt.format(value)} | {'yes' if ok else 'NO'} |")

        def per_core(name: str, kind: str) -> float:
            p = self.path(name)
            ph = p.phases.get(kind) if p is not None else None
            return 1e6 / ph.cpu_us_per_packet if ph is not None and ph.gw_cpu_ns else 0.0

        for kind in ("rr", "bulk"):
            t1, bare, naive = (
                self.pps("tcpguard-1", kind),
                self.pps("nfq-bare", kind),
                self.pps("nfq-scapy", kind),
            )
            row(f"tcpguard-1 / nfq-bare packets/s ({kind}) >= 0.8", t1 / bare if bare else 0, 0.8, "{:.2f}")
            c1, cb = per_core("tcpguard-1", kind), per_core("nfq-bare", kind)
            row(f"same, per gw core (CPU per packet) ({kind}) >= 0.8", c1 / cb if cb else 0, 0.8, "{:.2f}")
            row(f"tcpguard-1 / nfq-scapy packets/s ({kind}) >= 10", t1 / naive if naive else 0, 10, "{:.2f}")
            cn = per_core("nfq-scapy", kind)
            row(f"same, per gw core (CPU per packet) ({kind}) >= 10", c1 / cn if cn else 0, 10, "{:.2f}")
            t2 = self.pps(self.per_core, kind)
            row(
                f"{self.per_core} / tcpguard-1 packets/s ({kind}) >= 1.6", t2 / t1 if t1 else 0, 1.6, "{:.2f}"
            )
        for m in self.mem:
            row(f"{m.label}: bytes/conn < 1024", m.per_conn, 1024, "{:,.0f} B", higher=False)
        for o in self.offline:
            row(f"{o.label} > 100,000 packets/s (wall)", o.pps, 100_000, "{:,.0f}/s")
            row(f"{o.label} > 100,000 packets/s (CPU time)", o.cpu_pps, 100_000, "{:,.0f}/s")
        return rows

    def machine_lines(self) -> list[str]:
        return [f"- {k}: {v}" for k, v in self.machine.items()]


def write_doc(path: Path, report: Report) -> None:
    """Replace the results section between the markers (or append it), keeping the hand-written text."""
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    body = "\n".join(
        [
            begin,
            f"## Latest results ({time.strftime('%Y-%m-%d')})",
            "",
            f"Produced by `{report.command}` (wall time {report.wall:.0f} s) on:",
            "",
            *report.machine_lines(),
            "",
            *report.tables(),
            end,
        ]
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + body + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


def summarize_profile(path: Path, top: int = 25) -> list[str]:
    """py-spy raw (collapsed) stacks: the functions with the most self and inclusive samples."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        cnt = int(n)
        total += cnt
        frames = [re.sub(r" \((.*/)?([^/]*)\)$", r" (\2)", f) for f in stack.split(";")]
        if frames:
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + cnt
        for f in set(frames):
            incl[f] = incl.get(f, 0) + cnt
    if not total:
        return [f"{path.name}: no samples"]
    out = [f"{path.name}: {total} samples", "  self%  incl%  function"]
    for func, cnt in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * cnt / total:5.1f}  {100 * incl[func] / total:5.1f}  {func}")
    return out


# ================================================================================== the command
def settings_from(args: argparse.Namespace) -> Settings:
    short = bool(args.short)
    duration = args.duration if args.duration is not None else (1.5 if short else 10.0)
    return Settings(
        short=short,
        duration=duration,
        warmup=0.5 if short else 1.5,
        rr_conns=32 if short else 64,
        per_conn=10,
        bulk_up=2,
        bulk_down=2,
        lat_count=500 if short else 3000,
        mem_count=args.mem_count or (10_000 if short else 100_000),
        # --short: enough connections that their memory shows above the allocator's slack (with 300 the
        # RSS delta was once not positive).
        hold_count=args.hold if args.hold is not None else (2_000 if short else 15_000),
        capture_packets=args.packets or (20_000 if short else 200_000),
        rules=Path(args.rules).resolve(),
        workers=os.cpu_count() or 2,
        profile=Path(args.profile).resolve() if args.profile else None,
    )


def run_memory_only(st: Settings) -> int:
    """`--only memory`: the fabricated-connection memory rows alone (no namespaces, no root needed).

    The same subprocesses and rules copy as the full run, so the figures compare with its table; the
    real-connection row needs the network and is left out."""
    work = Path(tempfile.mkdtemp(prefix="tcpguard-bench-"))
    try:
        st.rules = bench_rules(st.rules, work / "rules")
        mem = [fabricated_memory(st, exchanged=False), fabricated_memory(st, exchanged=True)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| measurement | connections | RSS bytes/conn | traced bytes/conn | notes |")
    print("|---|--:|--:|--:|---|")
    for m in mem:
        traced = _f(m.traced_per_conn) if m.traced_per_conn is not None else "-"
        print(f"| {m.label} | {m.count:,} | {_f(m.per_conn)} | {traced} | {m.note} |")
    return 1 if any(m.note.startswith("failed") for m in mem) else 0


def run_bench(args: argparse.Namespace) -> int:
    st = settings_from(args)
    if args.only == "memory":
        return run_memory_only(st)
    t_start = time.monotonic()
    quiet = bool(args.quiet)

    def log(msg: str) -> None:
        if not quiet:
            print(f"  {msg}", file=sys.stderr, flush=True)

    if os.geteuid() != 0:
        print("tcpguard bench: needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "iptables", "ethtool") if shutil.which(t) is None]
    if missing:
        print(f"tcpguard bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout) must still run every cleanup below.
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="tcpguard-bench-"))
    try:
        st.rules = bench_rules(st.rules, work / "rules")
        background = background_load()
        if background > 0.10:
            log(f"warning: the machine is {background:.0%} busy before the start: figures will be low")
        paths: list[PathResult] = []
        mem: list[MemResult] = []
        with BenchLab() as lab:
            server = start_load_server(lab, work, nofile=st.hold_count + 4096)
            # Warm-up, not measured: the first traffic after start-up runs slow (caches, page faults).
            log("warm-up")
            _phase(lab, dataclasses.replace(st, duration=1.0, warmup=0.2), "rr", server.pid)
            _latency(lab, st)
            for name, label in paths_for(st.workers):
                paths.append(measure_path(lab, work, st, name, label, server.pid, log))
            if st.hold_count > 0:
                mem.append(held_open_memory(lab, work, st, log))
        # Without the network, after it: nothing else runs on the machine while the paths are measured.
        log(f"fabricating {st.mem_count} connections through the engine")
        mem[:0] = [fabricated_memory(st, exchanged=False), fabricated_memory(st, exchanged=True)]
        offline_results, cap_info = offline(st, work, log)
        machine = machine_description()
        machine["busy before start"] = f"{background:.0%} of all cores (other processes)"
        report = Report(
            paths,
            mem,
            offline_results,
            cap_info,
            machine,
            _command(args),
            per_core=f"tcpguard-{st.workers}",
        )
        report.wall = time.monotonic() - t_start
        print(
            "\n".join(
                [
                    "",
                    "tcpguard bench" + (" --short" if st.short else ""),
                    *report.machine_lines(),
                    "",
                    *report.tables(),
                ]
            )
        )
        if args.doc:
            write_doc(Path(args.doc), report)
            print(f"\nwrote {args.doc}")
        if st.profile is not None:
            for f in sorted(st.profile.glob("*.txt")):
                print("\n" + "\n".join(summarize_profile(f)))
        failed = [p.name for p in paths if p.error]
        return 1 if failed else 0
    finally:
        signal.signal(signal.SIGTERM, old)
        shutil.rmtree(work, ignore_errors=True)


def _command(args: argparse.Namespace) -> str:
    parts = ["tcpguard bench"]
    if args.short:
        parts.append("--short")
    if args.duration is not None:
        parts.append(f"--duration {args.duration:g}")
    for opt in ("mem_count", "hold", "packets"):
        v = getattr(args, opt)
        if v is not None:
            parts.append(f"--{opt.replace('_', '-')} {v}")
    if args.doc:
        parts.append(f"--doc {args.doc}")
    return " ".join(parts)


def add_subparser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="benchmark tcpguard against the alternatives on a namespace network (root)"
    )
    _add_arguments(p)
    p.set_defaults(func=run_bench)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--short", action="store_true", help="small counts and short phases (CI: checks it works)")
    p.add_argument(
        "--duration",
        type=float,
        help="seconds of measurement per traffic kind and path (default 10, 1.5 with --short)",
    )
    p.add_argument("--rules", default=str(DEFAULT_RULES), help="rules directory (default: the sample rules)")
    p.add_argument(
        "--mem-count",
        type=int,
        help="connections fabricated for the memory figure (default 100000, 10000 with --short)",
    )
    p.add_argument(
        "--hold",
        type=int,
        help="real connections held open through the daemon (default 15000, 2000 with --short; "
        "capped by the open-file limit; 0 skips)",
    )
    p.add_argument(
        "--packets", type=int, help="frames in the generated capture (default 200000, 20000 with --short)"
    )
    p.add_argument("--doc", help="write the results into this Markdown file (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--profile", metavar="DIR", help="record py-spy profiles of tcpguard-1 into DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--only",
        choices=["memory"],
        help="run one part alone: 'memory' prints the fabricated-connection memory rows (no root needed)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_role"]:
        ROLE_FUNCS[argv[1]](json.loads(argv[2]))
        return 0
    p = argparse.ArgumentParser(prog="tcpguard bench", description=__doc__.splitlines()[0] if __doc__ else "")
    _add_arguments(p)
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
