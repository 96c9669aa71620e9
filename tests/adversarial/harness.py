"""The real daemon in the lab with a rule that records what it saw and resets on a pattern.

`Guard` extends the daemon tests' `Gateway` (tests/app/daemon/test_daemon.py): same start/stop, same real
server application (tests/app/tcpapps.py SERVER records exactly the bytes the application read), with
its own rule module and a config built from overrides. The rule module:

* `record` (plain receive_data, 'up' direction): appends every batch of new bytes, with its stream
  offset, to `record/<client port>.jsonl`, and resets the connection once the bytes seen so far contain
  PATTERN. That file is "the bytes the rule saw".
* `ended` (end_connection): appends the reason to `record/<client port>.end`.
* Optional extra rules (`extra_rules`): source appended to the module, for the fault cases.

`check_invariant` is the inline promise, checked for one connection: the server application never got
the pattern, and it got exactly the bytes the rule saw (up to the batch that triggered the reset, when
the rule reset the connection: that batch's packet is dropped).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.app.daemon.test_daemon import Gateway, wait_for
from tests.netns import Lab

PATTERN = b"/bin/sh"

RULES = """
import json, os
from tcpguard import rule, tcp_connection

RECORD = {record!r}
PATTERN = {pattern!r}


@rule(on=tcp_connection.events.receive_data)
def record(flow, stream, current, direction):
    if direction != "up":
        return
    off = current.pos
    data = current.read()
    seen = flow.store.get("tail", b"") + data
    flow.store["tail"] = seen[-len(PATTERN):]
    hit = PATTERN in seen
    with open(os.path.join(RECORD, f"{{flow.srcport}}.jsonl"), "a") as f:
        f.write(json.dumps({{"id": flow.id, "off": off, "data": data.hex(), "hit": hit}}) + "\\n")
    if hit:
        flow.reset()


@rule(on=tcp_connection.events.end_connection)
def ended(flow):
    with open(os.path.join(RECORD, f"{{flow.srcport}}.end"), "a") as f:
        f.write(flow.end_reason + "\\n")
