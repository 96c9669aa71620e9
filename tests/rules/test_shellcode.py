"""rules/shellcode.py: a shell-code pattern is found however the client splits it, and both ends reset."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpguard.core.decision import Verdict
from tcpguard.core.settings import EngineSettings
from tests.tls_exchange import exchange

from .samples import (
    ACCEPT,
    DROP,
    HOLD,
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

RS, MOD = load("shellcode")


def test_whole_pattern_resets_both_ends() -> None:
    pb = playbook(RS)
    pb.handshake()
    assert pb.client("PA", b"GET /?cmd=/bin/sh HTTP/1.0\r\n\r\n").verdict == DROP
    assert actions(pb) == ["reset"]
    assert alerts(pb) == ["shell-code pattern b'/bin/sh' from the client"]
    assert sorted(forged(pb)) == [("client", 40000), ("server", 80)]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_pattern_split_into_tiny_segments_is_caught_on_the_completing_one(size: int) -> None:
    data = b"xxxxxxxxxx/bin/bash -i"
    pb = playbook(RS)
    pb.handshake()
    verdicts = send_pieces(pb, split(data, size))
    end = data.index(b"/bin/bash") + len(b"/bin/bash")
    completing = (end - 1) // size
    assert verdicts == [ACCEPT] * completing + [DROP]
    assert actions(pb) == ["reset"]


def test_pattern_sent_out_of_order_is_caught_when_the_gap_fills() -> None:
    pb = playbook(RS)
    pb.handshake()
    base = pb.cnext
    assert pb.client("PA", b"n/sh;", seq=base + 7).verdict == HOLD  # the tail arrives first: held
    dec = pb.client("PA", b"run /bi", seq=base)
    assert dec.verdict == DROP
    assert [r.verdict for r in dec.releases] == [DROP]  # the held tail never reaches the server
    assert actions(pb) == ["reset"]


def test_binary_shellcode_and_nop_sled() -> None:
    for payload in (b"\x00\x01\x31\xc0\x50\x68//sh\x68/bin", b"\x90" * 40):
        pb = playbook(RS)
        pb.handshake()
        assert send_pieces(pb, split(payload, 7))[-1] == DROP


def test_near_misses_and_the_servers_direction_pass() -> None:
    pb = playbook(RS)
    pb.handshake()
    assert send_pieces(pb, [b"/bin/s", b"x /bin", b"/ssh cmd.ex", b"x"]) == [ACCEPT] * 4
    assert pb.server("PA", b"#!/bin/sh\necho hi\n").verdict == ACCEPT  # only the client is inspected
    assert actions(pb) == []


def test_the_pattern_complete_first_is_reported_not_the_first_listed() -> None:
    pb = playbook(RS)
    pb.handshake()
    assert MOD["PATTERNS"].index(b"/bin/sh") < MOD["PATTERNS"].index(b"cmd.exe")
    assert pb.client("PA", b"a cmd.exe /bin/sh").verdict == DROP
    assert alerts(pb) == ["shell-code pattern b'cmd.exe' from the client"]
    clean = playbook(RS)
    clean.handshake()
    assert clean.client("PA", b"nothing").verdict == ACCEPT and alerts(clean) == []


@pytest.mark.parametrize("pattern", MOD["PATTERNS"], ids=repr)
def test_each_pattern_split_at_every_position_is_caught_on_the_completing_segment(pattern: bytes) -> None:
    data = b"GET /x?" + pattern + b" HTTP/1.0\r\n"
    start = data.index(pattern)
    for cut in range(start + 1, start + len(pattern)):
        pb = playbook(RS)
        pb.handshake()
        assert send_pieces(pb, [data[:cut], data[cut:]]) == [ACCEPT, DROP], cut
        assert alerts(pb) == [f"shell-code pattern {pattern!r} from the client"]


@pytest.mark.parametrize("pattern", MOD["PATTERNS"], ids=repr)
def test_each_pattern_sent_byte_by_byte_is_caught_on_its_last_byte(pattern: bytes) -> None:
    data = b"x" * 40 + pattern + b"tail"
    pb = playbook(RS)
    pb.handshake()
    end = data.index(pattern) + len(pattern)
    assert send_pieces(pb, split(data, 1)) == [ACCEPT] * (end - 1) + [DROP]


def test_a_pattern_seen_once_is_not_reported_again_and_nothing_is_kept_per_flow() -> None:
    pb = playbook(RS)
    pb.handshake()
    assert pb.client("PA", b"harmless /bin/s").verdict == ACCEPT
    assert pb.client("PA", b"x and more").verdict == ACCEPT
    assert flow(pb)._store is None  # the look-back comes from the engine's retained bytes
    assert pb.client("PA", b"/bin/bash").verdict == DROP
    assert alerts(pb) == ["shell-code pattern b'/bin/bash' from the client"]


def test_an_idle_connection_keeps_only_the_look_back_the_longest_pattern_needs() -> None:
    longest = max(len(p) for p in MOD["PATTERNS"])
    pb = playbook(RS)
    pb.handshake()
    assert pb.client("PA", b"POST / HTTP/1.1\r\n\r\n" + b"n" * 100 + b"\x90" * 31).verdict == ACCEPT
    pb.server("PA", b"HTTP/1.1 200 OK\r\n\r\n")
    assert bytes(flow(pb).up.buf) == b"\x90" * (longest - 1)  # not the default 256 bytes of the request
    # ...which is still enough for the longest pattern (the 32-byte NOP sled) completed by one more byte.
    assert pb.client("PA", b"\x90").verdict == DROP


# -- TLS: scanned until both ends showed they speak it, then done (and bypassed when that is on) --------
V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
HELLO_REQUEST = b"GET /?q=/bin/sh HTTP/1.1\r\n\r\n"  # encrypted inside TLS: the scanner cannot see it


def bypass_on() -> EngineSettings:
    st = EngineSettings()
    st.inspection.bypass = True
    return st


def tls_playbook(**kw: Any) -> Playbook:
    pb = playbook(RS, bypass_on(), sport=443, **kw)
    pb.handshake()
    return pb


def play(pb: Playbook, flights: list[tuple[str, bytes]], mss: int = 1448) -> list[tuple[str, Verdict, bool]]:
    """Send the flights as MSS-sized segments: (direction, verdict, bypass) of each, until a drop."""
    out = []
    for d, data in flights:
        for piece in split(data, mss):
            dec = pb.client("PA", piece) if d == "up" else pb.server("PA", piece)
            out.append((d, dec.verdict, dec.bypass))
            if dec.verdict == DROP:
                return out
    return out


@pytest.mark.parametrize("version", [V12, V13])
def test_a_real_tls_connection_is_done_after_both_sides_first_application_data(
    version: ssl.TLSVersion,
) -> None:
    flights = exchange(version, request=HELLO_REQUEST)
    pb = tls_playbook()
    got = play(pb, flights)
    assert all(v == ACCEPT for _, v, _ in got)
    # Bypassed on the segment that completes the evidence, and not before: TLS 1.3 on the client's
    # Finished (the server's first flight had application data), TLS 1.2 on the server's response.
    # The later ones are answered from the engine's tombstone (bypass asked again, harmless).
    bypass = [b for _, _, b in got]
    at = bypass.index(True)
    assert all(bypass[at:])
    assert at == (2 if version == V13 else len(got) - 1)
    assert got[at][0] == ("up" if version == V13 else "down")
    assert [e["reason"] for e in pb.names("end_connection")] == ["bypassed"]
    assert alerts(pb) == [] and pb.engine.stats.bypassed == 1


def test_a_tls_12_download_is_bypassed_without_waiting_for_the_client() -> None:
    """The server's first application data decides; the client sends nothing after its request. With a
    listener per direction, the client's would wait for bytes that never come."""
    flights = exchange(V12, response=b"x" * 20000)
    pb = tls_playbook()
    got = play(pb, flights)
    bypass = [b for _, _, b in got]
    at = bypass.index(True)
    # The response's first segment (its first application data record starts there, and ends in the
    # segment that completes it): 20 KB in 16 KB records of 1448-byte segments.
    response = sum(1 for d, data in flights[:-1] for _ in split(data, 1448))
    assert response < at <= response + 12 and got[at][0] == "down"
    assert pb.engine.stats.bypassed == 1
    # ...and later packets of the download are accepted as bypassed without reaching the rules.
    assert pb.server("PA", b"y" * 1000).bypass


