"""The NFQUEUE adapter and the raw sender.

Unit tests drive `NfqueueAdapter` with fake packets (no root). Root tests run the adapter for real: an
iptables NFQUEUE rule in the lab's gateway namespace, this module run as a driver process inside that
namespace (`python -m tests.io.test_nfqueue --handler NAME`, see `main()`), and real TCP clients and
servers (small Python scripts) in the client and server namespaces. The handlers here are stand-ins for
the engine with the same interface (`handle_packet`, `handle_timer`, `shutdown`), so these tests check the
adapter's translation, not the engine.

Every process is started through the `lab` fixture, which kills it by pid and deletes the namespaces at
the end, also on failure; every wait has a timeout; transfers are at most 2 MB.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import itertools
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tcpguard.core.decision import Decision, Output, Release, Verdict
from tcpguard.io.iptables import IptablesManager, IptablesSpec
from tcpguard.io.nfqueue import (
    _OUR_SEQ,
    _UNSEEN_SEQ,
    NFQ_MAX_COPY,
    NfqueueAdapter,
    QueueStats,
    _fail_open_message,
    _note_error,
)
from tcpguard.io.rawsend import LOST, SENT, WAITING, RawSender
from tests.netns import SERVER_V4, SERVER_V6, Lab

REPO = Path(__file__).resolve().parents[2]
MTU = 1500
PORT = 5000


# ================================================================================ stand-in handlers
class AcceptAll:
    """Accepts everything: the adapter must then be invisible."""

    def __init__(self) -> None:
        self.extra: dict[str, Any] = {}

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        return Decision(Verdict.ACCEPT)

    def handle_timer(self, now: float) -> Output:
        return Output()

    def shutdown(self, now: float) -> Output:
        return Output()


class AcceptStalling(AcceptAll):
    """Accepts everything but stalls 3 ms on every 200th packet, so packets pile up in the queue and the
    adapter reads (and answers) them in batches, as it does under load."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        self.count += 1
        if self.count % 200 == 0:
            time.sleep(0.003)
        return Decision(Verdict.ACCEPT)


class DropBlock(AcceptAll):
    """Drops every packet whose bytes contain b"BLOCK"."""

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        if b"BLOCK" in raw:
            self.extra["blocked"] = self.extra.get("blocked", 0) + 1
            return Decision(Verdict.DROP)
        return Decision(Verdict.ACCEPT)


class HoldAlternate(AcceptAll):
    """Holds every second packet and releases it after the next one (so each pair arrives swapped); the
    timer releases a hold older than 0.2 s, because the last packet of a burst has no "next"."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.held: tuple[object, float] | None = None

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        self.count += 1
        if self.held is not None:
            tok, _ = self.held
            self.held = None
            return Decision(Verdict.ACCEPT, releases=[Release(tok, Verdict.ACCEPT)])
        if self.count % 2 == 0:
            self.held = (token, now)
            return Decision(Verdict.HOLD)
        return Decision(Verdict.ACCEPT)

    def handle_timer(self, now: float) -> Output:
        if self.held is not None and now - self.held[1] > 0.2:
            tok, _ = self.held
            self.held = None
            self.extra["timer_releases"] = self.extra.get("timer_releases", 0) + 1
            return Output(releases=[Release(tok, Verdict.ACCEPT)])
        return Output()

    def shutdown(self, now: float) -> Output:
        return self.handle_timer(now + 10.0)


class HoldUntilTick(AcceptAll):
    """Holds every packet; only the timer releases them. Traffic moves only if ticks fire while idle."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[object] = []

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        self.held.append(token)
        return Decision(Verdict.HOLD)

    def handle_timer(self, now: float) -> Output:
        out = Output(releases=[Release(t, Verdict.ACCEPT) for t in self.held])
        self.held = []
        return out

    def shutdown(self, now: float) -> Output:
        return self.handle_timer(now)


class HoldForever(AcceptAll):
    """Holds every packet and never releases one: only the adapter's drain (or the kernel) can."""

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        return Decision(Verdict.HOLD)


def _scapy_ip(raw: bytes) -> Any:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    return IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)


class Rewrite(AcceptAll):
    """Rewrites b"hello" to b"HELLO" in TCP payloads (same length), fixing the checksum."""

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        if b"hello" not in raw:
            return Decision(Verdict.ACCEPT)
        from scapy.layers.inet import TCP
        from scapy.packet import Raw

        pkt = _scapy_ip(raw)
        pkt[Raw].load = pkt[Raw].load.replace(b"hello", b"HELLO")
        if hasattr(pkt, "chksum"):
            del pkt.chksum
        del pkt[TCP].chksum
        self.extra["rewritten"] = self.extra.get("rewritten", 0) + 1
        return Decision(Verdict.ACCEPT, packet=bytes(pkt))


class ResetOnMarker(AcceptAll):
    """Drops a client packet containing b"RESET" and forges a RST to the client in its place. Counts the RST
    packets it is shown: with OUTPUT hooked, a forged RST would come back here unless the mark rule works."""

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6

        pkt = _scapy_ip(raw)
        tcp = pkt[TCP]
        if tcp.flags.R:
            self.extra["rst_seen"] = self.extra.get("rst_seen", 0) + 1
        if b"RESET" not in raw:
            return Decision(Verdict.ACCEPT)
        ip = IP(src=pkt.dst, dst=pkt.src) if pkt.version == 4 else IPv6(src=pkt.dst, dst=pkt.src)
        # The client accepts a RST whose sequence number is exactly what it expects next: its own ack.
        rst = ip / TCP(sport=tcp.dport, dport=tcp.sport, flags="R", seq=tcp.ack)
        return Decision(Verdict.DROP, send=[bytes(rst)])


