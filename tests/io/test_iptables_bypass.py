"""Connection bypass in the kernel (issue 20): tcpguard's chain rules, and the kernel really stopping.

Pure tests check the rules `IptablesSpec` writes. Root tests install them in a lab's gateway namespace
with a real NFQUEUE behind them: a driver process (`python -m tests.io.test_iptables_bypass`, see
`main()`) runs the real `NfqueueAdapter` with a stand-in handler that answers the first data packet of
every connection with a bypass decision, and real TCP transfers run between the client and server
namespaces. What must hold: every byte arrives, the daemon sees a handful of the connection's packets
instead of all of them, the kernel's own queue counter agrees (it hands out far fewer queue ids than the
transfer has packets), and the connmark rule's counters account for the rest.

Every process is started through the `lab` fixture (killed by pid, namespaces deleted, also on failure);
the iptables rules live in the lab's namespace and go with it.
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpguard.core.decision import Decision, Verdict
from tcpguard.io.iptables import IptablesError, IptablesManager, IptablesSpec
from tcpguard.io.nfqueue import NfqueueAdapter
from tcpguard.io.rawsend import RawSender
from tests.io.test_nfqueue import CLIENT_SEND, MTU, REPO, AcceptAll, Setup, _check_common, _wait_line
from tests.netns import SERVER_V4, Lab

BIT = 0x40000000
BITS = f"{BIT:#x}/{BIT:#x}"

# ---------------------------------------------------------------------------------------------- pure


def test_the_bypass_rules_come_after_the_forged_packets_return_and_before_the_queue() -> None:
    rules = IptablesSpec(repeat=False).chain_rules()
    assert rules[1] == ["-m", "mark", "--mark", BITS, "-j", "CONNMARK", "--set-xmark", BITS]
    assert rules[2] == ["-m", "connmark", "--mark", BITS, "-j", "ACCEPT"]
    assert rules[3][-4:-1] == ["NFQUEUE", "--queue-num", "0"]
    # With queue.repeat the hook's later rules must still see the bypassed connection: RETURN.
    assert IptablesSpec(repeat=True).chain_rules()[2][-1] == "RETURN"
    assert IptablesSpec(bypass_mark=0x100).bypass_rules()[0][3] == "0x100/0x100"


def test_no_bypass_bit_means_no_bypass_rules() -> None:
    spec = IptablesSpec(bypass_mark=0)
    assert spec.bypass_rules() == []
    assert [r for r in spec.chain_rules() if "CONNMARK" in r or "connmark" in r] == []
    assert IptablesManager(spec).bypass_counters() == (0, 0)  # nothing to read, no iptables run


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"bypass_mark": 3}, "single bit"),
        ({"bypass_mark": 1 << 32}, "single bit"),
        ({"bypass_mark": -1}, "single bit"),
        ({"bypass_mark": True}, "single bit"),
        # A forged RST (mark 0x7467) would match the CONNMARK rule and bypass its own connection.
        ({"bypass_mark": 0x4}, "a bit of mark 0x7467"),
    ],
)
def test_bad_bypass_bits_name_the_field(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=f"^bypass_mark: .*{problem}"):
        IptablesSpec(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- driver
def _payload_len(raw: bytes) -> int:
    """TCP payload bytes of an IPv4/IPv6 packet (no IPv6 extension headers in the lab's traffic)."""
    if raw[0] >> 4 == 4:
        ihl = (raw[0] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", raw, 2)
        return int(total) - ihl - (raw[ihl + 12] >> 4) * 4
    (plen,) = struct.unpack_from("!H", raw, 4)
    return int(plen) - (raw[40 + 12] >> 4) * 4


class BypassOnData(AcceptAll):
    """Accepts the handshake, answers every packet carrying data with a bypass decision: the first data
    packet of a connection should be the last the daemon sees of it, but for those already queued."""

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        if _payload_len(raw) <= 0:
            self.extra["plain"] = self.extra.get("plain", 0) + 1
            return Decision(Verdict.ACCEPT)
        self.extra["bypass"] = self.extra.get("bypass", 0) + 1
        return Decision(Verdict.ACCEPT, bypass=True)


def main(argv: list[str] | None = None) -> int:
    """Run the real adapter with `BypassOnData` on one queue until SIGTERM; READY, then stats as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--mark", type=int, default=0x7467)
    ap.add_argument("--bypass-mark", type=int, default=BIT)
    ap.add_argument("--repeat", action="store_true")
    args = ap.parse_args(argv)
    handler = BypassOnData()
    with RawSender(mark=args.mark) as sender:
        adapter = NfqueueAdapter(
            handler,
            queue_num=args.queue,
            sender=sender,
            repeat_mark=args.mark if args.repeat else None,
            bypass_mark=args.bypass_mark,
            gso=False,  # packets at the MTU, as _check_common expects (GSO has its own tests)
        )
        signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
        adapter.open()
        print("READY", flush=True)
        adapter.run()
    print(json.dumps({"queue": adapter.stats.as_dict(), "handler": handler.extra}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- root
class BypassSetup(Setup):
    """test_nfqueue's lab plumbing with this module's driver; several drivers for several queues."""

    drivers: dict[int, subprocess.Popen[str]]

    def start_bypass_driver(self, queue: int = 0, *extra: str) -> None:
        proc = self.lab.popen(
            "gw",
            [sys.executable, "-m", "tests.io.test_iptables_bypass", "--queue", str(queue), *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_line(proc, "READY", 20)
        self.drivers[queue] = proc

    def stop_bypass_driver(self, queue: int = 0) -> dict[str, Any]:
        proc = self.drivers.pop(queue)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report


@pytest.fixture
def bsetup(lab: Lab, tmp_path: Path) -> Iterator[BypassSetup]:
    s = BypassSetup(lab, tmp_path)
    s.drivers = {}
    yield s  # the lab kills the drivers and deletes the namespaces, rules included


def _kernel_ids(lab: Lab) -> dict[int, int]:
    """Queue ids handed out so far per bound queue (nfnetlink_queue's proc file, column 8)."""
    out = lab.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return {int(c[0]): int(c[7]) for c in (line.split() for line in out.splitlines()) if c}


@pytest.mark.root
def test_install_and_remove_with_the_bypass_rules_in_both_families(lab: Lab) -> None:
    mgr = IptablesManager(IptablesSpec(repeat=False, queue_count=2), netns=lab.name("gw"))
    mgr.install()
    mgr.install()  # idempotent: still exactly one copy of each rule
    for binary in ("iptables", "ip6tables"):
        rules = lab.run("gw", [binary, "-w", "-S", "TCPGUARD"]).stdout.splitlines()
        assert rules == [
            "-N TCPGUARD",
            "-A TCPGUARD -m mark --mark 0x7467 -j RETURN",
            f"-A TCPGUARD -m mark --mark {BITS} -j CONNMARK --set-xmark {BITS}",
            f"-A TCPGUARD -m connmark --mark {BITS} -j ACCEPT",
            "-A TCPGUARD -p tcp -j NFQUEUE --queue-balance 0:1 --queue-bypass",
        ]
    assert mgr.bypass_counters() == (0, 0)
    assert f"-m connmark --mark {BITS}" in mgr.show()
    assert sorted(mgr.remove())[:2] == [
        "ip6tables chain TCPGUARD (4 rules)",
        "ip6tables rule: -A FORWARD -j TCPGUARD",
    ]
    for binary in ("iptables", "ip6tables"):
        assert "TCPGUARD" not in lab.run("gw", [f"{binary}-save"]).stdout
    with pytest.raises(IptablesError, match="TCPGUARD"):
        mgr.bypass_counters()  # a missing chain is an error, not zero traffic


@pytest.mark.root
@pytest.mark.parametrize(("family", "repeat"), [("4", False), ("6", True)], ids=["v4-accept", "v6-repeat"])
def test_a_bypassed_connection_is_no_longer_queued(bsetup: BypassSetup, family: str, repeat: bool) -> None:
    """2 MB through the gateway: the daemon answers the first data packet with a bypass verdict, and the
    kernel then carries the rest of the connection without queueing it."""
    s = bsetup
    s.family = family
    mgr = s.install(repeat=repeat)
    s.start_bypass_driver(0, *(["--repeat"] if repeat else []))
    data, out = s.transfer(2 << 20)
    ids = _kernel_ids(s.lab)[0]
    report = s.stop_bypass_driver(0)
    assert out.read_bytes() == data
    q = report["queue"]
    _check_common(q)
    # What the daemon saw: the handshake, the first data packets (those queued before the connmark took
    # effect) and the end. Far from the >2,800 packets of the transfer.
    assert q["packets"] < 60, q
    assert ids < 60
    assert q["bypass_marked"] == report["handler"]["bypass"] >= 1
    assert q["bypass_looped"] == 0
    packets, octets = mgr.bypass_counters()
    # The kernel counts GRO-merged packets (up to 64 KB each), so the packet count is far below the
    # segment count; the bytes are the transfer, through the kernel.
    assert packets >= (2 << 20) // 65536
    assert octets > 2 << 20


@pytest.mark.root
def test_several_workers_each_bypass_their_connections(bsetup: BypassSetup) -> None:
    """queue-balance over two queues, four connections at once: whichever worker a connection hashes to,
    its bypass verdict takes it off the queues (both directions share the conntrack entry)."""
    s = bsetup
    mgr = s.install(queue_count=2, repeat=False)
    s.start_bypass_driver(0)
    s.start_bypass_driver(1)
    size = 400_000
    sinks, clients = [], []
    for i in range(4):
        s.port = 5100 + i
        sinks.append(s.start_server("sink", f"received{i}"))
        src = s.tmp / f"sent{i}"
        src.write_bytes(bytes([65 + i]) * size)
        clients.append(
            s.lab.popen(
                "client",
                [sys.executable, "-c", CLIENT_SEND, "4", SERVER_V4, str(s.port), str(src)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for proc in clients:  # all four run at the same time
        out, _ = proc.communicate(timeout=120)
        assert out.strip() == f"OK {size}"
    ids = _kernel_ids(s.lab)
    reports = [s.stop_bypass_driver(0), s.stop_bypass_driver(1)]
    for i, sink in enumerate(sinks):
        assert sink.read_bytes() == bytes([65 + i]) * size
    seen = sum(r["queue"]["packets"] for r in reports)
    assert seen < 4 * 60 and sum(ids.values()) < 4 * 60, (seen, ids)
    assert (
        sum(r["queue"]["bypass_marked"] for r in reports) >= 4
    )  # one bypass verdict per connection at least
    assert all(r["queue"]["bypass_looped"] == 0 for r in reports)
    assert mgr.bypass_counters()[1] > 4 * size


@pytest.mark.root
def test_without_the_kernel_rules_a_bypass_packet_cannot_loop(bsetup: BypassSetup) -> None:
    """An operator chain without the CONNMARK/connmark rules (here: tcpguard's chain with bypass_mark 0)
    while the daemon answers bypass verdicts with the bit: the repeated packet comes back to the queue
    carrying the bit and is let through once, without the engine; the transfer completes, every packet
    still reaches the daemon (nothing tells the kernel to stop), and the counter says so."""
    s = bsetup
    s.install(bypass_mark=0)
    s.start_bypass_driver(0, "--repeat")
    data, out = s.transfer(256 << 10)
    report = s.stop_bypass_driver(0)
    assert out.read_bytes() == data
    q = report["queue"]
    assert q["bypass_looped"] == q["bypass_marked"] >= (256 << 10) // MTU
    assert q["handler_errors"] == q["verdict_errors"] == 0


if __name__ == "__main__":
    sys.exit(main())
