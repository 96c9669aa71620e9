"""rules/shellcode.py: a shell-code pattern is found however the client splits it, and both ends reset."""

from __future__ import annotations

import pytest

from .samples import ACCEPT, DROP, HOLD, actions, alerts, flow, forged, load, playbook, send_pieces, split

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