HANDLERS: dict[str, type[AcceptAll]] = {
    "accept": AcceptAll,
    "accept-stalling": AcceptStalling,
    "drop-block": DropBlock,
    "hold-alternate": HoldAlternate,
    "hold-until-tick": HoldUntilTick,
    "hold-forever": HoldForever,
    "rewrite": Rewrite,
    "reset": ResetOnMarker,
}


# ================================================================================ driver (in the gw ns)
def main(argv: list[str] | None = None) -> int:
    """Run one stand-in handler behind a real NFQUEUE until SIGTERM; print READY, then the stats as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--handler", choices=sorted(HANDLERS), required=True)
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--tick", type=float, default=0.5)
    ap.add_argument("--mark", type=int, default=0x7467)
    ap.add_argument("--fail-open", action="store_true")
    ap.add_argument("--drain-verdict", choices=["accept", "drop"], default="drop")
    ap.add_argument("--repeat", action="store_true", help="answer NF_REPEAT with --mark, as the daemon does")
    ap.add_argument("--gso", action="store_true", help="ask the kernel for GSO packets whole")
    args = ap.parse_args(argv)
    handler = HANDLERS[args.handler]()
    with RawSender(mark=args.mark) as sender:
        adapter = NfqueueAdapter(
            handler,
            queue_num=args.queue,
            max_len=args.max_len,
            tick=args.tick,
            fail_open=args.fail_open,
            sender=sender,
            drain_verdict=Verdict[args.drain_verdict.upper()],
            repeat_mark=args.mark if args.repeat else None,
            gso=args.gso,
        )
        signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
        adapter.open()
        print("READY", flush=True)
        adapter.run()
        report = {"queue": adapter.stats.as_dict(), "send": sender.stats.as_dict(), "handler": handler.extra}
    print(json.dumps(report), flush=True)
    return 0


# ================================================================================ traffic scripts
SERVER = r"""
import socket, sys, time
fam, addr, port, out, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(4)
print("LISTENING", flush=True)
s.settimeout(20)
c, _ = s.accept()
c.settimeout(10)
total = 0
with open(out, "wb") as f:
    while total < 8 << 20:
        try:
            data = c.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not data:
            break
        total += len(data)
        f.write(data)
        f.flush()
        if mode == "echo":
            c.sendall(data)
if mode == "sink":
    c.sendall(b"OK %d" % total)
c.close()
"""

# argv: family addr port infile -> sends the file, half-closes, prints the server's reply.
CLIENT_SEND = r"""
import socket, sys
fam, addr, port, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((addr, port), timeout=20)
with open(path, "rb") as f:
    s.sendall(f.read())
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    data = s.recv(100)
    if not data:
        break
    reply += data
print(reply.decode())
"""

# argv: addr port connect_timeout msg... -> for each message: send it, wait up to 2 s for the echo.
# Prints a JSON list: the echo received, "timeout", "reset" or "connect-failed".
CLIENT_CHAT = r"""
import json, socket, sys, time
addr, port, ctimeout, msgs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
out = []
try:
    s = socket.create_connection((addr, port), timeout=ctimeout)
except OSError as e:
    print(json.dumps(["connect-failed", str(e)]))
    sys.exit(0)
s.settimeout(2)
for m in msgs:
    try:
        s.sendall(m.encode())
        got = b""
        while len(got) < len(m):
            data = s.recv(100)
            if not data:
                break
            got += data
        out.append(got.decode())
    except socket.timeout:
        out.append("timeout")
    except ConnectionResetError:
        out.append("reset")
        break
print(json.dumps(out))
s.close()
"""


# ================================================================================ test plumbing
def _wait_line(proc: subprocess.Popen[str], want: str, timeout: float) -> None:
    """Read proc's stdout until a line equal to `want`; fail with its stderr if it dies or is too slow."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {want!r} from {proc.args!r}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        line = proc.stdout.readline()
        if line.strip() == want:
            return
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{proc.args!r} exited {proc.wait(5)} before {want!r}: {err}")


