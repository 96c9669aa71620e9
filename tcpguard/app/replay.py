"""Offline replay: a capture file through the engine, with packet timestamps as the clock.

It plays the gateway: every IP frame goes to the same `Engine` the daemon runs, and the output capture
gets, in order, each packet that would have been forwarded (as forwarded: rewritten bytes where the
engine normalised it, held packets at the moment they were released) and each forged packet at the
moment it would have been sent. Frames without IP are neither judged nor forwarded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tcpguard.core.decision import Output, Release, Verdict
from tcpguard.core.engine import Engine
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings
from tcpguard.io.pcap import PcapWriter, iter_frames

TIMER_INTERVAL = 1.0


@dataclass(slots=True)
class ReplaySummary:
    frames: int = 0
    non_ip: int = 0
    forwarded: int = 0
    forged: int = 0
    alerts: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)  # Engine.drops: dropped packets by reason

    def lines(self) -> list[str]:
        s = self.stats
        g = s.get
        out = [
            f"frames {self.frames} (not IP: {self.non_ip}), connections {g('connections', 0)}",
            f"packets accepted {g('accepted', 0)}, dropped {g('dropped', 0)}, held {g('held', 0)}, "
            f"rewritten {g('rewritten', 0)}",
            f"resets sent {g('resets_sent', 0)}, alerts {self.alerts}, rule errors {g('rule_errors', 0)}",
        ]
        if self.drops:
            out.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.drops.items())))
        refused = {k: v for k, v in s.items() if k in _REFUSALS and v}
        if refused:
            out.append("refused: " + ", ".join(f"{k} {v}" for k, v in refused.items()))
        if s.get("bad_checksum"):
            out.append(
                "note: packets with bad checksums were dropped; a capture taken on a sending host often has "
                "offloaded (unfilled) checksums: replay it with --ignore-checksums"
            )
        return out


_REFUSALS = (
    "malformed",
    "bad_checksum",
    "fragments",
    "invalid",
    "rst_injections",
    "unexpected_signatures",
    "ooo_dropped",
    "limit_hits",
    "refused",
    "evicted",
    "timeouts",
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

    def emit(self, data: bytes, ts: float) -> None:
        self.forwarded += 1
        if self.writer is not None:
            self.writer.write(data, ts)

    def apply_out(self, releases: Sequence[Release], send: Sequence[bytes], ts: float) -> None:
        for r in releases:
            original = self.held.pop(r.token)
            if r.verdict == Verdict.ACCEPT:
                self.emit(r.packet if r.packet is not None else original, ts)
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
    progress: Callable[[int], None] | None = None,
    forged_log: list[tuple[int, bytes]] | None = None,
) -> ReplaySummary:
    """Replay `capture`; see the module docstring. `forged_log` collects (frame number, packet) for every
    forged packet, the frame being the one whose handling produced it."""
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

    engine = Engine(settings, rules, sink=sink)
    engine.alert_hook = count_alert
    writer = PcapWriter(out) if out is not None else None
    gw = _Gateway(writer, forged_log)
    next_timer: float | None = None
    ts = 0.0
    # The per-frame loop keeps its counters and callables in locals: it runs once per frame and the
    # attribute lookups were a tenth of its cost next to the engine (tools/profile_engine.py --path replay).
    handle = engine.handle_packet
    emit = gw.emit
    frames = non_ip = 0
    try:
        for frame in iter_frames(capture):
            frames += 1
            number = frame.number
            gw.frame = number
            ts = frame.ts
            if next_timer is None:
                next_timer = ts + TIMER_INTERVAL
            elif ts >= next_timer:
                gw.output(engine.handle_timer(ts), ts)
                next_timer = ts + TIMER_INTERVAL
            ip = frame.ip
            if ip is None:
                non_ip += 1
                continue
            dec = handle(ip, ts, number)
            verdict = dec.verdict
            if verdict is _ACCEPT:
                emit(dec.packet if dec.packet is not None else ip, ts)
            elif verdict is _HOLD:
                gw.held[number] = ip
            if dec.releases or dec.send:
                gw.apply_out(dec.releases, dec.send, ts)
            if progress is not None and frames % 4096 == 0:
                progress(frames)
        gw.output(engine.shutdown(ts), ts)
    finally:
        if writer is not None:
            writer.close()
        summary.frames, summary.non_ip = frames, non_ip
    summary.forwarded = gw.forwarded
    summary.forged = gw.forged
    summary.alerts = alerts
    summary.stats = engine.stats.as_dict()
    summary.drops = dict(engine.drops)
    return summary
