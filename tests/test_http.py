"""tcpguard.http on its own, without the engine: the request reader, its one-expression fast path, the
framing it fails on, its bounds, and the host helpers. The sample rule that uses it is tested through the
engine in tests/rules/test_http_host.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tcpguard import http
from tcpguard.http import (
    MAX_LINE,
    MAX_NAME,
    RequestError,
    RequestReader,
    host_of,
    read_simple_heads,
    under_domains,
)
from tests.http_strategies import TOKENS, request_heads

BLOCKED = {"blocked.example", "ads.example"}


@dataclass
class Run:
    """What reading a client stream produced: the hosts reported (normalised), the error raised, whether
    the reader stopped, and the state it keeps at the end (None: nothing kept)."""

    hosts: list[str] = field(default_factory=list)
    error: str | None = None
    stopped: bool = False
    state: tuple[object, ...] | None = None


def on_host(run: Run, value: bytes) -> bool:
    name = host_of(value).decode("ascii", "replace")
    run.hosts.append(name)
    return under_domains(name, BLOCKED)


def read(pieces: list[bytes], *, simple: bool = True, midstream: bool = False) -> Run:
    """Feed `pieces` (the client's stream, in runs) as a plain listener does: between requests the
    one-expression path first (unless `simple` is False), a reader for the rest, dropped when idle."""
    run = Run()
    reader: RequestReader | None = None
    offset = 0
    for piece in pieces:
        if reader is not None and reader.stopped():
            break
        start = 0
        if reader is None:
            start = read_simple_heads(piece, on_host, run) if simple else 0
            if start == len(piece):
                offset += len(piece)
                continue
            reader = RequestReader()
            if start < 0:
                reader.stop()
                break
        try:
            reader.feed(piece, offset, midstream, on_host, run, start)
        except RequestError as e:
            run.error = str(e)
        offset += len(piece)
        if reader.idle():
            reader = None
    if reader is not None:
        run.stopped = reader.stopped()
        run.state = tuple(getattr(reader, f) for f in reader.__slots__)
    return run


def by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# ------------------------------------------------------------------------------------ host helpers


@pytest.mark.parametrize(
    ("value", "host"),
    [
        (b" Www.Example.ORG:8080 ", b"www.example.org"),
        (b"example.org.", b"example.org"),
        (b"[::1]:80", b"[::1]"),
        (b"[FE80::1]", b"[fe80::1]"),
        (b"", b""),
    ],
)
def test_host_of_lower_cases_and_strips_port_and_trailing_dot(value: bytes, host: bytes) -> None:
    assert host_of(value) == host


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "ads", "example", "blocked", "", "x" * 40]), max_size=20).map(".".join))
def test_parent_domain_check_matches_the_plain_definition(name: str) -> None:
    plain = any(name == b or name.endswith("." + b) for b in BLOCKED)
    assert under_domains(name, BLOCKED) == plain


def test_a_huge_host_of_many_labels_is_checked_on_its_last_labels_only() -> None:
    """Each label used to cost a copy of the rest of the name: quadratic in a 16 KB Host header. Only
    suffixes no longer than a DNS name can match, and only those are looked at."""
    looked_at: list[str] = []

    class Recording(set[str]):
        def __contains__(self, name: object) -> bool:
            looked_at.append(str(name))
            return super().__contains__(name)

    domains = Recording(BLOCKED)
    name = "a." * 8000 + "ads.example"
    assert under_domains(name, domains)
    assert not under_domains(name + "x", domains)
    assert looked_at and max(map(len, looked_at)) <= MAX_NAME
    assert len(looked_at) <= MAX_NAME


# ------------------------------------------------------------------------------------ the reader

KEEP_ALIVE = (
    b"\r\nPOST /form HTTP/1.1\r\nHost: ok.example\r\nContent-Length: 25\r\n\r\n"
    + b"Host: blocked.example\r\n\r\n"
    + b"POST /up HTTP/1.1\r\nHost: ok.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"19;ext=1\r\nHost: blocked.example\r\n\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    b"GET http://Ok.Example/ HTTP/1.1\r\nHost: ok.example\r\n\r\n"
)


def test_keep_alive_requests_report_every_host_and_never_one_in_a_body() -> None:
    for pieces in ([KEEP_ALIVE], by_byte(KEEP_ALIVE)):
        run = read(pieces)
        assert run.hosts == ["ok.example", "ok.example", "ok.example", "ok.example"]
        assert (run.error, run.state) == (None, None)  # between requests: nothing kept


def test_on_host_stops_the_reader_and_it_reads_nothing_more() -> None:
    data = b"GET / HTTP/1.1\r\nHost: ads.example\r\nHost: ok.example\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for pieces in ([data], by_byte(data)):
        run = read(pieces)
        assert run.hosts == ["ads.example"]
        assert run.stopped
    # The one-expression path stops on the first blocked host too.
    two = b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\nGET / HTTP/1.1\r\nHost: ads.example\r\n\r\n"
    hosts: list[bytes] = []

    def blocked_host(seen: list[bytes], value: bytes) -> bool:
        seen.append(value)
        return b"ads" in value

    assert read_simple_heads(two + two, blocked_host, hosts) == -1
    assert hosts == [b" ok.example", b" ads.example"]


def test_the_absolute_form_authority_is_a_host() -> None:
    run = read([b"GET http://user@Ads.Example:8080/x HTTP/1.1\r\nHost: proxy\r\n\r\n"])
    assert run.hosts == ["ads.example"]
    assert run.stopped


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
def test_framing_it_cannot_follow_raises_and_stops(framing: bytes, what: str) -> None:
    data = b"POST / HTTP/1.1\r\nHost: ok\r\n" + framing
    for pieces in ([data], by_byte(data)):
        run = read(pieces)
        assert run.error == f"HTTP framing broken: {what}"
        assert run.stopped


def test_a_first_line_that_is_not_http_stops_quietly_a_later_one_raises() -> None:
    run = read([b"\x16\x03\x01 binary\r\n", b"GET / HTTP/1.1\r\nHost: ads.example\r\n\r\n"])
    assert (run.hosts, run.error, run.stopped) == ([], None, True)
    run = read([b"GET / HTTP/1.1\r\nHost: ok\r\n\r\n", b"\x16\x03\x01 binary\r\n"])
    assert run.error == "HTTP framing broken: not an HTTP/1.x request line"
    assert run.stopped
    # Picked up mid-stream: any line where a request should start may be the middle of something else.
    run = read([b"GET / HTTP/1.1\r\nHost: ok\r\n\r\n", b"\x16\x03\x01 binary\r\n"], midstream=True)
    assert (run.error, run.stopped) == (None, True)


def test_lines_are_bounded_by_max_line_however_they_arrive() -> None:
    head = b"GET / HTTP/1.1\r\n"
    exact = b"X-Fits: " + b"a" * (MAX_LINE - len(b"X-Fits: ") - 2) + b"\r\n"
    assert len(exact) == MAX_LINE
    fits = head + exact + b"Host: ok\r\n\r\n"
    assert read([fits]) == Run(hosts=["ok"])
    too_long = head + b"Host: ok\r\nX-Long: " + b"a" * MAX_LINE + b"\r\n\r\n"
    for pieces in ([too_long], [too_long[i : i + 1400] for i in range(0, len(too_long), 1400)]):
        run = read(pieces)
        assert run.error == f"HTTP line longer than {MAX_LINE} bytes"
    # An unfinished line is kept only up to the bound: the reader never holds more than MAX_LINE bytes.
    reader = RequestReader()
    with pytest.raises(RequestError):
        for i in range(100):
            reader.feed(b"a" * 1000, 1000 * i, False, on_host, Run())
            assert len(reader.line) < MAX_LINE
    assert reader.stopped()


def test_a_split_line_is_kept_until_it_completes_then_nothing() -> None:
    reader = RequestReader()
    run = Run()
    assert reader.feed(b"GET / HTTP/1.1\r\nHo", 0, False, on_host, run)
    assert (reader.phase, reader.line) == (http.HEADERS, b"Ho")
    assert reader.feed(b"st: a.example\r\n\r\n", 18, False, on_host, run)
    assert reader.idle()
    assert run.hosts == ["a.example"]


def test_a_body_is_counted_not_kept() -> None:
    reader = RequestReader()
    run = Run()
    head = b"PUT / HTTP/1.1\r\nHost: ok\r\nContent-Length: 3000000\r\n\r\n"
    assert reader.feed(head, 0, False, on_host, run)
    offset = len(head)
    for _ in range(3000):
        assert reader.feed(b"Host: ads.example\r\n" * 50 + b"x" * 50, offset, False, on_host, run)
        offset += 1000
        assert reader.line == b""
    assert reader.idle()
    assert run.hosts == ["ok"]


def test_the_expression_is_not_tried_on_runs_longer_than_max_line() -> None:
    plain = b"GET / HTTP/1.1\r\nHost: ok\r\n\r\n"
    many = plain * (MAX_LINE // len(plain) + 1)
    assert read_simple_heads(plain * 3, on_host, Run()) == 3 * len(plain)
    assert read_simple_heads(many, on_host, Run()) == 0
    assert read([many]).hosts == ["ok"] * (len(many) // len(plain))


# ------------------------------------------------------------------------------------ one reading


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join))
@example(b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1")
@example(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\nGET / HTTP/1.1")
def test_a_stream_in_one_run_reads_like_the_same_stream_byte_by_byte(data: bytes) -> None:
    """Whole heads take the one-go path (`_head`), single bytes the line-by-line path: the same hosts,
    errors and kept state, with and without the expression."""
    whole = read([data])
    assert whole == read([data], simple=False) == read(by_byte(data))


@settings(max_examples=500, deadline=None)
@given(request_heads())
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\nGET / HTTP/1.1\r\nHost: ads.example\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\nHost: ads.example\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
@example(b"GET http://ads.example/ HTTP/1.1\r\nHost: ok.example\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\nTransfer-Encoding: chunked\r\n\r\nabc")
@example(b"GET / HTTP/1.1\r\nContent-Length: 3\r\nHost: ok.example\r\n\r\nabc")
@example(b"GET / HTTP/1.1\r\nHost: ok.example\r\nHost : ads.example\r\n\r\n")
def test_simple_heads_read_like_the_general_reader(data: bytes) -> None:
    assert read([data]) == read([data], simple=False) == read(by_byte(data))


def test_each_path_runs_where_it_should(monkeypatch: pytest.MonkeyPatch) -> None:
    """The equivalences above are only worth something if all three paths run: count them."""
    calls = {"head": 0}
    real = http._head

    def counting(*args: object) -> bool:
        calls["head"] += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(http, "_head", counting)
    typical = b"GET /index.html HTTP/1.1\r\nHost: ok.example\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n"
    assert read_simple_heads(typical * 2, on_host, Run()) == 2 * len(typical)
    post = b"POST / HTTP/1.1\r\nHost: ok.example\r\nContent-Length: 1\r\n\r\nx"
    assert read_simple_heads(typical + post, on_host, Run()) == len(typical)
    assert read_simple_heads(typical[:10], on_host, Run()) == 0
    read([KEEP_ALIVE], simple=False)
    assert calls["head"] == 3  # four requests; the first starts with an empty line: line by line
    calls["head"] = 0
    read(by_byte(KEEP_ALIVE))
    assert calls["head"] == 0