def fake_hello() -> bytes:
    hello = client_hello("www.example.org")
    return hello[: 5 + int.from_bytes(hello[3:5], "big")]


@pytest.mark.parametrize(
    "after",
    [
        b"GET /?cmd=/bin/sh HTTP/1.0\r\n\r\n",  # plaintext after the hello
        b"\x17\x03\x03\x00\x20" + b"x" * 10 + b"/bin/sh" + b"x" * 15,  # ...dressed as an encrypted record
    ],
)
def test_a_fake_client_hello_followed_by_the_pattern_is_scanned_and_reset(after: bytes) -> None:
    pb = tls_playbook()
    assert pb.client("PA", fake_hello()).verdict == ACCEPT
    assert pb.server("PA", b"HTTP/1.1 400 Bad Request\r\n\r\n").verdict == ACCEPT  # a plaintext server
    dec = pb.client("PA", after)
    assert (dec.verdict, dec.bypass) == (DROP, False)
    assert actions(pb) == ["reset"] and pb.engine.stats.bypassed == 0


def test_the_pattern_in_the_same_segment_as_a_fake_hello_is_reset() -> None:
    pb = tls_playbook()
    assert pb.client("PA", fake_hello() + b"/bin/sh").verdict == DROP
    assert alerts(pb) == ["shell-code pattern b'/bin/sh' from the client"]


