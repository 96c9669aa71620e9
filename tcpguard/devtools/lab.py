"""`tcpguard lab`: see tcpguard work in a minute, on a throwaway network made of namespaces.

`tcpguard lab` (root) builds the client <-> gateway <-> server network of `tcpguard.devtools.labnet`, starts
the lab's servers in the server namespace, runs the real daemon (`tcpguard run`) in the gateway with the
sample rules, then drives a scripted mix of connections from the client namespace (allowed ones, and one
for each sample rule that drops, resets or half-resets) and shows, connection by connection, what the
client saw, what the gateway decided and why (the rule's alert), and what reached the server. It exits
by itself when the mix is done (`--stay` keeps the network up for experiments until Ctrl-C) and tears
everything down on exit, on Ctrl-C, on SIGTERM and on errors: the daemon is stopped (it removes its
iptables rules), every process the lab started is killed, the namespaces are deleted.

The pieces are subcommands, so the docker-compose topology (docker/) runs the very same code:

* `tcpguard lab serve`: the servers (HTTP on 80 and 8080, a TLS stand-in on 443), recording per
  connection what they received and how the connection ended, as JSON lines.
* `tcpguard lab drive --server ADDR`: the scripted mix and the live view, from wherever it runs (the
  client namespace, the client container). The gateway's view comes from two files when given: the
  daemon's alerts (`alerts.file`) and the lab observer's record of every `end_connection`.
* `tcpguard lab rules DIR`: a rules directory for a lab gateway: the sample rules plus the observer,
  a rule module that only writes each connection's end (reason, counters, `flow.store`) to a file.
* `tcpguard lab clean`: remove namespaces left behind by a lab that was killed with SIGKILL.

How a verdict is read: the observer's `end_connection` record says how the gateway ended the connection
(`fin`/`rst`/`timeout`: it passed; `reset`, `halfreset`, `drop`: a rule or a policy blocked it) and the
alerts file says why. Without those files (`drive` on its own) the verdict is inferred from what the client
saw: refused or reset, a connect that timed out (dropped), a request that got no answer (half-reset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

PREFIX = "tglab"
OBSERVER_FILE = "zz_lab_observer.py"
HTTP_PORTS = (80, 8080)
TLS_PORT = 443
PROBE_PORT = 22  # allowed by the sample firewall, nothing listens: a closed port answers a probe with RST
BURST = 30
READ_TIMEOUT = 2.0
TITLE = 37  # width of the scenario column
END_WAIT = 2.0

OBSERVER_RULE = '''"""The lab's observer: writes how each connection ended to a JSON-lines file.

