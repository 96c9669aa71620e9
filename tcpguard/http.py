"""Reading HTTP/1.x requests from the client's stream, for rules that check requests.

A rule imports it beside the rule API (`from tcpguard.http import RequestReader, ...`); it needs
nothing but the standard library, so it runs wherever a rule module does. `rules/http_host.py` is the
worked example: it checks the host of every request and is the pattern to copy.

What it reads. A plain `receive_data` listener gets the client's bytes in runs, cut wherever TCP cut
them. `RequestReader` follows the requests through those runs: the request line, the header block
line by line, then the body, skipped by `Content-Length` or chunk by chunk for
`Transfer-Encoding: chunked` (a body is counted, never kept), so that the next request of a keep-alive
connection is read as a request again and a body that happens to contain "Host: ..." is never taken for
a header. It reports each request's host to the rule's callback: every `Host` field (a request may
carry several) and the authority of an absolute-form target (`GET http://host/ HTTP/1.1`, as sent to
proxies). `host_of` turns either into a host name and `under_domains` checks it against a set of
domains.

The shape of a listener that uses it (`rules/http_host.py` in full, with a cache of answers):

```python
def check(flow, value):                      # on_host: True stops the reader
    name = host_of(value).decode("ascii", "replace")
    if under_domains(name, BLOCKED):
        flow.alert(f"blocked host {name}", severity="medium", direction="up")
        flow.halfreset()
        return True
    return False

@rule(on=tcp_connection.events.receive_data, direction="up", lookback=0, ports={80})
def hosts(flow, stream, current, direction):
    reader = flow.store.get("http")
    if reader is not None and reader.stopped():
        return
    offset, data = current.pos, current.read()
    start = 0
    if reader is None:                       # between requests: the fast path first
        start = read_simple_heads(data, check, flow)
        if start == len(data):
            return                           # whole plain requests: nothing to keep
        reader = RequestReader()
        if start < 0:
            reader.stop()
    if not reader.stopped():
        try:
            reader.feed(data, offset, flow.midstream, check, flow, start)
        except RequestError as e:            # framing it cannot follow: fail closed
            flow.alert(str(e), severity="medium", direction="up")
            flow.halfreset()
    if reader.idle():
        flow.store.pop("http", None)
    else:
        flow.store["http"] = reader
```

Bounds. A line split over several runs is completed from them, and at most `MAX_LINE` bytes of it are
kept; a request line or header line longer than that raises `RequestError`, as does a `Content-Length`
that is not a plain decimal number, a chunk size that is not plain hex, and a line that is not an
HTTP/1.x request line where a later request should start. Servers refuse all of those, and a rule that
stopped reading there could be evaded (a lenient server would go on parsing requests the rule no longer
looks at), so the sample fails closed on them. A first line that is not HTTP/1.x (TLS, HTTP/2 prior
knowledge, anything else) only stops the reader (`feed` returns False): the stream is not HTTP and not
the rule's business; the same holds for any such line of a connection picked up mid-stream, whose first
bytes seen may be the middle of a body. A line the stream ends in without its line feed is no request
or header (no server acts on it).

State. Between requests a reader holds nothing (`idle()`), so a rule can drop it and keep nothing on
an idle connection; in the middle of a request it holds its phase, the framing of the body and the
start of a split line, in five slots.

Two paths, one reading (design notes). Most requests arrive whole, in one run, and carry no body. For
them `read_simple_heads` tries one regular expression, `SIMPLE_HEAD`, that matches a whole head with
every line ending in CRLF, a request line of three fields separated by single spaces, field names of
visible characters only, exactly one Host field and neither Content-Length nor Transfer-Encoding; the
match yields the Host value, in one C call, without any state. Whatever it does not take goes to
`RequestReader.feed`, which reads a whole head at once (`_head`: the header block lower-cased in one
go) when its CRLF CRLF is in the run, and line by line otherwise. The three readings agree: the tests
(tests/test_http.py, and tests/rules/test_http_host.py through the engine) hold the expression, the
general parser and byte-by-byte reading to the same hosts, errors and kept state, on heads built near
the expression's edge. The expression is linear (every repetition consumes a whole line and a failed
match backs off a line at a time) and is not tried on runs longer than `MAX_LINE` (it does not bound a
line's length; the general path does). A head made to fail the expression late is read twice, still
less than a head that arrives in pieces. What this saves and costs, measured: docs/BENCHMARKS.md,
round 7.

Why callbacks with a context argument: the reader calls `on_host(ctx, value)` for each host it meets,
and a rule passes a module-level function and its flow. A closure or bound method made per packet would
cost an allocation on every call of the listener; this costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "MAX_LINE",
    "MAX_NAME",
    "SIMPLE_HEAD",
    "RequestError",
    "RequestReader",
    "host_of",
    "read_simple_heads",
    "under_domains",
]

Ctx = TypeVar("Ctx")

MAX_LINE = 16384
"""The longest request line or header line read, line feed included (Python's `readline` limit)."""

MAX_NAME = 253
"""The longest DNS name: a domain longer than that cannot match a real host."""

# Reader phases. BODY and CHUNK_DATA skip `remaining` bytes; the others read lines.
REQUEST, HEADERS, BODY, CHUNK_SIZE, CHUNK_DATA, TRAILERS, STOPPED = range(7)
EMPTY_LINES = (b"\r\n", b"\n")
HEX = b"0123456789abcdefABCDEF"
FIELDS = {b"host", b"content-length", b"transfer-encoding"}  # the header fields the reader acts on


class RequestError(ValueError):
    """The client's request framing cannot be followed; the message says what, for an alert
    ("HTTP line longer than 16384 bytes", "HTTP framing broken: chunk size", ...). A rule that stops
    reading here could be evaded, since a lenient server goes on parsing what follows."""


def host_of(value: bytes) -> bytes:
    """The host name in a Host value or a URL authority, as `on_host` gets them: lower case, without
    surrounding white space, port or trailing dot (an IPv6 literal keeps its brackets)."""
    host = value.strip().lower()
    if host.startswith(b"["):  # an IPv6 literal
        return host.split(b"]", 1)[0] + b"]"
    return host.split(b":", 1)[0].rstrip(b".")


def under_domains(name: str, domains: set[str] | frozenset[str]) -> bool:
    """`name` is one of `domains` or a subdomain of one: one set lookup per label, whatever its size.

    A name longer than MAX_NAME can only match through a parent domain no longer than that, so the walk
    starts at its first label that ends within that length: a 16 KB `a.a.a...` host costs no more than a
    real one (each step copies the rest of the name)."""
    if len(name) > MAX_NAME:
        dot = name.find(".", len(name) - MAX_NAME - 1)
        if dot < 0:
            return False
        name = name[dot + 1 :]
    while name not in domains:
        dot = name.find(".")
        if dot < 0:
            return False
        name = name[dot + 1 :]
    return True


# The common request, read with one regular expression: a head that arrived whole with every line ending
# in CRLF, a request line of three fields separated by single spaces, field names of visible characters
# only, exactly one Host field and no Content-Length or Transfer-Encoding (so no body follows). What
# `_head` would read from it is then just the Host value (group 2); anything else takes the general path.
# Linear: every repetition consumes a whole line, and a failed match backs off a line at a time.
_OTHER_FIELD = rb"(?:(?!(?i:host|content-length|transfer-encoding):)[!-9;-~]+:[^\r\n]*\r\n)*"
SIMPLE_HEAD = re.compile(
    rb"[!-~]+ ([!-~]+) HTTP/1\.[!-~]*\r\n"
    + _OTHER_FIELD
    + rb"(?i:host):([^\r\n]*)\r\n"
    + _OTHER_FIELD
    + rb"\r\n"
)
"""The common request head as one expression (group 1 the target, group 2 the Host value); see
`read_simple_heads`."""


def read_simple_heads(data: bytes, on_host: Callable[[Ctx, bytes], bool], ctx: Ctx) -> int:
    """Read the plain, whole request heads `data` starts with (`SIMPLE_HEAD`) exactly as a new
    `RequestReader` would, without making one: `on_host(ctx, value)` is called with each one's Host value
    (as it follows the colon) and returns True to stop. Returns where those heads end (`len(data)` when
    that is all there is: nothing to keep), or -1 if `on_host` stopped. Call it only between requests;
    give the rest to a new reader's `feed(..., start=)`."""
    if len(data) > MAX_LINE:
        return 0  # SIMPLE_HEAD does not bound a line's length: no line of a shorter run can be too long
    i, n = 0, len(data)
    while i < n:
        m = SIMPLE_HEAD.match(data, i)
        if m is None or b"://" in m[1]:
            return i
        if on_host(ctx, m[2]):
            return -1
        i = m.end()
    return i


class RequestReader:
    """Where the reading of one client stream is between two runs of bytes (see the module's text)."""

    __slots__ = ("chunked", "length", "line", "phase", "remaining")

    def __init__(self) -> None:
        self.phase = REQUEST
        self.line = b""  # the start of a line whose line feed has not arrived yet
        self.remaining = 0  # body or chunk bytes still to skip
        self.length = 0  # Content-Length of the request whose headers are being read
        self.chunked = False

    def idle(self) -> bool:
        """True between requests: nothing worth keeping on the connection."""
        return self.phase == REQUEST and not self.line

    def stopped(self) -> bool:
        """True once `feed` returned False or raised, or `stop()` was called: read nothing more."""
        return self.phase == STOPPED

    def stop(self) -> None:
        """Read nothing more of this stream (the rule has decided on the connection)."""
        self.phase = STOPPED

    def feed(
        self,
        data: bytes,
        offset: int,
        midstream: bool,
        on_host: Callable[[Ctx, bytes], bool],
        ctx: Ctx,
        start: int = 0,
    ) -> bool:
        """Read `data[start:]`, the client's stream from offset `offset` (`current.pos`) on.

        `on_host(ctx, value)` gets each host met: a Host value as it follows the colon, or the authority
        of an absolute-form target, in any case (`host_of` normalises both); it returns True to stop
        reading. `midstream` (`flow.midstream`): any line that is not an HTTP/1.x request line where a
        request should start stops the reader quietly, not only the stream's first line.

        Returns False when reading stopped (not HTTP, or `on_host` said so), True otherwise; raises
        `RequestError` on framing it cannot follow. Either way the reader is `stopped()` after it."""
        try:
            if _feed(self, data, offset, midstream, on_host, ctx, start):
                return True
        except RequestError:
            self.phase = STOPPED
            raise
        self.phase = STOPPED
        return False


def _too_long(line: bytes) -> None:
    if line and not line.endswith(b"\n") and len(line) >= MAX_LINE:
        raise RequestError(f"HTTP line longer than {MAX_LINE} bytes")


def _field(
    req: RequestReader, name: bytes, value: bytes, on_host: Callable[[Ctx, bytes], bool], ctx: Ctx
) -> bool:
    """One header field of the request being read: `name` one of FIELDS (no surrounding white space),
    `value` as it follows the colon; both lower-cased. False: stop reading."""
    if name == b"host":
        if on_host(ctx, value):
            return False
    elif name == b"content-length":
        value = value.strip()
        if not value.isdigit():  # ASCII digits only: int() would also take "+5", "1_0", " 5"
            raise RequestError("HTTP framing broken: Content-Length")
        req.length = int(value)
    elif name == b"transfer-encoding":
        req.chunked = b"chunked" in value
    return True


def _whole_head(data: bytes, i: int) -> int:
    """Where the request head starting at `i` ends (its CRLF CRLF), if all of it is in `data` and every
    line of it ends in CRLF; else -1. Most requests arrive whole: `_head` then reads them in one go."""
    end = data.find(b"\r\n\r\n", i, i + MAX_LINE)
    if end <= i or data.startswith(b"\r\n", i):
        return -1  # not whole, or empty lines before the request: the line-by-line path
    if data.count(b"\n", i, end) != data.count(b"\r\n", i, end):
        return -1  # a bare line feed somewhere: the line-by-line path splits those
    return end


def _head(
    req: RequestReader,
    head: bytes,
    lenient: bool,
    on_host: Callable[[Ctx, bytes], bool],
    ctx: Ctx,
) -> bool:
    """A whole request head (`head`: up to, not including, the CRLF CRLF that ends it). The same steps as
    `_line` on each of its lines in turn, without the per-line bookkeeping of `_feed`: the request line as
    it is, then the header block lower-cased in one go (every field the reader acts on is read without
    regard to case)."""
    eol = head.find(b"\r\n")
    if not _request_line(req, head if eol < 0 else head[:eol], lenient, on_host, ctx):
        return False
    if eol >= 0:
        for line in head[eol + 2 :].lower().split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name not in FIELDS:  # the common spelling is looked up as it is, the others stripped
                name = name.strip()
                if name not in FIELDS:
                    continue
            if not _field(req, name, value, on_host, ctx):
                return False
    _end_of_head(req)
    return True


def _request_line(
    req: RequestReader, line: bytes, lenient: bool, on_host: Callable[[Ctx, bytes], bool], ctx: Ctx
) -> bool:
    """A line where a request starts (not empty). False: stop reading."""
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        if lenient:
            return False  # not HTTP/1.x: stop reading this stream
        raise RequestError("HTTP framing broken: not an HTTP/1.x request line")
    target = parts[1]
    if b"://" in target:
        authority = target.split(b"://", 1)[1].split(b"/", 1)[0].rsplit(b"@", 1)[-1]
        if on_host(ctx, authority.lower()):
            return False
    req.phase, req.length, req.chunked = HEADERS, 0, False
    return True


def _end_of_head(req: RequestReader) -> None:
    """The empty line that ends a request head: what comes next is its body, its chunks or a request.
    The head's framing fields are used up here and cleared, so that a reader between requests holds the
    same state as a new one, however the bytes were segmented."""
    if req.chunked:
        req.phase = CHUNK_SIZE
    elif req.length > 0:
        req.phase, req.remaining = BODY, req.length
    else:
        req.phase = REQUEST
    req.length, req.chunked = 0, False


def _line(
    req: RequestReader, line: bytes, lenient: bool, on_host: Callable[[Ctx, bytes], bool], ctx: Ctx
) -> bool:
    """Take one line (with its line feed, or `MAX_LINE` bytes without one). False: stop reading.
    `lenient`: a request line that is not HTTP/1.x only stops reading (the stream's first line)."""
    phase = req.phase
    if phase == REQUEST:
        _too_long(line)
        if line in EMPTY_LINES:
            return True  # empty lines before a request are allowed (RFC 9112, section 2.2)
        return _request_line(req, line, lenient, on_host, ctx)
    elif phase == HEADERS:
        _too_long(line)
        if line in EMPTY_LINES:
            _end_of_head(req)
            return True
        name, _, value = line.lower().partition(b":")
        name = name.strip()
        return name not in FIELDS or _field(req, name, value, on_host, ctx)
    elif phase == CHUNK_SIZE:
        digits = line.split(b";", 1)[0].strip()
        if not digits or digits.translate(None, HEX):  # plain hex only: int(, 16) takes "0x", "_"
            raise RequestError("HTTP framing broken: chunk size")
        size = int(digits, 16)
        if size == 0:
            req.phase = TRAILERS
        elif size > -2:
            req.phase, req.remaining = CHUNK_DATA, size + 2  # the data and its CRLF
    elif line in EMPTY_LINES:  # TRAILERS: the trailer section ends with an empty line
        req.phase = REQUEST
    return True


def _feed(
    req: RequestReader,
    data: bytes,
    base: int,
    midstream: bool,
    on_host: Callable[[Ctx, bytes], bool],
    ctx: Ctx,
    i: int,
) -> bool:
    """Read `data[i:]`; `data` is the client's stream from offset `base` on. False: stop reading."""
    n = len(data)
    while i < n:
        if req.phase in (BODY, CHUNK_DATA):
            k = min(req.remaining, n - i)
            i += k
            req.remaining -= k
            if req.remaining > 0:
                return True
            req.phase = REQUEST if req.phase == BODY else CHUNK_SIZE
            continue
        if req.phase == REQUEST and not req.line:
            end = _whole_head(data, i)
            if end >= 0:
                lenient = midstream or base + i == 0  # the stream's first line
                if not _head(req, data[i:end], lenient, on_host, ctx):
                    return False
                i = end + 4
                continue
        # A line ends at its line feed, or after MAX_LINE bytes without one (readline's limit).
        room = MAX_LINE - len(req.line)
        j = data.find(b"\n", i, i + room)
        if j >= 0:
            end = j + 1
        elif n - i >= room:
            end = i + room
        else:
            req.line += data[i:]
            return True
        line = req.line + data[i:end] if req.line else data[i:end]
        lenient = midstream or base + i - len(req.line) == 0  # the stream's first line
        req.line = b""
        i = end
        if not _line(req, line, lenient, on_host, ctx):
            return False
    return True