@dataclass
class Setup:
    lab: Lab
    tmp: Path
    family: str = "4"
    port: int = PORT
    driver: subprocess.Popen[str] | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def server_addr(self) -> str:
        return SERVER_V6 if self.family == "6" else SERVER_V4

    def install(self, **spec: Any) -> IptablesManager:
        mgr = IptablesManager(IptablesSpec(**spec), netns=self.lab.name("gw"))
        mgr.install()
        return mgr

    def start_driver(self, handler: str, *extra: str) -> None:
        self.driver = self.lab.popen(
            "gw",
            [sys.executable, "-m", "tests.io.test_nfqueue", "--handler", handler, *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_line(self.driver, "READY", 20)

    def stop_driver(self) -> dict[str, Any]:
        assert self.driver is not None
        self.driver.send_signal(signal.SIGTERM)
        out, err = self.driver.communicate(timeout=20)
        assert self.driver.returncode == 0, err
        self.report = json.loads(out.strip().splitlines()[-1])
        return self.report

    def start_server(self, mode: str, name: str = "received") -> Path:
        out = self.tmp / name
        proc = self.lab.popen(
            "server",
            [sys.executable, "-c", SERVER, self.family, self.server_addr, str(self.port), str(out), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_line(proc, "LISTENING", 20)
        return out

    def chat(self, *msgs: str, connect_timeout: float = 5.0) -> list[str]:
        res = self.lab.run(
            "client",
            [
                sys.executable,
                "-c",
                CLIENT_CHAT,
                self.server_addr,
                str(self.port),
                str(connect_timeout),
                *msgs,
            ],
            timeout=60,
        )
        result: list[str] = json.loads(res.stdout)
        return result

    def transfer(self, size: int) -> tuple[bytes, Path]:
        data = hashlib.shake_256(b"tcpguard").digest(size)
        src = self.tmp / "sent"
        src.write_bytes(data)
        out = self.start_server("sink")
        res = self.lab.run(
            "client",
            [sys.executable, "-c", CLIENT_SEND, self.family, self.server_addr, str(self.port), str(src)],
            timeout=120,
        )
        assert res.stdout.strip() == f"OK {size}"
        return data, out


@pytest.fixture
def setup(lab: Lab, tmp_path: Path) -> Setup:
    return Setup(lab, tmp_path)


def _check_common(q: dict[str, int]) -> None:
    """Invariants of every run: nothing left held, nothing refused, every packet got through the handler."""
    assert q["holding"] == 0
    assert q["verdict_errors"] == 0
    assert q["handler_errors"] == 0
    assert q["release_unknown"] == 0
    assert q["truncated"] == 0
    # The kernel segments GSO/GRO packets before queueing (we do not ask for NFQA_CFG_F_GSO).
    assert q["largest"] <= MTU


# ================================================================================ root tests
@pytest.mark.root
@pytest.mark.parametrize("family", ["4", "6"])
def test_accept_all_transfer_is_byte_identical(setup: Setup, family: str) -> None:
    setup.family = family
    setup.install()
    setup.start_driver("accept")
    data, out = setup.transfer(2 << 20)
    q = setup.stop_driver()["queue"]
    assert out.read_bytes() == data
    _check_common(q)
    assert q["packets"] >= (2 << 20) // MTU  # both directions, at least one per data segment
    assert q["accepted"] == q["packets"]
    assert q["dropped"] == q["held"] == 0


@pytest.mark.root
@pytest.mark.parametrize("repeat", [False, True], ids=["accept", "repeat"])
def test_batch_verdicts_deliver_every_byte(setup: Setup, repeat: bool) -> None:
    """Packets that pile up are answered with one batch verdict each pile; the kernel must take them
    (a refused or wrong batch would leave packets queued and the transfer would stall or lose bytes)."""
    setup.install()
    setup.start_driver("accept-stalling", *(["--repeat"] if repeat else []))
    data, out = setup.transfer(2 << 20)
    # The kernel's own view, before the driver unbinds: nothing left waiting for a verdict (a refused
    # or short batch would leave packets there for good), and how many ids it handed out.
    waiting, ids = _kernel_queue(setup.lab)
    deadline = time.monotonic() + 5
    while waiting and time.monotonic() < deadline:  # the connection's last packets may be in flight
        time.sleep(0.1)
        waiting, ids = _kernel_queue(setup.lab)
    q = setup.stop_driver()["queue"]
    assert out.read_bytes() == data
    _check_common(q)
    assert waiting == 0
    assert q["packets"] >= ids and q["unseen"] == q["refused"] == 0  # every id reached the adapter
    assert q["accepted"] == q["packets"]
    assert q["batches"] >= 1


def _kernel_queue(lab: Lab) -> tuple[int, int]:
    """(packets waiting for a verdict, last id handed out) of queue 0, from nfnetlink_queue's proc file."""
    out = lab.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] == "0":
            return int(cols[2]), int(cols[7])
    raise AssertionError(f"queue 0 is not bound: {out!r}")


@pytest.mark.root
def test_drop_handler_stops_blocked_bytes(setup: Setup) -> None:
    setup.install()
    setup.start_driver("drop-block")
    out = setup.start_server("echo")
    assert setup.chat("hello", "xxBLOCKxx") == ["hello", "timeout"]
    report = setup.stop_driver()
    assert out.read_bytes() == b"hello"
    assert report["handler"]["blocked"] >= 1  # the segment and its retransmissions
    assert report["queue"]["dropped"] == report["handler"]["blocked"]
    _check_common(report["queue"])


@pytest.mark.root
def test_hold_and_release_reorders_but_delivers(setup: Setup) -> None:
    setup.install()
    setup.start_driver("hold-alternate", "--tick", "0.1")
    data, out = setup.transfer(512 << 10)
    q = setup.stop_driver()["queue"]
    assert out.read_bytes() == data
    _check_common(q)
    assert q["held"] > 100
    assert q["released"] == q["held"] == q["release_accepted"]
    assert q["drained"] == 0


@pytest.mark.root
def test_timer_fires_when_idle(setup: Setup) -> None:
    """Every packet is held until a timer tick: the exchange completes only if ticks fire without traffic."""
    setup.install()
    setup.start_driver("hold-until-tick", "--tick", "0.2")
    setup.start_server("echo")
    assert setup.chat("ping", "pong") == ["ping", "pong"]
    q = setup.stop_driver()["queue"]
    _check_common(q)
    assert q["held"] == q["released"]
    # The client's last packets (its FIN) can arrive while the driver stops: they get the drain verdict.
    assert q["packets"] == q["held"] + q["drained"]
    assert q["timer_ticks"] >= 3


@pytest.mark.root
def test_rewrite_reaches_the_server(setup: Setup) -> None:
    setup.install()
    setup.start_driver("rewrite")
    out = setup.start_server("echo")
    assert setup.chat("say hello") == ["say HELLO"]
    report = setup.stop_driver()
    assert out.read_bytes() == b"say HELLO"
    assert report["queue"]["rewritten"] == report["handler"]["rewritten"] >= 1
    _check_common(report["queue"])


@pytest.mark.root
@pytest.mark.parametrize("family", ["4", "6"])
def test_forged_reset_is_sent_marked_and_not_requeued(setup: Setup, family: str) -> None:
    setup.family = family
    mark = 0x1234
    setup.install(hooks=("FORWARD", "OUTPUT"), mark=mark)
    setup.start_driver("reset", "--mark", str(mark))
    out = setup.start_server("echo")
    assert setup.chat("hello", "RESET", "never") == ["hello", "reset"]
    report = setup.stop_driver()
    assert out.read_bytes() == b"hello"
    assert report["queue"]["sent"] >= 1
    assert report["queue"]["send_errors"] == 0
    assert report["send"]["sent"] == report["queue"]["sent"]
    # With OUTPUT hooked, an unmarked forged RST would have been queued back to us.
    assert report["handler"].get("rst_seen", 0) == 0
    _check_common(report["queue"])


@pytest.mark.root
def test_stop_drains_held_packets(setup: Setup) -> None:
    """A SYN held when the daemon stops gets its verdict at stop (here ACCEPT), so the connection opens."""
    setup.install(bypass=True)
    setup.start_driver("hold-forever", "--drain-verdict", "accept")
    setup.start_server("echo")
    client = setup.lab.popen(
        "client",
        [sys.executable, "-c", CLIENT_CHAT, SERVER_V4, str(PORT), "5", "hi"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # the SYN is queued and held by now (its first retransmission is at 1 s)
    q = setup.stop_driver()["queue"]
    out, _ = client.communicate(timeout=20)
    assert json.loads(out) == ["hi"]  # the rest passes through --queue-bypass once nobody is bound
    assert q["held"] >= 1
    assert q["drained"] >= q["held"]
    assert q["holding"] == 0


@pytest.mark.root
def test_fail_open_accepts_when_queue_is_full(setup: Setup) -> None:
    """max_len 1 and a handler that holds forever: the first SYN fills the queue. With fail-open the kernel
    accepts what does not fit (the SYN retransmission and the rest of the connection); without, it drops."""
    setup.install(bypass=False)
    setup.start_driver("hold-forever", "--max-len", "1")
    setup.start_server("echo", "closed")
    assert setup.chat("x", connect_timeout=2.5)[0] == "connect-failed"
    setup.stop_driver()

    setup.start_driver("hold-forever", "--max-len", "1", "--fail-open")
    setup.port += 1  # the first server still waits for a connection that never came
    setup.start_server("echo", "open")
    assert setup.chat("hello", connect_timeout=5) == ["hello"]
    q = setup.stop_driver()["queue"]
    assert q["held"] == 1
    assert q["drained"] >= 1


@pytest.mark.root
def test_rawsend_counts_errors_and_sets_mark(lab: Lab) -> None:
    """In the gateway (no default route) a send to a TEST-NET address fails: counted, never raised."""
    code = r"""
import json, socket, struct
from tcpguard.io.rawsend import RawSender, SO_MARK
def ip4(dst):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton("10.77.1.1"),
                       socket.inet_aton(dst)) + bytes(20)
s = RawSender(mark=0x55)
ok = s.send(ip4("192.0.2.1"))
mark = s._socks[socket.AF_INET].getsockopt(socket.SOL_SOCKET, SO_MARK)
ok2 = s.send(ip4("10.77.1.2"))  # routable: really leaves through c0 (a bogus TCP segment to the client)
print(json.dumps([ok, ok2, mark, s.stats.as_dict()]))
"""
    res = lab.run("gw", [sys.executable, "-c", code], cwd=REPO)
    ok, ok2, mark, stats = json.loads(res.stdout)
    assert (ok, ok2, mark) == (-1, 1, 0x55)  # LOST (no route is no transient error), SENT
    assert stats == {
        "sent": 1,
        "bytes": 40,
        "failed": 1,
        "errors": {"ENETUNREACH": 1},
        "retried": 0,
        "lost": 1,
        "pending": 0,
    }


# ================================================================================ unit tests (fakes)
_QUEUE_IDS = itertools.count(1)


class FakePacket:
    def __init__(
        self,
        payload: bytes = b"\x45" + bytes(39),
        fail: bool = False,
        log: list[str] | None = None,
        name: str = "",
    ) -> None:
        self.payload = payload
        self.verdict: str | None = None
        self.new_payload: bytes | None = None
        self.fail = fail
        self.log = log if log is not None else []
        self.name = name
        self.mark = 0
        self.id = next(_QUEUE_IDS)  # the kernel numbers queued packets in order

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        self.new_payload = payload

    def _set(self, v: str) -> None:
        if self.verdict is not None or self.fail:
            raise RuntimeError("Verdict already given for this packet")
        self.verdict = v
        self.log.append(f"{v} {self.name}")

    def accept(self) -> None:
        self._set("accept")

    def drop(self) -> None:
        self._set("drop")

    def repeat(self) -> None:
        self._set(f"repeat mark={self.mark:#x}")

    def set_mark(self, mark: int) -> None:
        self.mark = mark


class Scripted(AcceptAll):
    """Returns the decisions it is given, in order; records what it was called with."""

    def __init__(self, *decisions: Decision | BaseException) -> None:
        super().__init__()
        self.decisions = list(decisions)
        self.calls: list[tuple[bytes, float, object]] = []
        self.trusted: list[bool] = []
        self.timer_out = Output()
        self.shutdown_out = Output()

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        self.calls.append((raw, now, token))
        self.trusted.append(checksum_trusted)
        d = self.decisions.pop(0)
        if isinstance(d, BaseException):
            raise d
        return d

    def handle_timer(self, now: float) -> Output:
        return self.timer_out

    def shutdown(self, now: float) -> Output:
        return self.shutdown_out


class FakeSender:
    """b"bad" is lost at once; while `busy`, packets wait for a retry (as RawSender's on EAGAIN), and a
    retry while still busy loses the packets named in `lose`."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.sent: list[bytes] = []
        self.log = log if log is not None else []
        self.busy = False
        self.waiting: list[bytes] = []
        self.lose: set[bytes] = set()

    def send(self, packet: bytes) -> int:
        self.sent.append(packet)
        self.log.append(f"send {packet.decode()}")
        if packet == b"bad":
            return LOST
        if self.busy:
            self.waiting.append(packet)
            return WAITING
        return SENT

    def retry(self) -> tuple[int, int]:
        lost = [p for p in self.waiting if p in self.lose]
        if self.busy:
            self.waiting = [p for p in self.waiting if p not in self.lose]
            return 0, len(lost)
        self.log.extend(f"resend {p.decode()}" for p in self.waiting)
        sent, self.waiting = len(self.waiting), []
        return sent, 0


def _adapter(handler: Scripted, log: list[str] | None = None, **kw: Any) -> tuple[NfqueueAdapter, FakeSender]:
    sender = FakeSender(log)
    return NfqueueAdapter(handler, sender=sender, clock=lambda: 42.0, **kw), sender


def test_unit_accept_rewrite_drop() -> None:
    h = Scripted(Decision(Verdict.ACCEPT), Decision(Verdict.ACCEPT, packet=b"new"), Decision(Verdict.DROP))
    a, _ = _adapter(h)
    p1, p2, p3 = FakePacket(), FakePacket(), FakePacket()
    for p in (p1, p2, p3):
        a.process(p)
    assert (p1.verdict, p2.verdict, p3.verdict) == ("accept", "accept", "drop")
    assert (p1.new_payload, p2.new_payload) == (None, b"new")
    assert h.calls[0] == (p1.payload, 42.0, p1)  # the token is the packet object, the clock is passed
    s = a.stats
    assert (s.packets, s.accepted, s.dropped, s.rewritten) == (3, 2, 1, 1)


def test_unit_hold_release_then_send_in_order() -> None:
    """decision.py's order: the packet's own verdict, then the releases in order, then the sends."""
    log: list[str] = []
    p1, p2, p3 = (FakePacket(log=log, name=n) for n in ("p1", "p2", "p3"))
    h = Scripted(
        Decision(Verdict.HOLD),
        Decision(Verdict.HOLD),
        Decision(
            Verdict.ACCEPT,
            releases=[Release(p2, Verdict.ACCEPT, b"p2new"), Release(p1, Verdict.DROP)],
            send=[b"rst1", b"bad"],
        ),
    )
    a, _ = _adapter(h, log)
    for p in (p1, p2):
        a.process(p)
    assert log == []
    assert a.stats.holding == 2
    a.process(p3)
    assert log == ["accept p3", "accept p2", "drop p1", "send rst1", "send bad"]
    assert p2.new_payload == b"p2new"
    s = a.stats
    assert (s.held, s.released, s.release_accepted, s.release_dropped, s.holding) == (2, 2, 1, 1, 0)
    assert (s.sent, s.send_errors) == (1, 1)


def test_unit_an_rst_in_place_rides_the_dropped_packets_verdict() -> None:
    """Decision.in_place: the RST toward the dropped packet's destination becomes that packet (its bytes
    replaced, accepted) where the sends go, after the releases; the other RST is sent as before."""
    log: list[str] = []
    p1, p2 = (FakePacket(log=log, name=n) for n in ("p1", "p2"))
    h = Scripted(
        Decision(Verdict.HOLD),
        Decision(
            Verdict.DROP, releases=[Release(p1, Verdict.DROP)], send=[b"rst-srv", b"rst-cli"], in_place=0
        ),
    )
    a, sender = _adapter(h, log)
    a.process(p1)
    a.process(p2)
    assert log == ["drop p1", "accept p2", "send rst-cli"]
    assert p2.new_payload == b"rst-srv" and sender.sent == [b"rst-cli"]
    s = a.stats
    assert (s.dropped, s.sent, s.sent_in_place, s.send_errors, s.verdict_errors) == (1, 2, 1, 0, 0)


def test_unit_an_rst_in_place_in_repeat_mode_is_repeated_with_the_mark() -> None:
    log: list[str] = []
    p = FakePacket(log=log, name="p")
    h = Scripted(Decision(Verdict.DROP, send=[b"x", b"rst"], in_place=1))
    a, _ = _adapter(h, log, repeat_mark=0x7467)
    a.process(p)
    assert log == ["send x", "repeat mark=0x7467 p"] and p.new_payload == b"rst"


def test_unit_an_rst_that_cannot_replace_the_packet_is_sent_by_itself() -> None:
    log: list[str] = []
    p = FakePacket(log=log, name="p")

    def refuse(payload: bytes) -> None:
        raise RuntimeError("payload refused")

    p.set_payload = refuse  # type: ignore[method-assign]
    a, _ = _adapter(Scripted(Decision(Verdict.DROP, send=[b"rst"], in_place=0)), log)
    a.process(p)
    assert log == ["drop p", "send rst"]
    assert (a.stats.sent, a.stats.sent_in_place) == (1, 0)


def test_unit_forged_packets_that_wait_are_retried_and_the_lost_ones_counted() -> None:
    """A packet the sender could not send now waits (send_pending); the timer tick and the end of each
    read batch retry it; what the sender gives up is counted in send_errors, the operator's number."""
    log: list[str] = []
    h = Scripted(Decision(Verdict.DROP, send=[b"r1", b"r2"]), Decision(Verdict.DROP, send=[b"bad"]))
    a, sender = _adapter(h, log)
    sender.busy = True
    sender.lose = {b"r2"}
    a.process(FakePacket(log=log, name="p1"))
    assert (a.stats.sent, a.stats.send_pending, a.stats.send_errors) == (0, 2, 0)
    a.timer(1.0)  # still busy: r2 runs out of its bounds
    assert (a.stats.sent, a.stats.send_pending, a.stats.send_errors) == (0, 1, 1)
    sender.busy = False
    a.timer(1.5)
    assert log[-1] == "resend r1"
    assert (a.stats.sent, a.stats.send_retried, a.stats.send_pending, a.stats.send_errors) == (1, 1, 0, 1)
    a.process(FakePacket(log=log, name="p2"))
    assert a.stats.send_errors == 2  # lost at once


def test_unit_unknown_release_and_verdict_error_are_counted() -> None:
    stranger = FakePacket()
    bad = FakePacket(fail=True)
    h = Scripted(
        Decision(Verdict.ACCEPT, releases=[Release(stranger, Verdict.ACCEPT)]), Decision(Verdict.DROP)
    )
    a, _ = _adapter(h)
    a.process(FakePacket())
    a.process(bad)
    assert stranger.verdict is None
    assert a.stats.release_unknown == 1
    assert a.stats.verdict_errors == 1


def test_unit_handler_exception_gets_error_verdict() -> None:
    h = Scripted(ValueError("engine bug"), Decision(Verdict.ACCEPT))
    a, _ = _adapter(h, error_verdict=Verdict.ACCEPT)
    p = FakePacket()
    a.process(p)
    assert p.verdict == "accept"
    assert a.stats.handler_errors == 1


def test_unit_keyboard_interrupt_in_callback_stops_the_loop() -> None:
    h = Scripted(KeyboardInterrupt())
    a, _ = _adapter(h)
    p = FakePacket()
    a.process(p)  # must not raise into NetfilterQueue's C callback
    assert p.verdict == "drop"
    assert isinstance(a._fatal, KeyboardInterrupt)
    assert a._stopping


def test_unit_timer_and_drain() -> None:
    p1, p2, p3 = FakePacket(), FakePacket(), FakePacket()
    h = Scripted(Decision(Verdict.HOLD), Decision(Verdict.HOLD), Decision(Verdict.HOLD))
    a, sender = _adapter(h, drain_verdict=Verdict.ACCEPT)
    for p in (p1, p2, p3):
        a.process(p)
    h.timer_out = Output(releases=[Release(p1, Verdict.ACCEPT)], send=[b"t"])
    a.timer(1.0)
    assert p1.verdict == "accept" and sender.sent == [b"t"]
    h.shutdown_out = Output(releases=[Release(p2, Verdict.DROP)])
    a.drain()
    assert (p2.verdict, p3.verdict) == ("drop", "accept")  # the engine's release, then the fallback
    assert (a.stats.drained, a.stats.holding, a.stats.timer_ticks) == (1, 0, 1)
    late = FakePacket()
    a.process(late)  # read during the drain: never reaches the (shut down) handler
    assert late.verdict == "accept" and len(h.calls) == 3


def test_unit_truncation_and_largest() -> None:
    h = Scripted(Decision(Verdict.ACCEPT), Decision(Verdict.ACCEPT), Decision(Verdict.ACCEPT))
    a, _ = _adapter(h, copy_range=NFQ_MAX_COPY)  # as on a kernel that refused our larger copy range
    # IPv4 total length 9000 (a jumbo frame), cut at the copy range.
    a.process(FakePacket(b"\x45\x00\x23\x28" + bytes(NFQ_MAX_COPY - 4)))
    assert (a.stats.truncated, a.stats.largest) == (1, NFQ_MAX_COPY)
    # A whole packet that fills the copy range exactly is not truncated.
    a.process(FakePacket(b"\x45\x00" + NFQ_MAX_COPY.to_bytes(2, "big") + bytes(NFQ_MAX_COPY - 4)))
    # A short one is never a truncation: the kernel checked its IP length before netfilter saw it.
    a.process(FakePacket(b"\x45\x00\x10\x00" + bytes(36)))
    assert (a.stats.truncated, a.stats.largest, a.stats.packets) == (1, NFQ_MAX_COPY, 3)


def test_unit_bad_parameters() -> None:
    with pytest.raises(ValueError, match="ACCEPT or DROP"):
        NfqueueAdapter(AcceptAll(), drain_verdict=Verdict.HOLD)
    with pytest.raises(ValueError, match="tick"):
        NfqueueAdapter(AcceptAll(), tick=0)


def test_unit_stats_dict() -> None:
    keys = {
        "packets",
        "accepted",
        "dropped",
        "held",
        "released",
        "send_errors",
        "send_pending",
        "sent_in_place",
    }
    assert set(QueueStats().as_dict()) >= keys


def test_unit_fail_open_message_layout() -> None:
    msg = _fail_open_message(7, 99)
    length, mtype, flags, seq, pid = (
        int.from_bytes(msg[i:j], sys.byteorder) for i, j in ((0, 4), (4, 6), (6, 8), (8, 12), (12, 16))
    )
    assert (length, mtype, flags, seq, pid) == (len(msg), 0x0302, 0x5, 99, 0)
    assert msg[16:20] == b"\x00\x00\x00\x07"  # AF_UNSPEC, version 0, queue 7 big-endian
    assert msg[22:24] == (4).to_bytes(2, sys.byteorder) and msg[24:28] == b"\x00\x00\x00\x01"
    assert msg[30:32] == (5).to_bytes(2, sys.byteorder) and msg[32:36] == b"\x00\x00\x00\x01"


def test_unit_rawsend_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    s = RawSender()
    assert s.send(b"") == LOST
    assert s.send(b"\x55" + bytes(30)) == LOST
    assert s.send(b"\x45" + bytes(5)) == LOST
    assert s.stats.failed == 3 and s.stats.errors["invalid"] == 3 and s.stats.lost == 3

    def no_raw_socket(family: int) -> Any:  # what a process without CAP_NET_RAW gets
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(s, "_socket", no_raw_socket)
    assert s.send(b"\x45" + bytes(39)) == LOST  # not a transient error: no retry
    assert s.stats.errors["EPERM"] == 1 and s.stats.sent == 0 and s.stats.pending == 0
    s.close()


if __name__ == "__main__":
    sys.exit(main())


def test_repeat_mode_marks_and_repeats_accepted_packets() -> None:
    """With a repeat mark, ACCEPT becomes NF_REPEAT with the mark, so the hook's later rules still run."""
    log: list[str] = []
    adapter = NfqueueAdapter(Scripted(Decision(Verdict.ACCEPT), Decision(Verdict.DROP)), repeat_mark=0x7467)
    adapter.process(FakePacket(b"a", log=log, name="p1"))
    adapter.process(FakePacket(b"b", log=log, name="p2"))
    assert log == ["repeat mark=0x7467 p1", "drop p2"]


class FakeNetlink:
    """Stands in for the queue's netlink socket: records what the adapter sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: tuple[int, int]) -> int:
        assert addr == (0, 0)  # the kernel
        self.sent.append(data)
        return len(data)


def IdPacket(pid: int, log: list[str]) -> FakePacket:  # noqa: N802 (reads like the class it makes)
    pkt = FakePacket(log=log, name=f"p{pid}")
    pkt.id = pid
    return pkt


def _batching(
    handler: Scripted, log: list[str] | None = None, **kw: Any
) -> tuple[NfqueueAdapter, FakeNetlink]:
    """An adapter in the state `_read_batch` puts it in while NetfilterQueue calls back."""
    adapter, _ = _adapter(handler, log, **kw)
    nl = FakeNetlink()
    adapter._sock = nl  # type: ignore[assignment]
    adapter._batching = True
    return adapter, nl


def _verdict_batch(
    queue: int, verdict: int, last_id: int, mark: int | None = None, msg: int = 3, seq: int = _OUR_SEQ
) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH laid out by hand from linux/netfilter/nfnetlink_queue.h."""
    attrs = struct.pack("=HH", 12, 2) + struct.pack("!II", verdict, last_id)  # NFQA_VERDICT_HDR
    if mark is not None:
        attrs += struct.pack("=HH", 8, 3) + struct.pack("!I", mark)  # NFQA_MARK
    body = struct.pack("=BBH", 0, 0, socket.htons(queue)) + attrs  # nfgenmsg: AF_UNSPEC, v0, queue
    # nlmsghdr: (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH (or _VERDICT), NLM_F_REQUEST, and our
    # own sequence number (any value: it tags the kernel's error answer, should there be one)
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | msg, 1, seq, 0) + body


def test_unit_accepts_wait_for_the_batch_end_and_go_in_one_message() -> None:
    log: list[str] = []
    a, nl = _batching(Scripted(*[Decision(Verdict.ACCEPT)] * 3), queue_num=7)
    for i in (11, 12, 13):
        a.process(IdPacket(i, log))
    assert log == [] and nl.sent == []  # nothing answered before the batch ends
    a._flush()
    assert nl.sent == [_verdict_batch(7, 1, 13)]  # NF_ACCEPT up to the last id
    assert log == []  # no per-packet verdict on top
    s = a.stats
    assert (s.accepted, s.batches, s.batched) == (3, 1, 3)


def test_unit_batch_repeats_with_the_mark() -> None:
    a, nl = _batching(Scripted(*[Decision(Verdict.ACCEPT)] * 2), queue_num=3, repeat_mark=0x7467)
    for i in (1, 2):
        a.process(IdPacket(i, []))
    a._flush()
    assert nl.sent == [_verdict_batch(3, 4, 2, mark=0x7467)]  # NF_REPEAT, mark on every packet


def test_unit_anything_but_a_plain_accept_keeps_the_order() -> None:
    """A rewrite, a hold, a release or a forged packet first answers what was accepted before it."""
    log: list[str] = []
    p = [IdPacket(i, log) for i in range(1, 8)]
    a, nl = _batching(
        Scripted(
            Decision(Verdict.ACCEPT),
            Decision(Verdict.ACCEPT),
            Decision(Verdict.ACCEPT, packet=b"new"),  # p3: flushes p1, p2 (one batch), then itself
            Decision(Verdict.ACCEPT),
            Decision(Verdict.DROP),  # p5: a drop answers at once and does not reorder accepts
            Decision(Verdict.HOLD),  # p6: flushes p4 (alone: its own verdict), then is held
            Decision(Verdict.ACCEPT, releases=[Release(p[5], Verdict.ACCEPT)]),  # p7
            Decision(Verdict.ACCEPT),
            Decision(Verdict.DROP, send=[b"rst"]),  # p9: a forged RST must not overtake p8
        ),
        log,
    )
    p += [IdPacket(8, log), IdPacket(9, log)]
    for pkt in p:
        a.process(pkt)
    assert nl.sent == [_verdict_batch(0, 1, 2)]
    assert log == [
        "accept p3",
        "drop p5",
        "accept p4",
        "accept p7",
        "accept p6",
        "accept p8",
        "drop p9",
        "send rst",
    ]
    a._flush()
    assert len(nl.sent) == 1 and a.stats.batched == 2


def test_unit_no_batch_while_a_packet_is_held() -> None:
    """The kernel's batch answers every older queued packet, a held one too: so none while one is held."""
    log: list[str] = []
    held = IdPacket(1, log)
    a, nl = _batching(Scripted(Decision(Verdict.HOLD), Decision(Verdict.ACCEPT), Decision(Verdict.ACCEPT)))
    for pkt in (held, IdPacket(2, log), IdPacket(3, log)):
        a.process(pkt)
    a._flush()
    assert nl.sent == []
    assert log == ["accept p2", "accept p3"] and held.verdict is None
    assert a.stats.holding == 1


def test_unit_outside_a_batch_every_accept_is_immediate() -> None:
    log: list[str] = []
    a, _ = _adapter(Scripted(Decision(Verdict.ACCEPT)))
    a.process(IdPacket(1, log))
    assert log == ["accept p1"]


def test_unit_ids_that_never_arrived_are_dropped_before_any_batch_can_accept_them() -> None:
    """A queue id skipped (its message lost or cut short) may still be in the kernel's queue: the next
    batch verdict, which answers every older queued packet, would accept it uninspected. So the accepts
    before the gap go first, then one batch DROP up to the gap's end."""
    log: list[str] = []
    a, nl = _batching(Scripted(*[Decision(Verdict.ACCEPT)] * 4), log, queue_num=2)
    for i in (1, 2, 5, 6):  # 3 and 4 never arrive
        a.process(IdPacket(i, log))
    a._flush()
    drop = _verdict_batch(2, 0, 4, seq=_UNSEEN_SEQ)  # its own tag: ENOENT for it is expected, not counted
    assert nl.sent == [_verdict_batch(2, 1, 2), drop, _verdict_batch(2, 1, 6)]
    assert a.stats.unseen == 2 and log == []


def test_unit_with_a_packet_held_unseen_ids_are_dropped_one_by_one() -> None:
    log: list[str] = []
    held = IdPacket(1, log)
    a, nl = _batching(Scripted(Decision(Verdict.HOLD), Decision(Verdict.ACCEPT)), log, queue_num=2)
    a.process(held)
    a.process(IdPacket(4, log))  # 2 and 3 never arrive
    one = [_verdict_batch(2, 0, i, msg=1, seq=_UNSEEN_SEQ) for i in (2, 3)]  # NFQNL_MSG_VERDICT each
    assert nl.sent == one
    assert held.verdict is None and a.stats.unseen == 2


def test_unit_ids_wrap_around_without_a_gap() -> None:
    a, nl = _batching(Scripted(*[Decision(Verdict.ACCEPT)] * 2))
    a.process(IdPacket(0xFFFFFFFF, []))
    a.process(IdPacket(0, []))
    a._flush()
    assert a.stats.unseen == 0 and nl.sent == [_verdict_batch(0, 1, 0)]


def test_unit_an_accept_error_verdict_goes_after_the_accepts_before_it() -> None:
    log: list[str] = []
    a, nl = _batching(
        Scripted(Decision(Verdict.ACCEPT), ValueError("bug"), Decision(Verdict.ACCEPT)),
        log,
        error_verdict=Verdict.ACCEPT,
    )
    for i in (1, 2, 3):
        a.process(IdPacket(i, log))
    assert log == ["accept p1", "accept p2"]  # p1 alone: its own verdict, then p2's error verdict
    a._flush()
    assert log == ["accept p1", "accept p2", "accept p3"] and nl.sent == []


def test_unit_an_interrupted_flush_keeps_the_rest_for_the_drain() -> None:
    log: list[str] = []

    class Interrupting(FakePacket):
        def accept(self) -> None:
            raise KeyboardInterrupt

    a, _ = _batching(Scripted(*[Decision(Verdict.ACCEPT)] * 3), log)
    a._held[1] = FakePacket()  # a held packet forces one verdict per packet
    first = Interrupting(log=log, name="p1")
    rest = [IdPacket(first.id + 1, log), IdPacket(first.id + 2, log)]
    for pkt in (first, *rest):
        a.process(pkt)
    with pytest.raises(KeyboardInterrupt):
        a._flush()
    assert a._pending == [first, *rest]  # nothing lost: the drain answers them
    first.accept = lambda: first._set("accept")  # type: ignore[method-assign]
    a._held.clear()
    a._sock = None
    a.drain()
    assert log == ["accept p1", f"accept p{first.id + 1}", f"accept p{first.id + 2}"]


def test_unit_a_refused_verdict_message_is_counted() -> None:
    stats = QueueStats()
    refused = struct.pack("=IHHII", 16, (3 << 8) | 3, 1, _OUR_SEQ, 0)
    error = struct.pack("=IHHII", 36, 2, 0, _OUR_SEQ, 0) + struct.pack("=i", -2) + refused  # ENOENT
    _note_error(error, stats)
    assert stats.refused == 1
    theirs = struct.pack("=IHHII", 16, (3 << 8) | 3, 1, 12345, 0)
    _note_error(struct.pack("=IHHII", 36, 2, 0, 12345, 0) + struct.pack("=i", -2) + theirs, stats)
    _note_error(struct.pack("=IHHII", 36, 2, 0, _OUR_SEQ, 0) + struct.pack("=i", 0) + refused, stats)
    unseen = struct.pack("=IHHII", 16, (3 << 8) | 3, 1, _UNSEEN_SEQ, 0)
    _note_error(struct.pack("=IHHII", 36, 2, 0, _UNSEEN_SEQ, 0) + struct.pack("=i", -2) + unseen, stats)
    # Another sender's error, an acknowledgement, and ENOENT for a drop of ids the kernel never queued.
    assert stats.refused == 1
