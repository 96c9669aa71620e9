"""`tcpguard lab` and the docker-compose topology.

The root tests run the real command (namespaces, the daemon, the scripted mix) and check that every
scenario went as the sample rules say and that nothing is left behind, also after Ctrl-C and SIGTERM; the
docker entrypoint is run role by role in the namespace lab, since no Docker engine runs here. The rest runs
anywhere: the lab's servers and client over loopback, the observer rule through the engine, and the
compose file through `docker compose config` (or `docker-compose config`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcpguard.app.daemon.ruleload import load_rules, rule_files
from tcpguard.devtools import lab
from tcpguard.devtools.labnet import SERVER_V4, Lab
from tests.core.playbook import Playbook

ROOT = Path(__file__).resolve().parents[2]
TCPGUARD = str(Path(sys.executable).parent / "tcpguard")

EXPECTED = {
    "web": "allowed",
    "web6": "allowed",
    "tls": "allowed",
    "telnet": "reset",
    "shellcode": "reset",
    "http_host": "halfreset",
    "tls_sni": "reset",
    "xmas": "drop",
    "synurg": "drop",
    "burst": "limited",
}


# ------------------------------------------------------------------------------------ helpers


def namespaces(text: str) -> set[str]:
    return set(re.findall(r"tglab-[0-9a-f]{8}-(?:client|gw|server)", text))


def live_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return namespaces(out)


def processes_mentioning(token: str) -> list[int]:
    """Processes whose command line contains `token` (the lab's work directory is in all of its own)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in cmdline:
            pids.append(int(d.name))
    return pids


def assert_nothing_left(output: str, work: Path) -> None:
    made = namespaces(output)
    assert len(made) == 3, output
    assert not made & live_namespaces()
    assert processes_mentioning(str(work)) == []


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> str:
    """Read the lab's output until a line matches `pattern`; everything read so far."""
    assert proc.stdout is not None
    seen: list[str] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if re.search(pattern, line):
                done.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    assert done.wait(timeout), "".join(seen)
    return "".join(seen)


# ------------------------------------------------------------------------------------ the real lab


@pytest.mark.root
def test_lab_runs_the_mix_with_the_sample_rules_and_leaves_nothing_behind(tmp_path: Path) -> None:
    work, report = tmp_path / "work", tmp_path / "report.json"
    res = subprocess.run(
        [TCPGUARD, "lab", "--out", str(work), "--report", str(report), "--no-colour"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    results = {r["key"]: r for r in json.loads(report.read_text())["results"]}
    assert {k: r["outcome"] for k, r in results.items()} == EXPECTED, out
    assert all(r["ok"] for r in results.values())
    # Each blocked connection names the rule's alert; the allowed ones none.
    assert results["telnet"]["alerts"] == ["[low] connection to port 23 not allowed"]
    assert results["http_host"]["alerts"] == ["[medium] HTTP request to blocked host blocked.example"]
    assert results["tls_sni"]["alerts"] == ["[medium] TLS connection to blocked server name tracker.example"]
    assert results["xmas"]["alerts"][0].startswith("[medium] Xmas scan from 10.77.1.2")
    assert results["web"]["alerts"] == results["tls"]["alerts"] == []
    # What each end saw agrees with the verdict.
    (shell,) = results["shellcode"]["connections"]
    assert shell["error"] == "reset" and shell["server"]["status"] == "reset"
    assert b"/bin/sh" not in shell["server"]["head"].encode("latin-1")
    (half,) = results["http_host"]["connections"]
    assert half["error"] == "timeout" and half["connected"] and half["server"]["status"] == "reset"
    assert results["xmas"]["connections"][0]["answer"] is None  # a closed port would have answered RST
    # The lab's TLS stand-in answers the hello with an alert, not a ServerHello: the shell-code rule
    # judged the connection "not TLS" (False) and scans it on (rules/shellcode.py).
    assert results["tls"]["connections"][0]["gateway"]["store"] == {
        "sni": "www.example.org",
        "shellcode.tls": False,
    }
    burst = results["burst"]["connections"]
    assert {c["gateway"]["reason"] for c in burst} == {"fin", "drop"}
    assert "10 of 10 as expected" in out
    assert "exited 0, its iptables rules removed" in out
    assert_nothing_left(out, work)


@pytest.mark.root
def test_ctrl_c_during_the_mix_tears_everything_down(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [TCPGUARD, "lab", "--out", str(work), "--no-colour"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        seen = read_until(proc, r"HTTP GET / on port 80 ")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = seen + rest
    assert proc.returncode == 130, out
    assert "interrupted: everything the lab made is removed" in out
    assert_nothing_left(out, work)


@pytest.mark.root
def test_sigterm_while_the_lab_stays_up_tears_everything_down(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [TCPGUARD, "lab", "--stay", "--only", "web", "--only", "telnet", "--out", str(work), "--no-colour"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        seen = read_until(proc, r" connections --config ")
        gw = next(n for n in namespaces(seen) if n.endswith("-gw"))
        chain = subprocess.run(["ip", "netns", "exec", gw, "iptables", "-w", "-S", "TCPGUARD"],
                               capture_output=True, text=True, check=False)  # fmt: skip
        assert "NFQUEUE" in chain.stdout
        # The status and connections commands it prints work as pasted, from the host.
        for command in ("status", "connections"):
            line = next(x for x in seen.splitlines() if f" {command} --config " in x)
            r = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode == 0, (line, r.stderr)
            assert r.stdout.startswith("tcpguard " if command == "status" else "ID "), r.stdout
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = seen + rest
    assert proc.returncode == 143, out
    assert "SIGTERM: everything the lab made is removed" in out
    assert "stopping tcpguard ... exited 0" in out
    assert_nothing_left(out, work)


@pytest.mark.root
def test_docker_entrypoint_roles_run_the_same_topology_in_namespaces(lab: Lab, tmp_path: Path) -> None:
    """docker/entrypoint.sh, role by role, in the namespace lab: gateway, server, then the client's mix."""
    shared = tmp_path / "lab"
    config = tmp_path / "tcpguard.yaml"
    text = (ROOT / "docker" / "tcpguard.yaml").read_text()
    text = text.replace("/etc/tcpguard/rules", str(tmp_path / "rules"))
    text = text.replace("/var/lib/tcpguard-lab", str(shared))
    text = text.replace("/run/tcpguard/control.sock", str(tmp_path / "control.sock"))
    config.write_text(text)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TCPGUARD_LAB_DIR": str(shared),
        "TCPGUARD_CONFIG": str(config),
        "TCPGUARD_RULES": str(tmp_path / "rules"),
        "TCPGUARD_SAMPLES": str(ROOT / "rules"),
    }
    entry = str(ROOT / "docker" / "entrypoint.sh")
    log = open(tmp_path / "gateway.log", "w")  # noqa: SIM115 - closed with the process
    gateway = lab.popen("gw", [entry, "gateway"], env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 30
    while lab.run("gw", ["iptables", "-w", "-S", "TCPGUARD"], check=False).returncode != 0:  # the healthcheck
        assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
        time.sleep(0.1)
    server_env = {**env, "TCPGUARD_LAB_ROUTE": "10.77.1.0/24", "TCPGUARD_LAB_GATEWAY": "10.77.2.1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    lab.popen("server", [entry, "server"], env=server_env, **quiet)
    client_env = {**env, "TCPGUARD_LAB_ROUTE": "10.77.2.0/24", "TCPGUARD_LAB_GATEWAY": "10.77.1.1",
                  "TCPGUARD_LAB_SERVER": SERVER_V4}  # fmt: skip
    argv = [entry, "client", "--only", "web", "--only", "shellcode", "--only", "xmas", "--no-colour"]
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    client = lab.popen("client", argv, env=client_env, **piped)
    out = read_until(client, r"^client: done", timeout=60)
    assert "3 of 3 as expected" in out, out
    assert re.search(r"✔ allowed .*HTTP GET / on port 80", out)
    assert re.search(r"✔ reset .*'/bin/sh' split", out)
    assert re.search(r"✔ drop .*Xmas scan", out)
    assert "route: 10.77.2.0/24 via 10.77.1.1" in out
    # SIGTERM to the gateway (what `docker compose down` sends): tcpguard removes its chain and exits 0.
    gateway.send_signal(signal.SIGTERM)
    assert gateway.wait(30) == 0
    assert lab.run("gw", ["iptables", "-w", "-S", "TCPGUARD"], check=False).returncode != 0
    # The gateway's log says which core runs, first from the entrypoint, then in the daemon's running line.
    import tcpguard.core

    log_text = (tmp_path / "gateway.log").read_text()
    assert log_text.startswith(f"gateway: tcpguard {tcpguard.__version__} ({tcpguard.core.MODE} core)\n")
    assert re.search(rf"running: queue 0, \d+ rules, core {re.escape(tcpguard.core.MODE)}\n", log_text)


# ------------------------------------------------------------------------------------ lab clean

# A lab in a process of its own, as `tcpguard lab --stay` in another terminal is: it builds the network,
# leaves a process inside the server namespace, says what it made, and keeps it all until its stdin closes.
LAB_OWNER = """
import json, sys
from tcpguard.devtools.labnet import Lab
with Lab(sys.argv[1]) as lab:
    sleeper = lab.popen("server", ["sleep", "600"])
    print(json.dumps({"id": lab.id, "ns": sorted(lab.ns.values()), "sleeper": sleeper.pid}), flush=True)
    sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _prefix_namespaces(prefix: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split(" ")[0] for line in out.splitlines() if line.startswith(f"{prefix}-")}


@pytest.fixture
def two_labs() -> Any:
    """Two labs of a prefix of their own, each run by its own process; the second one's process is then
    killed with SIGKILL, which leaves its namespaces and the process inside them behind. Also a namespace
    of the prefix with no lab record (made by hand, or by a version that kept none). Everything is
    removed afterwards, by pid and by name, also when the test fails."""
    from tcpguard.devtools import labnet

    prefix = f"tgc{os.urandom(2).hex()}"
    owners: list[subprocess.Popen[str]] = []
    labs: list[dict[str, Any]] = []
    bare = f"{prefix}-{os.urandom(4).hex()}-client"
    try:
        for _ in range(2):
            owner = subprocess.Popen([sys.executable, "-c", LAB_OWNER, prefix], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
            owners.append(owner)
            assert owner.stdout is not None
            labs.append(json.loads(owner.stdout.readline()))
        running, dead = labs
        owners[1].kill()
        owners[1].wait(10)
        assert _alive(dead["sleeper"])  # an orphan now: a lab killed this way leaves its processes behind
        subprocess.run(["ip", "netns", "add", bare], check=True)
        yield prefix, running, dead, bare, owners[0]
    finally:
        for owner in owners:
            if owner.poll() is None:
                owner.kill()
                owner.wait(10)
        for info in labs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info["sleeper"], signal.SIGKILL)
        for name in _prefix_namespaces(prefix):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        for path in labnet.RECORDS.glob(f"*{prefix}-*"):
            path.unlink(missing_ok=True)


def _assert_running_lab_intact(running: dict[str, Any], owner: subprocess.Popen[str]) -> None:
    assert owner.poll() is None
    assert set(running["ns"]) <= _prefix_namespaces(running["id"].split("-")[0])
    assert _alive(running["sleeper"])
    # Still a working network: the client reaches the server through the gateway (a closed port's RST
    # comes back; with the network gone the connect would fail otherwise or time out).
    client = next(n for n in running["ns"] if n.endswith("-client"))
    probe = (
        f"import socket\ntry: socket.create_connection(({SERVER_V4!r}, 9), timeout=5)\n"
        "except OSError as e: print(e)"
    )
    r = subprocess.run(["ip", "netns", "exec", client, sys.executable, "-c", probe], capture_output=True,
                       text=True, timeout=30, check=False)  # fmt: skip
    assert "Connection refused" in r.stdout, r.stdout + r.stderr


@pytest.mark.root
def test_remove_leftovers_keeps_a_running_lab_and_removes_a_killed_one(two_labs: Any) -> None:
    from tcpguard.devtools import labnet

    prefix, running, dead, bare, owner = two_labs
    assert labnet.leftovers(prefix) == sorted([*dead["ns"], bare])
    removed = labnet.remove_leftovers(prefix)
    assert sorted(removed) == sorted([*dead["ns"], bare])
    assert _prefix_namespaces(prefix) == set(running["ns"])
    assert not _alive(dead["sleeper"])
    assert not list(labnet.RECORDS.glob(f"{dead['id']}*"))
    _assert_running_lab_intact(running, owner)
    assert labnet.running_labs(prefix) == {running["id"]: owner.pid}
    # Cleaning again finds nothing more to do; the lab, once its process ends it, leaves nothing.
    assert labnet.remove_leftovers(prefix) == []
    _assert_running_lab_intact(running, owner)
    assert owner.stdin is not None
    owner.stdin.close()
    assert owner.wait(30) == 0
    assert _prefix_namespaces(prefix) == set()
    assert not list(labnet.RECORDS.glob(f"{prefix}-*"))


@pytest.mark.root
def test_lab_clean_command_keeps_a_running_lab_and_says_so(two_labs: Any) -> None:
    prefix, running, dead, bare, owner = two_labs
    r = subprocess.run([TCPGUARD, "lab", "clean", "--prefix", prefix], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    gone = ", ".join(sorted([*dead["ns"], bare]))
    assert r.stdout.startswith(f"removed 4 namespace(s): {gone}\n"), r.stdout
    assert f"kept {running['id']}-*: still running (process {owner.pid})" in r.stdout
    assert _prefix_namespaces(prefix) == set(running["ns"])
    assert not _alive(dead["sleeper"])
    _assert_running_lab_intact(running, owner)


def test_lab_clean_refuses_a_bad_prefix() -> None:
    r = subprocess.run([TCPGUARD, "lab", "clean", "--prefix", "Bad-One"], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2
    assert "namespace prefix 'Bad-One': 1 to 8 lower-case letters and digits" in r.stderr


# ------------------------------------------------------------------------------------ no root needed


def test_lab_servers_and_client_over_loopback(tmp_path: Path) -> None:
    record = tmp_path / "server.jsonl"
    servers = lab.Servers([0, 0], record)
    servers.listen()
    http_port, tls_port = (s.getsockname()[1] for s in servers.sockets)
    threading.Thread(target=servers.serve_forever, daemon=True).start()
    web = lab.tcp_exchange("127.0.0.1", http_port, [b"GET / HT", b"TP/1.1\r\nHost: x\r\n\r\n"], gap=0.05)
    assert web["error"] is None and web["head"] == "HTTP/1.1 200 OK"
    assert web["received"] == len(lab.HTTP_REPLY)
    tls = lab.tcp_exchange("127.0.0.1", tls_port, [lab.client_hello("www.example.org")])
    assert tls["error"] is None and tls["head"] == "TLS alert 40"
    refused = lab.tcp_exchange("127.0.0.1", 1, [b"x"])
    assert refused["error"] == "refused" and not refused["connected"]
    view = lab.GatewayView(None, None, record)
    seen = view.server_saw(web["cport"], http_port)
    assert seen is not None and seen["status"] == "replied" and seen["received"] == 27
    assert seen["head"].startswith("GET / HTTP/1.1")
    tls_seen = view.server_saw(tls["cport"], tls_port)
    assert tls_seen is not None and tls_seen["received"] == len(lab.client_hello("www.example.org"))


def test_observer_rule_records_how_each_connection_ended(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    names = lab.prepare_rules(tmp_path / "rules", ROOT / "rules", events)
    assert names == [p.stem for p in rule_files(ROOT / "rules")]
    rules = load_rules(tmp_path / "rules")
    assert "zz_lab_observer.lab_observer" in rules.names()
    pb = Playbook(rules=rules, sport=80)
    pb.handshake()
    pb.client("PA", b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n")
    telnet = Playbook(engine=pb.engine, sport=23, cport=40001)
    telnet.client("S")
    recs = lab.read_jsonl(events)
    assert [(r["sport"], r["reason"], r["store"]) for r in recs] == [
        (80, "halfreset", {"host": "blocked.example"}),
        (23, "reset", {}),
    ]
    view = lab.GatewayView(events, None, None)
    view.since = 0
    found = view.end(40001, 23, wait=0)
    assert found is not None and found["reason"] == "reset"
    assert view.end(40002, 23, wait=0) is None


def test_the_mix_exercises_every_sample_rule() -> None:
    samples = {p.stem for p in rule_files(ROOT / "rules")}
    assert {sc.rule for sc in lab.SCENARIOS if sc.rule} == samples
    assert {sc.key: sc.expect for sc in lab.SCENARIOS} == EXPECTED


def test_lab_without_root_says_so(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    args = argparse.Namespace(lab_command=None, list=False, rules=None, stay=False, out=None, report=None,
                              only=None, colour=False)  # fmt: skip
    assert lab.cmd_lab(args) == 1
    assert "needs root" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ docker-compose


def compose_validator() -> list[str] | None:
    """`docker compose` (the v2 plugin) if it works here, else `docker-compose` (v1), else None."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_validates() -> None:
    validator = compose_validator()
    if validator is None:
        pytest.skip("no compose validator: neither `docker compose` nor `docker-compose` (scripts/install.sh "
                    "installs Debian's docker-compose)")  # fmt: skip
    res = subprocess.run([*validator, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    argv = [*validator, "-f", str(ROOT / "docker-compose.yml"), "config"]
    full = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, check=True).stdout
    services = yaml.safe_load(full)["services"]
    assert set(services) == {"client", "gateway", "server"}


def test_compose_topology_and_image_agree() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    gw = services["gateway"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(gw["cap_add"])
    assert gw["sysctls"]["net.ipv4.ip_forward"] == "1"
    assert set(gw["networks"]) == {"clientnet", "servernet"}
    assert set(services["client"]["networks"]) == {"clientnet"}
    assert set(services["server"]["networks"]) == {"servernet"}
    assert all(n["internal"] for n in compose["networks"].values())  # nothing leaves the host
    # The client and server route to each other through the gateway's addresses.
    gw_addr = {net: cfg["ipv4_address"] for net, cfg in gw["networks"].items()}
    assert services["client"]["environment"]["TCPGUARD_LAB_GATEWAY"] == gw_addr["clientnet"]
    assert services["server"]["environment"]["TCPGUARD_LAB_GATEWAY"] == gw_addr["servernet"]
    server_addr = services["server"]["networks"]["servernet"]["ipv4_address"]
    assert services["client"]["environment"]["TCPGUARD_LAB_SERVER"] == server_addr
    # Every file the Dockerfile copies exists and gets past the build context filter.
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, src
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)
    r = subprocess.run(["sh", "-n", str(ROOT / "docker" / "entrypoint.sh")], capture_output=True, check=False)
    assert r.returncode == 0, r.stderr
    # The gateway's config is a valid tcpguard config.
    from tcpguard.app.daemon.config import parse_config

    cfg = parse_config((ROOT / "docker" / "tcpguard.yaml").read_text(), "/etc/tcpguard/tcpguard.yaml")
    assert cfg.queue.bypass is False and cfg.iptables.hooks == ["FORWARD"]
