"""Installs and removes the netfilter rules that send TCP traffic to tcpguard's NFQUEUE(s).

Everything tcpguard adds lives in one dedicated chain of the `filter` table (default `TCPGUARD`), reached
by an unconditional jump inserted at the top of each configured hook (FORWARD by default). Keeping our
rules in our own chain is what makes install and removal safe next to an operator's firewall: we never
touch, reorder or flush a rule we did not write, and `remove()` leaves the tables as they were.

The chain holds, in order:

1. `-m mark --mark M -j RETURN`: packets tcpguard forged itself (RSTs sent through a raw socket with
   `SO_MARK` = M) leave the chain and are never queued again. Exact match on purpose: a bit-mask match
   would also let through ordinary traffic that another tool happened to mark with overlapping bits.
2. `-m mark --mark B/B -j CONNMARK --set-xmark B/B` (with a connection bypass bit B, `bypass_mark`): the
   one packet tcpguard answered with a bypass verdict (NF_REPEAT with B added to its mark,
   `tcpguard.io.nfqueue`) copies the bit into its connection's conntrack mark. Only bit B of the conntrack
   mark is written, so an operator's own connmark bits stay as they are.
3. `-m connmark --mark B/B -j ACCEPT` (`-j RETURN` with `repeat`, so the hook's later rules still see the
   packets): every packet of a connection carrying the bit leaves before the queue rules, in the kernel,
   at no cost to the daemon. This is connection bypass (issue 20): once no rule wants a connection's bytes
   any more, the kernel stops queueing it. Its counters are the packets and bytes that went through the
   kernel instead of the daemon (`bypass_counters`).
4. `-p tcp [-i IF] [-o IF] [-m multiport --ports P] -j NFQUEUE --queue-num N` (or `--queue-balance A:B`
   for several workers, plus `--queue-bypass` when configured). NFQUEUE's balance hash is symmetric in
   the source and destination address, so both directions of a connection reach the same worker. The
   multiport match takes at most 15 ports, so a longer port list becomes several NFQUEUE rules; a packet
   is queued by the first one that matches (NFQUEUE is terminal), so never twice.

Why the conntrack mark and not the verdict itself: nfnetlink_queue can set the conntrack mark from the
verdict message (NFQA_CT with CTA_MARK), which would save rule 2, but only with
CONFIG_NETFILTER_NETLINK_GLUE_CT, which the kernels we run on do not set (`zcat /proc/config.gz`: "#
CONFIG_NETFILTER_NETLINK_GLUE_CT is not set"), and a verdict carrying NFQA_CT is then refused. A flowtable
(nftables `flow add`), which would take the bypassed connection off the slow path altogether, needs
CONFIG_NF_FLOW_TABLE, likewise not set. The CONNMARK target and the connmark match are built in
(CONFIG_NETFILTER_XT_TARGET_CONNMARK, CONFIG_NETFILTER_XT_MATCH_CONNMARK, CONFIG_NF_CONNTRACK_MARK), and
the packet mark round trip (NF_REPEAT with a mark) is what the adapter already does for `queue.repeat`.

Idempotence and crashes: `install()` rebuilds the chain's content in one atomic `iptables-restore
--noflush` transaction (declaring a chain there creates it or flushes it), so there is no moment where the
chain is half-built and a packet slips through unqueued, and a chain left behind by a crashed daemon is
simply reused. Jump rules are found in `-S` output: a missing one is inserted at the top, duplicates of
it are deleted by rule number (the first one stays where it is), and jumps from hooks that are no longer
configured are removed. Running `install()` twice leaves exactly the same tables as running it once.
Deleting by number assumes nobody else edits the same hook during those few commands (iptables offers no
transaction spanning a lookup and a delete); the operator's tooling should not race the daemon's start.

`remove()` deletes every rule that jumps to the chain (from any chain of the table, since a referenced
chain cannot be deleted), then flushes and deletes the chain. On the iptables-nft backend one difference
from a pristine namespace can remain and is harmless: if the `filter` table did not exist before
`install()`, it now exists with its empty built-in chains and ACCEPT policies; iptables itself has no
command to delete a table.

All commands use `-w` (wait for the xtables lock instead of failing when another tool holds it) and can
be run inside a network namespace (`netns`), which is how the tests use a throwaway network.
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["HOOKS", "IptablesError", "IptablesManager", "IptablesSpec"]

#: The hooks tcpguard can jump from. PREROUTING/POSTROUTING live in other tables and are not supported.
HOOKS = ("INPUT", "FORWARD", "OUTPUT")

_MAX_QUEUE = 65535
_MULTIPORT_MAX = 15
_CHAIN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,27}")
_RESERVED = frozenset(
    {
        "INPUT",
        "OUTPUT",
        "FORWARD",
        "PREROUTING",
        "POSTROUTING",
        "ACCEPT",
        "DROP",
        "QUEUE",
        "RETURN",
        "NFQUEUE",
    }
)
_IFACE_RE = re.compile(r"[^\s/:!]{1,15}")
_TIMEOUT = 30.0


class IptablesError(RuntimeError):
    """An iptables command failed. The message carries the command line and iptables' own error text."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{shlex.join(argv)} exited {returncode}: {stderr.strip()}")


