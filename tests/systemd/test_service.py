"""tcpguard.service under a real systemd: a Debian system booted in a container (systemd-nspawn, its own
network namespace), tcpguard installed there by scripts/install-service.sh from the read-only
repository, then driven with systemctl as an operator would.

Traffic: the test config hooks tcpguard into INPUT for a few ports, and clients and a listener inside the
container talk over its loopback, so every packet passes the queue (loopback traverses OUTPUT and INPUT)
and nothing leaves the container. The test rule module (RULES) resets one port with an alert, raises on
another, and, while /etc/tcpguard/stall exists, hangs for good on a third (swallowing the interrupt of
the rule time budget): the stalled packet loop the watchdog must catch. It also sleeps 2 s at import
in `tcpguard run`, so readiness comes visibly late.

The container is booted once for the module; each test starts from a stopped service with the test rules
and config in place. On a failure the report carries the unit's journal (see conftest.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .container import Container, ensure_rootfs, ensure_wheelhouse

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
UNIT = "tcpguard.service"
BLOCKED, RAISES, STALLS, OPEN = 8081, 8083, 8090, 8082
PORTS = (BLOCKED, OPEN, RAISES, STALLS)

RULES = """
import logging, os, sys, time
from tcpguard import rule, tcp_connection

BLOCKED = {blocked}
log = logging.getLogger("tcpguard.test")

# Readiness comes late in the daemon (not in `tcpguard check`, not again on a reload).
if "run" in sys.argv and not os.environ.get("TG_TEST_SLOW_DONE"):
    os.environ["TG_TEST_SLOW_DONE"] = "1"
    time.sleep(2)

@rule(on=tcp_connection.events.new_connection)
def gate(flow, tcp):
    if flow.dstport == BLOCKED:
        flow.alert("port {{}} is blocked".format(flow.dstport), severity="high", direction="up")
        flow.reset()
    elif flow.dstport == {raises}:
        raise RuntimeError("this rule fails on purpose")
    elif flow.dstport == {stalls} and os.path.exists("/etc/tcpguard/stall"):
        # Hangs for good: the bare except swallows the rule time budget's interrupt too, as a rule
        # blocked in C code would ignore it. Only the systemd watchdog gets the daemon out of this.
        log.warning("stalling the packet loop")
        while True:
            try:
                time.sleep(3600)
            except BaseException:
                pass
"""

# Accepts and closes connections on every test port, until the container goes.
LISTENER = """
import socket, selectors
sel = selectors.DefaultSelector()
for port in {ports}:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(64); sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept(); conn.close()
"""

# One connection attempt; prints what happened: connected, refused (an RST answered the SYN), timeout.
CLIENT = """
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[2]))
try:
    s.connect(("127.0.0.1", int(sys.argv[1]))); print("connected")
except ConnectionRefusedError: print("refused")
except (TimeoutError, socket.timeout): print("timeout")
"""


def wait_for(cond: Callable[[], object], what: str, timeout: float, box: Container) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container with tcpguard installed by install-service.sh, the listener running."""
    rootfs = ensure_rootfs()
    wheels = ensure_wheelhouse(REPO)
    workdir = tmp_path_factory.mktemp("nspawn")
    with Container(rootfs, binds=[(REPO, "/src"), (wheels, "/wheels")], workdir=workdir) as c:
        c.run(["/src/scripts/install-service.sh", "--wheelhouse", "/wheels"], timeout=300)
        # Samples out, the test rules in; the installed config, hooked to INPUT on the test ports.
        for sample in c.path("/etc/tcpguard/rules").glob("*.py"):
            sample.unlink()
        cfg = c.path("/etc/tcpguard/tcpguard.yaml")
        text = cfg.read_text()
        for old, new in (
            ("  hooks: [FORWARD]", "  hooks: [INPUT]"),
            ("  ports: null", f"  ports: {list(PORTS)}"),
        ):
            assert old in text, f"installed config has no line {old!r}"
            text = text.replace(old, new)
        c.write("/etc/tcpguard/tcpguard.yaml", text)
        c.run(
            [
                "systemd-run",
                "--unit=tg-listener",
                "/usr/bin/python3",
                "-c",
                LISTENER.format(ports=list(PORTS)),
            ]
        )
        # The filter table exists from here on (iptables-nft creates it on first use and keeps it).
        c.run(["iptables", "-w", "-S"])
        c.run(["ip6tables", "-w", "-S"])
        yield c


