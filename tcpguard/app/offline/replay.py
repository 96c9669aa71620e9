"""Offline replay: a capture file through the engine, with packet timestamps as the clock.

It plays the gateway: every IP frame goes to the same `Engine` the daemon runs, and the output capture
gets, in order, each packet that would have been forwarded (as forwarded: rewritten bytes where the
engine normalised it, held packets at the moment they were released) and each forged packet at the
moment it would have been sent. Frames without IP are neither judged nor forwarded.

What the offline tools (replay, trace, cost) share lives here too:

* A damaged capture (cut mid-record when tcpdump was killed, junk at the end) is read the way tcpdump
  and tshark read it: every whole record up to the damage, then a warning naming its byte offset. The
  work done on those records is kept (summary, output files, trace's index), and the command exits with
  `EXIT_DAMAGED` so a script can tell "processed, but the capture was damaged" from a clean run (0) and
  from a run that failed (1: not a capture, unreadable; nothing is left behind).
* Output files are written under a temporary name beside the target and renamed over it only when the
  run finishes (`Replacing`): a run that fails leaves no half-written file that looks like a result.
* Rules run under the daemon's per-call time budget (`engine.limits.rule_time_budget`, enforced by
  `tcpguard.app.daemon.budget.RuleBudget`), so a rule that loops costs the budget per call instead of
  hanging the tool, and rule errors are collected with their exception text (`RuleErrors`) instead of one
  log line per call without it.
* A progress bar over the capture's bytes on a terminal (`progress_bar`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tcpguard.app.eventlog import EventLog
from tcpguard.core.decision import Output, Release, Verdict
from tcpguard.core.engine import Engine
from tcpguard.core.events import EngineEvent, RuleError
from tcpguard.core.packet import sum16_mod
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings
from tcpguard.io.pcap import PcapError, PcapReader, PcapWriter

TIMER_INTERVAL = 1.0

#: Exit status of replay, trace and cost when they processed every whole record of a damaged capture.
#: 1 is a failed run and 2 a usage error (argparse's), so "damaged" gets a code of its own.
EXIT_DAMAGED = 3

#: Bytes a record costs in the file beyond its frame, for the progress bar (pcap record header; pcapng
#: EPB header and trailer). Options and padding are not counted: the bar is an estimate.
RECORD_OVERHEAD = {"pcap": 16, "pcapng": 32}
PROGRESS_EVERY = 4096  # frames between two updates of the bar
#: Frames longer than this (the capture's link MTU: the pcap formats do not record it) are candidates
#: for GRO/TSO aggregates, see `unfilled_checksum`.
DEFAULT_MTU = 1500


def unfilled_checksum(ip: bytes) -> bool:
    """Whether this TCP packet's checksum field holds only its pseudo-header sum: the checksum a host
    with GRO or TSO never filled in (tcp4_gro_complete and tcp_v4_send_check write exactly that, for
    the NIC or the segmentation to complete), which a capture on that host records as is.

    Replay takes a frame longer than the MTU with such a checksum as an aggregate and does not check
    its checksum (issue 21): it was never sent so; its segments, checked by GRO or filled by the NIC,
    were. A frame that fits the MTU is still checked (a wire packet with an unfilled checksum is one the
    receiver dropped), and so is any other bad checksum. Counted, and said in the summary."""
    if ip[0] >> 4 == 4:
        hl = (ip[0] & 0x0F) * 4
        if len(ip) < hl + 20 or ip[9] != 6:
            return False
        total = sum16_mod(ip, 12, 20)
    elif len(ip) >= 60 and ip[6] == 6:  # IPv6, TCP right after the fixed header
        hl = 40
        total = sum16_mod(ip, 8, 40)
    else:
        return False
    total += 6 + len(ip) - hl
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return int.from_bytes(ip[hl + 16 : hl + 18], "big") == total


def progress_bar(path: str, enabled: bool | None, desc: str) -> Any:
    """A tqdm bar over the capture's bytes, shown only on a terminal (tqdm's own test when `enabled`
    is None), or None when tqdm is missing: a progress bar is never worth failing a run for."""
    if enabled is False:
        return None
    if enabled is None and not sys.stderr.isatty():
        return None  # tqdm's own test, made before importing it (0.03 s of every run otherwise)
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    return tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)


def damage_warning(command: str, damage: PcapError, done: str) -> str:
    """The warning line for a damaged capture: where, what, and what was `done` with the records before."""
    return f"tcpguard {command}: warning: {damage}; {done} (exit status {EXIT_DAMAGED})"


class Replacing:
    """An output file written as `.NAME.PID.part` beside `target` and renamed over it by `commit`.

    The rename is atomic on one file system (hence beside, not in /tmp), so the target is either the
    previous file or the finished new one, never a run's first 24 bytes. The name carries the pid so
    that two runs writing the same target do not write into each other's part file.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self.part = self.target.with_name(f".{self.target.name}.{os.getpid()}.part")

    def commit(self) -> None:
        os.replace(self.part, self.target)

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)