@dataclass(frozen=True)
class IptablesSpec:
    """What to install. Plain data; the config loader maps the YAML `queue` and `iptables` sections onto it.

    `queue_count` is the number of consecutive queues starting at `queue_num` (one worker process per
    queue); more than one selects `--queue-balance`. `bypass` adds `--queue-bypass`: while no process is
    bound to a queue, its packets are accepted instead of dropped (fail-open across restarts). `mark` is
    the fwmark of forged packets (must equal the raw sender's `SO_MARK`). `ports` restricts queueing to TCP
    packets with one of these as source or destination port (None or empty: all TCP). `ipv6` installs the
    same chain with ip6tables as well. `bypass_mark` is the single bit of connection bypass (rules 2 and 3
    above; 0: no bypass rules, the kernel then queues every packet of every connection); it must not be a
    bit of `mark`, or a forged RST would mark its connection bypassed. `repeat` mirrors `queue.repeat`:
    bypassed connections then RETURN to the hook's later rules instead of being accepted outright.
    """

    chain: str = "TCPGUARD"
    hooks: tuple[str, ...] = ("FORWARD",)
    queue_num: int = 0
    queue_count: int = 1
    bypass: bool = True
    mark: int = 0x7467
    in_interface: str | None = None
    out_interface: str | None = None
    ports: tuple[int, ...] | None = None
    ipv6: bool = True
    bypass_mark: int = 0x40000000
    repeat: bool = True
    # Not configuration: the binaries, overridable for tests or unusual installs.
    binaries: tuple[str, str] = field(default=("iptables", "ip6tables"), compare=False)

    def __post_init__(self) -> None:
        # Accept lists from a YAML loader but store tuples, so the spec stays hashable and immutable.
        object.__setattr__(self, "hooks", tuple(self.hooks))
        if self.ports is not None:
            object.__setattr__(self, "ports", tuple(self.ports))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when the spec cannot become valid rules.

        iptables would reject most of these itself, but only half-way through an install and with a
        message about a command line the operator never wrote.
        """
        if not _CHAIN_RE.fullmatch(self.chain) or self.chain.upper() in _RESERVED:
            raise ValueError(f"chain: {self.chain!r} is not a usable user chain name")
        if not self.hooks:
            raise ValueError("hooks: at least one hook is needed")
        for hook in self.hooks:
            if hook not in HOOKS:
                raise ValueError(f"hooks: {hook!r} is not one of {', '.join(HOOKS)}")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError("hooks: listed twice")
        if not 0 <= self.queue_num <= _MAX_QUEUE:
            raise ValueError(f"queue_num: {self.queue_num} outside 0..{_MAX_QUEUE}")
        if self.queue_count < 1 or self.queue_num + self.queue_count - 1 > _MAX_QUEUE:
            raise ValueError(f"queue_count: {self.queue_count} queues from {self.queue_num} do not fit")
        if not 1 <= self.mark <= 0xFFFFFFFF:
            # Mark 0 would make the RETURN rule match every unmarked packet: nothing would be queued.
            raise ValueError(f"mark: {self.mark} outside 1..0xffffffff")
        b = self.bypass_mark
        if isinstance(b, bool) or not 0 <= b <= 0xFFFFFFFF or b & (b - 1):
            raise ValueError(f"bypass_mark: {b!r} is not 0 or a single bit of the 32-bit mark")
        if b & self.mark:
            raise ValueError(f"bypass_mark: {b:#x} is a bit of mark {self.mark:#x}")
        for name, iface in (("in_interface", self.in_interface), ("out_interface", self.out_interface)):
            if iface is not None and not _IFACE_RE.fullmatch(iface):
                raise ValueError(f"{name}: {iface!r} is not an interface name")
        # Such rules would load but never match: local output has no input interface and local input no
        # output interface.
        if self.in_interface is not None and "OUTPUT" in self.hooks:
            raise ValueError("in_interface: OUTPUT packets have no input interface")
        if self.out_interface is not None and "INPUT" in self.hooks:
            raise ValueError("out_interface: INPUT packets have no output interface")
        if self.ports is not None:
            for port in self.ports:
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise ValueError(f"ports: {port!r} is not a port number")

    def queue_target(self) -> list[str]:
        """The NFQUEUE target arguments."""
        if self.queue_count == 1:
            args = ["-j", "NFQUEUE", "--queue-num", str(self.queue_num)]
        else:
            last = self.queue_num + self.queue_count - 1
            args = ["-j", "NFQUEUE", "--queue-balance", f"{self.queue_num}:{last}"]
        if self.bypass:
            args.append("--queue-bypass")
        return args

    def chain_rules(self) -> list[list[str]]:
        """The chain's rules as argument lists (without the leading `-A CHAIN`), in order."""
        rules: list[list[str]] = [["-m", "mark", "--mark", f"{self.mark:#x}", "-j", "RETURN"]]
        rules += self.bypass_rules()
        match = ["-p", "tcp"]
        if self.in_interface is not None:
            match += ["-i", self.in_interface]
        if self.out_interface is not None:
            match += ["-o", self.out_interface]
        if self.ports:
            ports = list(dict.fromkeys(self.ports))
            for i in range(0, len(ports), _MULTIPORT_MAX):
                group = ",".join(str(p) for p in ports[i : i + _MULTIPORT_MAX])
                rules.append([*match, "-m", "multiport", "--ports", group, *self.queue_target()])
        else:
            rules.append([*match, *self.queue_target()])
        return rules

    def bypass_rules(self) -> list[list[str]]:
        """The two connection bypass rules (save the bit, let marked connections pass), or none."""
        if not self.bypass_mark:
            return []
        bits = f"{self.bypass_mark:#x}/{self.bypass_mark:#x}"
        return [
            ["-m", "mark", "--mark", bits, "-j", "CONNMARK", "--set-xmark", bits],
            ["-m", "connmark", "--mark", bits, "-j", "RETURN" if self.repeat else "ACCEPT"],
        ]

    def restore_script(self) -> str:
        """The `iptables-restore --noflush` input that (re)builds the chain atomically."""
        lines = ["*filter", f":{self.chain} - [0:0]"]
        lines += [shlex.join(["-A", self.chain, *rule]) for rule in self.chain_rules()]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


