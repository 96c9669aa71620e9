"""The operator's side of the control socket: `tcpguard version`, `status`, `connections`,
`drop`, `reset` and `reload`, the client that asks the daemon, and the tables it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tcpguard.app.control.protocol import ControlError, Request, Response, encode

# ================================================================================== the client side


class ControlClient:
    """Talks to a running daemon's control socket; errors are ControlError with an operator message."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, request: Request) -> Response:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except FileNotFoundError:
                raise ControlError(
                    f"no control socket at {self.path}: is tcpguard running, with this control.socket?"
                ) from None
            except PermissionError:
                raise ControlError(
                    f"permission denied on {self.path}: root or the configured control.group only"
                ) from None
            except ConnectionRefusedError:
                raise ControlError(f"nobody answers on {self.path}: tcpguard is not running") from None
            # Refused at once (permission, too many clients): the send may fail, the reason is still there.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(request))
            buf = bytearray()
            while b"\n" not in buf:
                data = sock.recv(1 << 20)
                if not data:
                    raise ControlError("the daemon closed the connection without an answer")
                buf += data
        except TimeoutError:
            raise ControlError(f"no answer from {self.path} within {self.timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: {exc}") from None
        finally:
            sock.close()
        try:
            resp = json.loads(buf[: buf.find(b"\n")])
        except ValueError:
            raise ControlError("the daemon sent an answer that is not JSON") from None
        if not isinstance(resp, dict):
            raise ControlError("the daemon sent an answer that is not a JSON object")
        return resp


def _socket_path(args: argparse.Namespace) -> Path:
    """--socket, else the config's control.socket (--config, or the default config if it exists)."""
    from tcpguard.app.daemon.config import ConfigError, ControlConfig, load_config

    if args.socket:
        return Path(args.socket)
    config = args.config
    if config is None:
        from tcpguard.app.daemon.defaults import DEFAULT_CONFIG

        config = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None
    if config is None:
        return ControlConfig().socket
    try:
        return load_config(config).control.socket
    except ConfigError as exc:
        raise ControlError(str(exc)) from None


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:d}:{m:02d}:{s:02d}"


_STATUS_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("packets received", ("packets", "received"), "n"),
    ("  accepted", ("packets", "accepted"), "n"),
    ("  dropped", ("packets", "dropped"), "n"),
    ("  held now", ("packets", "held"), "n"),
    ("  looped back (mark)", ("adapter", "looped"), "n"),
    ("  GSO aggregates", ("adapter", "gso_packets"), "n"),
    ("  largest", ("adapter", "largest"), "bytes"),
    ("bytes received", ("bytes", "received"), "n"),
    ("  accepted", ("bytes", "accepted"), "n"),
    ("  dropped", ("bytes", "dropped"), "n"),
    ("resets sent", ("resets_sent",), "n"),
    ("  as a dropped packet", ("adapter", "sent_in_place"), "n"),
    ("  waiting for a retry", ("adapter", "send_pending"), "n"),
    ("  lost (not sent)", ("adapter", "send_errors"), "n"),
    ("rule errors", ("rule_errors",), "n"),
    ("alerts", ("alerts",), "n"),
    ("connections tracked", ("connections", "tracked"), "n"),
    ("connections opened", ("connections", "opened"), "n"),
    ("  met mid-stream", ("connections", "midstream"), "n"),
    ("connections bypassed", ("bypass", "connections"), "n"),
    ("  remembered now", ("bypass", "remembered"), "n"),
    ("  packets via the kernel", ("bypass", "kernel_packets"), "n"),
    ("  bytes via the kernel", ("bypass", "kernel_bytes"), "bytes"),
    ("  packets via tcpguard", ("bypass", "late_packets"), "n"),
    ("  bypass bit looped", ("adapter", "bypass_looped"), "n"),
    ("queue full drops", ("queue_drops", "kernel_dropped"), "n"),
    ("queue user drops", ("queue_drops", "kernel_user_dropped"), "n"),
    ("queue bypassed", ("queue_drops", "bypassed"), "n"),
    ("netlink ENOBUFS", ("queue_drops", "enobufs"), "n"),
    ("GSO packets whole", ("adapter", "gso"), "onoff"),
    ("memory RSS", ("memory", "rss"), "bytes"),
    ("stream buffers", ("memory", "buffered"), "bytes"),
    ("uptime", ("uptime",), "time"),
)


