"""A throwaway three-namespace network: client <-> gw <-> server, for `tcpguard lab` and the root tests.

    with Lab() as lab:
        lab.run("gw", ["iptables", "-S"])
        server = lab.popen("server", [sys.executable, "-c", SERVER])

It lives in the package (not under tests/) because `tcpguard lab` is a product command; `tests/netns.py`
re-exports it for the integration tests.

Why it is built this way:

* Namespace names are `<prefix>-<random>-client|gw|server` (prefix `tg` in tests, `tglab` for `tcpguard
  lab`), so parallel runs (xdist, two CI jobs on one host, a lab next to a test run) never collide, and the
  prefix makes leftovers easy to spot by hand (`ip netns list`) or to remove (`remove_leftovers`).
* Each veth pair is created with both ends directly inside their namespaces (`ip link add ... netns`),
  so no interface ever appears in the host namespace, not even for a moment, and the short fixed
  interface names inside the namespaces cannot clash with the host's. All addresses (10.77.x.0/24,
  fd00:77:x::/64) exist only inside the namespaces; traffic cannot leave them.
* IPv6 addresses use `nodad` so they are usable at once instead of after duplicate address detection.
* Offloads: NFQUEUE hands user space GSO/GRO super-packets only when the listener asks for them
  (NFQA_CFG_F_GSO, which tcpguard does not set); otherwise the kernel segments them and completes
  checksums before queueing. So no ethtool tweaking is needed; `tests/io/test_nfqueue.py` checks the
  largest queued packet against the MTU to keep this claim honest.
* Exit (also on an exception, also when `__enter__` fails half-way) kills every process the lab started,
  then every process still inside its namespaces (by pid, from `ip netns pids`), then deletes the
  namespaces. Deleting a namespace removes its veths, addresses, routes and iptables rules; killing the
  processes first matters because a namespace with a live process in it outlives `ip netns del`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CLIENT_V4",
    "CLIENT_V6",
    "GW_CLIENT_V4",
    "GW_CLIENT_V6",
    "GW_SERVER_V4",
    "GW_SERVER_V6",
    "ROLES",
    "SERVER_V4",
    "SERVER_V6",
    "Lab",
    "leftovers",
    "remove_leftovers",
]

ROLES = ("client", "gw", "server")

CLIENT_V4 = "10.77.1.2"
GW_CLIENT_V4 = "10.77.1.1"
GW_SERVER_V4 = "10.77.2.1"
SERVER_V4 = "10.77.2.2"
CLIENT_V6 = "fd00:77:1::2"
GW_CLIENT_V6 = "fd00:77:1::1"
GW_SERVER_V6 = "fd00:77:2::1"
SERVER_V6 = "fd00:77:2::2"

# Interface names inside the namespaces: client's eth0 <-> gw's "c0"; gw's "s0" <-> server's eth0.
CLIENT_IF = "eth0"
GW_CLIENT_IF = "c0"
GW_SERVER_IF = "s0"
SERVER_IF = "eth0"

_TIMEOUT = 30.0


class Lab:
    """Three namespaces joined by two veth pairs, gw routing between them. Use as a context manager."""

    def __init__(self, prefix: str = "tg") -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"namespace prefix {prefix!r}: 1 to 8 lower-case letters and digits")
        self.prefix = prefix
        suffix = secrets.token_hex(4)
        self.ns: dict[str, str] = {role: f"{prefix}-{suffix}-{role}" for role in ROLES}
        self.procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill our processes, then anything left in our namespaces, then delete the namespaces."""
        for proc in self.procs:
            _kill(proc)
        self.procs.clear()
        for name in self._created:
            for pid in self._pids_in(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_TIMEOUT, check=False)
        self._created.clear()

    # ------------------------------------------------------------------ running things inside
    def name(self, role: str) -> str:
        """The real namespace name of a role ('client', 'gw', 'server'); a real name passes through."""
        return self.ns.get(role, role)

    def argv(self, role: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name(role), *argv]

    def run(self, role: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run to completion inside a namespace. Defaults: check=True, captured text output, 30 s timeout."""
        kw.setdefault("check", True)
        kw.setdefault("timeout", _TIMEOUT)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(role, argv), **kw)  # noqa: PLW1510 (check is in kw)

    def popen(self, role: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside a namespace; it is killed (by pid) when the lab closes at the latest."""
        # `ip netns exec` execs the command after setns, so the pid is the command's own pid.
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(role, argv), **kw)
        self.procs.append(proc)
        return proc

    # ------------------------------------------------------------------ building
    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=_TIMEOUT)

    def _build(self) -> None:
        for role in ROLES:
            name = self.ns[role]
            if os.path.exists(f"/run/netns/{name}"):
                raise RuntimeError(f"namespace {name} already exists")
            self._ip("netns", "add", name)
            self._created.append(name)
            self._ip("-n", name, "link", "set", "lo", "up")
        c, g, s = (self.ns[r] for r in ROLES)
        self._ip(
            "link", "add", CLIENT_IF, "netns", c, "type", "veth", "peer", "name", GW_CLIENT_IF, "netns", g
        )
        self._ip(
            "link", "add", GW_SERVER_IF, "netns", g, "type", "veth", "peer", "name", SERVER_IF, "netns", s
        )
        for ns, dev, v4, v6 in (
            (c, CLIENT_IF, CLIENT_V4, CLIENT_V6),
            (g, GW_CLIENT_IF, GW_CLIENT_V4, GW_CLIENT_V6),
            (g, GW_SERVER_IF, GW_SERVER_V4, GW_SERVER_V6),
            (s, SERVER_IF, SERVER_V4, SERVER_V6),
        ):
            self._ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            self._ip("-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            self._ip("-n", ns, "link", "set", dev, "up")
        self.run("gw", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        self._ip("-n", c, "route", "add", "default", "via", GW_CLIENT_V4)
        self._ip("-n", c, "-6", "route", "add", "default", "via", GW_CLIENT_V6)
        self._ip("-n", s, "route", "add", "default", "via", GW_SERVER_V4)
        self._ip("-n", s, "-6", "route", "add", "default", "via", GW_SERVER_V6)
        self._wait_carrier([(c, CLIENT_IF), (g, GW_CLIENT_IF), (g, GW_SERVER_IF), (s, SERVER_IF)])

    def _wait_carrier(self, links: list[tuple[str, str]], timeout: float = 10.0) -> None:
        """Wait until every veth end reports carrier: the kernel's linkwatch sets it a moment after
        `link set up`, and a test that sends at once would lose its first packets to NO-CARRIER."""
        deadline = time.monotonic() + timeout
        pending = list(links)
        while pending:
            ns, dev = pending[0]
            state = Path(f"/sys/class/net/{dev}/operstate")  # read inside the namespace, see below
            res = subprocess.run(
                ["ip", "netns", "exec", ns, "cat", str(state)],
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                check=False,
            )
            if res.stdout.strip() == "up":
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dev} in {ns} has no carrier after {timeout} s")
            time.sleep(0.05)

    @staticmethod
    def _pids_in(name: str) -> list[int]:
        res = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
        return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _kill(proc: subprocess.Popen[Any]) -> None:
    """Terminate, then kill, one process we started (by its pid, via the Popen object)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def leftovers(prefix: str) -> list[str]:
    """Namespaces named like a `Lab(prefix)` that are still there (a lab killed with SIGKILL leaves them)."""
    res = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=_TIMEOUT, check=False
    )
    pat = re.compile(rf"{re.escape(prefix)}-[0-9a-f]{{8}}-(?:{'|'.join(ROLES)})")
    names = (line.split(" ")[0] for line in res.stdout.splitlines())
    return sorted(name for name in names if pat.fullmatch(name))


def remove_leftovers(prefix: str) -> list[str]:
    """Kill the processes inside, then delete, every leftover namespace of `prefix`; returns their names."""
    names = leftovers(prefix)
    for name in names:
        for pid in Lab._pids_in(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_TIMEOUT, check=False)
    return names
