"""The handshake through the real daemon, judged by real Linux stacks (issue 18, section 4).

Each case puts a real Linux TCP socket on one side (the kernel of the client or of the server namespace,
driven from this process through `setns`) and a hand-made peer on the other (raw sockets, segments built
with scapy), so the peer can send what no listener sends: a forged RST/ACK in SYN-SENT, a bare SYN in
answer to a SYN (the split handshake), crossed SYNs (simultaneous open). The kernel decides what it
accepts; the test checks that the gateway agreed with it:

* H1 (suricata-verify bug-3286): an RST/ACK that acknowledges the SYN but echoes a timestamp the client
  never sent. Linux's SYN-SENT discards it; the gateway used to close on it, pass the real SYN-ACK that
  followed into a closed entry and then drop every data segment of the connection. The control case
  (the echo of the SYN's own TSval) shows the kernel does accept a fitting one.
* H2 (a forged SYN-ACK in SYN-SENT fixing the server's ISN at the gateway) is a playbook case only
  (tests/core/test_handshake.py).
* H3: an exact RST from the client to a Linux server's half-open connection that the server discards
  (its ACK is not the server's ISN+1, or its TSval is older than the SYN's): the gateway used to close
  on it and then drop the request that the server was still waiting for.
* H4 (the split handshake, Beardsley and Qian): the server answers the SYN with a SYN, the Linux client
  answers with a SYN-ACK, the server ends with an ACK. The gateway used to drop the server's SYN, so the
  connection never opened; now it opens, and the client stays the client: the rule that scans 'up' reads
  the bytes that reach the server (the attack swaps the roles for devices that take the SYN-ACK's sender
  for the server).
* H5 (simultaneous open): both ends send a SYN; the Linux end answers the crossed SYN with a SYN-ACK.

The hand-made server side needs the server kernel's own RSTs silenced (it has no socket for the hand-made
connection): a marked-RST filter like the client's, installed for the case and removed after it.
"""

from __future__ import annotations

import contextlib
import errno
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP

from tests.netns import CLIENT_V4, SERVER_V4, Lab

from .conftest import Rig
from .harness import PATTERN
from .stack import _ETH_P_ALL, _SO_MARK, MARK, MASK, ClientNet, Conn, Seg, netns
from .test_evasion import EVIL, GOOD

pytestmark = pytest.mark.root

_next_port = random.randint(8600, 8800)


def free_port() -> int:
    """A server port no server application listens on (the cases' hand-made servers and sockets)."""
    global _next_port
    _next_port += 1
    return _next_port


class ServerNet(ClientNet):
    """`ClientNet`, in the server namespace: raw marked senders and a receiver on the server's interface,
    keeping the segments addressed to the ports it watches."""

    def __init__(self, lab: Lab) -> None:  # the set-up of ClientNet's, in the other namespace
        self.lab = lab
        with netns(lab.name("server")):
            self._tx4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._tx6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
            self._rx.bind(("eth0", _ETH_P_ALL))
        for s in (self._tx4, self._tx6, self._rx):
            s.setsockopt(socket.SOL_SOCKET, _SO_MARK, MARK)
        self._gw_mac = None
        self._next_port = 0
        self._tx4.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self._rx.settimeout(0.1)
        self._lock = threading.Condition()
        self._segs: dict[int, list[Seg]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._receive, name="server-rx", daemon=True)
        self._thread.start()


RST_FILTER = ["OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-m", "mark", "!", "--mark", str(MARK)]


@contextlib.contextmanager
def hand_made_server(rig: Rig) -> Iterator[ServerNet]:
    """Raw sockets in the server namespace, with the server kernel's own RSTs dropped meanwhile."""
    rig.lab.run("server", ["iptables", "-w", "-I", *RST_FILTER, "-j", "DROP"])
    srv = ServerNet(rig.lab)
    try:
        yield srv
    finally:
        srv.close()
        rig.lab.run("server", ["iptables", "-w", "-D", *RST_FILTER, "-j", "DROP"])


def kernel_socket(lab: Lab, role: str) -> socket.socket:
    """A non-blocking TCP socket of the kernel in `role`'s namespace."""
    with netns(lab.name(role)):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    return s