For the live view of `tcpguard lab`. Not a filtering rule and not one of the samples: written by
`tcpguard lab rules`.
"""

import json
import time

from tcpguard import rule, tcp_connection

EVENTS = {events!r}


@rule(on=tcp_connection.events.end_connection)
def lab_observer(flow):
    record = {{
        "wall": time.time(),
        "flow": flow.id,
        "client": str(flow.srcip),
        "cport": flow.srcport,
        "server": str(flow.dstip),
        "sport": flow.dstport,
        "reason": flow.end_reason,
        "midstream": flow.midstream,
        "packets": [flow.pkts_up, flow.pkts_down],
        "bytes": [flow.bytes_up, flow.bytes_down],
        "store": {{k: v for k, v in flow.store.items() if isinstance(v, str | int | float | bool)}},
    }}
    with open(EVENTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\\n")
'''


class LabError(Exception):
    """The lab cannot run; the message says what to do."""


# ==================================================================================== the scripted mix


@dataclass(frozen=True)
class Scenario:
    """One step of the mix: what the client does and what the sample rules should make of it."""

    key: str
    title: str
    expect: str  # allowed, reset, halfreset, drop, or limited (a burst with some connections dropped)
    rule: str = ""  # the sample rule module that should act
    kind: str = "tcp"  # tcp (a real connection), probe (one raw segment), burst (many connections at once)
    port: int = 80
    family: int = 4
    chunks: tuple[bytes, ...] = ()
    sni: str | None = None  # send a real TLS ClientHello for this name
    gap: float = 0.0
    flags: int = 0  # probe: the TCP flags of the segment


FIN, SYN, PSH, URG = 0x01, 0x02, 0x08, 0x20


def _get(path: str, host: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tcpguard-lab\r\n\r\n".encode()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("web", "HTTP GET / on port 80", "allowed", chunks=(_get("/", "www.example.org"),)),
    Scenario("web6", "HTTP GET / over IPv6", "allowed", family=6, chunks=(_get("/", "www.example.org"),)),
    Scenario("tls", "TLS ClientHello for www.example.org", "allowed", port=TLS_PORT, sni="www.example.org"),
    Scenario("telnet", "connect to port 23 (telnet)", "reset", rule="firewall", port=23),
    Scenario(
        "shellcode",
        "'/bin/sh' split over 4 segments",
        "reset",
        rule="shellcode",
        chunks=(b"GET /run?cmd=/b", b"in", b"/s", b"h HTTP/1.1\r\nHost: www.example.org\r\n\r\n"),
        gap=0.15,
    ),
    Scenario(
        "http_host",
        "HTTP GET with Host: blocked.example",
        "halfreset",
        rule="http_host",
        chunks=(_get("/", "blocked.example"),),
    ),
    Scenario(
        "tls_sni",
        "TLS ClientHello for tracker.example",
        "reset",
        rule="tls_sni",
        port=TLS_PORT,
        sni="tracker.example",
    ),
    Scenario(
        "xmas",
        f"Xmas scan (FIN+PSH+URG) of port {PROBE_PORT}",
        "drop",
        rule="badflags",
        kind="probe",
        port=PROBE_PORT,
        flags=FIN | PSH | URG,
    ),
    Scenario("synurg", "SYN with URG set to port 80", "drop", rule="badflags", kind="probe", flags=SYN | URG),
    Scenario("burst", f"{BURST} connections at once to port 80", "limited", rule="ratelimit", kind="burst"),
)


# ==================================================================================== client side


def client_hello(sni: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl module: OpenSSL) for server name `sni`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _error_name(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout"
    return type(e).__name__


def tcp_exchange(
    host: str,
    port: int,
    chunks: Sequence[bytes],
    gap: float = 0.0,
    timeout: float = READ_TIMEOUT,
    phase: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Connect, send each chunk (with `gap` seconds between), read the answer until EOF; what happened."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    res: dict[str, Any] = {"cport": 0, "connected": False, "sent": 0, "received": 0, "head": ""}
    res["error"] = None
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        res["cport"] = s.getsockname()[1]
        s.settimeout(timeout)
        reply = b""
        try:
            phase(f"connecting to {host} port {port}")
            s.connect((host, port))
            res["connected"] = True
            for i, chunk in enumerate(chunks):
                phase(f"sending {len(chunk)} bytes" + (f" (segment {i + 1} of {len(chunks)})" if i else ""))
                if i and gap:
                    time.sleep(gap)
                s.sendall(chunk)
                res["sent"] += len(chunk)
            phase("waiting for the answer")
            while True:
                b = s.recv(65536)
                if not b:
                    break
                reply += b
        except OSError as e:
            res["error"] = _error_name(e)
            pending = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if pending == 104:  # ECONNRESET still pending: a later call failed for another reason first
                res["error"] = "reset"
        res["received"] = len(reply)
        res["head"] = describe_reply(reply)
    res["elapsed"] = round(time.monotonic() - start, 3)
    return res


def describe_reply(reply: bytes) -> str:
    """A few printable words for what a server answered (never raw bytes on the terminal)."""
    if reply.startswith(b"HTTP/"):
        return reply.split(b"\r\n", 1)[0].decode("latin-1")
    if reply[:1] == b"\x15" and len(reply) >= 7:
        return f"TLS alert {reply[6]}"
    if not reply:
        return ""
    return reply[:20].decode("ascii", "backslashreplace").encode("unicode_escape").decode()


def probe(host: str, port: int, flags: int, wait: float = 1.0) -> dict[str, Any]:
    """Send one raw TCP segment with `flags` (IPv4) and report what came back within `wait` seconds."""
    from tcpguard.core import forge
    from tcpguard.core.errors import DecodeError
    from tcpguard.core.packet import decode, flags_text

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.connect((host, 9))
        src = u.getsockname()[0]
    sport = random.randint(40000, 60000)
    packet = forge.build_tcp(
        4,
        socket.inet_aton(src),
        socket.inet_aton(host),
        sport,
        port,
        random.getrandbits(32),
        0,
        flags,
        64240,
    )
    res: dict[str, Any] = {"cport": sport, "flags": flags_text(flags), "answer": None}
    with (
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as tx,
    ):
        tx.sendto(packet, (host, 0))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            rx.settimeout(left)
            try:
                raw = rx.recv(65535)
            except TimeoutError:
                break
            try:
                p = decode(raw)
            except DecodeError:
                continue
            if p.is_tcp and p.src == socket.inet_aton(host) and p.sport == port and p.dport == sport:
                res["answer"] = p.flag_names()
                break
    return res


def burst(host: str, port: int, count: int) -> list[dict[str, Any]]:
    """`count` HTTP connections opened at the same moment, each in its own thread."""
    results: list[dict[str, Any]] = [{} for _ in range(count)]
    go = threading.Event()

    def one(i: int) -> None:
        go.wait()
        results[i] = tcp_exchange(host, port, [_get(f"/burst/{i}", "www.example.org")])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    return results


# ==================================================================================== the gateway's view


def _unix_time(alert: dict[str, Any]) -> float:
    """An alert's ISO-8601 `timestamp` as Unix time (0 when it has none or it does not parse)."""
    try:
        return datetime.fromisoformat(str(alert.get("timestamp"))).timestamp()
    except ValueError:
        return 0.0


