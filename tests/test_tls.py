"""tcpguard.tls: the hellos of real TLS 1.2 and 1.3 exchanges (OpenSSL on both ends, made at test time),
and the evidence that decides, from both directions, whether a connection is TLS."""

from __future__ import annotations

import itertools
import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpguard.tls import (
    EVIDENCE_LIMIT,
    MAX_RECORD,
    ClientHello,
    MalformedHelloError,
    ServerHello,
    TlsEvidence,
    parse_client_hello,
    parse_server_hello,
)
from tcpguard.tls import answer_problem as problem
from tests.tls_exchange import Flight, exchange, stream

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
EXCHANGES = {V12: exchange(V12), V13: exchange(V13)}
PLAIN = st.binary(min_size=1, max_size=300).map(lambda b: bytes(0x20 + x % 95 for x in b))  # printable


def hello_body(data: bytes) -> bytes:
    """The first handshake message body of a stream that starts with one whole handshake record."""
    assert data[0] == 0x16
    length = int.from_bytes(data[6:9], "big")
    return data[9 : 9 + length]


def decide(flights: list[Flight]) -> tuple[bool | None, str, int]:
    """(decision, reason, index of the flight that decided it or -1)."""
    ev = TlsEvidence()
    at = -1
    for i, (d, data) in enumerate(flights):
        if ev.feed(d, data) is not None and at < 0:
            at = i
    return ev.decision, ev.reason, at


def record(t: int, payload: bytes, version: bytes = b"\x03\x03") -> bytes:
    return bytes([t]) + version + struct.pack("!H", len(payload)) + payload


# -- the hellos -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [V12, V13])
def test_the_hellos_of_a_real_exchange_parse_and_answer_each_other(version: ssl.TLSVersion) -> None:
    flights = EXCHANGES[version]
    ch = parse_client_hello(hello_body(stream(flights, "up")))
    sh = parse_server_hello(hello_body(stream(flights, "down")))
    assert ch.server_name == "tls.test"
    assert sh.cipher_suite in ch.cipher_suites and not sh.retry
    assert sh.selected_version == (0x0304 if version == V13 else 0x0303)
    if version == V13:
        assert 0x0304 in ch.supported_versions and sh.session_id == ch.session_id
    assert problem(sh, ch) is None


def real_hellos() -> tuple[ClientHello, ServerHello]:
    flights = EXCHANGES[V13]
    return (
        parse_client_hello(hello_body(stream(flights, "up"))),
        parse_server_hello(hello_body(stream(flights, "down"))),
    )


def test_a_server_hello_that_does_not_answer_the_client_hello_is_named() -> None:
    ch, sh = real_hellos()
    ext = dict(sh.extensions)
    unoffered = ServerHello(sh.version, sh.random, sh.session_id, 0x0005, 0, sh.extensions)
    assert problem(unoffered, ch) == "cipher suite 0x0005 the client did not offer"
    more = (*sh.extensions, (99, b""))
    odd_ext = ServerHello(sh.version, sh.random, sh.session_id, sh.cipher_suite, 0, more)
    assert problem(odd_ext, ch) == "extension 99 the client did not offer"
    no_echo = ServerHello(sh.version, sh.random, b"\x01" * 32, sh.cipher_suite, 0, sh.extensions)
    assert problem(no_echo, ch) == "TLS 1.3 session id not echoed"
    v = ServerHello(sh.version, sh.random, sh.session_id, sh.cipher_suite, 0, ((43, b"\x03\x05"),))
    assert problem(v, ch) == "version 0x0305 the client did not offer"
    compressed = ServerHello(sh.version, sh.random, sh.session_id, sh.cipher_suite, 1, sh.extensions)
    assert problem(compressed, ch) == "compression method 1 the client did not offer"
    retry = ServerHello(
        sh.version,
        bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"),
        sh.session_id,
        sh.cipher_suite,
        0,
        tuple((k, v) for k, v in ext.items() if k == 43),
    )
    assert problem(retry, ch) is not None and "HelloRetryRequest" in str(problem(retry, ch))


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: b + b"\x00", "bytes after the extensions"),
        (lambda b: b"\x02" + b[1:], "version 2.3"),
    ],
)
def test_a_malformed_server_hello_is_named(cut, why: str) -> None:
    body = hello_body(stream(EXCHANGES[V13], "down"))
    with pytest.raises(MalformedHelloError, match=why):
        parse_server_hello(cut(body))