class IptablesManager:
    """Applies an `IptablesSpec` with iptables (and ip6tables when `spec.ipv6`).

    `netns` runs every command through `ip netns exec NETNS`, so the same code manages a test namespace.
    """

    def __init__(self, spec: IptablesSpec, netns: str | None = None) -> None:
        spec.validate()
        self.spec = spec
        self.netns = netns

    # ------------------------------------------------------------------ public API
    def families(self) -> list[str]:
        """The iptables binaries this spec uses: iptables, plus ip6tables when IPv6 is on."""
        v4, v6 = self.spec.binaries
        return [v4, v6] if self.spec.ipv6 else [v4]

    def install(self) -> list[str]:
        """Make the tables contain exactly this spec's chain and jumps. Safe to repeat; reuses leftovers.

        Returns what it found from an earlier run (a daemon killed with SIGKILL leaves its chain), one
        line each, so a restart can say it reused rules instead of installing them; empty on a clean start.
        """
        found: list[str] = []
        for binary in self.families():
            found += self._install_family(binary)
        return found

    def remove(self) -> list[str]:
        """Delete the chain and every rule jumping to it, in both families. A no-op when not installed.

        Both families are cleaned even when `spec.ipv6` is off, so turning IPv6 off in the config and
        restarting does not leave an orphan ip6tables chain behind.

        Returns what was deleted, one line each (`iptables rule: -A FORWARD -j TCPGUARD`, then the chain
        with the number of rules it held); empty when there was nothing. An operator cleaning up by hand,
        after a crash or with `iptables.manage: false`, needs to see whether anything was there at all.
        """
        removed: list[str] = []
        for binary in self.spec.binaries:
            if not self._have(binary):
                continue
            removed += self._remove_family(binary)
        return removed

    def is_installed(self) -> bool:
        """True when the chain exists and every configured hook jumps to it, in every family."""
        for binary in self.families():
            if not self._chain_exists(binary):
                return False
            for hook in self.spec.hooks:
                if not self._jump_positions(binary, hook):
                    return False
        return True

    def show(self) -> str:
        """The current rules tcpguard owns, as `iptables -S` text, one section per family."""
        out: list[str] = []
        for binary in self.families():
            out.append(f"# {binary}")
            if not self._chain_exists(binary):
                out.append(f"# chain {self.spec.chain} not installed")
                continue
            for line in self._rules(binary, None):
                if self._is_jump_line(line):
                    out.append(line)
            out.extend(self._rules(binary, self.spec.chain))
        return "\n".join(out) + "\n"

    def queued_packets(self) -> int:
        """Packets the chain's NFQUEUE rules have matched since the chain was (re)built, both families.

        That is every packet sent towards the queue(s), whether it entered one or not: a packet that
        finds no process bound (`--queue-bypass`) or a full queue with the fail-open flag never gets a
        queue packet id, so the kernel's per-queue counters miss it. The daemon compares the two to count
        the packets that passed uninspected (`tcpguard.app.daemon.metrics.BypassMeter`). Raises IptablesError
        when the chain is missing or iptables fails.
        """
        total = 0
        for binary in self.families():
            out = self._run([binary, "-w", "-t", "filter", "-L", self.spec.chain, "-n", "-v", "-x"])
            for line in out.splitlines():
                fields = line.split()
                # "pkts bytes target prot opt in out source destination ...": the two header lines and
                # the RETURN rule for forged packets are skipped.
                if len(fields) > 2 and fields[2] == "NFQUEUE" and fields[0].isdigit():
                    total += int(fields[0])
        return total

    def bypass_counters(self) -> tuple[int, int]:
        """Packets and bytes the connmark rule let past the queue since the chain was (re)built, both
        families: the traffic of bypassed connections that went through the kernel instead of the daemon
        (each bypass verdict's own repeated packet included, one per bypassed connection and in-flight
        packet). (0, 0) without a bypass bit. Raises IptablesError when the chain is missing or iptables
        fails."""
        if not self.spec.bypass_mark:
            return 0, 0
        packets = octets = 0
        for binary in self.families():
            out = self._run([binary, "-w", "-t", "filter", "-L", self.spec.chain, "-n", "-v", "-x"])
            for line in out.splitlines():
                fields = line.split()
                # "pkts bytes ACCEPT|RETURN ... connmark match 0x40000000/0x40000000": only the connmark
                # rule's line says "connmark match" (the CONNMARK target's says "CONNMARK or").
                if len(fields) > 2 and fields[0].isdigit() and "connmark match" in line:
                    packets += int(fields[0])
                    octets += int(fields[1])
        return packets, octets

    # ------------------------------------------------------------------ per family
    def _install_family(self, binary: str) -> list[str]:
        chain = self.spec.chain
        found: list[str] = []
        if self._chain_exists(binary):
            held = len(self._rules(binary, chain))
            jumps = [hook for hook in HOOKS if self._jump_positions(binary, hook)]
            found.append(
                f"{binary}: chain {chain} was already there ({held} rule{'' if held == 1 else 's'}"
                + (f", jumped to from {', '.join(jumps)}" if jumps else ", no jumps")
                + "): refilled and reused"
            )
        # One transaction fills (or refills) the chain before anything jumps to it.
        self._run([f"{binary}-restore", "-w", "--noflush"], stdin=self.spec.restore_script())
        for hook in HOOKS:
            positions = self._jump_positions(binary, hook)
            if hook in self.spec.hooks:
                if not positions:
                    # At the top: an operator's earlier ACCEPT (e.g. for established traffic) must not let
                    # packets skip inspection.
                    self._run([binary, "-w", "-t", "filter", "-I", hook, "1", "-j", chain])
                extra = positions[1:]  # keep the first jump where it is, wherever that is
            else:
                extra = positions
            # Highest position first, so the remaining numbers stay valid.
            for pos in reversed(extra):
                self._run([binary, "-w", "-t", "filter", "-D", hook, str(pos)])
        return found

    def _remove_family(self, binary: str) -> list[str]:
        if not self._chain_exists(binary):
            return []
        removed: list[str] = []
        for line in self._rules(binary, None):
            if self._is_jump_line(line):
                args = shlex.split(line)
                # "-A CHAIN rest..." becomes "-D CHAIN rest...": iptables deletes the first identical rule.
                self._run([binary, "-w", "-t", "filter", "-D", *args[1:]])
                removed.append(f"{binary} rule: {line}")
        held = len(self._rules(binary, self.spec.chain))
        self._run([binary, "-w", "-t", "filter", "-F", self.spec.chain])
        self._run([binary, "-w", "-t", "filter", "-X", self.spec.chain])
        removed.append(f"{binary} chain {self.spec.chain} ({held} rule{'' if held == 1 else 's'})")
        return removed

    # ------------------------------------------------------------------ helpers
    def _is_jump_line(self, line: str) -> bool:
        try:
            args = shlex.split(line)
        except ValueError:
            return False
        if len(args) < 4 or args[0] != "-A" or args[1] == self.spec.chain:
            return False
        # "-j CHAIN" or "-g CHAIN" anywhere in the rule.
        return any(
            a in ("-j", "-g", "--jump", "--goto") and b == self.spec.chain
            for a, b in itertools.pairwise(args)
        )

    def _jump_positions(self, binary: str, hook: str) -> list[int]:
        """1-based rule numbers of the plain `-j CHAIN` jumps in a hook."""
        exact = f"-A {hook} -j {self.spec.chain}"
        return [i for i, line in enumerate(self._rules(binary, hook), 1) if line.strip() == exact]

    def _rules(self, binary: str, chain: str | None) -> list[str]:
        """`-S` output lines (only `-A` rules) for one chain or the whole filter table."""
        argv = [binary, "-w", "-t", "filter", "-S"]
        if chain is not None:
            argv.append(chain)
        out = self._run(argv)
        return [line for line in out.splitlines() if line.startswith("-A ")]

    def _chain_exists(self, binary: str) -> bool:
        argv = [binary, "-w", "-t", "filter", "-S", self.spec.chain]
        try:
            res = self._exec(argv)
        except FileNotFoundError as exc:  # a missing binary is an IptablesError, as in _run
            raise IptablesError(self._argv(argv), 127, str(exc)) from exc
        return res.returncode == 0

    def _have(self, binary: str) -> bool:
        """Whether this binary runs at all (ip6tables may be missing on an IPv4-only host)."""
        try:
            res = self._exec([binary, "--version"])
        except FileNotFoundError:
            return False
        return res.returncode == 0

    def _argv(self, argv: Sequence[str]) -> list[str]:
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]

    def _exec(self, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._argv(argv), input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        try:
            res = self._exec(argv, stdin)
        except FileNotFoundError as exc:
            raise IptablesError(self._argv(argv), 127, str(exc)) from exc
        if res.returncode != 0:
            raise IptablesError(self._argv(argv), res.returncode, res.stderr)
        return res.stdout
