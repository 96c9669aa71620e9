"""Attacks on TLS bypass (issue 20): making the gateway believe a connection is TLS so that it stops
reading it, and the control case, a real TLS connection, which is bypassed.

The sample shell-code rule stops scanning a connection, and lets it be bypassed, only once both ends
have shown that they speak TLS (tcpguard.tls.TlsEvidence): a real ClientHello answered by a real
ServerHello, then records up to each side's first application data. Each attack is played twice: replayed
through the engine with every sample rule (no root), and live through the daemon in the lab with the
sample rules of `rules/`, `engine.inspection.bypass: true` and the kernel's bypass rules installed,
against a real server application:

* a real ClientHello, then plaintext carrying the pattern, to a plaintext server (silent, or answering
  as a plaintext server does); and the same plaintext dressed as an encrypted record;
* a server that answers the ClientHello with a real ServerHello and then speaks plaintext, the client
  then sending the pattern;
* control: a real TLS 1.2 and 1.3 download (Python's ssl on both ends) IS bypassed once both sides sent
  application data: `tcpguard status` counts it, and the rest of the download never reaches the queue.

The pattern must never reach the server application, and no attack connection may be bypassed.
"""

from __future__ import annotations

import json
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpguard.app.daemon.ruleload import load_rules
from tcpguard.core.decision import Verdict
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings
from tests.app.daemon.test_daemon import wait_for
from tests.app.tcpapps import CLIENT, SERVER
from tests.core.playbook import Playbook
from tests.netns import SERVER_V4, Lab
from tests.rules.samples import client_hello
from tests.tls_exchange import certificate, exchange

from .harness import Guard

ROOT = Path(__file__).resolve().parents[2]
PATTERN = b"/bin/sh"
PORT = 443  # the sample rules' firewall allows it, and both the SNI rule and the scanner read it
ACCEPT, DROP = Verdict.ACCEPT, Verdict.DROP


def first_record(data: bytes) -> bytes:
    return data[: 5 + int.from_bytes(data[3:5], "big")]


HELLO = first_record(client_hello("www.example.org"))  # a real ClientHello (OpenSSL's), SNI allowed


SERVER_HELLO = first_record(exchange()[1][1])  # a real ServerHello (of another connection)


PLAIN = b"GET /run?cmd=" + PATTERN + b" HTTP/1.0\r\n\r\n"
RECORD = b"\x17\x03\x03" + len(PLAIN).to_bytes(2, "big") + PLAIN  # plaintext dressed as a record
ATTACKS = {"plaintext": PLAIN, "dressed-as-a-record": RECORD}


# -- replayed through the engine ------------------------------------------------------------------------
def sample_rules() -> RuleSet:
    return load_rules(ROOT / "rules")


def engine_playbook() -> Playbook:
    st = EngineSettings()
    st.inspection.bypass = True
    pb = Playbook(sample_rules(), st, client="10.77.1.2", server="10.77.2.2", sport=PORT)
    pb.handshake()
    return pb


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["silent", "plaintext"])
@pytest.mark.parametrize("after", ATTACKS.values(), ids=ATTACKS.keys())
def test_replay_fake_client_hello_then_the_pattern(after: bytes, answer: bytes) -> None:
    pb = engine_playbook()
    d = pb.client("PA", HELLO)
    assert (d.verdict, d.bypass) == (ACCEPT, False)
    if answer:
        assert not pb.server("PA", answer).bypass
    d = pb.client("PA", after)
    assert (d.verdict, d.bypass) == (DROP, False)
    assert pb.engine.stats.bypassed == 0 and pb.engine.stats.resets_sent == 2


def test_replay_fake_server_hello_then_plaintext() -> None:
    pb = engine_playbook()
    assert pb.client("PA", HELLO).verdict == ACCEPT
    assert not pb.server("PA", SERVER_HELLO + b"220 plaintext from here on\r\n").bypass
    d = pb.client("PA", b"\x14\x03\x03\x00\x01\x01" + RECORD)
    assert (d.verdict, d.bypass) == (DROP, False)
    assert pb.engine.stats.bypassed == 0


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_replay_real_tls_is_bypassed(version: ssl.TLSVersion) -> None:
    pb = engine_playbook()
    bypassed = []
    for d, data in exchange(version, response=b"r" * 50000):
        for i in range(0, len(data), 1448):
            dec = pb.client("PA", data[i : i + 1448]) if d == "up" else pb.server("PA", data[i : i + 1448])
            assert dec.verdict == ACCEPT
            bypassed.append(dec.bypass)
    assert pb.engine.stats.bypassed == 1
    # In replay, every packet after the bypass is one the daemon would not have seen.
    assert pb.engine.stats.bypass_packets == len(bypassed) - bypassed.index(True) - 1 > 20


# -- live through the daemon ----------------------------------------------------------------------------

TLS_SERVER = r"""
import os, socket, ssl, sys, threading
port, cert, key, version, size, outdir = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.maximum_version = ssl.TLSVersion[version]
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", int(port))); srv.listen(16)
open(os.path.join(outdir, "ready"), "w").close()
def serve(c, k):
    status = "ok"
    try:
        c.settimeout(20)
        s = ctx.wrap_socket(c, server_side=True)
        req = b""
        while b"\r\n\r\n" not in req:
            b = s.recv(4096)
            if not b: break
            req += b
        s.sendall(b"d" * int(size))
        while s.recv(4096): pass
    except Exception as e:
        status = "error:" + type(e).__name__
    with open(os.path.join(outdir, f"{k}.status"), "w") as f: f.write(status)
    c.close()
k = 0
while True:
    c, _ = srv.accept(); k += 1
    threading.Thread(target=serve, args=(c, k), daemon=True).start()
"""