@pytest.fixture
def svc(box: Container) -> Iterator[Container]:
    """Each test starts with the service stopped, the test rules in place and no drop-ins."""
    box.write(
        "/etc/tcpguard/rules/test_rules.py", RULES.format(blocked=BLOCKED, raises=RAISES, stalls=STALLS)
    )
    yield box
    box.run(["systemctl", "stop", UNIT], check=False, timeout=60)
    box.run(["systemctl", "reset-failed", UNIT], check=False)
    for p in (box.path("/etc/tcpguard/stall"), box.path("/etc/tcpguard/rules/broken.py")):
        p.unlink(missing_ok=True)
    dropins = box.path(f"/etc/systemd/system/{UNIT}.d")
    if dropins.exists():
        for p in dropins.iterdir():
            p.unlink()
        dropins.rmdir()
        box.run(["systemctl", "daemon-reload"])


def connect(box: Container, port: int, timeout: float = 3.0) -> str:
    res = box.run(["/usr/bin/python3", "-c", CLIENT, str(port), str(timeout)], timeout=timeout + 30)
    return res.stdout.strip()


def rules_snapshot(box: Container) -> str:
    return box.run(["iptables", "-w", "-S"]).stdout + box.run(["ip6tables", "-w", "-S"]).stdout


def journal_since(box: Container, cursor: str) -> str:
    return box.journal("-u", UNIT, f"--after-cursor={cursor}") if cursor else box.journal("-u", UNIT)


def cursor(box: Container) -> str:
    """The cursor of the unit's latest entry, for `journalctl -u ... --after-cursor`.

    It must be an entry that the later query matches: journalctl 252 seeks to the first *matching*
    entry at or after the cursor and then skips it as if it were the cursor's own entry, so with the
    cursor of some other unit's entry it silently drops the first entry that was asked for."""
    res = box.run(["journalctl", "-u", UNIT, "-n", "1", "--show-cursor", "-q"], check=False)
    m = re.search(r"-- cursor: (\S+)", res.stdout)
    return m.group(1) if m else ""


def start(box: Container) -> None:
    box.run(["systemctl", "start", UNIT], timeout=90)


# --------------------------------------------------------------------------------------------- tests
def test_start_reaches_active_only_once_the_daemon_is_ready(svc: Container) -> None:
    before = rules_snapshot(svc)
    svc.run(["systemctl", "start", "--no-block", UNIT])
    seen: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = svc.unit_state(UNIT, "ActiveState", "SubState", "MainPID")
        state = (st["ActiveState"], st["SubState"], st["MainPID"])
        if not seen or seen[-1] != state:
            seen.append(state)
        if st["ActiveState"] != "activating":
            break
        time.sleep(0.05)
    assert seen[-1][0] == "active", f"the unit went through {seen}, never active"
    # At the first sight of "active", the queue is bound and the iptables rules are in place.
    chain = svc.run(["iptables", "-w", "-S", "TCPGUARD"], check=False)
    assert chain.returncode == 0 and "NFQUEUE" in chain.stdout, (
        f"active but no TCPGUARD chain: {chain.stderr}"
    )
    queues = svc.run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.split()
    assert queues[:1] == ["0"], f"active but queue 0 is not bound: {queues}"
    # It was activating with the daemon already running (loading its rules) before that.
    assert any(s[:2] == ("activating", "start") and s[2] != "0" for s in seen), (
        f"the unit never waited for the running daemon's READY: states {seen}"
    )
    log = svc.journal("-u", UNIT)
    assert "running: queue 0" in log and f"Started {UNIT}" in log, log
    assert log.index("running: queue 0") < log.index(f"Started {UNIT}"), (
        "systemd reported the unit started before the daemon logged that it runs"
    )
    assert rules_snapshot(svc) != before
    # STATUS= carries live counters.
    assert svc.unit_state(UNIT, "StatusText")["StatusText"].startswith("queue 0: "), (
        "no STATUS= from the daemon"
    )
    assert connect(svc, OPEN) == "connected"
    wait_for(
        lambda: re.search(r" [1-9]\d* packets", svc.unit_state(UNIT, "StatusText")["StatusText"]),
        "STATUS= to count the packets of a connection",
        timeout=12,
        box=svc,
    )