# Payload reaches a rule as bytes (or memoryview), so a bytes literal in an exception's text is most
# likely payload: it is elided from the report (the full text still goes to --events).
_BYTES_LITERAL = re.compile(r"""b(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
_MAX_ERROR_TEXT = 200


def error_text(e: BaseException) -> str:
    """`Type: message` of a rule's exception for a report: bytes literals elided, at most 200 characters."""
    text = _BYTES_LITERAL.sub("b'...'", str(e))
    if len(text) > _MAX_ERROR_TEXT:
        text = text[: _MAX_ERROR_TEXT - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class RuleErrors:
    """An engine's `on_event` listener for the offline tools: its rule errors are collected into distinct
    errors with a count instead of one log line per failing call, which buries a replay's output; the
    other events are logged as the daemon logs them, unless `quiet` (`tcpguard cost` keeps the log quiet
    while its clock runs). What is reported is `error_text`, never the flow or a traceback. At most
    `MAX_KINDS` distinct errors are kept; later new ones are only counted in `other`.
    """

    MAX_KINDS = 32

    def __init__(self, quiet: bool = False) -> None:
        self.log = None if quiet else EventLog()
        self.kinds: dict[tuple[str, str, str], int] = {}
        self.other = 0

    def __call__(self, ev: EngineEvent) -> None:
        if not isinstance(ev, RuleError):
            if self.log is not None:
                self.log(ev)
            return
        key = (ev.rule, ev.where, error_text(ev.error))
        if key in self.kinds:
            self.kinds[key] += 1
        elif len(self.kinds) < self.MAX_KINDS:
            self.kinds[key] = 1
        else:
            self.other += 1

    def attach(self, engine: Engine) -> None:
        engine.on_event = self

    def lines(self) -> list[str]:
        out = [f"  {rule} at {where}: {text} ({n} times)" for (rule, where, text), n in self.kinds.items()]
        if self.other:
            out.append(f"  and {self.other} more of other kinds")
        return out


def rule_budget(engine: Engine, settings: EngineSettings | None) -> Any:
    """The daemon's per-call budget on `engine`, started, or None when it is off (0) or cannot run here
    (its signal needs the main thread: a replay run from another thread goes without it, with a warning).
    Stop it with `.stop()`."""
    from tcpguard.app.daemon.budget import RuleBudget

    seconds = (settings or EngineSettings()).limits.rule_time_budget
    if seconds <= 0:
        return None
    if threading.current_thread() is not threading.main_thread():
        logging.getLogger("tcpguard.replay").warning(
            "not in the main thread: the rule time budget (%g s) is not enforced", seconds
        )
        return None
    budget = RuleBudget(engine, seconds)
    budget.start()
    return budget


#: The key of held packets dropped when released in `ReplaySummary.drops`: the daemon's words for them.
HELD_THEN_DROPPED = "held, then dropped"


@dataclass(slots=True)
class ReplaySummary:
    frames: int = 0
    non_ip: int = 0
    forwarded: int = 0  # packets that left: accepted on arrival, or held and released with accept
    forged: int = 0
    alerts: int = 0
    released_accepted: int = 0  # held packets forwarded when released
    released_dropped: int = 0  # held packets dropped when released
    still_held: int = 0  # held packets the engine never released (none after a clean shutdown)
    stats: dict[str, int] = field(default_factory=dict)
    # Dropped packets by reason: Engine.drops (on arrival), and HELD_THEN_DROPPED for released ones.
    drops: dict[str, int] = field(default_factory=dict)
    #: The capture's damage (every whole record before it was replayed), or None for a clean file.
    damage: PcapError | None = None
    rule_errors: list[str] = field(default_factory=list)  # RuleErrors.lines()
    unfilled: int = 0  # frames over the MTU with an unfilled checksum, not checked (`unfilled_checksum`)
    mtu: int = DEFAULT_MTU

    def lines(self) -> list[str]:
        """The summary in words that say what happened to the packets.

        The engine's `held` counts packets that were held, whatever happened next, and its refusal-like
        counters mix packets with connections; the lines below count each packet once by its fate and
        name the connection counters for what they are."""
        s = self.stats
        g = s.get
        accepted, dropped = g("accepted", 0), g("dropped", 0)
        out = [
            f"frames {self.frames} (not IP: {self.non_ip}), connections {g('connections', 0)}",
            f"packets forwarded {accepted + self.released_accepted} (after being held: "
            f"{self.released_accepted}), dropped {dropped + self.released_dropped} (after being held: "
            f"{self.released_dropped}), rewritten {g('rewritten', 0)}"
            + (f", still held at the end {self.still_held}" if self.still_held else ""),
            f"resets sent {g('resets_sent', 0)}, alerts {self.alerts}, rule errors {g('rule_errors', 0)}",
        ]
        out += self.rule_errors
        if self.drops:
            out.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.drops.items())))
        found = [f"{label} {g(k)}" for k, label in _FOUND if g(k, 0)]
        if found:
            out.append("found (dropped or passed as the policies say): " + ", ".join(found))
        conns = [f"{label} {g(k)}" for k, label in _CONNECTIONS if g(k, 0)]
        if conns:
            out.append("connections " + ", ".join(conns))
        if g("bypassed", 0):
            # Offline there is no kernel to hand a connection to: every later packet of a bypassed
            # connection still reaches the engine here, and is what a live gateway would not queue.
            out.append(
                f"connections bypassed {g('bypassed')} (no rule wanted more of them): "
                f"{g('bypass_packets', 0)} later packets ({g('bypass_bytes', 0)} bytes) would not have "
                "reached the daemon"
            )
        if g("depth_reached", 0):
            out.append(f"directions past their inspection depth {g('depth_reached')}")
        if g("limit_hits", 0):
            out.append(f"buffer limits hit {g('limit_hits')} times")
        if self.unfilled:
            out.append(
                f"frames over the MTU ({self.mtu}) with their TCP checksum left to the NIC (GRO/TSO on the "
                f"capturing host), not checked: {self.unfilled}"
            )
        if g("bad_checksum", 0):
            out.append(
                "note: packets with bad checksums were dropped; a capture taken on a sending host often has "
                "offloaded (unfilled) checksums: replay it with --ignore-checksums"
            )
        if self.damage is not None:
            out.append(
                f"capture damaged at byte {self.damage.offset}: {self.damage.message}; replayed the "
                f"{self.frames} whole records before it"
            )
        return out