def connected(s: socket.socket, timeout: float) -> int:
    """Wait for a non-blocking connect: 0 once it connected, else the error (ETIMEDOUT if still going)."""
    _, w, _ = select.select([], [s], [], timeout)
    if not w:
        return errno.ETIMEDOUT
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def recv_all(s: socket.socket, timeout: float) -> tuple[bytes, str]:
    """What a socket reads until EOF, a reset or `timeout`, and how it ended ('eof', 'reset', 'timeout')."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), "timeout"
        r, _, _ = select.select([s], [], [], left)
        if not r:
            continue
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return bytes(out), "reset"
        if not chunk:
            return bytes(out), "eof"
        out += chunk


def seg(
    src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int, data: bytes = b"", **kw: Any
) -> bytes:
    """An IPv4 TCP segment as bytes (sequence numbers taken modulo 2^32)."""
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq & MASK, ack=ack & MASK, **kw)
    pkt = IP(src=src, dst=dst) / tcp
    return bytes(pkt / data if data else pkt)


def payload_to(srv: ServerNet, port: int, cport: int) -> bytes:
    """Every payload byte that reached the server namespace from the client port, by sequence order."""
    got = sorted({(s.seq, s.payload) for s in srv.segments(port) if s.sport == cport and s.payload})
    return b"".join(p for _, p in got)


# ---------------------------------------------------------------------------- H1: RST/ACK in SYN-SENT


@pytest.mark.parametrize("fits", [False, True], ids=["wrong-echo", "echo-of-the-syn"])
def test_rst_ack_with_a_timestamp_echo_in_syn_sent(rig: Rig, fits: bool) -> None:
    port = free_port()
    with hand_made_server(rig) as srv:
        srv.watch(port)
        client = kernel_socket(rig.lab, "client")
        try:
            client.connect_ex((SERVER_V4, port))
            cport = client.getsockname()[1]
            syn = srv.wait(port, lambda s: s.sport == cport and s.has("S"), 2.0)
            assert syn is not None and syn.tsval, "the client's SYN (with a timestamp) did not arrive"
            echo = syn.tsval if fits else (syn.tsval - 100_000) & MASK
            opts = [("Timestamp", (4242, echo))]
            srv.send(seg(SERVER_V4, CLIENT_V4, port, cport, "RA", 0, syn.seq + 1, options=opts))
            time.sleep(0.2)
            sisn = random.randint(0, MASK)
            synack_opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (4300, syn.tsval))]
            srv.send(seg(SERVER_V4, CLIENT_V4, port, cport, "SA", sisn, syn.seq + 1, options=synack_opts))
            err = connected(client, 2.0)
            if fits:
                # The kernel took the RST: the connection was refused, and the gateway ended it too.
                assert err == errno.ECONNREFUSED, errno.errorcode.get(err, err)
                assert rig.guard.end_reasons(cport) == ["rst"]
                return
            assert err == 0, f"the client did not connect: {errno.errorcode.get(err, err)}"
            client.send(GOOD)
            data = srv.wait(port, lambda s: s.sport == cport and bool(s.payload), 2.0)
            assert data is not None, "the client's data never reached the server: the gateway dropped it"
            assert payload_to(srv, port, cport) == GOOD
            assert rig.guard.rule_saw(cport) == (GOOD, None)
        finally:
            client.close()


# ---------------------------------------------------------------------------- H3: RST to a half-open server


@pytest.mark.parametrize("kind", ["wrong-ack", "old-tsval", "control"])
def test_client_rst_to_a_half_open_linux_server(rig: Rig, kind: str) -> None:
    """Between the server's SYN-ACK and the client's ACK, an exact-sequence RST that a listening Linux
    server discards: its ACK is not the server's ISN+1 (the listener gets it and drops an RST), or its
    TSval is older than the SYN's (PAWS in tcp_check_req). The gateway used to close on both, then passed
    the client's ACK into the closed entry and dropped the request. Control: a fitting RST, which the
    server takes (the application never sees the connection)."""
    port = rig.guard.new_server()
    c = Conn(rig.net, SERVER_V4, port, timestamps=True)
    rig.net.send(c.syn_packet())
    synack = rig.net.wait(c.sport, lambda s: s.has("SA"), 3.0)
    assert synack is not None
    c.server_isn = synack.seq
    if kind == "wrong-ack":
        c.send("RA", 0, ack=(synack.seq + 5) & MASK)
    elif kind == "old-tsval":
        c.send("RA", 0, tsval=(c.ts - 1000) & MASK)
    else:
        c.send("RA", 0)
    time.sleep(0.2)
    c.send("A")
    time.sleep(0.05)
    if kind != "control":
        c.send("PA", 0, GOOD)
    if kind == "control":
        # The server dropped its half-open connection: its listener answers the ACK with an RST.
        assert c.reset_seen(1.0), "the server did not take the fitting RST"
        assert rig.guard.end_reasons(c.sport) == ["rst"]
        assert rig.guard.server_got(port, timeout=1.0)[0] == b""
    else:
        assert c.wait_acked(len(GOOD)), "the server never acknowledged the request: the gateway dropped it"
        assert c.finish(len(GOOD))
        assert rig.guard.server_got(port) == (GOOD, "eof")
        assert rig.guard.rule_saw(c.sport) == (GOOD, None)
    rig.guard.release_server(port)


# ---------------------------------------------------------------------------- H4: the split handshake


@pytest.mark.parametrize("request_", [GOOD, EVIL], ids=["harmless", "pattern"])
def test_split_handshake_opens_and_the_client_stays_the_client(rig: Rig, request_: bytes) -> None:
    port = free_port()
    with hand_made_server(rig) as srv:
        srv.watch(port)
        client = kernel_socket(rig.lab, "client")
        try:
            client.connect_ex((SERVER_V4, port))
            cport = client.getsockname()[1]
            syn = srv.wait(port, lambda s: s.sport == cport and s.has("S"), 2.0)
            assert syn is not None
            sisn = random.randint(0, MASK)
            # The server's own SYN, no ACK, no timestamp (so none is negotiated).
            srv.send(seg(SERVER_V4, CLIENT_V4, port, cport, "S", sisn, 0, options=[("MSS", 1460)]))
            synack = srv.wait(port, lambda s: s.sport == cport and s.has("SA"), 2.0)
            assert synack is not None, "the client's SYN-ACK never came: the gateway dropped the server's SYN"
            assert (synack.seq, synack.ack) == (syn.seq, (sisn + 1) & MASK)
            srv.send(seg(SERVER_V4, CLIENT_V4, port, cport, "A", sisn + 1, syn.seq + 1))
            assert connected(client, 2.0) == 0
            client.send(request_)
            if request_ == EVIL:
                got, how = recv_all(client, 2.0)
                assert how == "reset", f"the client was not reset ({how})"
                # The rule read the request as 'up' (the client's stream) and reset before it passed.
                assert rig.guard.rule_saw(cport) == (EVIL, 0)
                time.sleep(0.2)
                assert PATTERN not in payload_to(srv, port, cport)
                assert srv.wait(port, lambda s: s.sport == cport and s.has("R"), 1.0) is not None
                return
            data = srv.wait(port, lambda s: s.sport == cport and bool(s.payload), 2.0)
            assert data is not None and payload_to(srv, port, cport) == GOOD
            assert rig.guard.rule_saw(cport) == (GOOD, None)
            reply = b"HTTP/1.0 200 OK\r\n\r\nsplit"
            acked = syn.seq + 1 + len(GOOD)
            srv.send(seg(SERVER_V4, CLIENT_V4, port, cport, "PA", sisn + 1, acked, data=reply))
            srv.send(seg(SERVER_V4, CLIENT_V4, port, cport, "FA", sisn + 1 + len(reply), acked))
            got, how = recv_all(client, 2.0)
            assert (got, how) == (reply, "eof")
        finally:
            client.close()


# ---------------------------------------------------------------------------- H5: simultaneous open


@pytest.mark.parametrize("request_", [GOOD, EVIL], ids=["harmless", "pattern"])
def test_simultaneous_open_with_a_linux_end(rig: Rig, request_: bytes) -> None:
    port = free_port()
    a = Conn(rig.net, SERVER_V4, port)
    # The hand-made end's first SYN passes the gateway (which makes it the client) but not the server
    # namespace's input, so that the Linux end connects first and the SYNs cross.
    hold = ["INPUT", "-p", "tcp", "--syn", "-s", CLIENT_V4, "--sport", str(a.sport), "--dport", str(port)]
    rig.lab.run("server", ["iptables", "-w", "-I", *hold, "-j", "DROP"])
    b = kernel_socket(rig.lab, "server")
    held = True
    try:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        b.bind((SERVER_V4, port))
        rig.net.send(a.syn_packet())
        time.sleep(0.1)
        b.connect_ex((CLIENT_V4, a.sport))
        bsyn = rig.net.wait(a.sport, lambda s: s.has("S") and not s.has("A"), 2.0)
        assert bsyn is not None, "the Linux end's SYN never came: the gateway dropped it"
        rig.lab.run("server", ["iptables", "-w", "-D", *hold, "-j", "DROP"])
        held = False
        rig.net.send(a.syn_packet())  # the retransmitted SYN now reaches the Linux end in SYN-SENT
        bsynack = rig.net.wait(a.sport, lambda s: s.has("SA"), 2.0)
        assert bsynack is not None, "the Linux end did not answer the crossed SYN"
        assert (bsynack.seq, bsynack.ack) == (bsyn.seq, (a.isn + 1) & MASK)
        a.server_isn = bsyn.seq
        a.send("SA", seq=a.isn, ack=(bsyn.seq + 1) & MASK)
        assert connected(b, 2.0) == 0
        a.send("PA", 0, request_)
        got, how = recv_all(b, 1.0)
        saw = rig.guard.rule_saw(a.sport)
        if request_ == EVIL:
            assert PATTERN not in got and how == "reset", (got, how)
            assert saw == (EVIL, 0)
            assert a.reset_seen(1.0)
        else:
            assert got == GOOD and saw == (GOOD, None), (got, how, saw)
            a.abort(len(GOOD))
    finally:
        if held:
            rig.lab.run("server", ["iptables", "-w", "-D", *hold, "-j", "DROP"])
        b.close()
