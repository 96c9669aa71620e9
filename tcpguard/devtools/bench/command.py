"""`tcpguard bench`: the command line, the order of the run, and the load generator's role
dispatch (`python -m tcpguard.devtools.bench _role NAME PARAMS`, how the namespaces' processes start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tcpguard.devtools.bench.load import ROLE_FUNCS, make_certificate, start_load_server, start_tls_server
from tcpguard.devtools.bench.measurement import (
    MemResult,
    OfflineResult,
    PathResult,
    _latency,
    _phase,
    background_load,
    fabricated_memory,
    held_open_memory,
    machine_description,
    measure_path,
    offline,
)
from tcpguard.devtools.bench.network import (
    DEFAULT_RULES,
    KINDS,
    BenchLab,
    Settings,
    bench_rules,
    paths_for,
)
from tcpguard.devtools.bench.report import Report, _f, summarize_profile, write_doc


# ================================================================================== the command
def settings_from(args: argparse.Namespace) -> Settings:
    short = bool(args.short)
    duration = args.duration if args.duration is not None else (1.5 if short else 10.0)
    return Settings(
        short=short,
        duration=duration,
        warmup=0.5 if short else 1.5,
        rr_conns=32 if short else 64,
        per_conn=10,
        bulk_up=2,
        bulk_down=2,
        lat_count=500 if short else 3000,
        # TLS: two uploading and two downloading processes, so the crypto runs on every core; several
        # megabytes per connection (each a new handshake). More processes than that lowered both the
        # unfiltered figure and the bare loop's on 2 cores (6: 138 MB/s, 4: 220 MB/s unfiltered).
        tls_up=args.tls_procs // 2 if args.tls_procs else 2,
        tls_down=args.tls_procs - args.tls_procs // 2 if args.tls_procs else 2,
        tls_size=(args.tls_mb or (2 if short else 8)) * 1_000_000,
        mem_count=args.mem_count or (10_000 if short else 100_000),
        # --short: enough connections that their memory shows above the allocator's slack (with 300 the
        # RSS delta was once not positive).
        hold_count=args.hold if args.hold is not None else (2_000 if short else 15_000),
        capture_packets=args.packets or (20_000 if short else 200_000),
        rules=Path(args.rules).resolve(),
        workers=os.cpu_count() or 2,
        profile=Path(args.profile).resolve() if args.profile else None,
        kinds=tuple(args.kinds.split(",")) if args.kinds else KINDS,
    )


def run_memory_only(st: Settings) -> int:
    """`--only memory`: the fabricated-connection memory rows alone (no namespaces, no root needed).

    The same subprocesses and rules copy as the full run, so the figures compare with its table; the
    real-connection row needs the network and is left out."""
    work = Path(tempfile.mkdtemp(prefix="tcpguard-bench-"))
    try:
        st.rules = bench_rules(st.rules, work / "rules")
        mem = [fabricated_memory(st, exchanged=False), fabricated_memory(st, exchanged=True)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| measurement | connections | RSS bytes/conn | traced bytes/conn | notes |")
    print("|---|--:|--:|--:|---|")
    for m in mem:
        traced = _f(m.traced_per_conn) if m.traced_per_conn is not None else "-"
        print(f"| {m.label} | {m.count:,} | {_f(m.per_conn)} | {traced} | {m.note} |")
    return 1 if any(m.note.startswith("failed") for m in mem) else 0


def run_bench(args: argparse.Namespace) -> int:
    st = settings_from(args)
    if args.only == "memory":
        return run_memory_only(st)
    unknown = set(st.kinds) - set(KINDS)
    if unknown:
        print(f"tcpguard bench: unknown kinds: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    # A partial run (some paths or kinds) is a quick look: the memory and offline parts are left out.
    partial = bool(args.paths or args.kinds)
    t_start = time.monotonic()
    quiet = bool(args.quiet)

    def log(msg: str) -> None:
        if not quiet:
            print(f"  {msg}", file=sys.stderr, flush=True)

    if os.geteuid() != 0:
        print("tcpguard bench: needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "iptables", "ethtool") if shutil.which(t) is None]
    if missing:
        print(f"tcpguard bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout) must still run every cleanup below.
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="tcpguard-bench-"))
    try:
        st.rules = bench_rules(st.rules, work / "rules")
        background = background_load()
        if background > 0.10:
            log(f"warning: the machine is {background:.0%} busy before the start: figures will be low")
        paths: list[PathResult] = []
        mem: list[MemResult] = []
        with BenchLab() as lab:
            server = start_load_server(lab, work, nofile=st.hold_count + 4096)
            st.tls_cert, tls_key = make_certificate(work)
            start_tls_server(lab, work, st.tls_cert, tls_key)
            # Warm-up, not measured: the first traffic after start-up runs slow (caches, page faults).
            log("warm-up")
            _phase(lab, dataclasses.replace(st, duration=1.0, warmup=0.2), "rr", server.pid)
            _latency(lab, st)
            wanted = set(args.paths.split(",")) if args.paths else None
            for name, label in paths_for(st.workers):
                if wanted is None or name in wanted:
                    paths.append(measure_path(lab, work, st, name, label, server.pid, log))
            if st.hold_count > 0 and not partial:
                mem.append(held_open_memory(lab, work, st, log))
        # Without the network, after it: nothing else runs on the machine while the paths are measured.
        offline_results: list[OfflineResult] = []
        cap_info = "not run (--paths/--kinds)"
        if not partial:
            log(f"fabricating {st.mem_count} connections through the engine")
            mem[:0] = [fabricated_memory(st, exchanged=False), fabricated_memory(st, exchanged=True)]
            offline_results, cap_info = offline(st, work, log)
        machine = machine_description()
        machine["busy before start"] = f"{background:.0%} of all cores (other processes)"
        report = Report(
            paths,
            mem,
            offline_results,
            cap_info,
            machine,
            _command(args),
            per_core=f"tcpguard-{st.workers}",
        )
        report.wall = time.monotonic() - t_start
        print(
            "\n".join(
                [
                    "",
                    "tcpguard bench" + (" --short" if st.short else ""),
                    *report.machine_lines(),
                    "",
                    *report.tables(),
                ]
            )
        )
        if args.doc:
            write_doc(Path(args.doc), report)
            print(f"\nwrote {args.doc}")
        if st.profile is not None:
            for f in sorted(st.profile.glob("*.txt")):
                print("\n" + "\n".join(summarize_profile(f)))
        failed = [p.name for p in paths if p.error or p.failed]
        return 1 if failed else 0
    finally:
        signal.signal(signal.SIGTERM, old)
        shutil.rmtree(work, ignore_errors=True)


def _command(args: argparse.Namespace) -> str:
    parts = ["tcpguard bench"]
    if args.short:
        parts.append("--short")
    if args.duration is not None:
        parts.append(f"--duration {args.duration:g}")
    for opt in ("mem_count", "hold", "packets", "tls_procs", "tls_mb", "paths", "kinds"):
        v = getattr(args, opt)
        if v is not None:
            parts.append(f"--{opt.replace('_', '-')} {v}")
    if args.doc:
        parts.append(f"--doc {args.doc}")
    return " ".join(parts)


def add_subparser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="benchmark tcpguard against the alternatives on a namespace network (root)"
    )
    _add_arguments(p)
    p.set_defaults(func=run_bench)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--short", action="store_true", help="small counts and short phases (CI: checks it works)")
    p.add_argument(
        "--duration",
        type=float,
        help="seconds of measurement per traffic kind and path (default 10, 1.5 with --short)",
    )
    p.add_argument("--rules", default=str(DEFAULT_RULES), help="rules directory (default: the sample rules)")
    p.add_argument(
        "--mem-count",
        type=int,
        help="connections fabricated for the memory figure (default 100000, 10000 with --short)",
    )
    p.add_argument(
        "--hold",
        type=int,
        help="real connections held open through the daemon (default 15000, 2000 with --short; "
        "capped by the open-file limit; 0 skips)",
    )
    p.add_argument(
        "--tls-procs",
        type=int,
        help="TLS kind: client processes, half uploading, half downloading (default 4)",
    )
    p.add_argument(
        "--tls-mb", type=int, help="TLS kind: megabytes per connection (default 8, 2 with --short)"
    )
    p.add_argument(
        "--paths",
        help="comma-separated paths to run (default all; e.g. none,nfq-bare for a quick look)",
    )
    p.add_argument(
        "--kinds",
        help="comma-separated traffic kinds to run (default all: rr,bulk,tls,bulk-gso)",
    )
    p.add_argument(
        "--packets", type=int, help="frames in the generated capture (default 200000, 20000 with --short)"
    )
    p.add_argument("--doc", help="write the results into this Markdown file (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--profile", metavar="DIR", help="record py-spy profiles of tcpguard-1 into DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--only",
        choices=["memory"],
        help="run one part alone: 'memory' prints the fabricated-connection memory rows (no root needed)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_role"]:
        ROLE_FUNCS[argv[1]](json.loads(argv[2]))
        return 0
    import tcpguard.devtools.bench as package

    description = package.__doc__.splitlines()[0] if package.__doc__ else ""
    p = argparse.ArgumentParser(prog="tcpguard bench", description=description)
    _add_arguments(p)
    return run_bench(p.parse_args(argv))
