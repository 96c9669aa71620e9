"""rules/tls_sni.py: real ClientHellos (made by Python's ssl module, i.e. OpenSSL) parsed from the stream."""

from __future__ import annotations

import struct

import pytest

from tcpguard.core.settings import EngineSettings

from .samples import (
    ACCEPT,
    DROP,
    Playbook,
    actions,
    alerts,
    client_hello,
    flow,
    forged,
    load,
    playbook,
    send_pieces,
    split,
)

RS, MOD = load("tls_sni")


def tls_playbook(sport: int = 443) -> Playbook:
    pb = playbook(RS, sport=sport)
    pb.handshake()
    return pb


def test_allowed_name_passes_and_is_remembered() -> None:
    pb = tls_playbook()
    assert pb.client("PA", client_hello("www.example.org")).verdict == ACCEPT
    assert actions(pb) == []
    assert flow(pb).store["sni"] == "www.example.org"
    assert pb.server("PA", b"\x16\x03\x03 server hello ...").verdict == ACCEPT


@pytest.mark.parametrize("name", ["blocked.example", "cdn.blocked.example", "Tracker.Example"])
def test_blocked_name_resets_both_ends(name: str) -> None:
    pb = tls_playbook()
    assert pb.client("PA", client_hello(name)).verdict == DROP
    assert actions(pb) == ["reset"]
    assert alerts(pb) == [f"TLS connection to blocked server name {name.lower()}"]
    assert sorted(forged(pb)) == [("client", 40000), ("server", 443)]


@pytest.mark.parametrize("size", [1, 5, 6, 100, 600])
def test_hello_split_across_segments_is_caught_on_the_completing_one(size: int) -> None:
    hello = client_hello("blocked.example")
    pieces = split(hello, size)
    pb = tls_playbook()
    assert send_pieces(pb, pieces) == [ACCEPT] * (len(pieces) - 1) + [DROP]


def refragment(hello: bytes, cut: int) -> bytes:
    """The same handshake message sent as two TLS records (record fragmentation, RFC 8446 5.1)."""
    assert hello[0] == 0x16
    body = hello[5:]
    rec = hello[1:3]
    return (
        b"\x16"
        + rec
        + struct.pack("!H", cut)
        + body[:cut]
        + b"\x16"
        + rec
        + struct.pack("!H", len(body) - cut)
        + body[cut:]
    )


@pytest.mark.parametrize("cut", [2, 40, 200])
def test_hello_fragmented_over_records(cut: int) -> None:
    pb = tls_playbook()
    assert pb.client("PA", refragment(client_hello("blocked.example"), cut)).verdict == DROP
    assert alerts(pb) == ["TLS connection to blocked server name blocked.example"]


def test_hello_without_sni_passes() -> None:
    pb = tls_playbook()
    assert pb.client("PA", client_hello(None)).verdict == ACCEPT
    assert MOD["server_name"](client_hello(None)[9:]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello of one byte
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello where the ClientHello belongs
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03\x17\x03\x03\x00\x01x",  # application data inside
    ],
)
def test_malformed_handshake_fails_closed(data: bytes) -> None:
    pb = tls_playbook()
    assert pb.client("PA", data).verdict == DROP
    assert actions(pb) == ["reset"]
    assert alerts(pb)[0].startswith("malformed TLS ClientHello: ")


def test_corrupted_extension_lengths_are_malformed() -> None:
    hello = bytearray(client_hello("www.example.org"))
    body = bytes(hello[9:])
    server_name = MOD["server_name"]
    assert server_name(body) == "www.example.org"
    with pytest.raises(MOD["MalformedHelloError"]):
        server_name(body[:-3])  # truncated extensions
    with pytest.raises(MOD["MalformedHelloError"]):
        server_name(body + b"\x00")  # bytes after the extensions


def test_not_tls_and_other_ports_are_left_alone() -> None:
    pb = tls_playbook()
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n").verdict == ACCEPT
    assert pb.client("PA", client_hello("blocked.example")).verdict == ACCEPT  # only the first bytes count
    other = tls_playbook(8000)
    assert other.client("PA", client_hello("blocked.example")).verdict == ACCEPT
    assert actions(pb) == actions(other) == []
    # On another port the listener's coroutine is never started (ports= in the rule).
    assert flow(other)._greenlets is None and flow(other)._gdone == 0


