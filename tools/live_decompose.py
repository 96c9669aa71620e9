"""Where tcpguard's live per-packet cost goes: the bench's traffic through filters built up layer by layer.

    sudo .venv/bin/python tools/live_decompose.py [--duration 6] [--rounds 2] [--kinds rr,bulk]

On the benchmark's namespace network (tcpguard.devtools.bench: same topology, load generator, rules copy and
CPU accounting), the gateway runs in turn:

  nfq-bare    the bench's bare NetfilterQueue loop (one verdict per packet)
  adapter     tcpguard's NfqueueAdapter (batched verdicts) with a handler that accepts every packet
  engine      the adapter with Engine.handle_packet, no rules
  worker      the adapter with the daemon's Worker around the engine, no rules
  hollow-1    `tcpguard run`, one worker, with a copy of the rules whose listeners' bodies are `pass`
              (network.hollow_rules): the engine and the dispatch to those listeners, none of their work
  tcpguard-1  `tcpguard run` with the sample rules, one worker (the bench's path)

Rounds are interleaved (every variant once, then again) because this virtual machine's speed drifts by
10-20% within an hour; the table gives each figure's range over the rounds. Everything it creates
(namespaces, iptables rules, processes) goes away at the end, also on failure: the bench's own lab and
process handling does it. docs/BENCHMARKS.md (rounds 4 to 6) has tables made with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcpguard.devtools.bench import command, load, measurement, network  # noqa: E402

STANDINS = ("adapter", "engine", "worker")
HOLLOW = "hollow-1"
VARIANTS = ("nfq-bare", *STANDINS, HOLLOW, "tcpguard-1")


def standin(mode: str, ready: str) -> int:
    """Bind the bench's queue with the adapter and the handler `mode` names; run until SIGTERM."""
    from tcpguard.core.decision import Decision, Output, Verdict
    from tcpguard.core.engine import Engine
    from tcpguard.core.rules import RuleSet
    from tcpguard.io.nfqueue import NfqueueAdapter

    handler: Any
    if mode == "adapter":
        accept = Decision(Verdict.ACCEPT)

        class AcceptAll:
            def handle_packet(self, raw: bytes, now: float, token: object) -> Decision:
                return accept

            def handle_timer(self, now: float) -> Output:
                return Output()

            def shutdown(self, now: float) -> Output:
                return Output()

        handler = AcceptAll()
    elif mode == "engine":
        handler = Engine(None, RuleSet([]))
    else:
        from tcpguard.app.daemon.config import Config
        from tcpguard.app.daemon.worker import Worker

        cfg = Config()
        cfg.engine.limits.rule_time_budget = 0  # no watchdog thread: nothing to watch without rules
        handler = Worker(cfg, Path("/nonexistent.yaml"), RuleSet([]), network.QUEUE)
    adapter = NfqueueAdapter(handler, queue_num=network.QUEUE, max_len=4096)
    signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
    adapter.open()
    Path(ready).write_text("ok")
    adapter.run()
    return 0


class StandInPath(network.GatewayPath):
    """A gateway path whose filter is this tool run with --standin MODE."""

    def start(self) -> None:
        ready = self.work / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        self._spawn([sys.executable, __file__, "--standin", self.name, str(ready)], ready.exists)
        self.queue_forwarded_tcp()


def measure(args: argparse.Namespace) -> int:
    bench_args = argparse.Namespace(
        short=False,
        duration=args.duration,
        mem_count=None,
        hold=0,
        packets=None,
        rules=args.rules,
        profile=None,
    )
    st = command.settings_from(bench_args)
    kinds = args.kinds.split(",")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [k for k in kinds if k not in ("rr", "bulk")]
    if unknown:
        print(f"unknown variant or traffic kind: {', '.join(unknown)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tcpguard-decompose-"))
    try:
        results = _rounds(args, st, work, variants, kinds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _table(results, variants, kinds)
    return 0


def _rounds(
    args: argparse.Namespace, st: network.Settings, work: Path, variants: list[str], kinds: list[str]
) -> dict[tuple[str, str], list[measurement.PhaseResult]]:
    # The hollow copy is made from the rules as given, not from the bench copy: the bench copy only raises
    # the rate limiter's limits, and an emptied rate limiter refuses nothing anyway.
    hollow = dataclasses.replace(st, rules=network.hollow_rules(st.rules, work / "hollow"))
    st.rules = network.bench_rules(st.rules, work / "rules")
    results: dict[tuple[str, str], list[measurement.PhaseResult]] = {}
    with network.BenchLab() as lab:
        server = load.start_load_server(lab, work, nofile=8192)
        for rnd in range(args.rounds):
            for v in variants:
                gp: network.GatewayPath
                if v in STANDINS:
                    gp = StandInPath(v, lab, work, st)
                elif v == HOLLOW:
                    gp = network.GatewayPath("tcpguard-1-hollow", lab, work, hollow)  # `tcpguard run`
                else:
                    gp = network.GatewayPath(v, lab, work, st)
                try:
                    gp.start()
                    for kind in kinds:
                        ph = measurement._phase(lab, st, kind, server.pid)
                        results.setdefault((v, kind), []).append(ph)
                        print(
                            f"round {rnd + 1} {v:10s} {kind:4s} {ph.cpu_us_per_packet:6.2f} us/packet "
                            f"{ph.pps:9,.0f} packets/s  machine {ph.busy_share:.0%}  "
                            f"SYN retransmissions {ph.syn_retrans}",
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    gp.stop()
        network.stop_process(server)
    return results


def _table(
    results: dict[tuple[str, str], list[measurement.PhaseResult]], variants: list[str], kinds: list[str]
) -> None:
    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"

    head = "| what runs in the gw namespace |"
    rule = "|---|"
    for kind in kinds:
        head += f" {kind} µs/packet | {kind} packets/s | {kind} machine busy |"
        rule += "--:|--:|--:|"
    print(head)
    print(rule)
    for v in variants:
        row = f"| {v} |"
        for kind in kinds:
            phs = results.get((v, kind), [])
            if not phs:
                row += " - | - | - |"
                continue
            us = [p.cpu_us_per_packet for p in phs]
            pps = [p.pps / 1000 for p in phs]
            busy = [p.busy_share * 100 for p in phs]
            row += f" {span(us, '.2f')} | {span(pps, '.0f')}k | {span(busy, '.0f')}% |"
        print(row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--standin", nargs=2, metavar=("MODE", "READY"), help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per traffic kind and variant")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--kinds", default="rr,bulk", help="traffic kinds (default rr,bulk)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, default all")
    ap.add_argument(
        "--rules",
        default=str(ROOT / "rules"),
        help="rules of the tcpguard-1 path (and, emptied, of hollow-1)",
    )
    args = ap.parse_args(argv)
    if args.standin:
        return standin(*args.standin)
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