# Engine counters of packets with something wrong with them. What happened to each packet is the policy's
# choice (a malformed packet may be passed), so they are "found", not "refused".
_FOUND = (
    ("malformed", "malformed"),
    ("bad_checksum", "bad checksum"),
    ("fragments", "IP fragments"),
    ("invalid", "invalid for the connection's state"),
    ("rst_injections", "RST injections"),
    ("unexpected_signatures", "unexpected TCP signatures"),
    ("ooo_dropped", "out of order, dropped"),
)
# Engine counters of connections, not packets.
_CONNECTIONS = (
    ("timeouts", "ended idle (timeout)"),
    ("evicted", "evicted from a full table"),
    ("refused", "refused by a full table"),
    ("midstream", "first seen mid-stream"),
)


_ACCEPT = Verdict.ACCEPT
_HOLD = Verdict.HOLD


class _Gateway:
    """Applies decisions the way the NFQUEUE adapter does, writing what leaves to a capture."""

    def __init__(self, writer: PcapWriter | None, forged_log: list[tuple[int, bytes]] | None) -> None:
        self.writer = writer
        self.forged_log = forged_log
        self.frame = 0
        self.held: dict[object, bytes] = {}
        self.forwarded = 0
        self.forged = 0
        self.released_accepted = 0
        self.released_dropped = 0

    def emit(self, data: bytes, ts: float) -> None:
        self.forwarded += 1
        if self.writer is not None:
            self.writer.write(data, ts)

    def apply_out(self, releases: Sequence[Release], send: Sequence[bytes], ts: float) -> None:
        for r in releases:
            original = self.held.pop(r.token)
            if r.verdict == Verdict.ACCEPT:
                self.released_accepted += 1
                self.emit(r.packet if r.packet is not None else original, ts)
            else:
                self.released_dropped += 1
        for pkt in send:
            self.forged += 1
            if self.forged_log is not None:
                self.forged_log.append((self.frame, pkt))
            if self.writer is not None:
                self.writer.write(pkt, ts)

    def output(self, out: Output, ts: float) -> None:
        self.apply_out(out.releases, out.send, ts)


