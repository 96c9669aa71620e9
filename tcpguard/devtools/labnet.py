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
* A lab claims its name before it creates anything: `/run/tcpguard-labs/<prefix>-<random>.lab`, a file
  its process holds an exclusive `flock` on for as long as the lab exists. The kernel drops that lock
  when the process ends, however it ends (SIGKILL included), and no other process can take it while the
  owner lives, so "is this lab still running?" is one non-blocking `flock` away, with none of the doubt
  of a recorded pid (pids are reused) and no window in which a live lab looks abandoned: its namespaces
  only exist once the lock is held. `remove_leftovers` removes a lab only when it can take that lock (or
  when there is no record at all: namespaces of the prefix made by hand or by an older version). The
  descriptor is close-on-exec, so the lab's servers and daemon never hold the lock: when the lab's own
  process is killed they stay behind as orphans, and cleaning kills them with the namespaces.
* Each veth pair is created with both ends directly inside their namespaces (`ip link add ... netns`),
  so no interface ever appears in the host namespace, not even for a moment, and the short fixed
  interface names inside the namespaces cannot clash with the host's. All addresses (10.77.x.0/24,
  fd00:77:x::/64) exist only inside the namespaces; traffic cannot leave them.
* IPv6 addresses use `nodad` so they are usable at once instead of after duplicate address detection.
* Offloads: the lab leaves veth's defaults (TSO/GSO on, GRO off), so TCP between the endpoints crosses
  the gateway as TSO packets of up to 64 KB. NFQUEUE hands those to user space whole only when the
  listener asks (NFQA_CFG_F_GSO, which the daemon does: tcpguard.io.nfqueue); otherwise the kernel
  segments them and completes checksums before queueing. `tests/io/test_nfqueue.py`'s driver runs
  without the flag and checks the largest queued packet against the MTU; `tests/io/test_gso_live.py`
  turns GRO on too and checks the aggregates.
* Exit (also on an exception, also when `__enter__` fails half-way) kills every process the lab started,
  then every process still inside its namespaces (by pid, from `ip netns pids`), then deletes the
  namespaces. Deleting a namespace removes its veths, addresses, routes and iptables rules; killing the
  processes first matters because a namespace with a live process in it outlives `ip netns del`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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
    "RECORDS",
    "ROLES",
    "SERVER_V4",
    "SERVER_V6",
    "Lab",
    "check_prefix",
    "leftovers",
    "remove_leftovers",
    "running_labs",
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

# Where each lab's claim lives (see the module docstring). Under /run: gone at reboot, like the namespaces
# (/run/netns) it vouches for. Not /run/tcpguard, which systemd empties when the service stops.
RECORDS = Path("/run/tcpguard-labs")


class Lab:
    """Three namespaces joined by two veth pairs, gw routing between them. Use as a context manager."""

    def __init__(self, prefix: str = "tg") -> None:
        self.prefix = check_prefix(prefix)
        suffix = secrets.token_hex(4)
        self.id = f"{prefix}-{suffix}"
        self.ns: dict[str, str] = {role: f"{self.id}-{role}" for role in ROLES}
        self.procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._claim: int | None = None  # the descriptor holding the lock on the lab's record

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
        if self._claim is not None:
            # The record goes while the lock is still held, so no cleaner can see it unlocked meanwhile.
            _record(self.id).unlink(missing_ok=True)
            os.close(self._claim)
            self._claim = None

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

    def _take_claim(self) -> None:
        """Create and lock this lab's record, before any namespace exists (see the module docstring).

        The record is made and locked under a name no cleaner looks at, then renamed into place: under
        its real name it is never seen unlocked, or a cleaner could take it for a dead lab's and delete it
        in the moment between creating and locking."""
        RECORDS.mkdir(mode=0o755, parents=True, exist_ok=True)
        record = _record(self.id)
        draft = record.with_name(f".{record.name}.new")
        fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            info = {"pid": os.getpid(), "namespaces": [self.ns[r] for r in ROLES], "started": time.time()}
            os.write(fd, json.dumps(info).encode() + b"\n")
            os.rename(draft, record)
        except BaseException:
            os.close(fd)
            draft.unlink(missing_ok=True)
            raise
        self._claim = fd

    def _build(self) -> None:
        self._take_claim()
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


