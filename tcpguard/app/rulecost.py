"""`tcpguard cost`: what each rule costs per packet, measured on a capture before the rules go live.

With the sample rules, the engine and the dispatch to the listeners forward 0.8 of the bare NetfilterQueue
loop's packets per second, and the listeners' own Python costs the rest (docs/BENCHMARKS.md, round 6): on a
gateway the rules decide the throughput. This command lets an operator see which rule that is, on their
own traffic, without root or a queue.

How. The first `--frames` IP frames of the capture are read into memory (so the disk is not measured; the
bound keeps the memory at about the capture's size for that many frames), then the engine runs over them,
with the capture's timestamps as its clock and a timer tick every second as in `tcpguard replay`, with:

* no rules: the engine's own cost (decode, tracking, reassembly, verdicts);
* each rule alone: what that rule adds to it;
* every rule, each listener's body replaced by nothing: what subscribing costs (the dispatch to the
  listeners, the bytes retained for their look-back, a coroutine per flow for streamed ones);
* every rule: the set as it would run.

Each figure is the best of `--repeat` runs, in CPU time of this process, per packet of all traffic. A rule
alone can cost more or less than its part of the whole set: the first rule that acts on a connection stops
the later ones there, and the listeners of a direction share the bytes retained for the largest look-back.
Live, the same Python costs more per packet (between two packets the kernel's queueing and forwarding
evict its code and data from the caches: 1.3-1.5 times as much on the benchmark's machine) and the queue
adds its own cost, so the absolute figures are a floor; the ranking and the shares are what carry over.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tcpguard.core.engine import Engine
from tcpguard.core.rules import Rule, RuleSet
from tcpguard.core.settings import EngineSettings
from tcpguard.io.pcap import iter_frames

DEFAULT_FRAMES = 100_000
DEFAULT_REPEAT = 3
TIMER_INTERVAL = 1.0  # seconds of capture time between timer ticks, as in `tcpguard replay`

Frames = Sequence[tuple[bytes, float]]


@dataclass(frozen=True, slots=True)
class CostRow:
    """One measured rule set: `label` names it, `listens` says what its rule subscribes to (rule rows)."""

    label: str
    listens: str
    us_per_packet: float
    added: float  # over the engine with no rules


def load_frames(capture: str | Path, max_frames: int) -> list[tuple[bytes, float]]:
    """The first `max_frames` IP frames of `capture` as (IP packet, timestamp); frames without IP are
    skipped (the engine never sees them in the daemon either)."""
    out: list[tuple[bytes, float]] = []
    for frame in iter_frames(capture):
        if frame.ip is not None:
            out.append((frame.ip, frame.ts))
            if len(out) >= max_frames:
                break
    return out


def run_once(frames: Frames, rules: RuleSet, settings: EngineSettings | None) -> None:
    """One pass of a fresh engine over `frames`, ticking its timer as `tcpguard replay` does."""
    engine = Engine(settings, rules)
    handle = engine.handle_packet
    next_timer: float | None = None
    ts = 0.0
    for raw, ts in frames:
        if next_timer is None:
            next_timer = ts + TIMER_INTERVAL
        elif ts >= next_timer:
            engine.handle_timer(ts)
            next_timer = ts + TIMER_INTERVAL
        handle(raw, ts)
    engine.shutdown(ts)


def _nothing(*args: object) -> None:
    """A listener that does nothing (its subscription and filters are the rule's own)."""


def hollow(rules: RuleSet) -> RuleSet:
    """The same rules with listeners that do nothing: the same events, filters and order."""
    return RuleSet([dataclasses.replace(r, func=_nothing) for r in rules.rules])


def listens(r: Rule) -> str:
    """What the engine calls `r` on, in the words of `@rule`'s arguments."""
    parts = [str(r.event) + (" streamed" if r.streamed else "")]
    if r.direction is not None:
        parts.append(r.direction)
    if r.ports is not None:
        parts.append("ports " + " ".join(str(p) for p in sorted(r.ports)))
    if r.event == "receive_data" and not r.streamed:
        parts.append(f"lookback {r.lookback}")
    return ", ".join(parts)


def measure(
    frames: Frames,
    rules: RuleSet,
    settings: EngineSettings | None = None,
    repeat: int = DEFAULT_REPEAT,
    clock: Callable[[], float] = time.process_time,
    on_row: Callable[[CostRow], None] | None = None,
) -> list[CostRow]:
    """The rows described in the module docstring, in order: no rules, each rule alone, all rules doing
    nothing, all rules. `clock` is the time source (CPU time by default); `on_row` sees each row as soon
    as it is measured (a capture of a million frames takes minutes)."""
    if not frames:
        raise ValueError("no IP frames to measure on")
    repeat = max(1, repeat)

    def per_packet(rs: RuleSet) -> float:
        best = float("inf")
        for _ in range(repeat):
            t = clock()
            run_once(frames, rs, settings)
            best = min(best, clock() - t)
        return best / len(frames) * 1e6

    rows: list[CostRow] = []

    def add(label: str, what: str, rs: RuleSet, base: float | None) -> float:
        us = per_packet(rs)
        row = CostRow(label, what, us, 0.0 if base is None else us - base)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        return us

    base = add("(no rules)", "", RuleSet(), None)
    if not rules.rules:
        return rows
    for r in rules.rules:
        add(r.name, listens(r), RuleSet([r]), base)
    n = len(rules.rules)
    add(f"(all {n} rules, listeners doing nothing)", "", hollow(rules), base)
    add(f"(all {n} rules)", "", rules, base)
    return rows


def format_row(row: CostRow) -> str:
    added = "" if row.label == "(no rules)" else f"{row.added:+8.2f}"
    return f"{row.label:44s} {row.listens:46s} {row.us_per_packet:9.2f} {added}".rstrip()


HEADER = f"{'rules':44s} {'listens to':46s} {'us/packet':>9s} {'added':>8s}"


def cmd_cost(args: argparse.Namespace) -> int:
    from tcpguard.app.cli import load_settings_and_rules
    from tcpguard.io.pcap import PcapError

    loaded = load_settings_and_rules("cost", args.config, args.rules, args.ignore_checksums)
    if isinstance(loaded, int):
        return loaded
    settings, rules = loaded
    if args.frames < 1 or args.repeat < 1:
        print("tcpguard cost: --frames and --repeat must be at least 1", file=sys.stderr)
        return 2
    try:
        frames = load_frames(args.capture, args.frames)
    except (PcapError, OSError) as e:
        print(f"tcpguard cost: {e}", file=sys.stderr)
        return 1
    if not frames:
        print(f"tcpguard cost: {args.capture}: no IP frames", file=sys.stderr)
        return 1
    print(
        f"{len(frames):,} IP frames of {args.capture}, {len(rules)} rules; best of {args.repeat} runs, "
        "CPU time of this process per packet (microseconds)"
    )
    print(HEADER)
    measure(frames, rules, settings, args.repeat, on_row=lambda row: print(format_row(row), flush=True))
    print(
        "added: over no rules. A rule alone may cost more or less than its part of the whole set (the first\n"
        "rule that acts on a connection stops the later ones). Live, the same rules cost more per packet\n"
        "(see `tcpguard cost --help`)."
    )
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `tcpguard cost` on the command line's subparsers."""
    c = sub.add_parser(
        "cost",
        help="what each rule costs per packet, measured on a capture (no root needed)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("capture", help="pcap or pcapng file")
    c.add_argument("--rules", help="rules directory (default: the config's rules_dir)")
    c.add_argument("--config", help="config file for the engine settings")
    c.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_FRAMES,
        metavar="N",
        help="IP frames from the start of the capture, held in memory (default %(default)s)",
    )
    c.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        metavar="N",
        help="runs per figure (default %(default)s)",
    )
    c.add_argument(
        "--ignore-checksums",
        action="store_true",
        help="do not drop packets with bad checksums (captures with checksum offload)",
    )
    c.set_defaults(func=cmd_cost)