def read_jsonl(path: Path | None) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (a line still being written is skipped)."""
    if path is None or not path.exists():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


# End reasons of connections the gateway let through (the others name the action that blocked them).
PASSED = {r: "allowed" for r in ("fin", "rst", "timeout", "shutdown", "evicted", "reopened", "uninspected")}


class GatewayView:
    """How the gateway ended each connection (observer records) and why (alerts), matched by ports."""

    def __init__(self, events: Path | None, alerts: Path | None, server_log: Path | None) -> None:
        self.events = events
        self.alerts = alerts
        self.server_log = server_log
        self.since = time.time() - 1.0

    @property
    def available(self) -> bool:
        return self.events is not None

    def end(self, cport: int, sport: int, wait: float = END_WAIT) -> dict[str, Any] | None:
        """The observer's record of the connection from client port `cport` to `sport`, waiting for it."""
        if self.events is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            for rec in read_jsonl(self.events)[::-1]:
                if rec.get("wall", 0) < self.since:
                    continue
                if rec.get("cport") == cport and rec.get("sport") == sport:
                    return rec
                # A probe picked up mid-stream from a low port is recorded the other way round.
                if rec.get("sport") == cport and rec.get("cport") == sport and rec.get("midstream"):
                    return rec
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def alerts_of(self, flow_id: int) -> list[dict[str, Any]]:
        alerts = read_jsonl(self.alerts)
        return [a for a in alerts if a.get("flow_id") == flow_id and _unix_time(a) >= self.since]

    def server_saw(self, cport: int, port: int, wait: float = 1.0) -> dict[str, Any] | None:
        if self.server_log is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            for rec in read_jsonl(self.server_log)[::-1]:
                if rec.get("peer_port") == cport and rec.get("port") == port:
                    return rec
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


# ==================================================================================== the live view


