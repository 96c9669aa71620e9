#!/usr/bin/env python3
"""Fuzz the packet decoder and the engine with mutated packets; report the count, the time and peak RSS.

    python tools/fuzz_engine.py --count 1000000          # the long run (about a minute per 100k-200k)
    python tools/fuzz_engine.py --count 20000 --seed 7   # what CI runs (tests/adversarial/test_badinput.py)

How the packets are made. A generator keeps a pool of flows (IPv4 and IPv6, a few ports that rules treat
specially) with plausible sequence numbers on both sides, and builds segments for them: handshakes, data
in order, out of order, overlapping and retransmitted with other bytes, far outside the window, FIN, RST
(exact, in the window, blind), urgent data, SYN data, IPv4 options, IPv6 extension headers, fragments.
Payloads mix random bytes with words the fuzzing rules react to (reset, drop, half-reset, mark/unmark,
send, raise, alert, newline, the pattern). Most packets then go through one to four mutations (bit flips,
byte changes, interesting values, truncation, extension, insertion, deletion, splicing with an earlier
packet, header-field changes), and most get their checksums fixed again so that they reach the engine's
deeper code instead of stopping at the checksum check. The clock moves on by small steps with occasional
jumps, so timeouts and eviction run too; the limits are small, so every bound is hit.

What is checked, for every packet:

* `decode` returns a Packet or raises DecodeError, nothing else;
* `Engine.handle_packet` never raises and returns a Decision with a known verdict;
* every rewritten packet and every forged RST decodes, is TCP and has valid checksums;
* held packets are released exactly once, and only packets that were held (the adapter's contract);
* and every `--check-every` packets, the engine's bookkeeping: `held_packets` equals the packets it holds,
  `buffered` equals the bytes its streams buffer, the table and the held count stay within their limits.

At the end the engine shuts down and every held packet must have been released. Memory: the peak RSS of
the process (VmHWM) is printed, and the RSS after warm-up must not grow past `--max-growth-mib`.

A failure prints the packet (hex) that caused it and, with `--crash-dir`, saves it; the run goes on and
the exit status is 1. `--atheris` runs the same target under atheris (coverage-guided) if it is installed.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tcpguard.core.decision import Decision, Verdict  # noqa: E402
from tcpguard.core.engine import Engine  # noqa: E402
from tcpguard.core.errors import DecodeError  # noqa: E402
from tcpguard.core.packet import checksums_ok, decode  # noqa: E402
from tcpguard.core.rules import RuleSet, rule, tcp_connection  # noqa: E402
from tcpguard.core.settings import EngineSettings  # noqa: E402

MASK = 0xFFFFFFFF
EV = tcp_connection.events

WORDS = [
    b"RST!",
    b"DROP",
    b"HALF",
    b"MARK",
    b"UNMK",
    b"SEND",
    b"ERR!",
    b"ALRT",
    b"\n",
    b"\r\n",
    b"/bin/sh",
    b"BOOM\n",
    b"GET / HTTP/1.1\r\n",
    b"\x00" * 8,
    b"\xff" * 4,
]
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x10, 0x20, 0x40]
PORTS = [80, 443, 23, 24, 8080]  # 23: the fuzz rule resets at new_connection, 24: drops


# ====================================================================== the rules under fuzz
def make_rules() -> RuleSet:
    @rule(on=EV.new_connection)
    def gate(flow: Any, tcp: Any) -> None:
        if flow.dstport == 23:
            flow.reset()
        elif flow.dstport == 24:
            flow.drop()

    @rule(on=EV.receive_data)
    def inspect(flow: Any, stream: Any, current: Any, direction: str) -> None:
        data = current.read()
        if current.find(b"/bin/sh"):
            flow.reset()
        if b"RST!" in data:
            flow.reset()
        elif b"DROP" in data:
            flow.drop()
        elif b"HALF" in data:
            flow.halfreset()
        if b"MARK" in data:
            current.mark()
        if b"UNMK" in data:
            current.unmark()
        if b"SEND" in data:
            flow.send(direction if len(data) & 1 else None)
        if b"ALRT" in data:
            flow.alert("fuzz alert", severity="low", direction=direction)
        if b"ERR!" in data:
            raise ValueError("fuzz rule error")
        flow.store["n"] = flow.store.get("n", 0) + len(data)

    @rule(on=EV.receive_data, streamed=True)
    def lines(flow: Any, stream: Any, current: Any, direction: str) -> None:
        while True:
            line = current.readline(limit=256)
            if not line:
                return
            if line.startswith(b"BOOM"):
                raise RuntimeError("fuzz streamed error")
            if len(line) > 200:
                current.skip(17)
                current.peek(40)

    @rule(on=EV.end_connection)
    def ended(flow: Any) -> None:
        flow.store.clear()

    return RuleSet.of(gate, inspect, lines, ended)


def make_settings(variant: int) -> EngineSettings:
    st = EngineSettings()
    lim, pol, tmo = st.limits, st.policies, st.timeouts
    lim.max_connections = 48
    lim.max_ooo_bytes = 4096
    lim.max_ooo_segments = 8
    lim.max_stream_buffer = 16384
    lim.max_total_buffer = 131072
    lim.max_held_packets = 96
    tmo.syn_sent = tmo.syn_recv = 5.0
    tmo.established = 60.0
    tmo.fin_wait = tmo.time_wait = 10.0
    tmo.closed = 3.0
    # Every few thousand packets the policies change (through replace_settings, as a reload does).
    pol.limit = ("reset", "drop", "accept")[variant % 3]
    pol.rule_error = ("reset", "drop", "accept")[(variant // 3) % 3]
    pol.table_full = ("evict", "refuse")[variant % 2]
    pol.midstream = ("track", "accept", "drop")[(variant // 2) % 3]
    pol.fragments = ("drop", "accept")[(variant // 5) % 2]
    pol.out_of_order = ("hold", "drop")[1 if variant % 7 == 6 else 0]
    pol.verify_checksums = variant % 11 != 10
    return st


# ====================================================================== packet building
def csum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_options(rng: random.Random, syn: bool) -> bytes:
    opts = b""
    if syn or rng.random() < 0.1:
        if rng.random() < 0.8:
            opts += struct.pack("!BBH", 2, 4, rng.choice([536, 1460, 65535, 0]))
        if rng.random() < 0.6:
            opts += b"\x01" + struct.pack("!BBB", 3, 3, rng.choice([0, 7, 14, 15, 255]))
        if rng.random() < 0.5:
            opts += b"\x04\x02"
    if rng.random() < 0.3:
        opts += b"\x01\x01" + struct.pack("!BBII", 8, 10, rng.getrandbits(32), rng.getrandbits(32))
    if rng.random() < 0.1:
        n = rng.randint(1, 3)
        opts += struct.pack("!BB", 5, 2 + 8 * n) + bytes(rng.getrandbits(8) for _ in range(8 * n))
    opts = opts[:40]
    while len(opts) % 4:
        opts += b"\x00"
    return opts


def build(
    version: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes,
    rng: random.Random,
    window: int = 65535,
    urg: int = 0,
) -> bytes:
    opts = tcp_options(rng, bool(flags & 0x02))
    hl = 20 + len(opts)
    seg = (
        struct.pack("!HHIIBBHHH", sport, dport, seq & MASK, ack & MASK, (hl // 4) << 4, flags, window, 0, urg)
        + opts
        + payload
    )
    if version == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(seg))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(seg), 6)
    seg = seg[:16] + struct.pack("!H", csum(pseudo + seg)) + seg[18:]
    if version == 4:
        ipopts = b""
        if rng.random() < 0.05:
            ipopts = rng.choice(
                [b"\x01\x01\x01\x00", b"\x07\x07\x04\x00\x00\x00\x00\x00", b"\x94\x04\x00\x00"]
            )
        ihl = (20 + len(ipopts)) // 4
        frag = 0x4000
        if rng.random() < 0.03:
            frag = rng.choice([0x2000, 0x0001, 0x2003, 0x1FFF])
        hdr = (
            struct.pack(
                "!BBHHHBBH4s4s",
                0x40 | ihl,
                0,
                20 + len(ipopts) + len(seg),
                rng.getrandbits(16),
                frag,
                64,
                6,
                0,
                src,
                dst,
            )
            + ipopts
        )
        hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
        return hdr + seg
    ext = b""
    nxt = 6
    if rng.random() < 0.1:
        kind = rng.choice([0, 60, 43, 44, 51])
        if kind == 44:
            body = struct.pack("!BBHI", nxt, 0, rng.choice([0, 1, 8, 9]), rng.getrandbits(32))
        elif kind == 51:
            body = struct.pack("!BBHII", nxt, 1, 0, 1, 1)
        elif kind == 43:
            body = struct.pack("!BBBB", nxt, 0, 0, 0) + b"\x00" * 4
        else:
            body = struct.pack("!BB", nxt, 0) + b"\x01\x04\x00\x00\x00\x00"
        ext, nxt = body, kind
    hdr = struct.pack("!IHBB16s16s", 0x60000000, len(ext) + len(seg), nxt, 64, src, dst)
    return hdr + ext + seg


@dataclass
class Flow:
    version: int
    client: bytes
    server: bytes
    cport: int
    sport: int
    cisn: int
    sisn: int
    csent: int = 0  # bytes the client sent so far (offset of its next byte)
    ssent: int = 0
    state: int = 0  # 0 new, 1 SYN sent, 2 SYN-ACK sent, 3 established


class Generator:
    """Plausible traffic for a pool of flows, then mutated."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.flows: list[Flow] = []
        self.recent: list[bytes] = []
        for _ in range(40):
            self.flows.append(self._new_flow())

    def _new_flow(self) -> Flow:
        rng = self.rng
        v6 = rng.random() < 0.3
        if v6:
            c = bytes.fromhex("fd000077000100000000000000000002")
            s = bytes.fromhex("fd000077000200000000000000000002")
        else:
            c, s = bytes([10, 77, 1, rng.randint(1, 4)]), bytes([10, 77, 2, 2])
        return Flow(
            6 if v6 else 4,
            c,
            s,
            rng.randint(1024, 65535),
            rng.choice(PORTS),
            rng.getrandbits(32),
            rng.getrandbits(32),
        )

    def payload(self) -> bytes:
        rng = self.rng
        parts = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.4:
                parts.append(rng.choice(WORDS))
            else:
                parts.append(rng.randbytes(rng.choice([1, 2, 7, 30, 200, 1000])))
        return b"".join(parts)[: rng.choice([1, 50, 300, 1400, 3000])]

    def segment(self) -> bytes:
        rng = self.rng
        i = rng.randrange(len(self.flows))
        f = self.flows[i]
        if rng.random() < 0.01:
            self.flows[i] = f = self._new_flow()
        up = rng.random() < 0.6
        r = rng.random()
        payload = b""
        urg = 0
        if f.state == 0 or r < 0.03:
            flags, up = 0x02, True
            if rng.random() < 0.05:
                payload = self.payload()
            f.state = max(f.state, 1)
            seq, ack = f.cisn, 0
        elif f.state == 1 or r < 0.06:
            flags, up = 0x12, False
            f.state = max(f.state, 2)
            seq, ack = f.sisn, f.cisn + 1
        else:
            f.state = 3
            flags = 0x18 if rng.random() < 0.8 else 0x10
            payload = self.payload() if rng.random() < 0.8 else b""
            sent = f.csent if up else f.ssent
            kind = rng.random()
            if kind < 0.55:  # in order
                off = sent
            elif kind < 0.75:  # out of order, ahead
                off = sent + rng.choice([1, 10, 100, 1500, 5000])
            elif kind < 0.9:  # retransmission / overlap with other bytes
                off = max(0, sent - rng.randint(0, 2000))
            elif kind < 0.95:  # far away, maybe past 2**31
                off = sent + rng.choice([1 << 20, 1 << 31, (1 << 32) - 5, -(1 << 20)])
            else:
                off = rng.randint(-10, sent + 10)
            isn = f.cisn if up else f.sisn
            seq = isn + 1 + off
            ack = (f.sisn + 1 + f.ssent) if up else (f.cisn + 1 + f.csent)
            if off == sent:
                if up:
                    f.csent += len(payload)
                else:
                    f.ssent += len(payload)
            x = rng.random()
            if x < 0.04:
                flags |= 0x01  # FIN
            elif x < 0.08:
                flags = 0x04 | (0x10 if rng.random() < 0.5 else 0)  # RST
                seq = rng.choice([seq, 0, seq + rng.randint(1, 70000), seq - 1])
                payload = payload if rng.random() < 0.2 else b""
            elif x < 0.11:
                flags |= 0x20
                urg = rng.randint(0, max(1, len(payload) + 5))
            elif x < 0.12:
                flags = rng.getrandbits(8)
        src, dst, sp, dp = (
            (f.client, f.server, f.cport, f.sport) if up else (f.server, f.client, f.sport, f.cport)
        )
        return build(
            f.version,
            src,
            dst,
            sp,
            dp,
            seq,
            ack,
            flags,
            payload,
            rng,
            window=rng.choice([65535, 0, 1, 512, 29200]),
            urg=urg,
        )

    def mutate(self, raw: bytes) -> bytes:
        rng = self.rng
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(10)
            n = len(b)
            if n == 0:
                b += rng.randbytes(rng.randint(1, 60))
                continue
            if op == 0:
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                b[rng.randrange(n)] = rng.getrandbits(8)
            elif op == 2:
                b[rng.randrange(n)] = rng.choice(INTERESTING)
            elif op == 3:
                del b[rng.randrange(n) :]
            elif op == 4:
                b += rng.randbytes(rng.randint(1, 64))
            elif op == 5:
                i = rng.randrange(n)
                b[i:i] = rng.randbytes(rng.randint(1, 8))
            elif op == 6:
                i = rng.randrange(n)
                del b[i : i + rng.randint(1, 8)]
            elif op == 7 and self.recent:
                other = rng.choice(self.recent)
                i = rng.randrange(n)
                b = b[:i] + bytearray(other[rng.randrange(len(other) or 1) :])
            elif op == 8:  # header fields: the first 60 bytes hold the IP and TCP headers
                i = rng.randrange(min(n, 60))
                b[i] = rng.choice([*INTERESTING, rng.getrandbits(8)])
            else:
                i = rng.randrange(n)
                b[i : i + 2] = rng.randbytes(2)
        return bytes(b)

    def next(self) -> bytes:
        rng = self.rng
        raw = self.segment()
        if rng.random() < 0.5:
            raw = self.mutate(raw)
            if rng.random() < 0.8:
                raw = fix_checksums(raw)
        if rng.random() < 0.02:
            raw = rng.randbytes(rng.randint(0, 80))
        if rng.random() < 0.05:
            self.recent.append(raw)
            del self.recent[:-64]
        return raw


