"""Playbook tests of the tracker against the endpoints' own acceptance rules (issue 18, section 4).

The tracker must not be easier to fool than the stacks it sits between: a segment the receiver would
discard must not change the gateway's idea of the connection (else one forged packet makes the gateway
close, or drop the real handshake, while the endpoints carry on), and a handshake the stacks accept
(simultaneous open, the split handshake) must work through the gateway, with the rules seeing each
direction's bytes as its receiver gets them.

Timestamps are in the client's SYN unless a test says otherwise; Linux's SYN-SENT check
(tcp_rcv_synsent_state_process) takes an RST/ACK or SYN-ACK only if its ACK is exactly ISS+1 and, when it
carries the timestamp option, a non-zero echo lies between the first SYN's TSval and the client's clock.
"""

from __future__ import annotations

import struct

import pytest

from tcpguard.core.decision import Verdict
from tcpguard.core.state import State

from .playbook import Playbook, syn_options
from .test_engine import MD5, Recorder, conn_of, signed_syn

ACCEPT, DROP = Verdict.ACCEPT, Verdict.DROP

TS1 = 1_000_000  # the client's first SYN's TSval


def ts(val: int, ecr: int) -> bytes:
    """The timestamp option, NOP-padded to a 4-byte boundary."""
    return b"\x01\x01\x08\x0a" + struct.pack("!II", val, ecr)


def syn_ts(val: int, ecr: int = 0) -> bytes:
    return syn_options() + ts(val, ecr)


def client_syn(pb: Playbook, tsval: int | None = TS1) -> None:
    opts = syn_options() if tsval is None else syn_ts(tsval)
    assert pb.client("S", options=opts).verdict == ACCEPT


# ---------------------------------------------------------------------------- RST in SYN-SENT


def test_forged_rst_ack_with_a_wrong_timestamp_echo_is_dropped_and_the_handshake_lives() -> None:
    """suricata-verify bug-3286: an RST/ACK that acknowledges the SYN but echoes a timestamp the client
    never sent. Linux discards it (PAWSActiveRejected); the gateway used to close on it and then drop the
    real SYN-ACK."""
    rec = Recorder()
    pb = Playbook(rec.rules)
    client_syn(pb)
    forged = pb.server("RA", seq=0, ack=pb.cisn + 1, options=ts(55, TS1 + 5000))
    assert forged.verdict == DROP
    assert conn_of(pb).state == State.SYN_SENT
    assert pb.engine.stats.rst_injections == 1
    assert pb.server("SA", options=syn_ts(7, TS1)).verdict == ACCEPT
    assert pb.client("A", options=ts(TS1 + 10, 7)).verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED
    assert pb.client("PA", b"hello", options=ts(TS1 + 11, 7)).verdict == ACCEPT
    assert rec.data("up") == b"hello"
    assert rec.ends() == []


@pytest.mark.parametrize("ecr", [TS1, 0])
def test_rst_ack_echoing_the_syn_timestamp_or_none_closes(ecr: int) -> None:
    rec = Recorder()
    pb = Playbook(rec.rules)
    client_syn(pb)
    assert pb.server("RA", seq=0, ack=pb.cisn + 1, options=ts(55, ecr)).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED
    assert rec.ends() == [("end", 1, "rst")]


def test_rst_ack_echo_may_be_any_of_the_retransmitted_syns() -> None:
    """Linux accepts an echo between its first SYN's time and now: a peer echoes whichever SYN it got."""
    pb = Playbook()
    client_syn(pb)
    assert pb.client("S", seq=pb.cisn, options=syn_ts(TS1 + 3000)).verdict == ACCEPT
    for bad in (TS1 - 1, TS1 + 3001):
        assert pb.server("RA", seq=0, ack=pb.cisn + 1, options=ts(5, bad)).verdict == DROP
    assert conn_of(pb).state == State.SYN_SENT
    assert pb.server("RA", seq=0, ack=pb.cisn + 1, options=ts(5, TS1 + 1500)).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED


def test_rst_ack_timestamp_echo_is_compared_modulo_2_32() -> None:
    pb = Playbook()
    client_syn(pb, tsval=0xFFFF_FF00)
    assert pb.client("S", seq=pb.cisn, options=syn_ts(0x10)).verdict == ACCEPT  # the clock wrapped
    assert pb.server("RA", seq=0, ack=pb.cisn + 1, options=ts(5, 0xFFFF_FF01 - 0x200)).verdict == DROP
    assert pb.server("RA", seq=0, ack=pb.cisn + 1, options=ts(5, 0x8)).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED


