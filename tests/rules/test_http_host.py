"""rules/http_host.py: requests to a blocked Host are half-reset, also on keep-alive connections, without
false positives from bodies."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tcpguard import http
from tcpguard.core.rules import RuleSet, collecting
from tcpguard.core.settings import EngineSettings
from tcpguard.http import MAX_LINE, RequestReader
from tests.http_strategies import TOKENS, request_heads

from .samples import ACCEPT, DROP, Playbook, actions, alerts, flow, forged, load, playbook, send_pieces

RS, MOD = load("http_host")


def http_playbook(sport: int = 80) -> Playbook:
    pb = playbook(RS, sport=sport)
    pb.handshake()
    return pb


def test_allowed_host_passes_and_is_remembered() -> None:
    pb = http_playbook()
    request = b"GET / HTTP/1.1\r\nHost: www.example.org:80\r\nAccept: */*\r\n\r\n"
    assert pb.client("PA", request).verdict == ACCEPT
    assert actions(pb) == []
    assert flow(pb).store["host"] == "www.example.org"


def test_blocked_host_half_resets_only_the_server() -> None:
    pb = http_playbook()
    dec = pb.client("PA", b"GET / HTTP/1.1\r\nUser-Agent: t\r\nHost: Blocked.Example\r\n\r\n")
    assert dec.verdict == DROP
    assert actions(pb) == ["halfreset"]
    assert alerts(pb) == ["HTTP request to blocked host blocked.example"]
    assert forged(pb) == [("server", 80)]  # the client gets no RST
    assert pb.client("PA", b"retry").verdict == DROP


@pytest.mark.parametrize("host", [b"www.blocked.example", b"blocked.example.", b"ads.example:8080"])
def test_subdomains_trailing_dot_and_ports(host: bytes) -> None:
    pb = http_playbook()
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n").verdict == DROP


def test_absolute_form_target() -> None:
    pb = http_playbook(8080)
    request = b"GET http://user@blocked.example:80/x HTTP/1.1\r\nHost: proxy\r\n\r\n"
    assert pb.client("PA", request).verdict == DROP
    assert alerts(pb) == ["HTTP request to blocked host blocked.example"]


def test_host_split_across_segments_drops_the_segment_completing_it() -> None:
    pb = http_playbook()
    pieces = [b"GET / HTTP/1.1\r\nHo", b"st: blocked.ex", b"ample", b"\r\n\r\n"]
    assert send_pieces(pb, pieces) == [ACCEPT, ACCEPT, ACCEPT, DROP]


def test_keep_alive_bodies_are_skipped_and_the_next_request_is_parsed() -> None:
    pb = http_playbook()
    body = b"Host: blocked.example\r\n\r\n" * 3
    first = b"POST /form HTTP/1.1\r\nHost: ok.example\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert send_pieces(pb, [first[:50], first[50:]]) == [ACCEPT, ACCEPT]
    chunked = (
        b"POST /up HTTP/1.1\r\nHost: ok.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"19\r\nHost: blocked.example\r\n\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    assert pb.client("PA", chunked).verdict == ACCEPT
    assert actions(pb) == []
    assert pb.client("PA", b"\r\nGET /next HTTP/1.1\r\nHost: blocked.example\r\n\r\n").verdict == DROP
    assert actions(pb) == ["halfreset"]


def test_large_body_is_skipped_in_steps_without_buffering_it_whole() -> None:
    settings = EngineSettings()
    settings.limits.max_stream_buffer = 1024 * 1024
    pb = playbook(RS, settings, sport=80)
    pb.handshake()
    size = 3 * settings.limits.max_stream_buffer  # a body that would hit the bound if it were kept
    head = b"PUT /big HTTP/1.1\r\nHost: ok\r\nContent-Length: %d\r\n\r\n" % size
    assert pb.client("PA", head).verdict == ACCEPT
    chunk = b"Host: blocked.example\r\n" * 1000
    sent = 0
    while sent < size:
        piece = chunk[: size - sent]
        assert pb.client("PA", piece).verdict == ACCEPT
        pb.server("A")  # the server acknowledges, so the engine may forget what it forwarded
        sent += len(piece)
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n").verdict == DROP


def test_overlong_header_line_fails_closed() -> None:
    pb = http_playbook()
    line = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * MAX_LINE
    verdicts = send_pieces(pb, [line[i : i + 1400] for i in range(0, len(line), 1400)])
    assert verdicts[-1] == DROP
    assert actions(pb) == ["halfreset"]
    assert alerts(pb) == [f"HTTP line longer than {MAX_LINE} bytes"]


def test_not_http_and_other_ports_are_left_alone() -> None:
    pb = http_playbook()
    assert pb.client("PA", b"\x16\x03\x01 binary").verdict == ACCEPT
    assert pb.client("PA", b"\r\nGET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n").verdict == ACCEPT
    other = http_playbook(443)
    assert other.client("PA", b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n").verdict == ACCEPT
    assert actions(pb) == actions(other) == []


BODY = b"Host: blocked.example\r\n\r\n"
KEEP_ALIVE = (
    b"\r\nPOST /form HTTP/1.1\r\nHost: ok.example\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    + BODY
    + b"POST /up HTTP/1.1\r\nHost: ok.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"19;ext=1\r\nHost: blocked.example\r\n\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    b"GET http://ok.example/ HTTP/1.1\r\nHost: ok.example\r\n\r\n"
)
BLOCKED_LAST = KEEP_ALIVE + b"GET /next HTTP/1.1\r\nUser-Agent: t\r\nHost: ads.example\r\n\r\n"


def played(pieces: list[bytes]) -> tuple[Playbook, list[Any]]:
    pb = http_playbook()
    return pb, send_pieces(pb, pieces)


def completing_piece(pieces: list[bytes], offset: int) -> int:
    """Index of the piece that carries stream byte `offset`."""
    pos = 0
    for i, p in enumerate(pieces):
        pos += len(p)
        if offset < pos:
            return i
    raise AssertionError(offset)


def cuts(data: bytes) -> list[list[bytes]]:
    """The stream whole, byte by byte, and in two pieces at every position."""
    return [[data], [data[i : i + 1] for i in range(len(data))]] + [
        [data[:k], data[k:]] for k in range(1, len(data))
    ]


def test_keep_alive_stream_passes_however_it_is_split() -> None:
    for pieces in cuts(KEEP_ALIVE):
        pb, verdicts = played(pieces)
        assert verdicts == [ACCEPT] * len(pieces), [len(p) for p in pieces]
        assert flow(pb).store == {"host": "ok.example"}  # between requests nothing else is kept


def test_blocked_host_is_caught_on_the_segment_ending_its_line_however_it_is_split() -> None:
    trigger = BLOCKED_LAST.index(b"Host: ads.example\r\n") + len(b"Host: ads.example\r\n") - 1
    for pieces in cuts(BLOCKED_LAST):
        pb, verdicts = played(pieces)
        at = completing_piece(pieces, trigger)
        assert verdicts == [ACCEPT] * at + [DROP], [len(p) for p in pieces]
        assert alerts(pb) == ["HTTP request to blocked host ads.example"]
        assert actions(pb) == ["halfreset"]


def test_overlong_line_in_one_segment_and_at_exactly_the_limit() -> None:
    limit = MAX_LINE
    head = b"GET / HTTP/1.1\r\n"
    exact = b"X-Fits: " + b"a" * (limit - len(b"X-Fits: ") - 2) + b"\r\n"  # MAX_LINE bytes with CRLF
    assert len(exact) == limit
    pb = http_playbook()
    assert pb.client("PA", head + exact + b"Host: ok\r\n\r\n").verdict == ACCEPT
    assert actions(pb) == []
    pb = http_playbook()
    assert pb.client("PA", head + b"X-Long: " + b"a" * limit + b"\r\n\r\n").verdict == DROP
    assert alerts(pb) == [f"HTTP line longer than {limit} bytes"]
    pb = http_playbook()  # the same in a head the simple-head path would otherwise take
    assert pb.client("PA", head + b"Host: ok\r\nX-Long: " + b"a" * limit + b"\r\n\r\n").verdict == DROP
    assert alerts(pb) == [f"HTTP line longer than {limit} bytes"]
    pb = http_playbook()  # the request line itself
    assert pb.client("PA", b"GET /" + b"a" * limit).verdict == DROP
    assert actions(pb) == ["halfreset"]


def test_a_split_line_is_kept_only_until_it_completes() -> None:
    pb = http_playbook()
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHo").verdict == ACCEPT
    state = flow(pb).store[MOD["STATE"]]
    assert (state.phase, state.line) == (http.HEADERS, b"Ho")
    assert pb.client("PA", b"st: a.example\r\n\r\n").verdict == ACCEPT
    assert flow(pb).store == {"host": "a.example"}


@pytest.mark.parametrize(
    ("framing", "what"),
    [
        (b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"Transfer-Encoding: chunked\r\n\r\n0x5\r\n", "chunk size"),
        (b"Content-Length: +5\r\n\r\n", "Content-Length"),
        (b"Content-Length: 1_0\r\n\r\n", "Content-Length"),
        (b"Content-Length: 5, 5\r\n\r\n", "Content-Length"),
    ],
)
def test_broken_framing_fails_closed(framing: bytes, what: str) -> None:
    # Stopping there would let a lenient server's next requests through unread.
    pb = http_playbook()
    d = pb.client("PA", b"POST / HTTP/1.1\r\nHost: ok\r\n" + framing)
    assert d.verdict == DROP
    assert actions(pb) == ["halfreset"]
    assert alerts(pb) == [f"HTTP framing broken: {what}"]


def test_a_later_request_line_that_is_not_http_fails_closed() -> None:
    pb = http_playbook()
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: ok\r\n\r\n").verdict == ACCEPT
    assert pb.client("PA", b"\x16\x03\x01 binary\r\n").verdict == DROP
    assert actions(pb) == ["halfreset"]
    assert alerts(pb) == ["HTTP framing broken: not an HTTP/1.x request line"]


def test_an_idle_connection_keeps_no_request_bytes_and_the_host_cheaply() -> None:
    pb = http_playbook()
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n").verdict == ACCEPT
    pb.server("PA", b"HTTP/1.1 200 OK\r\n\r\n")
    assert flow(pb).up.buf == b""  # lookback=0: the parser needs none of the acknowledged bytes
    assert flow(pb)._store == ("host", "example.org")  # packed between packets (64 bytes, not 184)
    assert flow(pb).store == {"host": "example.org"}


def test_known_hosts_answer_like_new_ones_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    known = MOD["KNOWN"]
    known.clear()
    monkeypatch.setitem(MOD, "MAX_KNOWN", 3)
    for i in range(7):
        for _ in range(2):  # the second connection finds the host in KNOWN
            pb = http_playbook()
            request = b"GET / HTTP/1.1\r\nHost: H%d.Example\r\n\r\n" % i
            assert pb.client("PA", request).verdict == ACCEPT
            assert flow(pb).store["host"] == f"h{i}.example"
        assert 1 <= len(known) <= 3  # emptied when full
    for _ in range(2):
        pb = http_playbook()
        assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: WWW.Ads.Example:80\r\n\r\n").verdict == DROP
        assert alerts(pb) == ["HTTP request to blocked host www.ads.example"]
    # Kept as it appears after "Host:" (one request's worth of Host values: the general path lower-cases
    # the whole head first, the simple-head path does not).
    assert known[b" WWW.Ads.Example:80"] == ("www.ads.example", True)
    long = b"a." * 200 + b"blocked.example"
    pb = http_playbook()
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: " + long + b"\r\n\r\n").verdict == DROP
    assert b" " + long not in known  # longer than MAX_KNOWN_VALUE: looked up, never kept
    known.clear()


def _outcome(pieces: list[bytes]) -> tuple[list[str], list[str], dict[str, Any], bool]:
    pb, verdicts = played(pieces)
    store = {
        k: tuple(getattr(v, f) for f in v.__slots__) if isinstance(v, RequestReader) else v
        for k, v in flow(pb).store.items()
    }
    return alerts(pb), actions(pb), store, DROP in verdicts


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join))
# Found by hypothesis: a body's framing (Content-Length) stayed in the parser of the one-go path after the
# body, where the line-by-line path starts the next request with a new parser.
@example(b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1")
@example(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\nGET / HTTP/1.1")
def test_a_stream_in_one_segment_reads_like_the_same_stream_byte_by_byte(data: bytes) -> None:
    """Whole request heads in one segment take the one-go path (`_head`), heads cut into single bytes the
    line-by-line path: both must find the same hosts, fail closed on the same framing, keep the same state."""
    if not data:
        return
    whole = _outcome([data])
    by_byte = _outcome([data[i : i + 1] for i in range(len(data))])
    assert whole == by_byte


def test_the_one_go_path_reads_a_whole_head_and_the_line_path_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The equivalence above is only worth something if both paths run: count them."""
    calls = {"head": 0}
    real = http._head

    def counting(*args: Any) -> Any:
        calls["head"] += 1
        return real(*args)

    monkeypatch.setattr(http, "_head", counting)
    played([KEEP_ALIVE])
    # Four requests; the first starts with an empty line and takes the line path.
    assert calls["head"] == 3
    calls["head"] = 0
    played([KEEP_ALIVE[i : i + 1] for i in range(len(KEEP_ALIVE))])
    assert calls["head"] == 0


