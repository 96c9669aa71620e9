"""The benchmark's traffic: the load generator's roles (run as processes inside the namespaces:
server, request/response clients, bulk transfers, latency probes, held-open connections, the bare
NFQUEUE filters, the memory probe) and fabricated packets and captures for the offline figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tcpguard.devtools.bench.network import (
    BULK_PORT,
    RR_PORT,
    RR_PORT2,
    TLS_NAME,
    TLS_PORT,
    TLS_SERVER_V4,
    BenchLab,
    _py_role,
    stop_process,
)
from tcpguard.devtools.labnet import SERVER_V4

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
# TLS kind: the application writes this much per sendall, so the ssl module fills maximal records (16 KB)
# back to back inside one call instead of returning to Python per record.
TLS_BLOCK = 1024 * 1024
TLS_MAX_CHILDREN = 256  # the TLS server's concurrent connections (one forked process each)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


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
    threading.Thread(target=_bulk_listener, args=(p["bulk_host"], int(p["bulk_port"])), daemon=True).start()
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


def _bulk_listener(host: str, port: int) -> None:
    # On the server's address, not the wildcard: the TLS kind's server has port 443 on another address.
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
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

    from tcpguard.app.daemon.ruleload import load_rules
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


# ------------------------------------------------------------------------------------------ TLS kind
def make_certificate(work: Path) -> tuple[Path, Path]:
    """A throwaway self-signed ECDSA P-256 certificate for `TLS_NAME`, made with the openssl command (the
    `cryptography` package is not a dependency). P-256 keeps the handshake cheap: the figure is meant to
    be the bulk of the transfer, not the signatures. Returns (certificate, key)."""
    cert, key = work / "tls-cert.pem", work / "tls-key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={TLS_NAME}", "-addext", f"subjectAltName=DNS:{TLS_NAME}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def _kernel_timeouts(s: socket.socket, seconds: float) -> None:
    """Bound every send and receive of `s` in the kernel (SO_SNDTIMEO/SO_RCVTIMEO) and leave the socket
    blocking for Python. A Python-level timeout makes the ssl module run the socket non-blocking and poll
    before every retry, which cost the TLS load a quarter to a third of its throughput here (loopback,
    one pair: 137-192 MB/s against 204-231 blocking); with kernel timeouts a stalled peer still ends the
    call (EAGAIN, an OSError), so nothing waits forever. Large buffers: fewer wake-ups per megabyte."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)


def _tls_header(mode: bytes, size: int) -> bytes:
    return mode + size.to_bytes(8, "big")


def _recv_exact_into(s: socket.socket, buf: bytearray, n: int) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:n])
        if not k:
            raise ConnectionError("closed early")
        got += k