def fix_checksums(raw: bytes) -> bytes:
    """Recompute the IPv4 header and TCP checksums where the headers still make sense."""
    try:
        pkt = decode(raw)
    except DecodeError:
        return raw
    if not pkt.is_tcp:
        return raw
    b = bytearray(pkt.raw)
    if pkt.version == 4:
        b[10:12] = b"\x00\x00"
        b[10:12] = struct.pack("!H", csum(bytes(b[: pkt.ip_hlen])))
    seg = bytearray(b[pkt.ip_hlen :])
    seg[16:18] = b"\x00\x00"
    if pkt.version == 4:
        pseudo = pkt.src + pkt.dst + struct.pack("!BBH", 0, 6, len(seg))
    else:
        pseudo = pkt.src + pkt.dst + struct.pack("!IxxxB", len(seg), 6)
    seg[16:18] = struct.pack("!H", csum(pseudo + bytes(seg)))
    return bytes(b[: pkt.ip_hlen]) + bytes(seg)


# ====================================================================== the run
@dataclass
class Report:
    count: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_end_mib: float = 0.0
    decoded: int = 0
    decode_errors: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    engine: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.failures:
            out[f["kind"]] = out.get(f["kind"], 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def summary(self) -> str:
        rate = self.count / self.seconds if self.seconds else 0.0
        return (
            f"{self.count} packets in {self.seconds:.1f} s ({rate:,.0f}/s); "
            f"peak RSS {self.peak_rss_mib:.1f} MiB "
            f"(after warm-up {self.rss_after_warmup_mib:.1f}, at the end {self.rss_end_mib:.1f}); "
            f"decode: {self.decoded} packets, {self.decode_errors} DecodeError; verdicts {self.verdicts}; "
            f"failures: {len(self.failures)} {self.kinds()}"
        )


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Target:
    """One engine plus the adapter-side bookkeeping that checks its contract."""

    def __init__(self, report: Report, crash_dir: Path | None) -> None:
        self.report = report
        self.crash_dir = crash_dir
        self.variant = 0
        self.engine = Engine(make_settings(0), make_rules())
        self.held: set[int] = set()
        self.now = 1000.0
        self.token = 0

    def fail(self, what: str, raw: bytes, kind: str = "crash") -> None:
        """Record a failure: `crash` (something raised), `contract` (a broken promise to the adapter or the
        decoder's contract), `books` (the engine's own accounting disagrees with its streams) or `bound`
        (a configured limit was exceeded)."""
        entry = {"kind": kind, "what": what, "packet": raw.hex()}
        self.report.failures.append(entry)
        if len(self.report.failures) <= 20:
            print(f"FAILURE ({kind}): {what}\n  packet: {raw.hex()}", file=sys.stderr)
            if self.crash_dir is not None:
                self.crash_dir.mkdir(parents=True, exist_ok=True)
                (self.crash_dir / f"crash-{len(self.report.failures)}.bin").write_bytes(raw)

    def check_out(self, releases: Sequence[Any], send: Sequence[bytes], raw: bytes) -> None:
        for rel in releases:
            if rel.token not in self.held:
                self.fail(f"release of token {rel.token} that is not held", raw, "contract")
            self.held.discard(rel.token)
            if rel.verdict not in (Verdict.ACCEPT, Verdict.DROP):
                self.fail(f"release with verdict {rel.verdict}", raw, "contract")
            if rel.packet is not None:
                self.check_built(rel.packet, "released rewrite", raw)
        for out in send:
            self.check_built(out, "forged packet", raw)

    def check_built(self, data: bytes, what: str, raw: bytes) -> None:
        try:
            p = decode(data)
        except DecodeError as e:
            self.fail(f"{what} does not decode: {e}", raw, "contract")
            return
        if not p.is_tcp or not checksums_ok(p):
            self.fail(f"{what} is not TCP with valid checksums", raw, "contract")

    def feed(self, raw: bytes) -> None:
        rep = self.report
        try:
            decode(raw)
            rep.decoded += 1
        except DecodeError:
            rep.decode_errors += 1
        except Exception as e:
            self.fail(f"decode raised {type(e).__name__}: {e}", raw, "contract")
        self.token += 1
        self.now += self.engine.settings.timeouts.closed * 0.001 * (1 + (self.token % 7))
        if self.token % 5000 == 0:
            self.now += 30.0  # a jump: idle timeouts fire
        try:
            dec: Decision = self.engine.handle_packet(raw, self.now, self.token)
        except Exception as e:
            self.fail(f"handle_packet raised {type(e).__name__}: {e}\n{traceback.format_exc()}", raw)
            self.engine = Engine(make_settings(self.variant), make_rules())
            self.held.clear()
            return
        name = dec.verdict.name if isinstance(dec.verdict, Verdict) else f"bad:{dec.verdict!r}"
        rep.verdicts[name] = rep.verdicts.get(name, 0) + 1
        if dec.verdict == Verdict.HOLD:
            self.held.add(self.token)
        if dec.packet is not None:
            self.check_built(dec.packet, "rewritten packet", raw)
        self.check_out(dec.releases, dec.send, raw)
        if self.token % 50 == 0:
            try:
                out = self.engine.handle_timer(self.now)
            except Exception as e:
                self.fail(f"handle_timer raised {type(e).__name__}: {e}", raw)
            else:
                self.check_out(out.releases, out.send, raw)
        if self.token % 4000 == 0:
            self.variant += 1
            self.engine.replace_settings(make_settings(self.variant))

    def check_books(self, raw: bytes) -> None:
        eng = self.engine
        held = 0
        buffered = 0
        for conn in eng.table:
            for s in (conn.up, conn.down):
                held += len(s.ooo) + len(s.held)
                buffered += s.buffered()
        if eng.held_packets != len(self.held) or held != len(self.held):
            self.fail(
                f"held packets: engine says {eng.held_packets}, its streams hold {held}, "
                f"the adapter holds {len(self.held)}",
                raw,
                "books",
            )
            self.held = set(list(self.held)[: eng.held_packets])  # report once, not on every check
        if eng.buffered != buffered:
            self.fail(
                f"buffered bytes: engine says {eng.buffered}, its streams hold {buffered}", raw, "books"
            )
            eng.ledger.buffered = buffered
        lim = eng.settings.limits
        if len(eng.table) > lim.max_connections:
            self.fail(f"table holds {len(eng.table)} connections, limit {lim.max_connections}", raw, "bound")
        if eng.held_packets > lim.max_held_packets:
            self.fail(f"{eng.held_packets} packets held, limit {lim.max_held_packets}", raw, "bound")

    def finish(self) -> None:
        try:
            out = self.engine.shutdown(self.now + 1)
        except Exception as e:
            self.fail(f"shutdown raised {type(e).__name__}: {e}", b"")
            return
        self.check_out(out.releases, out.send, b"")
        if self.held:
            self.fail(f"{len(self.held)} held packets never released at shutdown", b"", "contract")


def run(
    count: int,
    seed: int = 1,
    check_every: int = 1000,
    crash_dir: Path | None = None,
    max_growth_mib: float = 256.0,
    progress: bool = False,
) -> Report:
    """Fuzz `count` packets; the report lists every contract violation found."""
    report = Report()
    gen = Generator(seed)
    target = Target(report, crash_dir)
    start = time.monotonic()
    warm = min(count // 10, 50_000)
    for i in range(count):
        raw = gen.next()
        target.feed(raw)
        if i % check_every == check_every - 1:
            target.check_books(raw)
        if i == warm:
            report.rss_after_warmup_mib = rss_mib()
        if progress and i and i % 100_000 == 0:
            print(
                f"  {i} packets, {time.monotonic() - start:.0f} s, RSS {rss_mib():.1f} MiB", file=sys.stderr
            )
    target.check_books(b"")
    target.finish()
    report.count = count
    report.seconds = time.monotonic() - start
    report.rss_end_mib = rss_mib()
    report.peak_rss_mib = peak_mib()
    report.engine = target.engine.stats.as_dict()
    if report.rss_after_warmup_mib and report.rss_end_mib - report.rss_after_warmup_mib > max_growth_mib:
        report.failures.append(
            {
                "kind": "bound",
                "what": f"RSS grew from {report.rss_after_warmup_mib:.1f} to {report.rss_end_mib:.1f} MiB",
                "packet": "",
            }
        )
    return report


def run_atheris(count: int, seed: int) -> Report:  # pragma: no cover - optional
    """The same target, coverage-guided by libFuzzer through atheris, from a corpus of generated packets."""
    import importlib
    import tempfile

    atheris = importlib.import_module("atheris")  # optional: pip install atheris

    atheris.instrument_all()
    report = Report()
    target = Target(report, None)
    corpus = Path(tempfile.mkdtemp(prefix="tcpguard-fuzz-corpus-"))
    gen = Generator(seed)
    for i in range(500):
        (corpus / f"seed-{i}").write_bytes(gen.segment())

    def one(data: bytes) -> None:
        before = len(report.failures)
        target.feed(data)
        if target.token % 1000 == 0:
            target.check_books(data)
        if len(report.failures) > before and report.failures[-1]["kind"] != "bound":
            raise RuntimeError(report.failures[-1]["what"])

    start = time.monotonic()
    try:
        atheris.Setup([sys.argv[0], f"-seed={seed}", f"-runs={count}", "-max_len=2048", str(corpus)], one)
        atheris.Fuzz()
    except SystemExit:
        pass
    report.count = target.token
    report.seconds = time.monotonic() - start
    report.peak_rss_mib = peak_mib()
    report.rss_end_mib = rss_mib()
    report.engine = target.engine.stats.as_dict()
    return report


def main(argv: list[str] | None = None) -> int:
    import logging

    # Rule errors are expected by the thousand. Set here, not in Target: the CI test runs Target inside
    # pytest, where a changed logger level would leak into every later test.
    logging.getLogger("tcpguard").setLevel(logging.CRITICAL)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=1_000_000, help="packets to generate (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-every", type=int, default=1000, help="engine bookkeeping check interval")
    ap.add_argument("--max-growth-mib", type=float, default=256.0, help="allowed RSS growth after warm-up")
    ap.add_argument("--crash-dir", type=Path, help="save each failing packet here")
    ap.add_argument("--json", type=Path, help="write the report as JSON")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided run with atheris (if installed)")
    args = ap.parse_args(argv)
    if args.atheris:
        report = run_atheris(args.count, args.seed)
    else:
        report = run(
            args.count, args.seed, args.check_every, args.crash_dir, args.max_growth_mib, progress=True
        )
    print(report.summary())
    print("engine counters:", json.dumps(report.engine, sort_keys=True))
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