def _without_simple_path(monkeypatch: pytest.MonkeyPatch, data: bytes) -> Any:
    with monkeypatch.context() as m:
        m.setitem(MOD, "read_simple_heads", lambda data, on_host, ctx: 0)
        return _outcome([data])


@settings(max_examples=500, deadline=None)
@given(request_heads())
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\nGET / HTTP/1.1\r\nHost: ads.example\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\nHost: ads.example\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
@example(b"GET http://ads.example/ HTTP/1.1\r\nHost: ok.example\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\nTransfer-Encoding: chunked\r\n\r\nabc")
@example(b"GET / HTTP/1.1\r\nContent-Length: 3\r\nHost: ok.example\r\n\r\nabc")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\nHost : ads.example\r\n\r\n")
def test_simple_heads_read_like_the_general_path(data: bytes) -> None:
    """Runs of requests in one segment, with and without the simple-head path, and byte by byte: the same
    hosts, alerts, actions, drops and kept state."""
    mp = pytest.MonkeyPatch()
    try:
        general = _without_simple_path(mp, data)
    finally:
        mp.undo()
    assert _outcome([data]) == general == _outcome([data[i : i + 1] for i in range(len(data))])


def test_the_simple_path_reads_common_requests_and_leaves_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The equivalence above is only worth something if the simple path does take requests: it reads a
    typical keep-alive request in full, stops at the first request it does not take, and never sees a
    request that is cut in two."""
    seen: list[int] = []
    real = MOD["read_simple_heads"]

    def recording(data: bytes, on_host: Any, ctx: Any) -> int:
        seen.append(real(data, on_host, ctx))
        return seen[-1]

    monkeypatch.setitem(MOD, "read_simple_heads", recording)
    typical = b"GET /index.html HTTP/1.1\r\nHost: ok.example\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n"
    post = b"POST / HTTP/1.1\r\nHost: ok.example\r\nContent-Length: 1\r\n\r\nx"
    pb = http_playbook()
    assert pb.client("PA", typical + typical).verdict == ACCEPT
    assert seen == [2 * len(typical)]
    assert pb.client("PA", typical + post).verdict == ACCEPT
    assert seen[-1] == len(typical)  # the POST went the general way
    assert pb.client("PA", typical[:10]).verdict == ACCEPT
    assert seen[-1] == 0
    pb.client("PA", typical[10:])  # the rest of a split request: the general path's, which holds it
    assert len(seen) == 3
    assert flow(pb).store == {"host": "ok.example"}


def test_the_usage_example_of_tcpguard_http_is_a_working_rule() -> None:
    """The listener shown in tcpguard.http's docstring (and so in docs/rules.md) runs as written and does
    what the sample does on the cases that matter: a blocked host, keep-alive bodies, broken framing."""
    doc = http.__doc__ or ""
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    header = (
        "from tcpguard import rule, tcp_connection\n"
        "from tcpguard.http import RequestError, RequestReader, host_of, read_simple_heads, under_domains\n"
        "BLOCKED = {'blocked.example'}\n"
    )
    with collecting() as found:
        exec(compile(header + code, "tcpguard.http example", "exec"), {"__name__": "example"})
    rules = RuleSet(list(found))
    pb = playbook(rules, sport=80)
    pb.handshake()
    body = b"Host: blocked.example\r\n\r\n"
    post = b"POST / HTTP/1.1\r\nHost: ok.example\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert send_pieces(pb, [post[:30], post[30:], b"GET / HTTP/1.1\r\nHost: ok\r\n\r\n"]) == [ACCEPT] * 3
    assert pb.client("PA", b"GET / HTTP/1.1\r\nHost: www.Blocked.Example\r\n\r\n").verdict == DROP
    assert alerts(pb) == ["blocked host www.blocked.example"]
    assert actions(pb) == ["halfreset"]
    pb = playbook(rules, sport=80)
    pb.handshake()
    assert pb.client("PA", b"POST / HTTP/1.1\r\nHost: ok\r\nContent-Length: +5\r\n\r\n").verdict == DROP
    assert alerts(pb) == ["HTTP framing broken: Content-Length"]