def _get(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return _human_bytes(value)
    if kind == "time":
        return _duration(value)
    if kind == "onoff":  # the total is how many queues have it on
        return "on" if value else "off"
    return str(value)


def format_status(st: dict[str, Any]) -> str:
    """A table: one column for the total, one per worker; connections by state after the counts."""
    workers = st.get("workers", [])
    live = [w for w in workers if "error" not in w]
    lines = [
        f"tcpguard {st.get('version')} ({st.get('core')} core): up {_duration(st.get('uptime', 0))}, "
        f"{st.get('mode')} mode, pid {st.get('pid')}, main RSS {_human_bytes(st.get('rss'))}"
    ]
    lines += [f"queue {w.get('queue')}: {w['error']}" for w in workers if "error" in w]
    cols: list[dict[str, Any]] = [st.get("totals", {}), *live]
    table = [["", "total", *(f"queue {w['queue']}" for w in live)]]
    rows = list(_STATUS_ROWS)
    states = sorted({s for c in cols for s in (_get(c, ("connections", "by_state")) or {})})
    at = next(i for i, r in enumerate(rows) if r[0] == "connections opened") + 1
    rows[at:at] = [(f"  {s}", ("connections", "by_state", s), "n") for s in states]
    # Why packets were dropped, under the count of them (the engine's reasons and the daemon's "held,
    # then dropped"; none when nothing was).
    reasons = sorted({r for c in cols for r in (_get(c, ("drops",)) or {})})
    at = next(i for i, r in enumerate(rows) if r[1] == ("packets", "dropped")) + 1
    rows[at:at] = [(f"    {r}", ("drops", r), "n") for r in reasons]
    for label, path, kind in rows:
        cells = [_cell(_get(c, path), kind) for c in cols]
        if kind == "time":
            cells[0] = ""  # a sum of uptimes means nothing
        if path[0] == "drops" or path[:2] == ("connections", "by_state"):
            cells = [c if c != "-" else "0" for c in cells]
        table.append([label, *cells])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        lines.append(
            "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()
        )
    note = _get(st.get("totals", {}), ("queue_drops", "bypassed_note"))
    if note:
        lines.append(f"queue bypassed: {note}")
    note = _get(st.get("totals", {}), ("bypass", "kernel_note"))
    if note and _get(st.get("totals", {}), ("bypass", "connections")):
        lines.append(f"bypass via the kernel: {note}")
    return "\n".join(lines)


def format_connections(result: dict[str, Any]) -> str:
    def ep(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    table = [["ID", "CLIENT", "SERVER", "STATE", "PKTS UP/DOWN", "BYTES UP/DOWN", "AGE", "IDLE"]]
    for r in result["connections"]:
        if r["state"] == "BYPASSED":
            # Out of tcpguard's sight: when it was handed over, and what still came through the daemon.
            late = r.get("late") or {}
            table.append(
                [
                    r["id"],
                    ep(r["client"], r["cport"]),
                    ep(r["server"], r["sport"]),
                    "BYPASSED at " + time.strftime("%H:%M:%S", time.localtime(r["since"])),
                    f"{late.get('packets', 0)} late",
                    f"{late.get('bytes', 0)} late",
                    f"{r['age']:.1f}s",
                    "-",
                ]
            )
            continue
        state = r["state"] + (f" ({r['ended']})" if r.get("ended") else "")
        table.append(
            [
                r["id"],
                ep(r["client"], r["cport"]),
                ep(r["server"], r["sport"]),
                state,
                f"{r['packets'][0]}/{r['packets'][1]}",
                f"{r['bytes'][0]}/{r['bytes'][1]}",
                f"{r['age']:.1f}s",
                f"{r['idle']:.1f}s",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in table]
    if result.get("truncated"):
        lines.append("(more connections: raise --limit)")
    for e in result.get("errors", []):
        lines.append(f"queue {e['queue']}: {e['error']}")
    return "\n".join(lines)


def _parse_filters(items: list[str] | None) -> dict[str, str]:
    spec: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ControlError(
                f"--filter {item!r}: expected KEY=VALUE, e.g. state=ESTABLISHED or port=80,443"
            )
        if key in spec:
            raise ControlError(f"--filter {key} given twice: separate alternatives with commas instead")
        spec[key] = value.strip()
    return spec


def cmd_control(args: argparse.Namespace) -> int:
    name = args.command
    try:
        path = _socket_path(args)
        if name == "connections":
            req: Request = {"cmd": "connections", "filter": _parse_filters(args.filter)}
            if args.limit is not None:
                req["limit"] = args.limit
        elif name in ("drop", "reset"):
            req = {"cmd": name, "id": args.id}
        elif name == "version":
            req = {"cmd": "version"}
        else:
            req = {"cmd": name}
        resp = ControlClient(path, timeout=args.timeout).call(req)
    except ControlError as exc:
        print(f"tcpguard {name}: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(resp.get("result") if resp.get("ok") else resp, indent=2, default=str))
        return 0 if resp.get("ok") else 1
    if not resp.get("ok"):
        print(f"tcpguard {name}: {resp.get('error')}", file=sys.stderr)
        return 1
    result: Any = resp.get("result")
    if name == "status":
        print(format_status(result))
    elif name == "version":
        print(f"tcpguard {result['version']} ({result['core']} core), daemon pid {result['pid']}")
    elif name == "connections":
        print(format_connections(result))
    elif name in ("drop", "reset"):
        print(
            f"{result['id']}: {name} ({result['forged']} RST packets sent)"
            if name == "reset"
            else f"{result['id']}: dropped"
        )
    elif name == "reload":
        for r in result:
            print(f"queue {r['queue']}: reloaded, {r['result']['rules']} rules")
    return 0


def add_subparser(sub: Any) -> None:
    """Register version, status, connections, drop, reset and reload with the `tcpguard` command line."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--socket", help="control socket path (default: control.socket of the config)")
    where.add_argument(
        "--config",
        help="config file to read control.socket from (default /etc/tcpguard/tcpguard.yaml when it exists)",
    )
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")

    v = sub.add_parser(
        "version",
        parents=[common],
        help="the running daemon's version and core (`tcpguard --version`: the installed one)",
    )
    v.add_argument("--json", action="store_true", help="print the answer as JSON")
    v.set_defaults(func=cmd_control)

    s = sub.add_parser("status", parents=[common], help="counters of the running daemon, per worker")
    s.add_argument("--json", action="store_true", help="print the status document as JSON")
    s.set_defaults(func=cmd_control)

    c = sub.add_parser("connections", parents=[common], help="list the tracked connections")
    c.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="only connections matching: state, ip, client, server (address or CIDR), port, "
        "cport, sport, queue; comma-separated alternatives; repeat for more keys",
    )
    c.add_argument("--limit", type=int, help="at most this many connections")
    c.add_argument("--json", action="store_true", help="print the connections as JSON")
    c.set_defaults(func=cmd_control)

    for name, text in (
        ("drop", "drop a live connection silently from now on"),
        ("reset", "reset a live connection: RST to both ends, then drop"),
    ):
        a = sub.add_parser(name, parents=[common], help=text)
        a.add_argument("id", help="connection id QUEUE:FLOW as listed by `tcpguard connections`")
        a.add_argument("--json", action="store_true", help="print the answer as JSON")
        a.set_defaults(func=cmd_control)

    r = sub.add_parser(
        "reload",
        parents=[common],
        help="reload the config and rules (like SIGHUP), and report whether it worked",
    )
    r.add_argument("--json", action="store_true", help="print the answer as JSON")
    r.set_defaults(func=cmd_control)
