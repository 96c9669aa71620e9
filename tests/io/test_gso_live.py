"""GRO/GSO aggregates through a real NFQUEUE into the real engine, offloads on (issue 21).

The lab's gateway gets GRO on both veth ends (`ethtool -K c0 gro on`, `s0`), the client and the server
keep TSO/GSO on (veth's default), so bulk data crosses the gateway as aggregates of up to 64 KB. This
module runs as the driver in the gateway namespace (`python -m tests.io.test_gso_live`, see `main()`):
the NFQUEUE adapter asking for GSO packets, the real `Engine` with one rule that resets a connection
whose stream holds PATTERN, and the raw sender for its RSTs. The server application records what it
reads; the tests check it byte for byte, and that the pattern never reaches it.

Every process is started through the `lab` fixture (killed by pid, namespaces deleted at the end, also on
failure); the iptables rules live in the lab's gateway namespace and go with it; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tcpguard.core.conntrack import Connection
from tcpguard.core.decision import Decision, Output, Verdict
from tcpguard.core.engine import Engine
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tcpguard.io.iptables import IptablesManager, IptablesSpec
from tcpguard.io.nfqueue import NfqueueAdapter
from tcpguard.io.rawsend import RawSender
from tests.io.test_nfqueue import _wait_line
from tests.netns import SERVER_V4, SERVER_V6, Lab

REPO = Path(__file__).resolve().parents[2]
MTU = 1500
PORT = 5021
MARK = 0x7467
PATTERN = b"EVIL-PATTERN-21"


# ================================================================================ driver (in the gw ns)
class Recording:
    """The engine, plus what these tests need to know about the packets it was given."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.largest = 0
        self.over_mtu = 0
        self.trusted = 0
        self.stopper_size = 0  # the size of the first packet the rule's block dropped
        self.rewritten_trusted = 0  # rewritten packets whose checksum the kernel was to complete

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        size = len(raw)
        self.largest = max(self.largest, size)
        if size > MTU:
            self.over_mtu += 1
        if checksum_trusted:
            self.trusted += 1
        dec = self.engine.handle_packet(raw, now, token, checksum_trusted=checksum_trusted)
        if dec.verdict is Verdict.DROP and dec.reason.endswith("by rule") and not self.stopper_size:
            self.stopper_size = size
        if dec.packet is not None and checksum_trusted:
            self.rewritten_trusted += 1
        return dec

    def handle_timer(self, now: float) -> Output:
        return self.engine.handle_timer(now)

    def shutdown(self, now: float) -> Output:
        return self.engine.shutdown(now)


@rule(on=tcp_connection.events.receive_data)
def stop_pattern(flow: Connection, stream: Any, current: Any, direction: str) -> None:
    """Resets the connection once its stream holds PATTERN, wherever the segments were cut."""
    if current.find(PATTERN):
        flow.reset()


def main(argv: list[str] | None = None) -> int:
    """Run the engine behind a real NFQUEUE until SIGTERM; print READY, then the stats as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-gso", action="store_true", help="do not ask for GSO packets")
    args = ap.parse_args(argv)
    handler = Recording(Engine(None, RuleSet.of(stop_pattern)))
    with RawSender(mark=MARK) as sender:
        adapter = NfqueueAdapter(handler, sender=sender, repeat_mark=MARK, gso=not args.no_gso)
        signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
        adapter.open()
        print("READY", flush=True)
        adapter.run()
        report = {
            "queue": adapter.stats.as_dict(),
            "engine": handler.engine.stats.as_dict(),
            "drops": dict(handler.engine.drops),
            "handler": {k: v for k, v in vars(handler).items() if isinstance(v, int)},
        }
    print(json.dumps(report), flush=True)
    return 0


# ================================================================================ traffic scripts
# argv: family addr port out -> one connection. The client's first line says what to do:
#   "UP n": read n bytes (or until EOF or reset), write them to `out`, answer "OK <sha256>";
#   "DOWN n": send n bytes of shake_256(b"down"), then close.
SERVER = r"""
import hashlib, socket, sys
fam, addr, port, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(4)
print("LISTENING", flush=True)
s.settimeout(30)
c, _ = s.accept()
c.settimeout(10)
f = c.makefile("rb")
cmd, n = f.readline().split()
n = int(n)
if cmd == b"DOWN":
    c.sendall(hashlib.shake_256(b"down").digest(n))
    c.close()
    sys.exit(0)
got = bytearray()
with open(out, "wb") as o:
    try:
        while len(got) < n:
            data = f.read1(65536)
            if not data:
                break
            got += data
            o.write(data)
            o.flush()
    except (socket.timeout, ConnectionResetError):
        pass