"""

BASE_CONFIG: dict[str, Any] = {
    "rules_dir": "rules",
    "queue": {"num": 0, "workers": 1, "bypass": True},
    "iptables": {"manage": True, "hooks": ["FORWARD"]},
    "alerts": {"file": "alerts.jsonl"},
    "logging": {"level": "info", "target": "stderr"},
    "control": {"socket": "control.sock"},
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = v
    return out


class Guard(Gateway):
    """The daemon in the lab's gw namespace with the recording rule; servers on ports of our choosing."""

    def __init__(
        self,
        lab: Lab,
        tmp: Path,
        config: dict[str, Any] | None = None,
        extra_rules: str = "",
        pattern: bytes = PATTERN,
    ) -> None:
        self.record_dir = tmp / "record"
        self.record_dir.mkdir(parents=True, exist_ok=True)
        self.pattern = pattern
        self.extra_rules = extra_rules
        self.next_port = 8100
        self.server_procs: dict[int, subprocess.Popen[Any]] = {}
        super().__init__(lab, tmp)
        self.set_config(config or {})

    # ------------------------------------------------------------------ set-up
    def write_rules(self, pattern: str) -> None:  # called by Gateway.__init__; our pattern is bytes
        src = RULES.format(record=str(self.record_dir), pattern=self.pattern) + self.extra_rules
        (self.rules_dir / "test_rules.py").write_text(src)

    def set_config(self, over: dict[str, Any]) -> None:
        self.config_dict = merged(BASE_CONFIG, over)
        self.config.write_text(yaml.safe_dump(self.config_dict, sort_keys=False))

    def new_server(self) -> int:
        """A fresh server application on its own port: its first connection is the case's connection."""
        port = self.next_port
        self.next_port += 1
        self.start_server(port, reply=0)
        self.server_procs[port] = self.lab.procs[-1]
        return port

    def release_server(self, port: int) -> None:
        """Stop a case's server application once its result is read (a module runs a hundred cases)."""
        proc = self.server_procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    # ------------------------------------------------------------------ what happened
    def records(self, cport: int) -> list[dict[str, Any]]:
        path = self.record_dir / f"{cport}.jsonl"
        if not path.exists():
            return []
        text = path.read_text()
        if not text.endswith("\n"):  # the rule is still writing its last line
            text = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in text.splitlines()]

    def end_reasons(self, cport: int) -> list[str]:
        path = self.record_dir / f"{cport}.end"
        return path.read_text().split() if path.exists() else []

    def rule_saw(self, cport: int) -> tuple[bytes, int | None]:
        """(every byte the rule saw on the client's stream, the offset where the blocking batch started)."""
        out = bytearray()
        block_at: int | None = None
        flow, base = None, 0
        for rec in self.records(cport):
            if rec["id"] != flow:  # a new flow on the same ports (picked up again mid-stream): its offsets
                flow, base = rec["id"], len(out) - rec["off"]  # count from where the gateway picked it up
            assert base + rec["off"] == len(out), (
                f"rule saw a gap or an overlap: {rec} after {len(out)} bytes"
            )
            if rec["hit"] and block_at is None:
                block_at = len(out)
            out += bytes.fromhex(rec["data"])
        return bytes(out), block_at

    def server_got(self, port: int, timeout: float = 5.0) -> tuple[bytes, str | None]:
        """What the server application on `port` read on its first connection, and how the read ended."""
        # A status file that exists but is still empty is being written: not done yet.
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: bool(self.server_conns(port)) and bool(self.server_conns(port)[0][1]),
                f"server on {port} done",
                timeout=timeout,
            )
        conns = self.server_conns(port)
        if not conns:
            return b"", None
        return conns[0]

    def log_text(self) -> str:
        return self.daemon_log.read_text(errors="replace") if self.daemon_log.exists() else ""

    def stop_stats(self, timeout: float = 20) -> dict[str, Any]:
        """SIGTERM the daemon and return the counters of its 'stopped: {...}' line."""
        assert self.daemon is not None
        if self.daemon.poll() is None:
            self.stop_daemon(signal.SIGTERM, timeout)
        return stopped_stats(self.log_text())

    def status(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The daemon's status document over its control socket (None if it does not answer)."""
        from tcpguard.app.control.client import ControlClient
        from tcpguard.app.control.protocol import ControlError

        try:
            resp = ControlClient(self.tmp / "control.sock", timeout).call({"cmd": "status"})
        except ControlError:
            return None
        result = resp.get("result") if resp.get("ok") else None
        return result if isinstance(result, dict) else None

    def worker_status(self, timeout: float = 10.0) -> dict[str, Any]:
        st = self.status(timeout)
        assert st is not None, "the daemon does not answer on its control socket"
        worker: dict[str, Any] = st["workers"][0]
        return worker

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the daemon in KiB."""
        assert self.daemon is not None
        return proc_rss(self.daemon.pid)


def stopped_stats(log: str) -> dict[str, Any]:
    found = re.findall(r"stopped: (\{.*\})", log)
    assert found, "no 'stopped:' line in the daemon log"
    value = ast.literal_eval(found[-1])
    assert isinstance(value, dict)
    return value


def proc_rss(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss, hwm


@dataclass
class Outcome:
    """One case's result, for the assertion messages and the report."""

    server: bytes
    status: str | None
    rule: bytes
    block_at: int | None
    client_reset: bool
    end_reasons: list[str]

    @property
    def blocked(self) -> bool:
        return self.block_at is not None

    def __repr__(self) -> str:
        return (
            f"Outcome(server={_short(self.server)} status={self.status} rule={_short(self.rule)} "
            f"block_at={self.block_at} client_reset={self.client_reset} ends={self.end_reasons})"
        )


def _short(data: bytes, keep: int = 60) -> str:
    if len(data) <= 2 * keep:
        return repr(data)
    return f"{data[:keep]!r}...({len(data)} bytes)...{data[-keep:]!r}"


def outcome(guard: Guard, port: int, cport: int, client_reset: bool) -> Outcome:
    server, status = guard.server_got(port)
    rule, block_at = guard.rule_saw(cport)
    return Outcome(server, status, rule, block_at, client_reset, guard.end_reasons(cport))


def check_invariant(o: Outcome, pattern: bytes = PATTERN) -> None:
    """The server application never got the pattern, and got exactly what the rule saw."""
    assert pattern not in o.server, f"the server application received the pattern: {o}"
    if o.blocked:
        assert o.block_at is not None
        assert o.server == o.rule[: o.block_at], f"server bytes differ from what the rule saw: {o}"
        # A connection reset before the server application accepted it leaves the accept queue unseen:
        # the application then reports nothing at all (status None, no bytes), which is just as reset.
        assert o.status == "reset" or (o.status is None and o.server == b""), f"the server was not reset: {o}"
        assert o.client_reset, f"the client saw no RST: {o}"
    else:
        assert o.server == o.rule, f"server bytes differ from what the rule saw: {o}"


def iptables_lines(lab: Lab, role: str = "gw") -> list[str]:
    """iptables-save and ip6tables-save rules (no comments, counters or chain policies), sorted."""
    lines: list[str] = []
    for tool in ("iptables-save", "ip6tables-save"):
        out = lab.run(role, [tool]).stdout
        lines += [f"{tool}: {ln}" for ln in out.splitlines() if ln and not ln.startswith(("#", ":"))]
    return sorted(lines)


def queue_counters(lab: Lab) -> list[dict[str, int]]:
    """The kernel's per-queue counters in the gw namespace (/proc/net/netfilter/nfnetlink_queue)."""
    r = lab.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False)
    out = []
    names = (
        "queue",
        "portid",
        "waiting",
        "copy_mode",
        "copy_range",
        "queue_dropped",
        "user_dropped",
        "id_sequence",
    )
    for line in r.stdout.splitlines():
        vals = [int(v) for v in line.split()[: len(names)]]
        out.append(dict(zip(names, vals, strict=True)))
    return out


def run_quiet(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kw)


def settle(seconds: float = 0.3) -> None:
    time.sleep(seconds)