TLS_CLIENT = r"""
import json, socket, ssl, sys
host, port, version, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.maximum_version = ssl.TLSVersion[version]
res = {"version": None, "received": 0, "error": None}
try:
    with socket.create_connection((host, port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="tls.test") as s:
            res["version"] = s.version()
            s.sendall(b"GET / HTTP/1.1\r\nHost: tls.test\r\n\r\n")
            while res["received"] < size:
                b = s.recv(65536)
                if not b: break
                res["received"] += len(b)
except Exception as e:
    res["error"] = repr(e)
print(json.dumps(res))
"""

FAKE_TLS_SERVER = r"""
import os, socket, sys, time
port, hello_hex, outdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", port)); srv.listen(4)
open(os.path.join(outdir, "ready"), "w").close()
c, _ = srv.accept()
c.settimeout(10)
data = bytearray(); status = "eof"
try:
    data += c.recv(65536)                     # the ClientHello
    c.sendall(bytes.fromhex(hello_hex) + b"220 plaintext from here on\r\n")
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
except ConnectionResetError: status = "reset"
except Exception as e: status = "error:" + type(e).__name__
with open(os.path.join(outdir, "1.bin"), "wb") as f: f.write(data)
with open(os.path.join(outdir, "1.status"), "w") as f: f.write(status)
"""


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guard]:
    tmp = tmp_path_factory.mktemp("bypass-tls")
    with Lab() as lab:
        g = Guard(
            lab,
            tmp,
            config={"rules_dir": str(ROOT / "rules"), "engine": {"inspection": {"bypass": True}}},
        )
        g.start_daemon()
        try:
            yield g
        finally:
            if g.daemon is not None and g.daemon.poll() is None:
                g.stop_daemon()


class App:
    """A server application of one case, on PORT; stopped (by pid) when the case ends."""

    def __init__(self, guard: Guard, name: str, program: str, *args: str) -> None:
        self.out = guard.tmp / f"app-{name}"
        self.out.mkdir()
        argv = [a.replace("{out}", str(self.out)) for a in args]
        self.proc = guard.lab.popen("server", [sys.executable, "-c", program, *argv])
        wait_for((self.out / "ready").exists, f"{name} server ready")

    def got(self) -> tuple[bytes, str]:
        wait_for((self.out / "1.status").exists, "the server application's verdict")
        data = (self.out / "1.bin").read_bytes() if (self.out / "1.bin").exists() else b""
        return data, (self.out / "1.status").read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def apps(guard: Guard) -> Iterator[list[App]]:
    started: list[App] = []
    yield started
    for app in started:
        app.stop()


def bypassed(guard: Guard) -> int:
    return int(guard.worker_status()["bypass"]["connections"])


def raw_client(guard: Guard, chunks: list[bytes], gap: float = 0.5) -> dict[str, Any]:
    spec = {"chunks": [c.hex() for c in chunks], "gap": gap, "timeout": 5}
    argv = [sys.executable, "-c", CLIENT, SERVER_V4, str(PORT), json.dumps(spec)]
    r = guard.lab.run("client", argv, timeout=60)
    out: dict[str, Any] = json.loads(r.stdout)
    return out


@pytest.mark.root
@pytest.mark.parametrize("after", ATTACKS.values(), ids=ATTACKS.keys())
def test_live_fake_client_hello_then_the_pattern_to_a_plaintext_server(
    guard: Guard, apps: list[App], after: bytes
) -> None:
    before = bypassed(guard)
    apps.append(app := App(guard, f"plain-{len(after)}", SERVER, str(PORT), "{out}", "0"))
    res = raw_client(guard, [HELLO, after])
    data, status = app.got()
    assert PATTERN not in data, "the server application received the pattern"
    assert data == HELLO and status == "reset"  # the hello went through; the pattern's segment did not
    assert res["error"] is not None  # the client was reset too
    assert bypassed(guard) == before


@pytest.mark.root
def test_live_fake_server_hello_then_plaintext(guard: Guard, apps: list[App]) -> None:
    before = bypassed(guard)
    apps.append(app := App(guard, "fake-hello", FAKE_TLS_SERVER, str(PORT), SERVER_HELLO.hex(), "{out}"))
    res = raw_client(guard, [HELLO, b"\x14\x03\x03\x00\x01\x01" + RECORD])
    data, status = app.got()
    assert PATTERN not in data
    assert data == HELLO and status == "reset"
    assert res["error"] is not None
    assert bypassed(guard) == before


@pytest.mark.root
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_live_real_tls_download_is_bypassed_and_leaves_the_queue(
    guard: Guard, apps: list[App], version: str
) -> None:
    size = 4_000_000
    cert, key = certificate()
    before = bypassed(guard)
    received_before = guard.worker_status()["packets"]["received"]
    app = App(guard, f"tls-{version}", TLS_SERVER, str(PORT), cert, key, version, str(size), "{out}")
    apps.append(app)
    r = guard.lab.run(
        "client", [sys.executable, "-c", TLS_CLIENT, SERVER_V4, str(PORT), version, str(size)], timeout=60
    )
    res = json.loads(r.stdout)
    assert res["error"] is None and res["received"] == size
    assert res["version"] == version.replace("_", ".")
    assert app.got()[1] == "ok"
    wait_for(lambda: bypassed(guard) == before + 1, "the connection counted as bypassed")
    # The daemon saw the handshake and a few packets in flight; the ~2,800 segments of the download went
    # through the kernel (the chain's connmark rule) without reaching the queue.
    seen = guard.worker_status()["packets"]["received"] - received_before
    assert seen < 40, f"the daemon handled {seen} packets of a bypassed 4 MB download"

