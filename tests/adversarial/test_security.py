"""Security of the daemon itself: files other users could write are refused, the control socket answers
root (or a configured group) only, and no payload reaches the logs by default.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.app.daemon.test_daemon import hexs, wait_for

from .conftest import Rig
from .harness import PATTERN, iptables_lines

pytestmark = pytest.mark.root

NOBODY = 65534


# ====================================================================== files others can write
def run_daemon_once(rig: Rig) -> subprocess.CompletedProcess[str]:
    """`tcpguard run` in the gateway namespace, expected to refuse to start."""
    tcpguard = str(Path(sys.executable).parent / "tcpguard")
    return rig.lab.run("gw", [tcpguard, "run", "--config", str(rig.guard.config)], check=False, timeout=20)


@pytest.mark.parametrize("what", ["config", "rule-file", "rules-dir"])
def test_daemon_refuses_files_other_users_can_write(make_rig: Callable[..., Rig], what: str) -> None:
    rig = make_rig(start=False)
    guard = rig.guard
    before = iptables_lines(rig.lab)
    target = {
        "config": guard.config,
        "rule-file": guard.rules_dir / "test_rules.py",
        "rules-dir": guard.rules_dir,
    }[what]
    target.chmod(target.stat().st_mode | 0o002)
    res = run_daemon_once(rig)
    assert res.returncode == 1
    assert f"{target}" in res.stderr and "writable by other users" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert iptables_lines(rig.lab) == before  # nothing installed


def test_daemon_refuses_a_config_owned_by_another_user(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(start=False)
    os.chown(rig.guard.config, NOBODY, -1)
    rig.guard.config.chmod(0o444)  # read-only does not help: its owner can chmod it back
    res = run_daemon_once(rig)
    assert res.returncode == 1 and "owned by uid 65534" in res.stderr, res.stderr


def test_rule_file_owned_by_another_user_is_refused_even_read_only(tmp_path: Path) -> None:
    from tcpguard.app.daemon.ruleload import load_rules
    from tcpguard.core.errors import RuleLoadError

    rules = tmp_path / "rules"
    rules.mkdir()
    mod = rules / "mine.py"
    mod.write_text("from tcpguard import rule\n")
    os.chown(mod, NOBODY, NOBODY)
    mod.chmod(0o444)
    with pytest.raises(RuleLoadError, match="owned by uid 65534"):
        load_rules(rules)


def test_reload_refuses_a_rule_file_made_world_writable(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    guard = rig.guard
    guard.start_server(8950, reply=10)
    rules = guard.rules_dir / "test_rules.py"
    rules.write_text(rules.read_text().replace(repr(PATTERN), repr(b"NEWPATTERN")))
    rules.chmod(0o666)
    assert guard.daemon is not None
    guard.daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in guard.log_text(), "the reload is refused")
    assert "writable by other users" in guard.log_text()
    # The running rules stay: the old pattern is still caught, the new one is not in force.
    assert guard.client([hexs(b"x " + PATTERN)], port=8950)["error"] == "ConnectionResetError"
    assert guard.client([hexs(b"x NEWPATTERN")], port=8950)["error"] is None


# ====================================================================== the control socket
@pytest.fixture
def control_dir() -> Iterator[Path]:
    """A directory everybody may traverse, so that only the socket's own protection is tested."""
    d = Path("/tmp") / f"tg-ctl-{secrets.token_hex(4)}"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


CONNECT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("error:" + type(e).__name__)  # the file system refused the connection
    sys.exit()