def test_a_fake_server_hello_then_plaintext_keeps_the_client_scanned() -> None:
    flights = exchange(V13)
    sh = flights[1][1][: 5 + int.from_bytes(flights[1][1][3:5], "big")]
    pb = tls_playbook()
    assert pb.client("PA", flights[0][1]).verdict == ACCEPT
    assert pb.server("PA", sh + b"220 plaintext from here\r\n").verdict == ACCEPT
    dec = pb.client("PA", b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x09/bin/bash")
    assert (dec.verdict, dec.bypass) == (DROP, False)
    assert alerts(pb) == ["shell-code pattern b'/bin/bash' from the client"]


def test_a_server_that_speaks_first_makes_no_candidate() -> None:
    pb = tls_playbook()
    assert pb.server("PA", b"220 ready\r\n").verdict == ACCEPT
    assert pb.client("PA", fake_hello()).verdict == ACCEPT
    assert pb.client("PA", b"\x17\x03\x03\x00\x07/bin/sh").verdict == DROP


def test_a_mid_stream_connection_is_never_a_tls_candidate() -> None:
    pb = playbook(RS, bypass_on(), sport=443)
    assert pb.client("A").verdict == ACCEPT  # picked up mid-stream
    assert flow(pb).midstream
    assert pb.client("PA", fake_hello()).verdict == ACCEPT
    assert pb.server("PA", exchange(V13)[1][1]).verdict == ACCEPT
    assert pb.client("PA", b"\x17\x03\x03\x00\x07/bin/sh").verdict == DROP


def test_a_plain_connection_costs_one_call_more_and_keeps_nothing() -> None:
    pb = playbook(RS, bypass_on())
    pb.handshake()
    calls = pb.engine.dispatch.rule_calls
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").verdict == ACCEPT
    assert pb.engine.dispatch.rule_calls - calls == 2  # no_shellcode, and tls_or_not saying done
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"d" * 100
    for _ in range(3):
        assert pb.server("PA", response).verdict == ACCEPT
        pb.client("A")
        assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").verdict == ACCEPT
    assert pb.engine.dispatch.rule_calls - calls == 2 + 3  # only no_shellcode from then on
    assert flow(pb)._store is None  # no flow.store on a plain connection
    assert bytes(flow(pb).down.buf) == b""  # and no tail of the server's bytes (look-back 0 there)
    assert pb.engine.stats.bypassed == 0  # the client's direction is scanned to the end


def test_without_bypass_the_tls_connection_stays_tracked_but_unscanned() -> None:
    flights = exchange(V13)
    pb = playbook(RS, sport=443)
    pb.handshake()
    assert all(v == ACCEPT and not b for _, v, b in play(pb, flights))
    assert flow(pb)._want == 0  # both listeners are done with it
    assert flow(pb)._store is None or MOD["TLS"] not in flow(pb).store


def test_with_bypass_tls_off_a_tls_connection_is_scanned_to_the_end() -> None:
    rs, mod = load("shellcode")
    mod["BYPASS_TLS"] = False
    pb = playbook(rs, bypass_on(), sport=443)
    pb.handshake()
    assert all(not b for _, _, b in play(pb, exchange(V13)))
    assert flow(pb).wants(0)  # no_shellcode still reads the client's bytes
    assert pb.client("PA", b"\x17\x03\x03\x00\x07/bin/sh").verdict == DROP


EXCHANGES = {V12: exchange(V12, request=HELLO_REQUEST), V13: exchange(V13, request=HELLO_REQUEST)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([V12, V13]), mss=st.integers(1, 1448))
def test_any_segment_size_bypasses_on_the_segment_with_the_deciding_byte(
    version: ssl.TLSVersion, mss: int
) -> None:
    """Whatever the segment size, the connection is bypassed on the segment that carries the last byte
    of the deciding record (the end of the deciding flight), never before, and nothing is reset."""
    flights = EXCHANGES[version]
    pb = tls_playbook()
    got = play(pb, flights, mss)
    assert all(v == ACCEPT for _, v, _ in got)
    deciding = 2 if version == V13 else len(flights) - 1
    at = sum(len(split(data, mss)) for _, data in flights[: deciding + 1]) - 1
    assert [b for _, _, b in got].index(True) == at