def check_prefix(prefix: str) -> str:
    """`prefix` if it can begin a lab's namespace names (short, so that names stay readable), else
    ValueError saying what it must be."""
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        raise ValueError(f"namespace prefix {prefix!r}: 1 to 8 lower-case letters and digits")
    return prefix


def _record(lab_id: str) -> Path:
    return RECORDS / f"{lab_id}.lab"


def _namespaces(prefix: str) -> dict[str, list[str]]:
    """The namespaces named like a `Lab(prefix)`'s, by lab id."""
    res = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=_TIMEOUT, check=False
    )
    pat = re.compile(rf"({re.escape(prefix)}-[0-9a-f]{{8}})-(?:{'|'.join(ROLES)})")
    labs: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        name = line.split(" ")[0]
        if m := pat.fullmatch(name):
            labs.setdefault(m.group(1), []).append(name)
    return {lab_id: sorted(names) for lab_id, names in sorted(labs.items())}


def _owner(lab_id: str) -> tuple[bool, int | None]:
    """(True, its pid) while the process that made lab `lab_id` holds the lab's lock (pid None if its
    record does not say); (False, None) when no process holds it: it ended, or there is no record."""
    try:
        fd = os.open(_record(lab_id), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    try:
        try:
            # A shared lock, released at once by the close: this only asks whether the owner holds it.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = json.loads(os.read(fd, 4096)).get("pid")
            except (OSError, ValueError, AttributeError):
                pid = None
            return True, pid if type(pid) is int else None
        return False, None
    finally:
        os.close(fd)


def running_labs(prefix: str) -> dict[str, int | None]:
    """The labs of `prefix` whose process still runs: lab id -> that process's pid (None if unknown)."""
    out: dict[str, int | None] = {}
    for lab_id in _namespaces(prefix):
        running, pid = _owner(lab_id)
        if running:
            out[lab_id] = pid
    return out


def leftovers(prefix: str) -> list[str]:
    """Namespaces of `Lab(prefix)`s whose process is gone (a lab killed with SIGKILL leaves them)."""
    return [name for lab_id, names in _namespaces(prefix).items() if not _owner(lab_id)[0] for name in names]


def remove_leftovers(prefix: str) -> list[str]:
    """Kill the processes inside, then delete, the namespaces of every lab of `prefix` whose own process is
    gone; returns their names. A lab whose process still runs is never touched.

    Each lab is removed while this process holds its lock, so a cleaner running at the same time skips it
    rather than racing; its record goes last. Records of dead labs that left no namespace (killed before
    making them) are removed too."""
    removed: list[str] = []
    for lab_id, names in _namespaces(prefix).items():
        abandoned, fd = _lock_if_abandoned(lab_id)
        if not abandoned:
            continue
        try:
            for name in names:
                for pid in Lab._pids_in(name):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for name in names:
                subprocess.run(
                    ["ip", "netns", "del", name], capture_output=True, timeout=_TIMEOUT, check=False
                )
            removed += names
            _record(lab_id).unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    if RECORDS.is_dir():
        for path in RECORDS.iterdir():
            m = re.fullmatch(rf"({re.escape(prefix)}-[0-9a-f]{{8}})\.lab", path.name)
            if m is None:
                continue
            abandoned, fd = _lock_if_abandoned(m.group(1))
            if abandoned and fd is not None:
                path.unlink(missing_ok=True)
                os.close(fd)
    return removed


def _lock_if_abandoned(lab_id: str) -> tuple[bool, int | None]:
    """Whether lab `lab_id`'s process is gone and, if its record exists, a descriptor holding the record's
    lock (the caller closes it). (False, None) while the lab's process holds the lock."""
    try:
        fd = os.open(_record(lab_id), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    return True, fd
