"""`tcpguard cost`: what each rule costs per packet, measured on a capture before the rules go live.

On the benchmark's request/response traffic, tcpguard with the sample rules' listeners emptied forwards
about 0.85 of a bare NetfilterQueue loop's packets per second, and with the real listeners 0.66-0.74: of
the cost above the bare loop, the listeners' own Python is the larger part (docs/BENCHMARKS.md, rounds 6
and 7). On such traffic the rules decide a gateway's throughput (on bulk transfers the engine's own work
weighs more), and this command shows which rule it is, on the operator's own traffic, without root or a
queue.

How. The first `--frames` IP frames of the capture are read into memory (so the disk is not measured;
at most 512 MiB of them), then the engine runs over them, with the capture's timestamps as its clock
and a timer tick every second as in `tcpguard replay`, with:

* no rules: the engine's own cost (decode, tracking, reassembly, verdicts);
* each rule alone: what that rule adds to it;
* every rule with its listener's body replaced by nothing: what subscribing costs (the calls, the bytes
  retained for the look-back). Emptied listeners never act, so they are called on every connection, also
  on those the real rules would refuse; a streamed one's coroutine is started and ends at once;
* every rule: the set as it would run.

Rules run under the daemon's per-call time budget (`engine.limits.rule_time_budget`): a call that runs
past it is interrupted and counted as a rule error, and a rule set whose calls time out is measured on one
run up to its first timeout and marked `timed out` (its figure is the budget, not the rule). Rule errors are
listed after the table with their exception text (bytes in it elided), from one more, untimed, run of the
row. A damaged capture (cut mid-record, junk at the end) is measured on its whole records before the
damage, with a warning and exit status 3 when the damage was reached.

Each figure is the best of `--repeat` runs, in CPU time of this process, per packet of all traffic,
including the end of the connections still open when the frames run out (their `end_connection`). The
rule modules are loaded afresh before every run (untimed), so what a module keeps between calls (a rate
limiter's buckets, a cache) starts empty each time, as in a daemon just started. Alerts and rule errors
are counted, not logged, while the clock runs. A rule alone can cost more or less than its part of the
whole set: the first rule that acts on a connection stops the later ones there, and the listeners of a
direction share the bytes retained for the largest look-back. Live, the same Python costs more per packet
(between two packets the kernel's queueing and forwarding evict its code and data from the caches: about
1.3 times as much for the sample rules' listeners on the benchmark's machine, about 2 times for the
engine on bulk transfers) and the queue adds its own cost, so the absolute figures are a floor and the
engine's share grows live; the ranking of the rules is what carries over.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tcpguard.app.offline.replay import EXIT_DAMAGED, TIMER_INTERVAL, RuleErrors, damage_warning, rule_budget
from tcpguard.core.engine import Engine
from tcpguard.core.rules import Rule, RuleSet
from tcpguard.core.settings import EngineSettings
from tcpguard.io.pcap import PcapError, PcapReader

DEFAULT_FRAMES = 100_000
MAX_BYTES = 512 * 2**20  # of IP packets held in memory, whatever --frames says (GRO captures: 64 KB frames)
DEFAULT_REPEAT = 3

Frames = Sequence[tuple[bytes, float]]
Loader = Callable[[], RuleSet]


@dataclass(frozen=True, slots=True)
class CostRow:
    """One measured rule set: `label` names it, `listens` says what its rule subscribes to (rule rows).
    The counters are what the engine did in one run: a rule that drops or raises changes what it costs."""

    label: str
    listens: str
    us_per_packet: float
    added: float  # over the engine with no rules
    dropped: int = 0
    alerts: int = 0
    rule_errors: int = 0
    bad_checksum: int = 0
    timed_out: bool = False  # a call ran past the rule time budget: the run stopped there
    errors: tuple[str, ...] = ()  # the distinct rule errors of one run (RuleErrors.lines)


def read_frames(
    capture: str | Path, max_frames: int, max_bytes: int = MAX_BYTES
) -> tuple[list[tuple[bytes, float]], PcapError | None]:
    """The first IP frames of `capture` as (IP packet, timestamp): at most `max_frames` of them and
    `max_bytes` of packets. Frames without IP are skipped (the engine never sees them in the daemon).
    Reading stops at damage in the file (see `PcapReader`'s stop_at_damage), which is returned with the
    frames before it; None when the file was clean as far as it was read."""
    out: list[tuple[bytes, float]] = []
    size = 0
    with PcapReader(capture, stop_at_damage=True) as reader:
        for frame in reader:
            ip = frame.ip
            if ip is None:
                continue
            size += len(ip)
            if size > max_bytes:
                break
            out.append((ip, frame.ts))
            if len(out) >= max_frames:
                break
        return out, reader.damage


def load_frames(
    capture: str | Path, max_frames: int, max_bytes: int = MAX_BYTES
) -> list[tuple[bytes, float]]:
    """`read_frames` for callers that want damage as an error: raises it after reading the frames."""
    frames, damage = read_frames(capture, max_frames, max_bytes)
    if damage is not None:
        raise damage
    return frames


_CHUNK = 1024  # frames between two looks at `stop` (the slice costs next to nothing per frame)


def run_once(frames: Frames, engine: Engine, stop: Callable[[], bool] | None = None) -> None:
    """One pass of `engine` over `frames`, ticking its timer as `tcpguard replay` does. With `stop`,
    the pass ends early (at a chunk boundary, then the engine's shutdown) once it returns True."""
    handle = engine.handle_packet
    next_timer: float | None = None
    ts = 0.0
    step = len(frames) if stop is None else _CHUNK
    for start in range(0, len(frames), max(1, step)):
        for raw, ts in frames[start : start + step]:
            if next_timer is None:
                next_timer = ts + TIMER_INTERVAL
            elif ts >= next_timer:
                engine.handle_timer(ts)
                next_timer = ts + TIMER_INTERVAL
            handle(raw, ts)
        if stop is not None and stop():
            break
    engine.shutdown(ts)


def _nothing(*args: object) -> None:
    """A listener that does nothing (its subscription and filters are the rule's own)."""


def hollow(rules: RuleSet) -> RuleSet:
    """The same rules with listeners that do nothing: the same events, filters and order. They never act,
    so every listener is called on every connection (also those the real rules would refuse), and a
    streamed listener's coroutine is started and ends at once."""
    return RuleSet([dataclasses.replace(r, func=_nothing) for r in rules.rules])


def _alone(load: Loader, i: int) -> Loader:
    """A loader of the `i`th rule of what `load` loads, by itself."""
    return lambda: RuleSet([load().rules[i]])


def listens(r: Rule) -> str:
    """What the engine calls `r` on, in the words of `@rule`'s arguments."""
    parts = [str(r.event) + (" streamed" if r.streamed else "")]
    if r.module.endswith(".lua"):
        parts.insert(0, "lua")  # a Haka rule file's rule (tcpguard.lua): the same events, via Lua
    if r.direction is not None:
        parts.append(r.direction)
    if r.ports is not None:
        parts.append("ports " + " ".join(str(p) for p in sorted(r.ports)))
    if r.event == "receive_data" and not r.streamed:
        parts.append(f"lookback {r.lookback}")
    return ", ".join(parts)


def measure(
    frames: Frames,
    load: Loader,
    settings: EngineSettings | None = None,
    repeat: int = DEFAULT_REPEAT,
    clock: Callable[[], float] = time.process_time,
    on_row: Callable[[CostRow], None] | None = None,
) -> list[CostRow]:
    """The rows described in the module docstring, in order: no rules, each rule alone, all rules with
    their listeners emptied, all rules. `load` makes the rule set; it is called again before every run
    (untimed), so that what a rule module keeps between calls (a rate limiter's buckets, a cache) starts
    afresh each time, as it would in a daemon just started. `clock` is the time source (CPU time by
    default); `on_row` sees each row as soon as it is measured (a capture of a million frames takes
    minutes). Alerts and rule errors are counted, not logged, while the clock runs."""
    if not frames:
        raise ValueError("no IP frames to measure on")
    repeat = max(1, repeat)
    rules = load()
    n = len(rules.rules)
    sets: list[tuple[str, str, Loader]] = [("(no rules)", "", RuleSet)]
    for i, r in enumerate(rules.rules):
        sets.append((r.name, listens(r), _alone(load, i)))
    if n:
        sets.append((f"(all {n} rules, listeners emptied)", "", lambda: hollow(load())))
        sets.append((f"(all {n} rules)", "", load))
    rows: list[CostRow] = []
    base = 0.0
    # The timed engines have no event listener: they log nothing, and handle nothing but packets.
    run_once(frames, Engine(settings, RuleSet()))  # warm-up: first-use allocations, caches
    for label, what, make in sets:
        best = float("inf")
        alerts = 0
        timed_out = False
        for _ in range(repeat):
            engine = Engine(settings, make())
            alerts = 0

            def count(ev: dict[str, Any]) -> None:
                nonlocal alerts
                alerts += 1

            engine.alert_hook = count
            budget = rule_budget(engine, settings)
            # A call that times out costs the whole budget: stop the run there, and the repeats.
            stop = _stopper(budget)
            gc.collect()  # the previous run's garbage is not this run's cost
            try:
                t = clock()
                run_once(frames, engine, stop)
                best = min(best, clock() - t)
            finally:
                if budget is not None:
                    budget.stop()
            if budget is not None and budget.timeouts:
                timed_out = True
                break
        us = best / len(frames) * 1e6
        if not rows:
            base = us
        st = engine.stats
        errors: tuple[str, ...] = ()
        if st.rule_errors:
            errors = _error_texts(frames, settings, make)
        row = CostRow(
            label,
            what,
            us,
            us - base,
            st.dropped,
            alerts,
            st.rule_errors,
            st.bad_checksum,
            timed_out,
            errors,
        )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _stopper(budget: Any) -> Callable[[], bool] | None:
    """`run_once`'s stop test for a run under `budget` (None: no budget, nothing to stop for)."""
    if budget is None:
        return None
    return lambda: bool(budget.timeouts)


def _error_texts(frames: Frames, settings: EngineSettings | None, make: Loader) -> tuple[str, ...]:
    """The distinct rule errors of one more run of `make`'s rules, untimed: the timed runs hear none of
    the engine's events (handling them would be part of the figure), so the texts come from here."""
    engine = Engine(settings, make())
    collect = RuleErrors(quiet=True)
    collect.attach(engine)
    budget = rule_budget(engine, settings)
    try:
        run_once(frames, engine, _stopper(budget))
    finally:
        if budget is not None:
            budget.stop()
    return tuple(collect.lines())


def format_row(row: CostRow) -> str:
    added = "" if row.label == "(no rules)" else f"{row.added:+.2f}"
    us = "timed out" if row.timed_out else f"{row.us_per_packet:9.2f}"
    return (
        f"{row.label:44s} {row.listens:46s} {us:>9s} {added if not row.timed_out else '':>8s} "
        f"{row.dropped:>8,} {row.alerts:>7,} {row.rule_errors:>7,}"
    )


HEADER = (
    f"{'rules':44s} {'listens to':46s} {'us/packet':>9s} {'added':>8s} {'dropped':>8s} {'alerts':>7s} "
    f"{'errors':>7s}"
)


def cmd_cost(args: argparse.Namespace) -> int:
    from tcpguard.app.daemon.ruleload import load_rules
    from tcpguard.app.offline.inputs import load_settings_and_rules

    if args.frames < 1 or args.repeat < 1:
        print("tcpguard cost: --frames and --repeat must be at least 1", file=sys.stderr)
        return 2
    loaded = load_settings_and_rules("cost", args.config, args.rules, args.ignore_checksums)
    if isinstance(loaded, int):
        return loaded
    settings, rules, rules_dir = loaded
    try:
        frames, damage = read_frames(args.capture, args.frames)
    except (PcapError, OSError) as e:
        print(f"tcpguard cost: {e}", file=sys.stderr)
        return 1
    if not frames:
        print(f"tcpguard cost: {args.capture}: no IP frames", file=sys.stderr)
        return 1
    print(
        f"{len(frames):,} IP frames of {args.capture}, {len(rules)} rules from {rules_dir}; best of "
        f"{args.repeat} runs, CPU time of this process per packet (microseconds)"
    )
    print(HEADER)
    # The modules loaded once more for every run: the check above already reported any error in them.
    rows = measure(
        frames,
        lambda: load_rules(rules_dir),
        settings,
        args.repeat,
        on_row=lambda row: print(format_row(row), flush=True),
    )
    print(
        "added: over no rules. dropped, alerts, errors: what the engine did in one run. A rule alone may\n"
        "cost more or less than its part of the whole set (the first rule that acts on a connection stops\n"
        "the later ones there). Live, the same rules cost more per packet (see `tcpguard cost --help`)."
    )
    if rows[0].bad_checksum:
        print(
            f"note: {rows[0].bad_checksum:,} packets had bad checksums and were dropped before any rule saw "
            "them; a capture taken on a sending host often has offloaded (unfilled) checksums: measure it "
            "with --ignore-checksums"
        )
    failing = [row for row in rows if row.errors]
    if failing:
        print("rule errors (one untimed run of each row that had them):")
        for row in failing:
            print(f" {row.label}:")
            for line in row.errors:
                print(line)
    if any(row.timed_out for row in rows):
        budget = settings.limits.rule_time_budget
        print(
            f"timed out: a rule call ran past the rule time budget ({budget:g} s, "
            "engine.limits.rule_time_budget); that row's run stopped there"
        )
    if damage is not None:
        print(f"capture damaged at byte {damage.offset}: {damage.message}; measured the frames before it")
        print(
            damage_warning("cost", damage, f"measured the {len(frames)} IP frames before it"), file=sys.stderr
        )
        return EXIT_DAMAGED
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
        help="IP frames from the start of the capture, held in memory (default %(default)s; at most "
        f"{MAX_BYTES // 2**20} MiB of them)",
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