def _role_tls_server(p: dict[str, Any]) -> None:
    """TLS listener: one forked process per connection (the crypto of several connections then runs on
    every core, which threads under the GIL would not), at most `TLS_MAX_CHILDREN` at once (the accept
    waits for one to end). A connection asks `U<size>` (the client uploads `size` bytes, answered by one
    byte `K` once they all arrived) or `D<size>` (the server sends `size` bytes); the client closes first."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(p["cert"], p["key"])
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((p["host"], int(p["port"])))
    ls.listen(256)
    end = time.monotonic() + float(p["max_seconds"])
    children: set[int] = set()

    def stop(*_: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    Path(p["ready"]).touch()
    ls.settimeout(0.5)
    while time.monotonic() < end:
        while children:
            pid, _ = os.waitpid(-1, os.WNOHANG if len(children) < TLS_MAX_CHILDREN else 0)
            if not pid:
                break
            children.discard(pid)
        try:
            c, _ = ls.accept()
        except TimeoutError:
            continue
        pid = os.fork()
        if pid:
            children.add(pid)
            c.close()
            continue
        # The child: one connection, then exit without running the parent's cleanup.
        code = 0
        try:
            ls.close()
            c.settimeout(None)
            _kernel_timeouts(c, 30)
            s = ctx.wrap_socket(c, server_side=True)
            buf = bytearray(TLS_BLOCK)
            head = bytearray(9)
            _recv_exact_into(s, head, 9)
            size = int.from_bytes(head[1:], "big")
            if head[:1] == b"U":
                got = 0
                while got < size:
                    k = s.recv_into(buf)
                    if not k:
                        raise ConnectionError("upload cut short")
                    got += k
                s.sendall(b"K")
            else:
                block = memoryview(random.Random(17).randbytes(TLS_BLOCK))
                left = size
                while left > 0:
                    n = min(left, TLS_BLOCK)
                    s.sendall(block[:n])
                    left -= n
            # Wait for the client's close (it closes first: TIME_WAIT stays on its side).
            with contextlib.suppress(OSError):
                s.recv(1)
        except (OSError, ValueError):
            code = 1
        os._exit(code)


def _role_tls(p: dict[str, Any]) -> None:
    """`up` uploading and `down` downloading processes, each doing TLS connections one after another
    (handshake with SNI and certificate check, `size` bytes, close) until `stop_at`. Counts the bytes
    moved and the connections completed inside the window, summed over the processes."""
    import ssl

    win_start, win_end, stop_at = float(p["win_start"]), float(p["win_end"]), float(p["stop_at"])
    size = int(p["size"])
    sources = list(p.get("sources") or [""])
    modes = [b"U"] * int(p["up"]) + [b"D"] * int(p["down"])
    kids: list[tuple[int, int]] = []
    for i, mode in enumerate(modes):
        r, w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(w)
            kids.append((pid, r))
            continue
        os.close(r)
        stats: dict[str, Any] = {
            "window_bytes": 0,
            "bytes": 0,
            "connections": 0,
            "window_connections": 0,
            "errors": 0,
        }
        try:
            ctx = ssl.create_default_context(cafile=p["cafile"])
            _tls_worker(
                ctx, p["host"], int(p["port"]), mode, size, sources, i, stats, win_start, win_end, stop_at
            )
        except Exception as e:  # one process failing must reach the report, not hang it
            stats["errors"] += 1
            stats["failure"] = f"{type(e).__name__}: {e}"
        os.write(w, json.dumps(stats).encode())
        os.close(w)
        os._exit(0)
    total: dict[str, Any] = {
        "window_bytes": 0,
        "bytes": 0,
        "connections": 0,
        "window_connections": 0,
        "errors": 0,
    }
    for pid, r in kids:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        try:
            one = json.loads(data)
        except ValueError:
            total["errors"] += 1
            continue
        for k in ("window_bytes", "bytes", "connections", "window_connections", "errors"):
            total[k] += int(one.get(k, 0))
        for k in ("cipher", "failure"):
            if one.get(k):
                total[k] = one[k]
    print(json.dumps(total), flush=True)


def _tls_worker(
    ctx: Any,
    host: str,
    port: int,
    mode: bytes,
    size: int,
    sources: list[str],
    index: int,
    stats: dict[str, Any],
    win_start: float,
    win_end: float,
    stop_at: float,
) -> None:
    """One process's connections, until `stop_at` (a transfer under way then is cut short)."""
    block = memoryview(random.Random(19).randbytes(TLS_BLOCK))
    buf = bytearray(TLS_BLOCK)
    n = 0
    while time.monotonic() < stop_at:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _kernel_timeouts(raw, 10)
        try:
            raw.bind((sources[(index + n * 7) % len(sources)], 0))
            n += 1
            raw.connect((host, port))
            s = ctx.wrap_socket(raw, server_hostname=TLS_NAME)
            stats["cipher"] = (s.cipher() or ("",))[0]
            s.sendall(_tls_header(mode, size))
            left = size
            while left > 0 and time.monotonic() < stop_at:
                if mode == b"U":
                    k = min(left, TLS_BLOCK)
                    s.sendall(block[:k])
                else:
                    k = s.recv_into(buf)
                    if not k:
                        raise ConnectionError("download cut short")
                left -= k
                t = time.monotonic()
                stats["bytes"] += k
                if win_start <= t < win_end:
                    stats["window_bytes"] += k
            if left > 0:
                break  # stop_at passed mid-transfer
            if mode == b"U":
                _recv_exact_into(s, buf, 1)  # the server has every byte
            stats["connections"] += 1
            if win_start <= time.monotonic() < win_end:
                stats["window_connections"] += 1
        except (OSError, ValueError):
            stats["errors"] += 1
            time.sleep(0.05)  # a refused or reset connection must not spin
        finally:
            raw.close()


def start_tls_server(lab: BenchLab, work: Path, cert: Path, key: Path) -> subprocess.Popen[Any]:
    """The TLS kind's server in the server namespace, on its own address, once it listens."""
    ready = work / "tls-server.ready"
    ready.unlink(missing_ok=True)
    params = {
        "host": TLS_SERVER_V4,
        "port": TLS_PORT,
        "cert": str(cert),
        "key": str(key),
        "ready": str(ready),
        "max_seconds": 3600,
    }
    server = lab.popen("server", _py_role("tls_server", params), cwd=work)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the TLS load server did not start")
        time.sleep(0.05)
    return server


ROLE_FUNCS: dict[str, Callable[[dict[str, Any]], None]] = {
    "server": _role_server,
    "rr": _role_rr,
    "bulk": _role_bulk,
    "latency": _role_latency,
    "hold": _role_hold,
    "nfq": _role_nfq,
    "mem": _role_mem,
    "tls_server": _role_tls_server,
    "tls": _role_tls,
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


def start_load_server(lab: BenchLab, work: Path, nofile: int) -> subprocess.Popen[Any]:
    """The load generator's server (request/response and bulk listeners) in the server namespace, once it
    listens; the lab stops it at the latest."""
    ready = work / "server.ready"
    ready.unlink(missing_ok=True)
    params = {
        "rr_ports": [RR_PORT, RR_PORT2],
        "bulk_host": SERVER_V4,
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