try:
    c.sendall(b"OK " + hashlib.sha256(got).hexdigest().encode())
except OSError:
    pass
c.close()
"""

# argv: family addr port mode size infile parts -> "UP": sends the file in `parts` (comma-separated sizes,
# with a pause between; "oob": all, then one urgent byte "!") and prints the server's answer or "reset";
# "DOWN": prints the sha256 of what came.
CLIENT = r"""
import hashlib, socket, sys, time
fam, addr, port, mode, size, path, parts = sys.argv[1:8]
s = socket.create_connection((addr, int(port)), timeout=30)
oob = parts == "oob"
s.sendall(f"{mode} {int(size) + oob}\n".encode())
if mode == "DOWN":
    h, total = hashlib.sha256(), 0
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        h.update(d)
        total += len(d)
    print(total, h.hexdigest())
    sys.exit(0)
data = open(path, "rb").read()
try:
    at = 0
    for p in [] if oob else [int(x) for x in parts.split(",")]:
        s.sendall(data[at : at + p])
        at += p
        time.sleep(0.3)
    s.sendall(data[at:])
    if oob:  # one urgent byte: the segments still queued for sending leave with URG and its pointer
        s.send(b"!", socket.MSG_OOB)
    print(s.recv(100).decode() or "closed")
except (ConnectionResetError, BrokenPipeError, socket.timeout) as e:
    print("reset", type(e).__name__)