def test_a_repeated_extension_is_malformed() -> None:
    body = hello_body(stream(EXCHANGES[V13], "up"))
    ch = parse_client_hello(body)
    kind, data = ch.extensions[0]
    extra = struct.pack("!HH", kind, len(data)) + data
    # Rebuild the extensions block with the first extension twice.
    start = len(body) - sum(4 + len(d) for _, d in ch.extensions) - 2
    block = body[start + 2 :] + extra
    with pytest.raises(MalformedHelloError, match=f"extension {kind} twice"):
        parse_client_hello(body[:start] + struct.pack("!H", len(block)) + block)


# -- the evidence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [V12, V13])
def test_a_real_exchange_is_tls_once_both_sides_sent_application_data(version: ssl.TLSVersion) -> None:
    flights = EXCHANGES[version]
    decision, reason, at = decide(flights)
    assert (decision, reason) == (True, "")
    # Decided on the flight that carries the second side's first application_data record, not before.
    firsts = [
        next(i for i, (d, b) in enumerate(flights) if d == side and b"\x17\x03\x03" in b)
        for side in ("up", "down")
    ]
    assert at == max(firsts)
    if version == V13:
        assert flights[at][0] == "up"  # the client's Finished: the server's first flight had type 23
    else:
        assert at == len(flights) - 1  # TLS 1.2: the server's response, its first application data


def segmented(flights: list[Flight], data: st.DataObject) -> list[Flight]:
    """The same exchange with every flight cut at random places (TCP segments of any size)."""
    out = []
    for d, b in flights:
        cuts = sorted(data.draw(st.sets(st.integers(1, max(len(b) - 1, 1)), max_size=8)))
        edges = [0, *(c for c in cuts if c < len(b)), len(b)]
        out += [(d, b[x:y]) for x, y in itertools.pairwise(edges) if y > x]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), version=st.sampled_from([V12, V13]))
def test_any_segmentation_of_a_real_exchange_gives_the_same_decision(
    data: st.DataObject, version: ssl.TLSVersion
) -> None:
    flights = EXCHANGES[version]
    whole, _, _ = decide(flights)
    pieces = segmented(flights, data)
    decision, reason, at = decide(pieces)
    assert (decision, reason) == (whole, "") == (True, "")
    # ...on the same byte: the deciding flight ends with the deciding record, so the piece that decides
    # is that flight's last.
    _, _, flight = decide(flights)
    ends = [i for i in range(len(pieces)) if i == len(pieces) - 1 or pieces[i + 1][0] != pieces[i][0]]
    assert at == ends[flight]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), version=st.sampled_from([V12, V13]), plain=PLAIN, answer=st.booleans())
def test_any_plaintext_after_a_fake_client_hello_is_not_tls(
    data: st.DataObject, version: ssl.TLSVersion, plain: bytes, answer: bool
) -> None:
    """The client sends a real ClientHello and then plaintext; the server answers as a real TLS server
    would (or says nothing). Not TLS, decided on the first plaintext byte, however TCP cut it."""
    flights = EXCHANGES[version]
    ch = stream(flights, "up")
    ch = ch[: 5 + int.from_bytes(ch[3:5], "big")]
    fake: list[Flight] = [("up", ch + plain)]
    if answer:
        fake.append(next(f for f in flights if f[0] == "down"))
    fake.append(("up", b"GET /bin/sh HTTP/1.0\r\n\r\n"))
    pieces = segmented(fake, data)
    decision, reason, at = decide(pieces)
    assert decision is False
    assert reason == f"up: record type {plain[0]}"
    # ...on the piece that carries the first plaintext byte.
    sent = list(itertools.accumulate(len(b) for _, b in pieces))
    assert at == next(i for i, n in enumerate(sent) if n > len(ch))


@pytest.mark.parametrize("version", [V12, V13])
def test_a_fake_server_hello_then_plaintext_is_not_tls(version: ssl.TLSVersion) -> None:
    flights = EXCHANGES[version]
    sh = stream(flights, "down")
    sh = sh[: 5 + int.from_bytes(sh[3:5], "big")]
    fake = [flights[0], ("down", sh + b"HTTP/1.1 200 OK\r\n\r\n"), *[f for f in flights[2:] if f[0] == "up"]]
    assert decide(fake)[:2] == (False, "down: record type 72")


def test_a_stream_that_does_not_start_with_a_handshake_record_is_not_tls_on_its_first_byte() -> None:
    for first in (b"G", b"\x17", b"\x15"):
        ev = TlsEvidence()
        assert ev.feed("up", first) is False
    ev = TlsEvidence()
    assert ev.feed("up", b"\x16") is None and ev.feed("up", b"\x02") is False
    assert ev.reason == "up: record version 2"