def test_reload_swaps_the_rules_and_a_broken_reload_fails_and_keeps_them(svc: Container) -> None:
    start(svc)
    pid = svc.unit_state(UNIT, "MainPID")["MainPID"]
    assert connect(svc, BLOCKED) == "refused" and connect(svc, OPEN) == "connected"
    mark = cursor(svc)
    svc.write("/etc/tcpguard/rules/test_rules.py", RULES.format(blocked=OPEN, raises=RAISES, stalls=STALLS))
    svc.run(["systemctl", "reload", UNIT])
    # Synchronous: when `systemctl reload` returns, the new rules are in force (no waiting).
    assert connect(svc, OPEN) == "refused", "the reloaded rule does not block the new port"
    assert connect(svc, BLOCKED) == "connected", "the old rule is still in force after the reload"
    log = journal_since(svc, mark)
    assert "reloaded: 1 rules" in log and f"Reloaded {UNIT}" in log, log
    assert svc.unit_state(UNIT, "MainPID")["MainPID"] == pid, "reload restarted the daemon"
    # A broken module: `systemctl reload` fails and says why; the daemon keeps the running rules.
    svc.write("/etc/tcpguard/rules/broken.py", "from tcpguard import rule\nthis is not python\n")
    res = svc.run(["systemctl", "reload", UNIT], check=False)
    assert res.returncode != 0, "systemctl reload succeeded with a broken rule module"
    assert "broken.py:2" in journal_since(svc, mark), "the journal does not name the broken file and line"
    st = svc.unit_state(UNIT, "ActiveState", "MainPID")
    assert st == {"ActiveState": "active", "MainPID": pid}, f"after a failed reload: {st}"
    assert connect(svc, OPEN) == "refused", "a failed reload changed the running rules"
    # A plain SIGHUP to the main process reloads as well, with RELOADING=1 ... READY=1 around it.
    (svc.path("/etc/tcpguard/rules/broken.py")).unlink()
    svc.write(
        "/etc/tcpguard/rules/test_rules.py", RULES.format(blocked=BLOCKED, raises=RAISES, stalls=STALLS)
    )
    mark = cursor(svc)
    svc.run(["systemctl", "kill", "--kill-who=main", "--signal=HUP", UNIT])
    wait_for(lambda: "reloaded: 1 rules" in journal_since(svc, mark), "the reload after SIGHUP", 10, svc)
    wait_for(lambda: svc.unit_state(UNIT, "ActiveState")["ActiveState"] == "active", "active again", 10, svc)
    assert connect(svc, BLOCKED) == "refused" and connect(svc, OPEN) == "connected"
    assert svc.unit_state(UNIT, "MainPID")["MainPID"] == pid


