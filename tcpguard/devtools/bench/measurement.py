"""What the benchmark measures and how: samples of the gateway's counters and CPU, phases
between samples, one path's run, resident memory per connection, offline replay and trace throughput,
and the state of the machine the run had.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tcpguard import core
from tcpguard.devtools.bench.load import (
    REQUEST,
    RESPONSE,
    _run_load,
    generate_capture,
    max_open_files,
    rss_bytes,
)
from tcpguard.devtools.bench.network import (
    BULK_PORT,
    CLIENT_SOURCES,
    ROOT,
    RR_PORT,
    RR_PORT2,
    TLS_PORT,
    TLS_SERVER_V4,
    BenchLab,
    GatewayPath,
    Settings,
    _py_role,
    bypass_supported,
    stop_process,
)
from tcpguard.devtools.labnet import (
    GW_CLIENT_IF,
    GW_SERVER_IF,
    SERVER_V4,
)


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
    # What went to user space: packets, the queues' id counters (every packet a queue delivered, each
    # segment of an aggregate the kernel cut for a queue without GSO counted once); bytes, the NFQUEUE
    # rules' counters (an aggregate counted whole, before any cut). 0 on the paths without a queue.
    uq_packets: int = 0
    uq_bytes: int = 0
    drops: int = 0  # the kernel's NFQUEUE drop counters (queue_drops)
    # The daemon's own counters (status over the control socket), None on the other paths.
    daemon_packets: int | None = None
    daemon_bypassed: int | None = None


def queued_counters(lab: BenchLab) -> tuple[int, int]:
    """Packets and bytes that every `-j NFQUEUE` rule in the gateway (every table and chain: the
    baselines' FORWARD rule or tcpguard's own chain) sent to a queue. Packets that a bypass rule lets
    through before the NFQUEUE rule are not in them: they never left the kernel."""
    r = lab.run("gw", ["iptables-save", "-c"], check=False)
    pk = by = 0
    for line in r.stdout.splitlines():
        if line.startswith("[") and "-j NFQUEUE" in line:
            counts = line[1 : line.index("]")].split(":")
            pk += int(counts[0])
            by += int(counts[1])
    return pk, by


def daemon_counters(sock: Path) -> tuple[int | None, int | None]:
    """(packets received, connections bypassed) summed over the daemon's workers, from `status`; the
    bypassed count is None when the daemon does not report one (no bypass in this build)."""
    from tcpguard.app.control.client import ControlClient
    from tcpguard.app.control.protocol import ControlError

    try:
        resp = ControlClient(sock, timeout=10).call({"cmd": "status"})
    except ControlError:
        return None, None
    workers = [w for w in (resp.get("result") or {}).get("workers", []) if "error" not in w]
    packets = sum(int(w.get("packets", {}).get("received") or 0) for w in workers)
    counts = [w.get("engine", {}).get("bypassed") for w in workers]
    bypassed = sum(int(c) for c in counts) if counts and all(c is not None for c in counts) else None
    return packets, bypassed


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


def take_sample(lab: BenchLab, load_pids: list[int], daemon_sock: Path | None = None) -> Sample:
    t = time.monotonic()
    pk, by = _link_tx(lab)
    gw = sum(proc_cpu_ns(p) for p in lab.pids("gw"))
    load = sum(proc_cpu_ns(p) for p in load_pids)
    busy, total = _machine_cpu()
    sample = Sample(t, pk, by, gw, load, busy, total)
    sample.uq_bytes = queued_counters(lab)[1]
    sample.uq_packets, sample.drops = queue_counters(lab)
    if daemon_sock is not None:
        sample.daemon_packets, sample.daemon_bypassed = daemon_counters(daemon_sock)
    return sample


def queue_counters(lab: BenchLab) -> tuple[int, int]:
    """(packets delivered, drops) of every NFQUEUE bound in the gw namespace, from
    /proc/net/netfilter/nfnetlink_queue: the last packet id (id_sequence: each packet queued takes the
    next one) and queue_dropped + user_dropped. (0, 0) if none is bound."""
    r = lab.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False)
    ids = drops = 0
    for line in r.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 8:
            drops += int(cols[5]) + int(cols[6])
            ids += int(cols[7])
    return ids, drops


def queue_drops(lab: BenchLab) -> int:
    """queue_dropped + user_dropped of every NFQUEUE in the gw namespace (0 if none is bound)."""
    return queue_counters(lab)[1]


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
    uq_packets: int = 0
    uq_bytes: int = 0
    drops: int = 0
    connections: int = 0  # completed inside the window (tls), opened (rr); 0 where not counted
    daemon_packets: int | None = None
    daemon_bypassed: int | None = None

    @property
    def mean_size(self) -> float:
        """Mean size of the packets the gateway forwarded (bytes)."""
        return self.bytes / self.packets if self.packets else 0.0

    @property
    def uq_mean_size(self) -> float:
        """Mean size of the packets the queue delivered to user space (bytes)."""
        return self.uq_bytes / self.uq_packets if self.uq_packets else 0.0

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
    failed: dict[str, str] = field(default_factory=dict)  # kind -> why it has no figures
    queue_drops: int = 0
    error: str = ""
    note: str = ""


def phase_between(a: Sample, b: Sample) -> PhaseResult:
    jiffies = b.total - a.total

    def delta(x: int | None, y: int | None) -> int | None:
        return y - x if x is not None and y is not None else None

    return PhaseResult(
        seconds=b.t - a.t,
        packets=b.tx_packets - a.tx_packets,
        bytes=b.tx_bytes - a.tx_bytes,
        gw_cpu_ns=b.gw_cpu_ns - a.gw_cpu_ns,
        load_cpu_ns=b.load_cpu_ns - a.load_cpu_ns,
        busy_share=(b.busy - a.busy) / jiffies if jiffies > 0 else 0.0,
        uq_packets=b.uq_packets - a.uq_packets,
        uq_bytes=b.uq_bytes - a.uq_bytes,
        drops=b.drops - a.drops,
        daemon_packets=delta(a.daemon_packets, b.daemon_packets),
        daemon_bypassed=delta(a.daemon_bypassed, b.daemon_bypassed),
    )


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
    daemon_sock: Path | None = None,
) -> PhaseResult:
    """Run one traffic kind; sample the gateway over the steady-state window. `bulk-gso` turns the
    offloads on for its run and off again after it, also on failure."""
    if kind == "bulk-gso":
        lab.offloads(True)
        try:
            return _phase(lab, st, "bulk", server_pid, profile, daemon_sock)
        finally:
            lab.offloads(False)
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
    elif kind == "tls":
        if st.tls_cert is None:
            raise RuntimeError("no TLS certificate for the tls kind")
        role, params = (
            "tls",
            {
                **common,
                "host": TLS_SERVER_V4,
                "port": TLS_PORT,
                "up": st.tls_up,
                "down": st.tls_down,
                "size": st.tls_size,
                "cafile": str(st.tls_cert),
            },
        )
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
        a = take_sample(lab, load_pids, daemon_sock)
        if profile is not None:
            prof = profile(kind, st.duration)
        _sleep_until(win_end)
        b = take_sample(lab, load_pids, daemon_sock)
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
    if kind == "tls":
        ph.connections = int(res.get("window_connections", 0))
        ph.note = "; ".join(x for x in (str(res.get("cipher") or ""), str(res.get("failure") or "")) if x)
        if not res.get("connections"):
            raise RuntimeError(f"no TLS connection completed: {res.get('failure') or res}")
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
        sock = gp.control_socket if name.startswith("tcpguard-") else None
        if name.endswith("+bypass") and not bypass_supported():
            result.note = "this daemon has no engine.inspection.bypass: ran as bypass off"
        for kind in st.kinds:
            log(f"[{name}] {kind} for {st.duration:g} s")
            try:
                result.phases[kind] = _phase(lab, st, kind, server_pid, profile, sock)
            except RuntimeError as e:  # one kind failing must not hide the path's other kinds
                result.failed[kind] = str(e)
                log(f"[{name}] {kind} failed: {e}")
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