def replay(
    capture: str | Path,
    rules: RuleSet,
    settings: EngineSettings | None = None,
    out: str | Path | None = None,
    events: IO[str] | None = None,
    progress: bool | None = False,
    forged_log: list[tuple[int, bytes]] | None = None,
    mtu: int = DEFAULT_MTU,
) -> ReplaySummary:
    """Replay `capture`; see the module docstring. `forged_log` collects (frame number, packet) for every
    forged packet, the frame being the one whose handling produced it. `progress`: True or False forces
    the bar on or off, None shows it on a terminal.

    A capture damaged after its header does not raise: every whole record before the damage is replayed,
    the connections are ended as at the end of a capture, and `ReplaySummary.damage` says where the file
    went wrong; check it. A file that is not a capture raises `PcapError` before `out` is touched, and
    `out` is only replaced when the replay finishes (see `Replacing`). A frame longer than `mtu` whose
    checksum was left to the NIC is replayed without checking it (`unfilled_checksum`)."""
    summary = ReplaySummary()
    sink: Callable[[dict[str, Any]], None] | None = None
    alerts = 0

    def count_alert(ev: dict[str, Any]) -> None:
        nonlocal alerts
        alerts += 1

    if events is not None:
        ev_file = events

        def sink(ev: dict[str, Any]) -> None:
            ev_file.write(json.dumps(ev, default=str, separators=(",", ":")) + "\n")

    reader = PcapReader(capture, stop_at_damage=True)  # first: a file that is not a capture fails here
    engine = Engine(settings, rules, sink=sink)
    engine.alert_hook = count_alert
    errors = RuleErrors()
    target = Replacing(out) if out is not None else None
    bar = None
    budget = None
    writer = None
    frames = non_ip = unfilled = 0
    try:
        writer = PcapWriter(target.part) if target is not None else None
        gw = _Gateway(writer, forged_log)
        errors.attach(engine)
        budget = rule_budget(engine, settings)
        bar = progress_bar(reader.path, progress, "replay")
        overhead = RECORD_OVERHEAD.get(reader.format, 16)
        done = 0
        next_timer: float | None = None
        ts = 0.0
        # The per-frame loop keeps its counters and callables in locals: it runs once per frame and the
        # attribute lookups were a tenth of its cost next to the engine (tools/profile_engine.py --path
        # replay).
        handle = engine.handle_packet
        emit = gw.emit
        for frame in reader:
            frames += 1
            number = frame.number
            gw.frame = number
            ts = frame.ts
            if bar is not None:
                done += len(frame.data) + overhead
                if not frames % PROGRESS_EVERY:
                    bar.update(done)
                    done = 0
                    bar.set_postfix(frames=frames, refresh=False)
            if next_timer is None:
                next_timer = ts + TIMER_INTERVAL
            elif ts >= next_timer:
                gw.output(engine.handle_timer(ts), ts)
                next_timer = ts + TIMER_INTERVAL
            ip = frame.ip
            if ip is None:
                non_ip += 1
                continue
            if len(ip) > mtu and unfilled_checksum(ip):
                unfilled += 1
                dec = handle(ip, ts, number, checksum_trusted=True)
            else:
                dec = handle(ip, ts, number)
            verdict = dec.verdict
            if verdict is _ACCEPT:
                emit(dec.packet if dec.packet is not None else ip, ts)
            elif verdict is _HOLD:
                gw.held[number] = ip
            if dec.releases or dec.send:
                gw.apply_out(dec.releases, dec.send, ts)
        if sink is not None:
            # Per bypassed connection the engine still remembers (issue 20): its packets after the bypass
            # verdict, which a live gateway's kernel would have forwarded without queueing them. The
            # "bypass" event at the verdict and end_connection's reason "bypassed" come from the engine.
            for b in engine.bypassed:
                sink(
                    {
                        "event": "bypassed",
                        "flow": b.id,
                        "time": ts,
                        "packets_after": b.packets,
                        "bytes_after": b.bytes,
                    }
                )
        gw.output(engine.shutdown(ts), ts)
        if writer is not None:
            writer.close()
        if target is not None:
            target.commit()
    except BaseException:
        if writer is not None:
            writer.close()
        if target is not None:
            target.discard()
        raise
    finally:
        if budget is not None:
            budget.stop()
        if bar is not None:
            bar.close()
        reader.close()
        summary.frames, summary.non_ip = frames, non_ip
        summary.unfilled, summary.mtu = unfilled, mtu
    summary.forwarded = gw.forwarded
    summary.forged = gw.forged
    summary.alerts = alerts
    summary.released_accepted = gw.released_accepted
    summary.released_dropped = gw.released_dropped
    summary.still_held = len(gw.held)
    summary.stats = engine.stats.as_dict()
    summary.drops = dict(engine.drops)
    if gw.released_dropped:
        summary.drops[HELD_THEN_DROPPED] = gw.released_dropped
    summary.damage = reader.damage
    summary.rule_errors = errors.lines()
    return summary
