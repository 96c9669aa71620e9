"""The `tcpguard` command line: check, replay (and the daemon and tools added by later modules)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tcpguard.app.daemon.defaults import DEFAULT_CONFIG
from tcpguard.core.errors import RuleLoadError


def cmd_check(args: argparse.Namespace) -> int:
    from tcpguard.app.daemon.config import ConfigError, config_warnings, load_config
    from tcpguard.app.daemon.ruleload import DEFAULT_LOAD_BUDGET, load_rules_bounded, rule_files

    rules_dir: Path | None = Path(args.rules) if args.rules else None
    budget = DEFAULT_LOAD_BUDGET
    if args.config:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"tcpguard check: {e}", file=sys.stderr)
            return 1
        print(f"config {args.config}: ok")
        for warning in config_warnings(cfg):
            print(f"{args.config}: warning: {warning}", file=sys.stderr)
        rules_dir = rules_dir or cfg.rules_dir
        budget = cfg.rules_load_budget
    if rules_dir is None:
        print("tcpguard check: give --config or --rules", file=sys.stderr)
        return 2
    try:
        rs = load_rules_bounded(rules_dir, budget)
    except RuleLoadError as e:
        print(f"tcpguard check: {e}", file=sys.stderr)
        return 1
    print(f"rules {rules_dir}: {len(rs)} rules ok")
    if not rule_files(rules_dir):
        print(
            f"{rules_dir}: warning: no rule files (*.py or *.lua not starting with _): every connection "
            "would be accepted uninspected",
            file=sys.stderr,
        )
    for r in rs.rules:
        print(f"  {r.name:40s} {r.event}{' (streamed)' if r.streamed else ''}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Exit status: 0 clean; 1 failed (nothing written); 2 usage; EXIT_DAMAGED (3) when the capture was
    damaged and every whole record before the damage was replayed (outputs and summary written)."""
    from tcpguard.app.offline.inputs import load_settings_and_rules
    from tcpguard.app.offline.replay import EXIT_DAMAGED, Replacing, damage_warning, replay
    from tcpguard.io.pcap import PcapError

    loaded = load_settings_and_rules("replay", args.config, args.rules, args.ignore_checksums)
    if isinstance(loaded, int):
        return loaded
    settings, rules, _ = loaded
    events_file = Replacing(args.events) if args.events else None
    try:
        events = open(events_file.part, "w", encoding="utf-8") if events_file else None  # noqa: SIM115
        try:
            summary = replay(args.capture, rules, settings, out=args.out, events=events, progress=None)
        finally:
            if events is not None:
                events.close()
        if events_file is not None:
            events_file.commit()
    except BaseException as e:
        if events_file is not None:
            events_file.discard()  # a failed run leaves no events file that looks like a result
        if not isinstance(e, PcapError | OSError):
            raise
        print(f"tcpguard replay: {e}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    if summary.damage is not None:
        done = f"replayed the {summary.frames} whole records before it"
        print(damage_warning("replay", summary.damage, done), file=sys.stderr)
        return EXIT_DAMAGED
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tcpguard.app.daemon.run import main_run

    return main_run(args.config, args.verbose)


def cmd_iptables(args: argparse.Namespace) -> int:
    from tcpguard.app.daemon.config import ConfigError, load_config
    from tcpguard.app.daemon.run import iptables_spec
    from tcpguard.io.iptables import IptablesError, IptablesManager

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"tcpguard iptables: {e}", file=sys.stderr)
        return 1
    mgr = IptablesManager(iptables_spec(cfg))
    try:
        if args.action == "install":
            for line in mgr.install():
                print(line)
        elif args.action == "remove":
            removed = mgr.remove()
            if not removed:
                print(f"nothing to remove: no chain {mgr.spec.chain} in {' or '.join(mgr.spec.binaries)}")
            for what in removed:
                print(f"removed {what}")
            return 0
        print(mgr.show(), end="")
    except IptablesError as e:
        print(f"tcpguard iptables: {e}", file=sys.stderr)
        return 1
    return 0


# Modules that add their own subcommands through `add_subparser(sub)`, and the subcommands each adds
# (tests/app/test_cli.py holds this list to what the modules register). A command line naming one of them
# imports only its module: importing all four (the benchmark and the lab pull in much of the standard
# library) took 0.1 s of every `tcpguard trace` or `tcpguard status`.
PLUGGED_COMMANDS: dict[str, tuple[str, ...]] = {
    "tcpguard.app.offline.trace": ("trace",),
    "tcpguard.devtools.lab": ("lab",),
    "tcpguard.app.control.client": ("version", "status", "connections", "drop", "reset", "reload"),
    "tcpguard.devtools.bench.command": ("bench",),
    "tcpguard.app.offline.cost": ("cost",),
}


CORE_COMMANDS = ("check", "replay", "run", "iptables")  # defined here, in build_parser


def _command(argv: list[str]) -> str | None:
    """The subcommand a command line names (the first argument that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _version() -> str:
    """`tcpguard 0.1.0 (compiled core)`: which core runs matters as much as the version (the pure-Python
    one works at about half the speed), and the only other place that says it is a warning at import."""
    import tcpguard
    import tcpguard.core

    return f"tcpguard {tcpguard.__version__} ({tcpguard.core.MODE} core)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `command`, only what that command needs: no plugged module for one of
    CORE_COMMANDS, its own module for a plugged one, and every module for anything else (a misspelling:
    the error then lists every command)."""
    p = argparse.ArgumentParser(prog="tcpguard", description="Inline TCP filtering with Haka-style rules.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    p.add_argument(
        "--version",
        action="version",
        version=_version(),
        help="print the installed version and core, and exit (`tcpguard version`: the running daemon's)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate the config and the rule modules")
    c.add_argument("--config", help="config file (YAML)")
    c.add_argument("--rules", help="rules directory (default: the config's rules_dir)")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("replay", help="run the rules over a pcap/pcapng capture")
    r.add_argument("capture", help="pcap or pcapng file")
    r.add_argument("--rules", help="rules directory (default: the config's rules_dir)")
    r.add_argument("--config", help="config file for the engine settings")
    r.add_argument("--out", help="write the packets that would be forwarded, and forged RSTs, to this pcap")
    r.add_argument("--events", help="write rule events and verdicts as JSON lines to this file")
    r.add_argument(
        "--ignore-checksums",
        action="store_true",
        help="do not drop packets with bad checksums (captures with checksum offload)",
    )
    r.set_defaults(func=cmd_replay)

    d = sub.add_parser("run", help="run the inline daemon on the configured NFQUEUE(s) (root)")
    d.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    d.set_defaults(func=cmd_run)

    i = sub.add_parser("iptables", help="install, remove or show tcpguard's iptables chain (root)")
    i.add_argument("action", choices=["install", "remove", "show"])
    i.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    i.set_defaults(func=cmd_iptables)

    # Commands that live in their own modules register themselves (each module has add_subparser).
    import importlib

    if command in CORE_COMMANDS:
        modules = []
    else:
        modules = [m for m, cmds in PLUGGED_COMMANDS.items() if command in cmds] or list(PLUGGED_COMMANDS)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_subparser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