def test_a_server_that_speaks_first_is_not_tls() -> None:
    ev = TlsEvidence()
    assert ev.feed("down", b"220 smtp.example ESMTP\r\n") is False


def test_an_echo_server_is_not_tls() -> None:
    ch = stream(EXCHANGES[V13], "up")
    ch = ch[: 5 + int.from_bytes(ch[3:5], "big")]
    ev = TlsEvidence()
    assert ev.feed("up", ch) is None
    assert ev.feed("down", ch) is False
    assert ev.reason == "down: handshake type 1 where the ServerHello belongs"


def test_a_server_hello_before_the_client_hello_is_complete_is_not_tls() -> None:
    flights = EXCHANGES[V13]
    ev = TlsEvidence()
    assert ev.feed("up", flights[0][1][:100]) is None
    assert ev.feed("down", flights[1][1]) is False
    assert ev.reason == "down: a ServerHello before the ClientHello it would answer"


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (record(0x18, b"x"), "record type 24"),
        (record(0x17, b"x", b"\x03\x04"), "record version 3.4"),
        (record(0x17, b"x", b"\x02\x00"), "record version 2.0"),
        (b"\x17\x03\x03" + struct.pack("!H", MAX_RECORD + 1), f"record of {MAX_RECORD + 1} bytes"),
        (record(0x15, b""), "empty record of type 21"),
        (record(0x14, b"\x01\x01"), "ChangeCipherSpec of 2 bytes"),
        (record(0x14, b"\x02"), "ChangeCipherSpec of value 2"),
        (record(0x16, b"\x01\x00\x00\x00"), "handshake type 1 after the hello"),
    ],
)
def test_a_record_that_breaks_framing_before_application_data_is_not_tls(tail: bytes, why: str) -> None:
    ch = stream(EXCHANGES[V13], "up")
    ch = ch[: 5 + int.from_bytes(ch[3:5], "big")]
    ev = TlsEvidence()
    assert ev.feed("up", ch + tail) is False
    assert ev.reason == f"up: {why}"


def test_another_record_inside_a_handshake_message_is_not_tls() -> None:
    ch = stream(EXCHANGES[V13], "up")
    ch = ch[: 5 + int.from_bytes(ch[3:5], "big")]
    key_exchange = record(0x16, b"\x10\x00\x00\x21" + b"k" * 10)  # 10 of the message's 33 bytes
    ev = TlsEvidence()
    assert ev.feed("up", ch + key_exchange + record(0x14, b"\x01")) is False
    assert ev.reason == "up: record type 20 inside a handshake message"


def test_a_side_that_sends_no_application_data_within_the_limit_is_not_tls() -> None:
    flights = EXCHANGES[V12]
    ch = stream(flights, "up")
    ch = ch[: 5 + int.from_bytes(ch[3:5], "big")]
    ev = TlsEvidence()
    assert ev.feed("up", ch) is None
    alerts = record(0x15, b"\x01\x00") * ((EVIDENCE_LIMIT - len(ch)) // 7 + 1)
    assert ev.feed("up", alerts[: EVIDENCE_LIMIT - len(ch)]) is None  # up to the limit: still undecided
    assert ev.feed("up", alerts[EVIDENCE_LIMIT - len(ch) :]) is False
    assert ev.reason == f"up: no application data within {EVIDENCE_LIMIT} bytes"
    assert ev.client is None  # nothing kept once decided


def test_after_the_decision_nothing_is_read() -> None:
    flights = EXCHANGES[V13]
    ev = TlsEvidence()
    for d, b in flights:
        ev.feed(d, b)
    assert ev.decision is True
    assert ev.feed("up", b"GET /bin/sh HTTP/1.0\r\n") is True  # encrypted from here on: not read


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.sampled_from(["up", "down"]), st.binary(max_size=64)), max_size=30),
    start=st.booleans(),
)
def test_any_bytes_give_a_decision_or_none_and_never_an_exception(
    chunks: list[tuple[str, bytes]], start: bool
) -> None:
    """Random bytes (after a real ClientHello, or from the first byte) never raise, and once the
    evidence has decided, nothing changes its mind."""
    ev = TlsEvidence()
    if start:
        ch = stream(EXCHANGES[V13], "up")
        ev.feed("up", ch[: 5 + int.from_bytes(ch[3:5], "big")])
    first: bool | None = None
    for d, data in chunks:
        got = ev.feed(d, data)
        assert got is ev.decision
        if first is None:
            first = got
        assert got == first or first is None
    assert ev.decision is not True  # random bytes never make a TLS exchange