@pytest.mark.parametrize("first", [b"D", b"\x16\x05", b"\x17\x03\x03\x00"])
def test_a_short_stream_that_is_not_tls_is_left_alone(first: bytes) -> None:
    """Fewer bytes than a record header, then the end of the stream: TLS only if they start like a
    handshake record (0x16, then version 3). A non-TLS client that sends one byte and closes got a
    'malformed TLS ClientHello' alert and a reset attempt (seen on the bench's bulk traffic to 443)."""
    pb = tls_playbook()
    assert pb.client("PA", first).verdict == ACCEPT
    assert pb.client("FA").verdict == ACCEPT
    assert alerts(pb) == [] and actions(pb) == []


def test_the_first_byte_decides_not_tls_without_waiting_for_more() -> None:
    pb = tls_playbook()
    assert pb.client("PA", b"D").verdict == ACCEPT
    # Bit 0 of _gdone: the set's first streamed reader has finished in the client's direction (on the
    # first byte, instead of waiting for a five-byte record header).
    assert flow(pb)._gdone == 1


@pytest.mark.parametrize("first", [b"\x16", b"\x16\x03", b"\x16\x03\x01\x00"])
def test_a_short_stream_that_starts_like_tls_fails_closed(first: bytes) -> None:
    pb = tls_playbook()
    assert pb.client("PA", first).verdict == ACCEPT
    assert pb.client("FA").verdict == DROP
    assert alerts(pb) == ["malformed TLS ClientHello: stream ended inside the ClientHello"]


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (b"\x17\x03\x03\x00\x01x", "record type 23 inside the ClientHello"),
        (b"\x16\x02\x00\x00\x01x", "record version 2.0 inside the ClientHello"),
    ],
)
def test_a_second_record_that_is_not_a_tls_handshake_record_is_named(record: bytes, why: str) -> None:
    hello = client_hello("www.example.org")
    first = refragment(hello, 60)[: 5 + 60]  # the first record of a hello sent in two
    pb = tls_playbook()
    assert pb.client("PA", first).verdict == ACCEPT
    assert pb.client("PA", record).verdict == DROP
    assert alerts(pb) == [f"malformed TLS ClientHello: {why}"]


def test_stream_ending_inside_the_hello_fails_closed() -> None:
    pb = tls_playbook()
    hello = client_hello("www.example.org")
    assert pb.client("PA", hello[:50]).verdict == ACCEPT
    assert pb.client("FA").verdict == DROP
    assert alerts(pb) == ["malformed TLS ClientHello: stream ended inside a record"]


# -- done after the ClientHello: the rule never holds a connection back from bypass --------------------
def bypassing(sport: int = 443) -> Playbook:
    st = EngineSettings()
    st.inspection.bypass = True
    pb = playbook(RS, st, sport=sport)
    pb.handshake()
    return pb


def test_after_an_allowed_hello_the_rule_is_done_and_the_connection_bypassed() -> None:
    hello = client_hello("www.example.org")
    pb = bypassing()
    first = pb.client("PA", hello[:100])
    assert (first.verdict, first.bypass) == (ACCEPT, False)  # the hello is not complete: still wanted
    assert flow(pb).wants(0)
    last = pb.client("PA", hello[100:])
    assert (last.verdict, last.bypass) == (ACCEPT, True)  # complete: nothing wanted any more
    assert [e["reason"] for e in pb.names("end_connection")] == ["bypassed"]


def test_a_blocked_name_is_reset_not_bypassed() -> None:
    pb = bypassing()
    dec = pb.client("PA", client_hello("blocked.example"))
    assert (dec.verdict, dec.bypass) == (DROP, False)
    assert pb.engine.stats.bypassed == 0


def test_a_stream_that_is_not_tls_is_let_go_on_its_first_byte() -> None:
    pb = bypassing()
    dec = pb.client("PA", b"GET / HTTP/1.1\r\n\r\n")
    assert (dec.verdict, dec.bypass) == (ACCEPT, True)


def test_a_connection_to_another_port_is_never_wanted() -> None:
    st = EngineSettings()
    st.inspection.bypass = True
    pb = playbook(RS, st, sport=8000)
    assert not pb.client("S").bypass and not pb.server("SA").bypass
    assert pb.client("A").bypass  # bypassed at the handshake's last ACK: the rule never applied


def test_the_server_direction_is_never_wanted() -> None:
    pb = playbook(RS, sport=443)
    pb.handshake()
    assert not flow(pb).wants(1)
    assert pb.server("PA", b"220 server speaks first\r\n").verdict == ACCEPT
    assert flow(pb).wants(0) and not flow(pb).wants(1)