"""


# ================================================================================ plumbing
class Gso:
    def __init__(self, lab: Lab, tmp: Path, family: str = "4") -> None:
        self.lab, self.tmp, self.family = lab, tmp, family
        self.driver: subprocess.Popen[str] | None = None

    @property
    def server_addr(self) -> str:
        return SERVER_V6 if self.family == "6" else SERVER_V4

    def offloads_on(self) -> None:
        """GRO on the gateway's veth ends; TSO/GSO on the endpoints (veth's default, set anyway)."""
        for dev in ("c0", "s0"):
            self.lab.run("gw", ["ethtool", "-K", dev, "gro", "on"])
        for role in ("client", "server"):
            self.lab.run(role, ["ethtool", "-K", "eth0", "tso", "on", "gso", "on"])
        feats = self.lab.run("gw", ["ethtool", "-k", "c0"]).stdout
        assert "generic-receive-offload: on" in feats

    def start(self, *extra: str) -> None:
        mgr = IptablesManager(IptablesSpec(mark=MARK), netns=self.lab.name("gw"))
        mgr.install()
        self.driver = self.lab.popen(
            "gw",
            [sys.executable, "-m", "tests.io.test_gso_live", *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_line(self.driver, "READY", 20)

    def stop(self) -> dict[str, Any]:
        assert self.driver is not None
        self.driver.send_signal(signal.SIGTERM)
        out, err = self.driver.communicate(timeout=30)
        assert self.driver.returncode == 0, err
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report

    def server(self, name: str = "received") -> Path:
        out = self.tmp / name
        proc = self.lab.popen(
            "server",
            [sys.executable, "-c", SERVER, self.family, self.server_addr, str(PORT), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_line(proc, "LISTENING", 20)
        return out

    def client(self, mode: str, data: bytes, parts: str = "0") -> str:
        src = self.tmp / "sent"
        src.write_bytes(data)
        res = self.lab.run(
            "client",
            [
                sys.executable,
                "-c",
                CLIENT,
                self.family,
                self.server_addr,
                str(PORT),
                mode,
                str(len(data)),
                str(src),
                parts,
            ],
            timeout=120,
        )
        return str(res.stdout.strip())


@pytest.fixture
def gso(lab: Lab, tmp_path: Path) -> Gso:
    g = Gso(lab, tmp_path)
    g.offloads_on()
    return g


def _check_gso(report: dict[str, Any]) -> None:
    q, h = report["queue"], report["handler"]
    assert q["gso"] == 1, "the kernel did not take NFQA_CFG_F_GSO"
    assert q["handler_errors"] == q["verdict_errors"] == q["truncated"] == q["unseen"] == 0
    assert q["gso_packets"] > 0 and h["over_mtu"] > 0, "no aggregate reached the daemon"
    assert q["largest"] > 8 * MTU
    assert q["csum_partial"] > 0 and q["csum_trusted"] >= q["csum_partial"]
    assert report["engine"]["bad_checksum"] == 0


SIZE = 16 << 20


# ================================================================================ root tests
@pytest.mark.root
@pytest.mark.parametrize("family", ["4", "6"])
def test_bulk_upload_and_download_are_byte_exact_with_aggregates(gso: Gso, family: str) -> None:
    gso.family = family
    gso.start()
    data = hashlib.shake_256(b"up").digest(SIZE)
    out = gso.server("up")
    assert gso.client("UP", data) == "OK " + hashlib.sha256(data).hexdigest()
    assert out.read_bytes() == data
    gso.server("down")
    down = hashlib.shake_256(b"down").digest(SIZE)
    assert gso.client("DOWN", b"x" * SIZE) == f"{SIZE} {hashlib.sha256(down).hexdigest()}"
    report = gso.stop()
    print(
        "figures:",
        {
            k: report["queue"][k]
            for k in ("packets", "gso_packets", "largest", "csum_partial", "csum_trusted")
        },
    )
    _check_gso(report)
    # Far fewer trips through the engine than wire-sized segments: 2 x 16 MB in 1,448-byte segments is
    # 23,000 data segments each way's worth; the aggregates cut that many times over.
    assert report["engine"]["packets"] < 2 * SIZE // 1448 // 2


@pytest.mark.root
def test_without_the_flag_the_kernel_segments_aggregates(gso: Gso) -> None:
    """The fallback (a kernel without NFQA_CFG_F_GSO behaves so): offloads on, every packet wire-sized."""
    gso.start("--no-gso")
    data = hashlib.shake_256(b"up").digest(4 << 20)
    out = gso.server()
    assert gso.client("UP", data) == "OK " + hashlib.sha256(data).hexdigest()
    assert out.read_bytes() == data
    q = gso.stop()["queue"]
    assert q["gso"] == 0 and q["gso_packets"] == q["csum_trusted"] == 0
    assert q["largest"] <= MTU


@pytest.mark.root
def test_a_pattern_in_the_middle_of_an_aggregate_never_reaches_the_server(gso: Gso) -> None:
    gso.start()
    clean = hashlib.shake_256(b"clean").digest(1 << 20)
    data = clean + hashlib.shake_256(b"x").digest(30000) + PATTERN + hashlib.shake_256(b"y").digest(1 << 20)
    out = gso.server()
    assert gso.client("UP", data).startswith("reset")
    got = out.read_bytes()
    report = gso.stop()
    assert PATTERN not in got
    # What it read is byte-exact (the RST may discard bytes it had not read yet: no "all before it").
    assert got == data[: len(got)] and len(got) > 0
    _check_gso(report)
    assert report["engine"]["resets_sent"] >= 1
    assert report["handler"]["stopper_size"] > MTU, "the pattern did not arrive inside an aggregate"


@pytest.mark.root
def test_a_pattern_split_across_two_aggregates_never_reaches_the_server(gso: Gso) -> None:
    gso.start()
    half = len(PATTERN) // 2
    first = hashlib.shake_256(b"first").digest(200_000) + PATTERN[:half]
    data = first + PATTERN[half:] + hashlib.shake_256(b"second").digest(200_000)
    out = gso.server()
    # The first part goes out alone (a pause before the rest), so the pattern straddles two packets.
    assert gso.client("UP", data, parts=str(len(first))).startswith("reset")
    got = out.read_bytes()
    report = gso.stop()
    assert PATTERN not in got
    assert got == data[: len(got)]
    _check_gso(report)
    assert report["handler"]["stopper_size"] > MTU, "the pattern's second half was not in an aggregate"


@pytest.mark.root
def test_rewritten_partial_checksum_packets_reach_the_receiver_intact(gso: Gso) -> None:
    """The engine clears the urgent flag and pointer (the urgent byte stays in the stream, where the
    rules saw it), which rewrites every segment that carries them. With GSO on these arrive with partial
    checksums (the client offloads its checksum); nfqnl_mangle marks a rewritten packet CHECKSUM_NONE, so
    the engine's full checksum is what the receiver checks: it must read every byte, the urgent one
    inline. (Linux sends no TSO packets in urgent mode, tcp_xmit_size_goal: these are wire-sized; the
    rewrite of an aggregate is tests/adversarial/test_evasion_offloads.py's.)"""
    gso.start()
    data = hashlib.shake_256(b"urgent").digest(8 << 20)
    out = gso.server()
    want = data + b"!"
    assert gso.client("UP", data, parts="oob") == "OK " + hashlib.sha256(want).hexdigest()
    assert out.read_bytes() == want
    report = gso.stop()
    _check_gso(report)
    assert report["handler"]["rewritten_trusted"] >= 1, "no rewritten packet had a partial checksum"
    assert report["queue"]["rewritten"] >= report["handler"]["rewritten_trusted"]


if __name__ == "__main__":
    raise SystemExit(main())