def test_rst_ack_with_an_echo_when_the_syn_had_no_timestamp_is_dropped() -> None:
    """No echo can fit a timestamp the client never sent: only a forger puts one there."""
    pb = Playbook()
    client_syn(pb, tsval=None)
    assert pb.server("RA", seq=0, ack=pb.cisn + 1, options=ts(5, 12345)).verdict == DROP
    assert conn_of(pb).state == State.SYN_SENT
    assert pb.server("RA", seq=0, ack=pb.cisn + 1).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED


def test_rst_ack_with_a_malformed_option_block_is_dropped_not_raised() -> None:
    pb = Playbook()
    client_syn(pb)
    bad = b"\x08\x0a\x00\x00"  # a timestamp option whose length runs past the header
    assert pb.server("RA", seq=0, ack=pb.cisn + 1, options=bad).verdict == DROP
    assert conn_of(pb).state == State.SYN_SENT


# ---------------------------------------------------------------------------- SYN-ACK in SYN-SENT


def test_forged_syn_ack_with_the_wrong_ack_does_not_fix_the_server_isn() -> None:
    """The server's ISN is taken from the SYN-ACK the gateway accepts, not from one it drops: otherwise
    one forged SYN-ACK makes the real one look like a SYN with the wrong sequence number."""
    pb = Playbook()
    client_syn(pb)
    assert pb.server("SA", seq=424242, ack=pb.cisn + 9).verdict == DROP
    assert pb.server("SA").verdict == ACCEPT
    assert pb.client("A").verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED


def test_syn_ack_with_a_wrong_timestamp_echo_is_dropped_and_the_real_one_passes() -> None:
    pb = Playbook()
    client_syn(pb)
    assert pb.server("SA", seq=424242, options=syn_ts(9, TS1 + 99_999)).verdict == DROP
    assert conn_of(pb).state == State.SYN_SENT
    assert pb.server("SA", options=syn_ts(9, TS1)).verdict == ACCEPT
    assert pb.client("A", options=ts(TS1 + 1, 9)).verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED


# ---------------------------------------------------------------------------- RST in SYN_RECV


def test_client_rst_in_syn_recv_must_acknowledge_the_server_syn() -> None:
    """A listening Linux server hands a segment whose ACK is not ISS+1 to the listener (tcp_check_req),
    which discards an RST: the half-open connection stays, so the gateway must keep it too."""
    pb = Playbook()
    client_syn(pb)
    pb.server("SA", options=syn_ts(9, TS1))
    assert pb.client("RA", seq=pb.cisn + 1, ack=pb.sisn + 5, options=ts(TS1 + 5, 9)).verdict == DROP
    assert conn_of(pb).state == State.SYN_RECV
    assert pb.client("RA", seq=pb.cisn + 1, ack=pb.sisn + 1, options=ts(TS1 + 5, 9)).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED


def test_client_rst_without_ack_in_syn_recv_closes() -> None:
    pb = Playbook()
    client_syn(pb)
    pb.server("SA", options=syn_ts(9, TS1))
    assert pb.client("R", seq=pb.cisn + 1, ack=0).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED


def test_client_rst_in_syn_recv_with_a_timestamp_older_than_the_syn_is_dropped() -> None:
    """PAWS on the server's half-open connection (tcp_check_req) rejects an RST whose TSval is older than
    the SYN's."""
    pb = Playbook()
    client_syn(pb)
    pb.server("SA", options=syn_ts(9, TS1))
    assert pb.client("R", seq=pb.cisn + 1, ack=0, options=ts(TS1 - 10, 0)).verdict == DROP
    assert conn_of(pb).state == State.SYN_RECV
    assert pb.client("R", seq=pb.cisn + 1, ack=0, options=ts(TS1, 0)).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED


# ---------------------------------------------------------------------------- simultaneous open