def test_journal_holds_the_structured_fields(svc: Container) -> None:
    start(svc)
    mark = cursor(svc)
    assert connect(svc, BLOCKED) == "refused"
    assert connect(svc, RAISES) == "refused"  # the rule_error policy is reset

    def entries() -> list[dict[str, str]]:
        out = svc.run(["journalctl", "-u", UNIT, "-o", "json", f"--after-cursor={mark}"]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def having(field: str, value: str) -> list[dict[str, str]]:
        return [e for e in entries() if e.get(field) == value]

    def rule_errors() -> list[dict[str, str]]:
        # An alert names its rule too (TCPGUARD_RULE, with a TCPGUARD_SEVERITY); the error entry has none.
        return [e for e in having("TCPGUARD_RULE", "test_rules.gate") if "TCPGUARD_SEVERITY" not in e]

    wait_for(rule_errors, "the rule error entry", 10, svc)
    alert = having("TCPGUARD_SEVERITY", "high")
    assert alert, "no journal entry with TCPGUARD_SEVERITY=high for the alert"
    a = alert[0]
    assert a["TCPGUARD_DIRECTION"] == "up" and a["PRIORITY"] == "4" and a["SYSLOG_IDENTIFIER"] == "tcpguard"
    assert f":{BLOCKED}" in a["TCPGUARD_FLOW"] and a["TCPGUARD_FLOW_ID"].isdigit(), a
    verdict = [e for e in having("TCPGUARD_VERDICT", "reset") if f":{BLOCKED}" in e.get("TCPGUARD_FLOW", "")]
    assert verdict, "no journal entry with TCPGUARD_VERDICT=reset for the blocked connection"
    err = rule_errors()[0]
    assert err["PRIORITY"] == "3" and err["TCPGUARD_VERDICT"] == "reset", err
    # Without logging.log_payload the exception's message (which may quote payload) stays out of the
    # journal: the entry names the rule, the exception type and where in the rule module it happened.
    msg = err["MESSAGE"]
    assert "RuntimeError" in msg and "test_rules.py:" in msg and "fails on purpose" not in msg, msg
    # journalctl's own field match finds them, as an operator would search.
    hits = svc.run(["journalctl", "-u", UNIT, "-o", "cat", "TCPGUARD_SEVERITY=high"]).stdout
    assert f"port {BLOCKED} is blocked" in hits
    # Nothing of a LogRecord's internals leaks in as fields.
    assert not any(k in e for e in entries() for k in ("msg", "args", "levelname", "MSG", "ARGS"))
    # Least privilege, as the kernel saw it: a user of its own (DynamicUser), holding only
    # CAP_NET_ADMIN (bit 12) and CAP_NET_RAW (bit 13).
    assert a["_UID"] != "0" and a["_CAP_EFFECTIVE"] == "3000", (a["_UID"], a["_CAP_EFFECTIVE"])


def test_installing_again_upgrades_and_keeps_the_operators_files(svc: Container) -> None:
    """A second install (an upgrade) replaces the program and the unit, never the config or the rules."""
    cfg_before = svc.path("/etc/tcpguard/tcpguard.yaml").read_text()  # edited by the fixture
    rules_before = sorted(p.name for p in svc.path("/etc/tcpguard/rules").iterdir())
    out = svc.run(["/src/scripts/install-service.sh", "--wheelhouse", "/wheels"], timeout=300).stdout
    assert "kept your /etc/tcpguard/tcpguard.yaml" in out, out
    assert svc.path("/etc/tcpguard/tcpguard.yaml").read_text() == cfg_before
    assert svc.path("/etc/tcpguard/tcpguard.yaml.dist").exists()
    assert sorted(p.name for p in svc.path("/etc/tcpguard/rules").iterdir()) == rules_before, (
        "the installer re-added sample rules the operator had removed"
    )
    # Root-owned, nobody else may write: the daemon executes the rule modules.
    loose = svc.run(
        ["find", "/opt/tcpguard", "/etc/tcpguard", "/etc/systemd/system/tcpguard.service",
         "/usr/local/bin/tcpguard", "(", "-perm", "-o+w", "-o", "!", "-user", "root", ")", "!", "-type", "l"]
    ).stdout  # fmt: skip
    assert not loose.strip(), f"writable by others or not owned by root:\n{loose}"
    assert svc.run(["tcpguard", "check", "--config", "/etc/tcpguard/tcpguard.yaml"]).returncode == 0
    start(svc)


def test_a_stalled_packet_loop_is_killed_by_the_watchdog_and_restarted(svc: Container) -> None:
    svc.write(f"/etc/systemd/system/{UNIT}.d/test-watchdog.conf", "[Service]\nWatchdogSec=3\nRestartSec=1\n")
    svc.run(["systemctl", "daemon-reload"])
    start(svc)
    st = svc.unit_state(UNIT, "MainPID", "NRestarts", "WatchdogUSec")
    assert st["NRestarts"] == "0" and st["WatchdogUSec"] == "3s", st
    # A healthy loop pings in time: longer than WatchdogSec without traffic, and nothing happens.
    time.sleep(4)
    now = svc.unit_state(UNIT, "MainPID", "NRestarts")
    assert now == {"MainPID": st["MainPID"], "NRestarts": "0"}, f"an idle daemon was restarted: {now}"
    svc.write("/etc/tcpguard/stall", "")
    mark = cursor(svc)
    assert connect(svc, STALLS, timeout=1) == "timeout"
    wait_for(lambda: "stalling the packet loop" in journal_since(svc, mark), "the rule to stall", 10, svc)
    (svc.path("/etc/tcpguard/stall")).unlink()  # the restarted daemon must not stall again

    def restarted() -> bool:
        now = svc.unit_state(UNIT, "ActiveState", "MainPID", "NRestarts")
        return now["NRestarts"] == "1" and now["ActiveState"] == "active" and now["MainPID"] != st["MainPID"]

    wait_for(restarted, "systemd to kill the stalled daemon and start it again", 30, svc)
    log = journal_since(svc, mark)
    assert "Watchdog timeout" in log, "the restart was not caused by the watchdog"
    assert connect(svc, BLOCKED) == "refused", "the restarted daemon does not filter"
    assert connect(svc, STALLS) == "connected"


def test_stop_removes_the_iptables_rules_and_exits_cleanly(svc: Container) -> None:
    before = rules_snapshot(svc)
    start(svc)
    assert "TCPGUARD" in rules_snapshot(svc)
    svc.run(["systemctl", "stop", UNIT], timeout=60)
    st = svc.unit_state(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert st == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, st
    after = rules_snapshot(svc)
    assert after == before, f"iptables rules left behind:\nbefore:\n{before}\nafter:\n{after}"
    assert "iptables chain TCPGUARD removed" in svc.journal("-u", UNIT)


def test_sandbox_exposure_as_recorded_in_the_docs(svc: Container) -> None:
    """The online figure of the installed unit must not exceed the one docs/service.md records."""
    out = svc.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out[-2000:]
    doc = (REPO / "docs/service.md").read_text()
    recorded = re.search(r"exposure after: \*\*(\d+\.\d+)\*\*", doc)
    assert recorded, "docs/service.md does not record the figure"
    assert float(m.group(1)) <= float(recorded.group(1)), out[-3000:]


def test_legacy_iptables_gets_its_drop_in_and_works(svc: Container) -> None:
    """On a gateway whose iptables is the legacy variant, the installer adds the drop-in that lets the
    daemon take the xtables lock; the service then filters and cleans up as with iptables-nft."""
    alternatives = ("iptables", "ip6tables")
    dropin = f"/etc/systemd/system/{UNIT}.d/50-iptables-legacy.conf"
    try:
        for alt in alternatives:
            svc.run(["update-alternatives", "--quiet", "--set", alt, f"/usr/sbin/{alt}-legacy"])
        out = svc.run(["/src/scripts/install-service.sh", "--wheelhouse", "/wheels"], timeout=300).stdout
        assert f"installed {dropin}" in out, out
        before = rules_snapshot(svc)
        mark = cursor(svc)
        start(svc)
        assert "TCPGUARD" in svc.run(["iptables-legacy", "-w", "-S"]).stdout
        assert connect(svc, BLOCKED) == "refused" and connect(svc, OPEN) == "connected"

        # Filtered here, not with a journalctl field match: that would make the cursor entry unmatched.
        def alert() -> dict[str, str] | None:
            out = svc.run(["journalctl", "-u", UNIT, "-o", "json", f"--after-cursor={mark}"]).stdout
            hits = [e for e in map(json.loads, out.splitlines()) if e.get("TCPGUARD_SEVERITY") == "high"]
            return hits[0] if hits else None

        wait_for(alert, "the alert in the journal", 10, svc)
        entry = alert()
        assert entry is not None
        assert entry["_UID"] == "0" and entry["_CAP_EFFECTIVE"] == "3000", (
            entry["_UID"],
            entry["_CAP_EFFECTIVE"],
        )
        svc.run(["systemctl", "stop", UNIT], timeout=60)
        assert rules_snapshot(svc) == before
    finally:
        for alt in alternatives:
            svc.run(["update-alternatives", "--quiet", "--set", alt, f"/usr/sbin/{alt}-nft"], check=False)
    out = svc.run(["/src/scripts/install-service.sh", "--wheelhouse", "/wheels"], timeout=300).stdout
    assert f"removed {dropin}" in out and not svc.path(dropin).exists(), out