data = b""
try:
    s.sendall(b'{"cmd": "status"}\n')
    while not data.endswith(b"\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
except OSError:
    pass
if not data.strip():
    print("closed")  # connected, then the daemon hung up
else:
    resp = json.loads(data)
    print("ok" if resp.get("ok") else "refused:" + str(resp.get("error")))
"""


def as_user(uid: int, gid: int, path: Path, groups: list[int] | None = None) -> str:
    def drop() -> None:
        os.setgroups(groups or [])
        os.setgid(gid)
        os.setuid(uid)

    # The system interpreter: the virtual environment may live where other users cannot reach it.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    res = subprocess.run(
        [python, "-c", CONNECT, str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        cwd="/",
        preexec_fn=drop,
    )
    return res.stdout.strip()


def test_control_socket_answers_root_only(make_rig: Callable[..., Rig], control_dir: Path) -> None:
    sock = control_dir / "control.sock"
    rig = make_rig({"control": {"socket": str(sock)}})
    assert (sock.stat().st_mode & 0o777) == 0o600, oct(sock.stat().st_mode)
    assert as_user(0, 0, sock) == "ok"
    assert as_user(NOBODY, NOBODY, sock) == "error:PermissionError"
    # Loosened by hand, the file no longer protects it: the daemon still refuses by the peer's credentials.
    sock.chmod(0o666)
    answer = as_user(NOBODY, NOBODY, sock)
    assert answer == "closed" or answer.startswith("refused:"), answer  # connected, then refused
    assert rig.guard.daemon is not None and rig.guard.daemon.poll() is None


def test_control_socket_answers_the_configured_group(make_rig: Callable[..., Rig], control_dir: Path) -> None:
    import grp

    group = grp.getgrgid(NOBODY).gr_name if NOBODY in {g.gr_gid for g in grp.getgrall()} else None
    if group is None:
        pytest.skip("no group 65534 on this system")
    sock = control_dir / "control.sock"
    make_rig({"control": {"socket": str(sock), "group": group}})
    assert (sock.stat().st_mode & 0o777) == 0o660 and sock.stat().st_gid == NOBODY
    assert as_user(NOBODY, NOBODY, sock) == "ok"
    assert as_user(NOBODY, 1, sock, groups=[1]) == "error:PermissionError"  # another group


# ====================================================================== payload in logs
CANARY = b"CANARY-" + secrets.token_hex(8).encode()

ALERTING = """

@rule(on=tcp_connection.events.receive_data)
def alerting(flow, stream, current, direction):
    if direction == "up" and b"CANARY" in current.peek(7):
        flow.alert("canary seen", severity="low", direction=direction)
"""

PARSING = """

@rule(on=tcp_connection.events.receive_data)
def parse_length(flow, stream, current, direction):
    if direction == "up" and flow.dstport == 8981:
        int(current.read())  # a typical rule bug: the payload is not a number
"""


def payload_forms(data: bytes) -> list[str]:
    return [data.decode(), data.hex(), repr(data)[2:-1], data.hex(" ")]


def test_no_payload_in_logs_by_default(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(extra_rules=ALERTING)
    guard = rig.guard
    guard.start_server(8980, reply=100)
    assert guard.client([hexs(CANARY + b" plain request")], port=8980)["error"] is None
    assert guard.client([hexs(CANARY + b" " + PATTERN)], port=8980)["error"] == "ConnectionResetError"
    assert guard.client([hexs(b"GET /" + CANARY)], port=8980, gap=0.05)["error"] is None
    time.sleep(0.5)
    assert guard.stop_daemon() == 0
    log = guard.log_text()
    assert "alert [low]" in log and "reset by rule" in log  # the events are logged, without their bytes
    for form in payload_forms(CANARY):
        assert form not in log, f"payload in the log: {form}"


def test_no_payload_in_logs_when_a_rule_fails_on_it(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(extra_rules=PARSING)
    guard = rig.guard
    guard.start_server(8981, reply=100)
    guard.client([hexs(CANARY)], port=8981, timeout=3)
    time.sleep(0.5)
    guard.stop_daemon()
    log = guard.log_text()
    assert "parse_length raised" in log
    for form in payload_forms(CANARY):
        assert form not in log, f"payload in the log: {form}"