class Style:
    """Plain ANSI colours, off when the output is not a terminal or NO_COLOR is set."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text

    def green(self, t: str) -> str:
        return self._wrap("32", t)

    def red(self, t: str) -> str:
        return self._wrap("31", t)

    def yellow(self, t: str) -> str:
        return self._wrap("33", t)

    def cyan(self, t: str) -> str:
        return self._wrap("36", t)

    def dim(self, t: str) -> str:
        return self._wrap("2", t)

    def bold(self, t: str) -> str:
        return self._wrap("1", t)


OUTCOME_COLOUR = {
    "allowed": "green",
    "reset": "red",
    "halfreset": "red",
    "drop": "yellow",
    "limited": "yellow",
}


class LiveLine:
    """The line of the scenario that is running: a spinner and its phase, rewritten in place."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: IO[str], style: Style, prefix: str, live: bool) -> None:
        self.out = out
        self.style = style
        self.prefix = prefix
        self.phase = "starting"
        self.live = live
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveLine:
        if self.live:
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        return self

    def set(self, phase: str) -> None:
        self.phase = phase

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.08):
            with self._lock:
                frame = self.FRAMES[i % len(self.FRAMES)]
                self.out.write(f"\r\x1b[2K{self.prefix}{self.style.cyan(frame)} {self.style.dim(self.phase)}")
                self.out.flush()
            i += 1

    def done(self, text: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self.out.write(("\r\x1b[2K" if self.live else "") + text + "\n")
            self.out.flush()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Result:
    key: str
    title: str
    rule: str
    expect: str
    outcome: str
    ok: bool
    detail: str
    gateway: str = ""
    alerts: list[str] = field(default_factory=list)
    connections: list[dict[str, Any]] = field(default_factory=list)


def _client_words(c: dict[str, Any]) -> str:
    err = c.get("error")
    if err is None:
        head = c.get("head") or ""
        return f"answered {head} ({c['received']} B)" if head else f"answered ({c['received']} B)"
    if err == "refused":
        return "connection refused"
    if err == "reset":
        return "connection reset"
    if err == "timeout":
        return "no answer (connect timed out)" if not c.get("connected") else "no answer (timed out)"
    return str(err)


def _infer(c: dict[str, Any]) -> str:
    """The verdict as the client saw it (when the gateway's records are not available)."""
    err = c.get("error")
    if err is None:
        return "allowed"
    if err in ("refused", "reset"):
        return "reset"
    if err == "timeout":
        return "drop" if not c.get("connected") else "halfreset"
    return "error"


def _server_words(s: dict[str, Any] | None) -> str:
    if s is None:
        return "saw nothing"
    status = s.get("status", "?")
    n = s.get("received", 0)
    if status == "reset":
        return f"got {n} B, then a reset"
    if status == "replied":
        return f"got {n} B, answered"
    return f"got {n} B ({status})"


class Driver:
    """Runs the scenarios one after the other and prints a line (or two) per scenario as it completes."""

    def __init__(
        self,
        server4: str,
        server6: str | None,
        view: GatewayView,
        out: IO[str],
        style: Style,
        live: bool,
    ) -> None:
        self.server4 = server4
        self.server6 = server6
        self.view = view
        self.out = out
        self.style = style
        self.live = live

    def run(self, scenarios: Sequence[Scenario]) -> list[Result]:
        st = self.style
        results = []
        width = shutil.get_terminal_size((200, 24)).columns if self.live else 0
        head = f"  {'#':>2}   {'verdict':<10} {'the client':<{TITLE}} what the client and the server saw"
        self.out.write(st.bold(_fit(head, width)) + "\n")
        for i, sc in enumerate(scenarios, 1):
            prefix = f"  {i:>2}   {'':<10} {sc.title:<{TITLE}} "
            with LiveLine(self.out, st, prefix, self.live) as line:
                res = self.one(sc, line)
                mark = st.green("✔") if res.ok else st.red("✘")
                colour = getattr(st, OUTCOME_COLOUR.get(res.outcome, "red"))
                first = _fit(f"{sc.title:<{TITLE}} {res.detail}", width - 18)
                text = f"  {i:>2} {mark} {colour(f'{res.outcome:<10}')} {first}"
                if not res.ok:
                    text += st.red(f"  (expected {sc.expect})")
                gateway = _fit(f"└ gateway: {res.gateway}", width - 18)
                text += "\n" + " " * 18 + st.dim(gateway)
                for a in res.alerts:
                    text += "\n" + " " * 20 + st.yellow(_fit(f"alert {a}", width - 20))
                line.done(text)
            results.append(res)
        return results

    def _host(self, sc: Scenario) -> str | None:
        return self.server6 if sc.family == 6 else self.server4

    def one(self, sc: Scenario, line: LiveLine) -> Result:
        host = self._host(sc)
        if host is None:
            return Result(sc.key, sc.title, sc.rule, sc.expect, "skipped", True, "no IPv6 server address")
        if sc.kind == "probe":
            line.set("sending one segment, listening for an answer")
            c = probe(host, sc.port, sc.flags)
            return self._judge(sc, [c], "probe")
        if sc.kind == "burst":
            line.set(f"opening {BURST} connections")
            conns = burst(host, sc.port, BURST)
            return self._judge(sc, conns, "burst")
        chunks = (client_hello(sc.sni),) if sc.sni else sc.chunks
        c = tcp_exchange(host, sc.port, chunks, gap=sc.gap, phase=line.set)
        line.set("waiting for the gateway's verdict")
        return self._judge(sc, [c], "tcp")

    def _gateway(self, sc: Scenario, c: dict[str, Any], deadline: float) -> None:
        end = self.view.end(c["cport"], sc.port, wait=max(deadline - time.monotonic(), 0.0))
        c["gateway"] = end
        c["alerts"] = self.view.alerts_of(end["flow"]) if end else []
        if sc.kind != "probe":
            c["server"] = self.view.server_saw(c["cport"], sc.port, wait=0.5 if c.get("connected") else 0.0)

    def _verdict(self, c: dict[str, Any], kind: str) -> str:
        end = c.get("gateway")
        if end is not None:
            reason = str(end["reason"])
            return PASSED.get(reason, reason)
        if kind == "probe":
            return "allowed" if c.get("answer") else "drop"
        return _infer(c)

    def _judge(self, sc: Scenario, conns: list[dict[str, Any]], kind: str) -> Result:
        deadline = time.monotonic() + END_WAIT  # one wait for all the connections of a burst
        for c in conns:
            self._gateway(sc, c, deadline)
        verdicts = [self._verdict(c, kind) for c in conns]
        alerts = [
            f"[{a['tcpguard']['severity']}] {a['alert']['signature']}" for c in conns for a in c["alerts"]
        ]
        gateway = self._gateway_words(conns)
        if kind == "burst":
            passed = verdicts.count("allowed")
            blocked = len(verdicts) - passed
            outcome = "limited" if passed and blocked else ("allowed" if not blocked else "drop")
            detail = f"client: {passed} answered, {blocked} not"
        else:
            c = conns[0]
            outcome = verdicts[0]
            if kind == "probe":
                detail = f"client: answer {c['answer']}" if c.get("answer") else "client: no answer"
            else:
                detail = "client: " + _client_words(c)
                if self.view.server_log is not None:
                    detail += " · server: " + _server_words(c.get("server"))
        ok = outcome == sc.expect
        return Result(sc.key, sc.title, sc.rule, sc.expect, outcome, ok, detail, gateway, alerts, conns)

    def _gateway_words(self, conns: list[dict[str, Any]]) -> str:
        """What the gateway recorded: end reasons (counted for a burst) and what the rules stored."""
        if not self.view.available:
            return "(no records: verdict inferred from what the client saw)"
        ends = [c.get("gateway") for c in conns]
        reasons: dict[str, int] = {}
        for e in ends:
            r = e["reason"] if e else "no record"
            reasons[r] = reasons.get(r, 0) + 1
        words = ", ".join(r if len(conns) == 1 else f"{n} {r}" for r, n in reasons.items())
        if len(conns) == 1 and ends[0]:
            e = ends[0]
            up, down = e["packets"]
            words = f"ended: {words}" + (f", {up}+{down} packets" if up or down else "")
            words += "".join(f", {k}={v}" for k, v in (e.get("store") or {}).items())
        else:
            words = f"ended: {words}"
        return words


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` columns with an ellipsis (no cut when width <= 0: not a terminal)."""
    if width <= 0 or len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + "…"


def summary_lines(results: Sequence[Result], style: Style) -> list[str]:
    ran = [r for r in results if r.outcome != "skipped"]
    good = sum(r.ok for r in ran)
    counts: dict[str, int] = {}
    for r in ran:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    alerts = sum(len(r.alerts) for r in ran)
    text = f"{good} of {len(ran)} as expected: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    text += f"; {alerts} alert{'s' if alerts != 1 else ''}"
    return [style.green(text) if good == len(ran) else style.red(text)]


# ==================================================================================== the servers


HTTP_BODY = b"hello from the tcpguard lab server\n"
HTTP_REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    % len(HTTP_BODY)
) + HTTP_BODY
# The lab has no certificate: its TLS port answers a complete ClientHello with a handshake_failure alert.
TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"


def _complete(data: bytes) -> bytes | None:
    """The reply once `data` holds a whole HTTP header block or TLS record, else None."""
    if data[:1] == b"\x16" and len(data) >= 5:
        return TLS_ALERT if len(data) >= 5 + int.from_bytes(data[3:5], "big") else None
    if b"\r\n\r\n" in data:
        return HTTP_REPLY
    return None


class Servers:
    """The lab's servers: one listening socket per port, one thread per connection, a JSON-lines record."""

    def __init__(self, ports: Sequence[int], record: Path | None) -> None:
        self.ports = ports
        self.record = record
        self._lock = threading.Lock()
        self.sockets: list[socket.socket] = []

    def listen(self) -> None:
        for port in self.ports:
            try:
                s = self._bind(socket.AF_INET6, "::", port)
            except OSError:  # no IPv6 here (a container without it): IPv4 only
                s = self._bind(socket.AF_INET, "0.0.0.0", port)
            s.listen(128)
            self.sockets.append(s)

    @staticmethod
    def _bind(family: socket.AddressFamily, addr: str, port: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
        except OSError:
            s.close()
            raise
        return s

    def serve_forever(self) -> None:
        for s in self.sockets:
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        threading.Event().wait()

    def _accept(self, srv: socket.socket) -> None:
        port = srv.getsockname()[1]
        while True:
            conn, peer = srv.accept()
            threading.Thread(target=self._handle, args=(conn, peer, port), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: Any, port: int) -> None:
        data = b""
        status = "eof"
        conn.settimeout(5.0)
        try:
            while True:
                b = conn.recv(65536)
                if not b:
                    break
                data += b
                reply = _complete(data)
                if reply is not None:
                    conn.sendall(reply)
                    status = "replied"
                    break
        except OSError as e:
            status = _error_name(e)
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        addr = str(peer[0])
        if addr.startswith("::ffff:"):
            addr = addr[7:]
        rec = {
            "wall": time.time(), "port": port, "peer": addr, "peer_port": peer[1], "received": len(data),
            "head": data[:60].decode("latin-1"), "status": status,
        }  # fmt: skip
        if self.record is not None:
            with self._lock, open(self.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")


# ==================================================================================== the gateway's rules


def default_rules_dir() -> Path | None:
    """The sample rules of a source checkout (the repository's rules/ next to the package), if there."""
    import tcpguard

    d = Path(tcpguard.__file__).resolve().parents[1] / "rules"
    return d if d.is_dir() else None


def prepare_rules(dest: Path, samples: Path, events: Path) -> list[str]:
    """Fill `dest` with copies of the rule modules of `samples` and the observer; the module names.

    Copies, not links: the copies belong to whoever runs the lab (root), which the rule loader demands of
    files it executes as root, whoever owns the checkout.
    """
    from tcpguard.app.daemon.ruleload import rule_files

    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    names = []
    for src in rule_files(samples):
        shutil.copyfile(src, dest / src.name)
        os.chmod(dest / src.name, 0o644)
        names.append(src.stem)
    (dest / OBSERVER_FILE).write_text(OBSERVER_RULE.format(events=str(events)), encoding="utf-8")
    os.chmod(dest / OBSERVER_FILE, 0o644)
    return names


def _check_rules(copy: Path, samples: Path) -> None:
    """Load the prepared rules once here, so a broken module is reported before anything starts."""
    from tcpguard.app.daemon.ruleload import load_rules
    from tcpguard.core.errors import RuleLoadError

    try:
        load_rules(copy)
    except RuleLoadError as e:
        raise LabError(str(e).replace(str(copy), str(samples))) from None


def lab_config(work: Path, rules: Path) -> str:
    """The daemon's config for the lab gateway (everything else at its default)."""
    return (
        "# tcpguard lab: the gateway's configuration (written by `tcpguard lab`).\n"
        f"rules_dir: {rules}\n"
        "queue:\n  num: 0\n  workers: 1\n  bypass: false\n"
        "iptables:\n  manage: true\n  hooks: [FORWARD]\n  ipv6: true\n"
        "logging:\n  level: info\n  target: stderr\n"
        f"alerts:\n  file: {work / 'alerts.jsonl'}\n"
        f"control:\n  socket: {work / 'control.sock'}\n"
    )


# ==================================================================================== the whole lab


class _StopSignalError(Exception):
    """SIGTERM or SIGHUP while the lab runs: tear down like Ctrl-C."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _StopSignalError(signal.Signals(signum).name)


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _preflight() -> None:
    if os.geteuid() != 0:
        raise LabError("needs root (it creates network namespaces and iptables rules): sudo tcpguard lab")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise LabError(f"'{tool}' is not installed (scripts/install.sh installs it)")
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        raise LabError(
            "the NFQUEUE binding is missing: pip install 'tcpguard[daemon]' (scripts/install.sh does it)"
        ) from None


class LabRun:
    """One run of `tcpguard lab`: the network, the servers, the daemon, the driver; torn down on exit."""

    def __init__(self, args: argparse.Namespace, out: IO[str]) -> None:
        self.args = args
        self.out = out
        self.style = Style(_colour(args, out))
        self.keep = args.out is not None
        self.work = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="tcpguard-lab-"))
        self.daemon: subprocess.Popen[bytes] | None = None
        self.results: list[Result] = []

    def say(self, text: str, end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[list[str]]:
        note: list[str] = []
        self.say(f"{self.style.cyan('▸')} {what} ... ", end="")
        t = time.monotonic()
        try:
            yield note
        except BaseException:
            self.say(self.style.red("failed"))
            raise
        took = time.monotonic() - t
        self.say(f"{(note[0] if note else 'done')} {self.style.dim(f'({took:.1f} s)')}")

    def run(self) -> int:
        from tcpguard.devtools import labnet

        args = self.args
        samples = Path(args.rules).resolve() if args.rules else default_rules_dir()
        if samples is None or not samples.is_dir():
            raise LabError("no sample rules found: give --rules DIR")
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)
        for name in ("events.jsonl", "alerts.jsonl", "server.jsonl", "daemon.log", "report.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.work / name).unlink()
        st = self.style
        self.say(st.bold("tcpguard lab") + ": a client, a gateway running tcpguard and a server")
        topology = f"client {labnet.CLIENT_V4} ── gateway (tcpguard, NFQUEUE 0) ── server {labnet.SERVER_V4}"
        self.say(st.dim("  " + topology))
        net = labnet.Lab(prefix=PREFIX)
        interrupted = False
        try:
            with self.step(f"preparing the rules ({samples})") as note:
                events = self.work / "events.jsonl"
                names = prepare_rules(self.work / "rules", samples, events)
                _check_rules(self.work / "rules", samples)
                config = lab_config(self.work, self.work / "rules")
                (self.work / "tcpguard.yaml").write_text(config, encoding="utf-8")
                note.append(f"{len(names)} modules: {', '.join(names)}")
            with self.step("building the network") as note:
                net.__enter__()
                note.append(f"namespaces {net.name('client')}, {net.name('gw')}, {net.name('server')}")
            return self._in(net, samples)
        except (KeyboardInterrupt, _StopSignalError):
            interrupted = True
            raise
        finally:
            with _shielded():
                if interrupted:
                    self.say("")
                self._teardown(net)

    def _teardown(self, net: Any) -> None:
        """Stop the daemon (it removes its iptables rules), kill the rest, delete the namespaces."""
        st = self.style
        daemon = self.daemon
        if daemon is not None and daemon.poll() is None:
            with self.step("stopping tcpguard") as note:
                daemon.send_signal(signal.SIGTERM)
                try:
                    code = daemon.wait(20)
                    note.append(f"exited {code}, its iptables rules removed")
                except subprocess.TimeoutExpired:
                    note.append("did not stop within 20 s: killed")
        if net.ns and net._created:
            net.close()
            self.say(f"{st.cyan('▸')} network removed: namespaces, interfaces, processes")
        if self.keep:
            self.say(st.dim(f"  config, logs and records kept in {self.work}"))
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def _in(self, net: Any, samples: Path) -> int:
        from tcpguard.devtools import labnet

        args, st, work = self.args, self.style, self.work
        py = sys.executable
        events, alerts, server_log = work / "events.jsonl", work / "alerts.jsonl", work / "server.jsonl"
        with self.step("starting the servers in the server namespace") as note:
            ready = work / "servers.ready"
            with contextlib.suppress(FileNotFoundError):
                ready.unlink()
            ports = sorted({*HTTP_PORTS, TLS_PORT})
            net.popen(
                "server",
                [py, "-m", "tcpguard.devtools.lab", "serve", "--record", str(server_log),
                 "--ready", str(ready), *(a for p in ports for a in ("--port", str(p)))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            _wait(ready.exists, 15, "the servers")
            note.append("listening on ports " + ", ".join(map(str, ports)))
        with self.step("starting tcpguard in the gateway namespace") as note:
            log = open(work / "daemon.log", "ab")  # noqa: SIM115 - handed to the process, closed below
            self.daemon = net.popen(
                "gw",
                [py, "-m", "tcpguard.app.cli", "run", "--config", str(work / "tcpguard.yaml")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            log.close()
            daemon = self.daemon

            def up() -> bool:
                if daemon.poll() is not None:
                    raise LabError(f"tcpguard exited with status {daemon.returncode}:\n{self._daemon_log()}")
                return "running:" in (work / "daemon.log").read_text(errors="replace")

            _wait(up, 20, "tcpguard to bind its queue and install its iptables rules")
            note.append("running: FORWARD → chain TCPGUARD → NFQUEUE 0, fail-closed")
        self.say("")
        driver_args = [
            py, "-m", "tcpguard.devtools.lab", "drive",
            "--server", labnet.SERVER_V4, "--server6", labnet.SERVER_V6,
            "--events", str(events), "--alerts", str(alerts), "--server-log", str(server_log),
            "--report", str(work / "report.json"), "--quiet-summary",
            "--colour" if st.enabled else "--no-colour",
            *(a for k in (args.only or []) for a in ("--only", k)),
        ]  # fmt: skip
        driver: subprocess.Popen[bytes] = net.popen("client", driver_args, stdin=subprocess.DEVNULL)
        rc = driver.wait()
        if rc not in (0, 1):
            raise LabError(f"the scripted mix failed (exit status {rc})")
        report = work / "report.json"
        self.results = [Result(**r) for r in json.loads(report.read_text())["results"]]
        if args.report:
            shutil.copyfile(report, args.report)
        self.say("")
        if args.stay:
            self._stay(net, alerts)
        return rc

    def _stay(self, net: Any, alerts: Path) -> None:
        from tcpguard.devtools import labnet

        st = self.style
        c = net.name("client")
        net_server = labnet.SERVER_V4
        self.say(st.bold("The lab stays up until Ctrl-C.") + " From another terminal, as root:")
        self.say(f"  ip netns exec {c} curl -v http://{labnet.SERVER_V4}/")
        self.say(
            f"  ip netns exec {c} curl -H 'Host: blocked.example' --max-time 3 http://{labnet.SERVER_V4}/"
        )
        self.say(f"  ip netns exec {c} {sys.executable} -m tcpguard.devtools.lab drive --server {net_server}")
        self.say(f"  tail -f {alerts}")
        self.say(f"  ip netns exec {net.name('gw')} iptables -L TCPGUARD -v -n")
        # The daemon's control socket is a file in the work directory, reachable from the host: these
        # need no namespace, only this lab's config (the default config names another socket).
        cli = Path(sys.executable).parent / "tcpguard"
        tcpguard = (
            shlex.quote(str(cli)) if cli.exists() else f"{shlex.quote(sys.executable)} -m tcpguard.app.cli"
        )
        config = shlex.quote(str(self.work / "tcpguard.yaml"))
        self.say(f"  {tcpguard} status --config {config}")
        self.say(f"  {tcpguard} connections --config {config}")
        assert self.daemon is not None
        try:
            while self.daemon.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.say("")
            return
        raise LabError(f"tcpguard exited with status {self.daemon.returncode}:\n{self._daemon_log()}")

    def _daemon_log(self) -> str:
        return _tail(self.work / "daemon.log")


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP while tearing down, so a second one cannot leave things behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _colour(args: argparse.Namespace, out: IO[str]) -> bool:
    if getattr(args, "colour", None) is not None:
        return bool(args.colour)
    return out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


# ==================================================================================== commands


def cmd_lab(args: argparse.Namespace) -> int:
    sub = getattr(args, "lab_command", None)
    if sub == "serve":
        return cmd_serve(args)
    if sub == "drive":
        return cmd_drive(args)
    if sub == "rules":
        return cmd_rules(args)
    if sub == "clean":
        return cmd_clean(args)
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.key:<10} {sc.expect:<10} {sc.rule or '-':<10} {sc.title}")
        return 0
    out = sys.stdout
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _preflight()
        lab = LabRun(args, out)
        rc = lab.run()
        for line in summary_lines(lab.results, lab.style):
            out.write(line + "\n")
        return rc
    except KeyboardInterrupt:
        out.write("\ninterrupted: everything the lab made is removed\n")
        return 130
    except _StopSignalError as e:
        out.write(f"\n{e}: everything the lab made is removed\n")
        return 143
    except (LabError, OSError, subprocess.SubprocessError) as e:
        print(f"tcpguard lab: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cmd_serve(args: argparse.Namespace) -> int:
    servers = Servers(args.port or [*HTTP_PORTS, TLS_PORT], Path(args.record) if args.record else None)
    servers.listen()
    if args.ready:
        Path(args.ready).touch()
    print(f"tcpguard lab serve: listening on {', '.join(str(p) for p in servers.ports)}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        servers.serve_forever()
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    chosen = [sc for sc in SCENARIOS if not args.only or sc.key in args.only]
    unknown = set(args.only or ()) - {sc.key for sc in SCENARIOS}
    if unknown:
        print(f"tcpguard lab drive: unknown scenario(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    out = sys.stdout
    style = Style(_colour(args, out))
    shared = Path(args.lab_dir) if args.lab_dir else None

    def where(given: str | None, name: str) -> Path | None:
        if given:
            return Path(given)
        return shared / name if shared is not None else None

    view = GatewayView(
        where(args.events, "events.jsonl"),
        where(args.alerts, "alerts.jsonl"),
        where(args.server_log, "server.jsonl"),
    )
    if args.wait_for_server:
        _wait(lambda: _reachable(args.server, 80), args.wait_for_server, f"{args.server}:80")
    driver = Driver(args.server, args.server6, view, out, style, live=style.enabled and out.isatty())
    try:
        results = driver.run(chosen)
    except KeyboardInterrupt:
        return 130
    if args.report:
        report = {"results": [asdict(r) for r in results]}
        Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    if not args.quiet_summary:
        for line in summary_lines(results, style):
            out.write(line + "\n")
    return 0 if all(r.ok for r in results) else 1


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def cmd_rules(args: argparse.Namespace) -> int:
    samples = Path(args.samples) if args.samples else default_rules_dir()
    if samples is None:
        print("tcpguard lab rules: give --samples DIR", file=sys.stderr)
        return 2
    names = prepare_rules(Path(args.dest), samples, Path(args.events))
    print(f"{args.dest}: {', '.join(names)} and the lab observer (writes {args.events})")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove what labs whose process is gone left behind; a lab still running is named and kept (another
    terminal's `tcpguard lab --stay`, a test run): labnet's lock on each lab's record tells them apart."""
    from tcpguard.devtools.labnet import remove_leftovers, running_labs

    if os.geteuid() != 0:
        print("tcpguard lab clean: needs root", file=sys.stderr)
        return 1
    prefix = getattr(args, "prefix", None) or PREFIX
    names = remove_leftovers(prefix)
    running = running_labs(prefix)
    print(f"removed {len(names)} namespace(s){': ' + ', '.join(names) if names else ''}")
    for lab_id, pid in running.items():
        owner = f"process {pid}" if pid is not None else "its process"
        print(f"kept {lab_id}-*: still running ({owner})")
    return 0


def add_subparser(sub: Any) -> None:
    p = sub.add_parser(
        "lab",
        help="try tcpguard on a throwaway client-gateway-server network (root)",
        description="Builds a client <-> gateway <-> server network from network namespaces, runs "
        "tcpguard in the gateway with the sample rules, drives a scripted mix of allowed, dropped and reset "
        "connections and shows what happens to each; everything is removed on exit or Ctrl-C.",
    )
    p.add_argument("--rules", help="the sample rules directory (default: rules/ of the source checkout)")
    p.add_argument("--stay", action="store_true", help="keep the lab up after the mix, until Ctrl-C")
    p.add_argument("--out", help="keep the config, daemon log, alerts and records in this directory")
    p.add_argument("--report", help="also write the results as JSON to this file")
    p.add_argument("--only", action="append", metavar="KEY", help="run only this scenario (repeatable)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    _colour_flags(p)
    p.set_defaults(func=cmd_lab, lab_command=None)
    lsub = p.add_subparsers(dest="lab_command", metavar="{serve,drive,rules,clean}")

    s = lsub.add_parser("serve", help="run the lab's servers (server namespace or container)")
    s.add_argument("--port", type=int, action="append", help="port (repeatable; default 80 443 8080)")
    s.add_argument("--record", help="append a JSON line per finished connection to this file")
    s.add_argument("--ready", help="create this file once listening")

    d = lsub.add_parser("drive", help="run the scripted mix against a lab server (client side)")
    d.add_argument("--server", required=True, help="the server's IPv4 address")
    d.add_argument("--server6", help="the server's IPv6 address (the IPv6 step is skipped without it)")
    d.add_argument(
        "--lab-dir",
        default=os.environ.get("TCPGUARD_LAB_DIR"),
        help="directory shared with the gateway and the server holding events.jsonl, alerts.jsonl and "
        "server.jsonl (default: $TCPGUARD_LAB_DIR; the containers set it)",
    )
    d.add_argument("--events", help="the lab observer's end_connection records (gateway side)")
    d.add_argument("--alerts", help="the daemon's alerts file (gateway side)")
    d.add_argument("--server-log", help="the servers' connection records")
    d.add_argument("--report", help="write the results as JSON to this file")
    d.add_argument("--only", action="append", metavar="KEY", help="run only this scenario (repeatable)")
    d.add_argument("--wait-for-server", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long until the server answers on port 80")  # fmt: skip
    d.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)
    _colour_flags(d)

    r = lsub.add_parser("rules", help="make a lab gateway's rules directory: the samples plus the observer")
    r.add_argument("dest", help="directory to fill")
    r.add_argument("--samples", help="sample rules directory (default: rules/ of the source checkout)")
    r.add_argument("--events", required=True, help="file the observer appends end_connection records to")

    c = lsub.add_parser(
        "clean", help=f"remove the namespaces ({PREFIX}-*) of labs whose process is gone, never a running one"
    )
    c.add_argument(
        "--prefix",
        default=PREFIX,
        type=_lab_prefix,
        help=f"the labs' namespace prefix (default {PREFIX}; the test suite's labs use tg)",
    )


def _lab_prefix(value: str) -> str:
    from tcpguard.devtools.labnet import check_prefix

    try:
        return check_prefix(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _colour_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--colour", "--color", dest="colour", action="store_const", const=True, default=None,
                   help="colour the output even when it is not a terminal")  # fmt: skip
    g.add_argument("--no-colour", "--no-color", dest="colour", action="store_const", const=False,
                   help="plain output")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m tcpguard.devtools.lab ...`: the subcommands without the rest of the CLI (used inside the
    lab)."""
    parser = argparse.ArgumentParser(prog="tcpguard lab")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(argv if argv is not None else sys.argv[1:])])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