@pytest.mark.parametrize(("client", "server"), [("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")])
def test_simultaneous_open(client: str, server: str) -> None:
    """RFC 793 figure 8 (RFC 9293 3.5 figure 7): both ends send a SYN, each answers the other's with a
    SYN-ACK repeating its own ISN. The first SYN's sender stays the client."""
    rec = Recorder()
    pb = Playbook(rec.rules, client=client, server=server)
    assert pb.client("S").verdict == ACCEPT
    assert pb.server("S").verdict == ACCEPT
    assert conn_of(pb).state == State.BOTH_SYN
    assert pb.client("SA", seq=pb.cisn).verdict == ACCEPT
    assert conn_of(pb).state == State.CLIENT_SYNACK
    assert pb.server("SA", seq=pb.sisn).verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED
    assert pb.client("PA", b"from the client").verdict == ACCEPT
    assert pb.server("PA", b"from the server").verdict == ACCEPT
    assert rec.data("up") == b"from the client"
    assert rec.data("down") == b"from the server"
    assert rec.log[0] == ("new", 1, client, 40000, server, 80)
    assert len(pb.engine.table) == 1 and pb.engine.stats.invalid == 0


def test_simultaneous_open_syn_acks_crossing_the_other_way() -> None:
    pb = Playbook()
    pb.client("S")
    pb.server("S")
    assert pb.server("SA", seq=pb.sisn).verdict == ACCEPT
    assert conn_of(pb).state == State.SYN_RECV
    assert pb.client("SA", seq=pb.cisn).verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED
    assert pb.server("PA", b"x").verdict == ACCEPT


def test_simultaneous_open_window_scaling_needs_both_syns() -> None:
    pb = Playbook()
    pb.client("S", options=syn_options(wscale=7))
    pb.server("S", options=syn_options(wscale=3))
    pb.client("SA", seq=pb.cisn, options=syn_options(wscale=7))
    pb.server("SA", seq=pb.sisn, options=syn_options(wscale=3))
    conn = conn_of(pb)
    assert (conn.wscale_client, conn.wscale_server) == (7, 3)
    pb2 = Playbook()
    pb2.client("S", options=syn_options(wscale=None))
    pb2.server("S", options=syn_options(wscale=3))
    assert (conn_of(pb2).wscale_client, conn_of(pb2).wscale_server) == (0, 0)


@pytest.mark.parametrize(
    ("who", "flags", "kw"),
    [
        pytest.param("server", "SA", {"ack": 1000 + 7}, id="server-syn-ack-wrong-ack"),
        pytest.param("client", "SA", {"ack": 5000 + 7}, id="client-syn-ack-wrong-ack"),
        pytest.param("client", "SA", {"seq": 1000 + 50}, id="client-syn-ack-new-isn"),
        pytest.param("server", "S", {"seq": 5000 + 50}, id="server-syn-new-isn"),
        pytest.param("client", "PA", {}, id="client-data-before-any-ack"),
        pytest.param("server", "PA", {}, id="server-data-before-any-ack"),
        pytest.param("server", "A", {}, id="server-bare-ack"),
        pytest.param("client", "FA", {}, id="client-fin"),
    ],
)
def test_both_syn_refuses_what_the_stacks_refuse(who: str, flags: str, kw: dict[str, int]) -> None:
    pb = Playbook()
    pb.client("S")
    pb.server("S")
    seq = {"seq": pb.cisn if who == "client" else pb.sisn} if "S" in flags else {}
    data = b"x" if "P" in flags else b""
    dec = getattr(pb, who)(flags, data, **{**seq, **kw})
    assert dec.verdict == DROP
    assert conn_of(pb).state == State.BOTH_SYN


# ---------------------------------------------------------------------------- split handshake


def test_split_handshake_keeps_the_initiator_as_the_client() -> None:
    """Beardsley and Qian's split handshake: the server answers the SYN with a SYN of its own, the client
    answers with a SYN-ACK, the server with an ACK. The roles stay those of the first SYN: 'up' is what
    reaches the server the client connected to, whichever side sent the SYN-ACK."""
    rec = Recorder()
    rec.on_data = (b"/bin/sh", "reset")
    pb = Playbook(rec.rules)
    assert pb.client("S").verdict == ACCEPT
    assert pb.server("S").verdict == ACCEPT
    assert pb.client("SA", seq=pb.cisn).verdict == ACCEPT
    assert conn_of(pb).state == State.CLIENT_SYNACK
    assert pb.server("A").verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED
    conn = conn_of(pb)
    assert (str(conn.srcip), conn.srcport) == ("10.0.0.1", 40000)
    assert (str(conn.dstip), conn.dstport) == ("10.0.0.2", 80)
    assert pb.client("PA", b"GET /run?cmd=/bi").verdict == ACCEPT
    assert pb.client("PA", b"n/sh HTTP/1.0\r\n\r\n").verdict == DROP  # blocked: the rule saw it 'up'
    assert rec.data("up") == b"GET /run?cmd=/bin/sh HTTP/1.0\r\n\r\n"
    assert len(pb.sent) == 2  # an RST to each end


