"""Hypothesis strategies of HTTP/1.x client streams near the edges of tcpguard.http's readers, shared by
the library's tests (tests/test_http.py) and the sample rule's (tests/rules/test_http_host.py)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = ["TOKENS", "request_heads"]

# Pieces that requests (and attempts to confuse a parser) are made of: line ends of every kind, header
# names in odd spellings, framing headers with good and bad values, blocked and allowed hosts.
TOKENS = [
    b"GET / HTTP/1.1",
    b"POST /x HTTP/1.0",
    b"GET http://ads.example/ HTTP/1.1",
    b"BREW / HTCPCP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"Host",
    b"host",
    b" HOST ",
    b"X-Host",
    b"Hos t",
    b" blocked.example",
    b"ok.example",
    b"www.ads.example.",
    b"Content-Length",
    b"content-length",
    b"2",
    b"0",
    b"+2",
    b"Transfer-Encoding",
    b"chunked",
    b"ab",
    b"1\r\nx\r\n0\r\n\r\n",
    # Values and targets in odd case and spacing (the one-go path lower-cases the whole head at once).
    b"CHUNKED",
    b"Blocked.Example",
    b"ADS.EXAMPLE:80",
    b"\x0b",
    b"\x0c",
    b"GET HTTP://Ads.Example/ HTTP/1.1",
    b"@",
    b"[::1]",
    b"Content-Length: 1\r\n\r\nx",
]


# Request heads near the edge of what SIMPLE_HEAD takes: mostly simple ones (a plain request line, plain
# fields, one Host field, CRLF line ends), each piece sometimes swapped for one that is not: field names that
# are or almost are the three the parser acts on, in any case and with white space where the general path
# strips it; values with bytes the simple path refuses; odd request lines, bare line feeds, bodies.
SIMPLE_LINE = b"GET / HTTP/1.1"
REQUEST_LINES = [
    b"get /a?b=c HTTP/1.0",
    b"GET / http/1.1",
    b"GET  / HTTP/1.1",
    b"GET\t/ HTTP/1.1",
    b"GET / HTTP/2",
    b"GET http://ads.example/ HTTP/1.1",
    b"GET HTTP://Ok.Example/ HTTP/1.1",
    b"GET / HTTP/1.1 extra",
    b"GET /\x80 HTTP/1.1",
    b"GET",
]
HOST_NAMES = [b"Host", b"host", b"HOST"]
NAMES = [
    b"Host ",
    b" Host",
    b"Host\t",
    b"X-Host",
    b"Hostx",
    b"Content-Length",
    b"CONTENT-LENGTH",
    b"Transfer-Encoding",
    b"User-Agent",
    b"Accept",
    b"A\x80",
    b"",
]
HOSTS = [b" ok.example", b" blocked.example", b"ADS.Example:8080", b"ok.example."]
VALUES = [b" ok.example\rx", b" 0", b" 3", b" chunked", b"", b" \x80\xff", b" a:b", b" blocked.example"]


PLAIN_NAMES = [b"User-Agent", b"Accept", b"X-Host", b"Hostx"]


def _sometimes(draw: Any, simple: bytes, odd: list[bytes]) -> bytes:
    """`simple` three times in four, else one of `odd`."""
    choice: bytes = draw(st.sampled_from(odd)) if draw(st.integers(0, 3)) == 0 else simple
    return choice


def _one_head(draw: Any) -> bytes:
    def pick(items: list[bytes]) -> bytes:
        item: bytes = draw(st.sampled_from(items))
        return item

    def end() -> bytes:
        return _sometimes(draw, b"\r\n", [b"\n"])

    fields = [
        pick(PLAIN_NAMES) + b":" + _sometimes(draw, b" x/1", VALUES) + b"\r\n"
        for _ in range(draw(st.integers(0, 2)))
    ]
    host = _sometimes(draw, pick(HOST_NAMES), NAMES)
    fields.insert(draw(st.integers(0, len(fields))), host + b":" + pick(HOSTS) + end())
    if draw(st.booleans()):  # one more field, likely an odd one
        extra = pick(NAMES + HOST_NAMES) + b":" + pick(VALUES + HOSTS)
        fields.insert(draw(st.integers(0, len(fields))), extra + end())
    line = _sometimes(draw, SIMPLE_LINE, REQUEST_LINES) + end()
    return line + b"".join(fields) + b"\r\n" + _sometimes(draw, b"", [b"abc", b"0\r\n\r\n"])


@st.composite
def request_heads(draw: Any) -> bytes:
    return b"".join(_one_head(draw) for _ in range(draw(st.integers(1, 3))))