def test_split_handshake_server_data_is_scanned_as_down() -> None:
    """The attack the split handshake was made for: the server's download is taken for the client's
    upload by a device that names the SYN-ACK's sender the server. Here it stays 'down'."""
    rec = Recorder()
    rec.on_data = (b"MALWARE", "reset")
    pb = Playbook(rec.rules)
    pb.client("S")
    pb.server("S")
    pb.client("SA", seq=pb.cisn)
    assert pb.server("PA", b"here is MAL").verdict == ACCEPT  # the ACK that ends the handshake carries data
    assert conn_of(pb).state == State.ESTABLISHED
    assert pb.server("PA", b"WARE").verdict == DROP
    assert rec.data("down") == b"here is MALWARE" and rec.data("up") == b""


def test_split_handshake_with_the_ack_before_the_syn() -> None:
    """The five-step variant: the server's bare ACK of the SYN comes first. Linux's SYN-SENT discards an
    ACK without SYN that acknowledges its SYN, so the gateway drops it; the rest is the split handshake."""
    pb = Playbook()
    pb.client("S")
    assert pb.server("A", seq=pb.sisn + 1).verdict == DROP
    assert pb.server("S").verdict == ACCEPT
    assert pb.client("SA", seq=pb.cisn).verdict == ACCEPT
    assert pb.server("A").verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED


def test_client_synack_refuses_client_data_and_a_server_ack_of_nothing() -> None:
    pb = Playbook()
    pb.client("S")
    pb.server("S")
    pb.client("SA", seq=pb.cisn)
    assert pb.client("PA", b"early", seq=pb.cisn + 1).verdict == DROP  # its SYN is not acknowledged yet
    assert pb.server("A", ack=pb.cisn).verdict == DROP  # does not acknowledge the client's SYN
    assert conn_of(pb).state == State.CLIENT_SYNACK
    assert pb.client("SA", seq=pb.cisn).verdict == ACCEPT  # retransmitted
    assert pb.server("S", seq=pb.sisn).verdict == ACCEPT  # retransmitted
    assert pb.server("FA", ack=pb.cisn + 1).verdict == ACCEPT  # the server's ACK with its FIN
    assert conn_of(pb).state == State.SERVER_FIN


def test_both_syn_rst_closes_when_exact() -> None:
    rec = Recorder()
    pb = Playbook(rec.rules)
    pb.client("S")
    pb.server("S")
    assert pb.server("R", seq=pb.sisn + 200_000, ack=0).verdict == DROP  # outside the window
    assert pb.server("R", seq=pb.sisn + 100, ack=0).verdict == ACCEPT  # in it: challenged, not closed
    assert conn_of(pb).state == State.BOTH_SYN
    assert pb.server("R", seq=pb.sisn + 1, ack=0).verdict == ACCEPT
    assert conn_of(pb).state == State.CLOSED
    assert rec.ends() == [("end", 1, "rst")]


def test_reset_forged_in_both_syn_reaches_both_ends() -> None:
    pb = Playbook()
    pb.client("S")
    pb.server("S")
    conn = conn_of(pb)
    out = pb.engine.act(conn.id, 3, pb.now)
    assert out is not None and len(out.send) == 2
    to_server, to_client = (pb.decoded(p) for p in out.send)
    assert (to_server.seq, to_server.ack) == (pb.cisn + 1, pb.sisn + 1)
    assert (to_client.seq, to_client.ack) == (pb.sisn + 1, pb.cisn + 1)


def test_signed_split_handshake_negotiates_signing_on_the_server_syn() -> None:
    """TCP-MD5 on both SYNs: the server's own signed SYN agrees to signing as a signed SYN-ACK does, so
    the server's signed ACK that ends the split handshake is inspected, not dropped as unexpected."""
    pb = Playbook()
    assert pb.client("S", options=signed_syn(MD5)).verdict == ACCEPT
    assert pb.server("S", options=signed_syn(MD5)).verdict == ACCEPT
    assert pb.client("SA", seq=pb.cisn, options=signed_syn(MD5)).verdict == ACCEPT
    assert pb.server("A", options=MD5).verdict == ACCEPT
    assert conn_of(pb).state == State.ESTABLISHED
    assert pb.client("PA", b"x", options=MD5).verdict == ACCEPT
    assert pb.engine.stats.unexpected_signatures == 0
