"""Half-reset HTTP requests to a blocked Host.

Event: `receive_data`, plain (not streamed), client-to-server direction of connections to `HTTP_PORTS`.

The listener parses the client's HTTP/1.x requests incrementally, from whatever runs of bytes the
segments bring: the request line, the header block line by line, then the body is skipped (by
`Content-Length`, or chunk by chunk for `Transfer-Encoding: chunked`) so that the next request of a
keep-alive connection is parsed as a request again and a body that happens to contain "Host: ..." is
never mistaken for a header. A line split over several segments is completed from them (at most
`MAX_LINE` bytes are kept for it); a body is counted, never kept. The host of a request is its `Host`
header, or the authority of an absolute-form target (`GET http://host/ HTTP/1.1`, as sent to proxies);
every `Host` header is checked when a request has several.

If a host is blocked (`BLOCKED_HOSTS`, which also blocks every subdomain of each entry), the rule raises
a medium-severity alert and calls `flow.halfreset()` as soon as it reads that host: the server gets an RST
and frees the connection at once, and the packet carrying the host is dropped, so the server never
receives a complete request; the client gets nothing (no RST), sees a stalled request and eventually
times out, which slows down naive retry loops. The host is kept in `flow.store["host"]`.

Fail closed: a request line or header line longer than `MAX_LINE`, a `Content-Length` that is not a
plain decimal number, a chunk size that is not plain hex, and a line that is not an HTTP/1.x request line
where a later request should start are half-reset too, with their own alert (servers refuse those
anyway, and a rule that stopped reading there could be evaded: a lenient server would go on parsing
requests the rule no longer looks at). A stream whose first line does not look like HTTP/1.x (TLS,
HTTP/2 prior knowledge, anything else) is left alone, as is a connection picked up mid-stream
(`flow.midstream`: after a restart its first bytes seen may be the middle of a body) from its first line
that does not parse.
A line the stream ends in without its line feed is no request or header (no server acts on it).

Cost: between requests the parser keeps nothing but the host; in the middle of one it keeps its state
(and a split line's bytes) in `flow.store["_http_host"]`. A plain listener costs nothing on an idle
connection, where a streamed one (a suspended coroutine per connection) would cost several kilobytes.
The answers for Host values seen before are kept in `KNOWN` (shared by all connections, emptied when it
reaches `MAX_KNOWN` entries; values longer than `MAX_KNOWN_VALUE` bytes are never kept), so a keep-alive
client repeating its Host header costs one dictionary lookup per request. A run of bytes that starts
with whole, plain requests (one Host field, no body: most requests) is read by one regular expression,
`SIMPLE_HEAD`; the general parser takes whatever it does not, and reads those requests the same way (a
property test holds both to it). On a capture of the bench's request/response traffic this cuts the
rule's cost by a third. A whole head made to fail the expression late costs up to twice what the general
parser alone takes for it (it reads the head afterwards), still less than a head that arrives in pieces
and is read line by line; the expression is linear and is not tried on runs longer than `MAX_LINE`.
"""

import re
import sys

from tcpguard import rule, tcp_connection

BLOCKED_HOSTS = {"blocked.example", "ads.example"}
HTTP_PORTS = {80, 8080}
MAX_LINE = 16384

STATE = "_http_host"  # flow.store key of a request in progress
# Parser phases. BODY and CHUNK_DATA skip `remaining` bytes; the others read lines.
REQUEST, HEADERS, BODY, CHUNK_SIZE, CHUNK_DATA, TRAILERS, STOPPED = range(7)
EMPTY_LINES = (b"\r\n", b"\n")


class Request:
    """Where the parser is in the client's stream between two runs of bytes."""

    __slots__ = ("chunked", "length", "line", "phase", "remaining")

    def __init__(self):
        self.phase = REQUEST
        self.line = b""  # the start of a line whose line feed has not arrived yet
        self.remaining = 0  # body or chunk bytes still to skip
        self.length = 0  # Content-Length of the request whose headers are being read
        self.chunked = False

    def idle(self):
        """True between requests: nothing worth keeping on the connection."""
        return self.phase == REQUEST and not self.line


def host_of(value):
    """The host name in a Host header value or URL authority: lower case, no port, no trailing dot."""
    host = value.strip().lower()
    if host.startswith(b"["):  # an IPv6 literal
        return host.split(b"]", 1)[0] + b"]"
    return host.split(b":", 1)[0].rstrip(b".")


MAX_NAME = 253  # the longest DNS name: no entry of BLOCKED_HOSTS that can match a real host is longer


def is_blocked(name):
    """`name` or a parent domain of it is in BLOCKED_HOSTS: one set lookup per label, whatever its size.

    A name longer than MAX_NAME can only match through a parent domain no longer than that, so the walk
    starts at its first label that ends within that length: a 16 KB `a.a.a...` host costs no more than a
    real one (each step copies the rest of the name)."""
    if len(name) > MAX_NAME:
        dot = name.find(".", len(name) - MAX_NAME - 1)
        if dot < 0:
            return False
        name = name[dot + 1 :]
    while name not in BLOCKED_HOSTS:
        dot = name.find(".")
        if dot < 0:
            return False
        name = name[dot + 1 :]
    return True


def _too_long(flow, line, direction):
    if line and not line.endswith(b"\n") and len(line) >= MAX_LINE:
        flow.alert(f"HTTP line longer than {MAX_LINE} bytes", severity="medium", direction=direction)
        flow.halfreset()
        return True
    return False


def _broken(flow, what, direction):
    """Fail closed on framing the rule cannot follow: alert and half-reset. Returns False (stop)."""
    flow.alert(f"HTTP framing broken: {what}", severity="medium", direction=direction)
    flow.halfreset()
    return False


HEX = b"0123456789abcdefABCDEF"


MAX_KNOWN = 4096  # entries of KNOWN; it is emptied when full
MAX_KNOWN_VALUE = 300  # longer values are looked up every time, never kept in KNOWN
# Host values seen before -> (host name, blocked). The general parser keys them lower-cased, the simple-head
# path as they appear after "Host:"; both give the same answer, so a value may be there in both spellings.
# Keep-alive clients repeat the same Host header on every request: one dict lookup then replaces the
# parsing, decoding and parent-domain walk. Reloading the rules (an edit of BLOCKED_HOSTS) starts anew.
KNOWN = {}


def _host_of_value(value):
    """(host name, blocked) for a Host value or authority, in any case."""
    known = KNOWN.get(value)
    if known is not None:
        return known
    # Interned: the many connections to one site share one string instead of a copy each.
    name = sys.intern(host_of(value).decode("ascii", "replace"))
    known = (name, is_blocked(name))
    if len(value) <= MAX_KNOWN_VALUE:
        if len(KNOWN) >= MAX_KNOWN:
            KNOWN.clear()
        KNOWN[value] = known
    return known


def _check_host(flow, value, direction):
    """Remember the host of `value` (a Host header value or authority, in any case); half-reset and return
    True if it is blocked."""
    name, blocked = _host_of_value(value)
    flow.store["host"] = name
    if not blocked:
        return False
    flow.alert(f"HTTP request to blocked host {name}", severity="medium", direction=direction)
    flow.halfreset()
    return True


FIELDS = {b"host", b"content-length", b"transfer-encoding"}  # the header fields the parser acts on


def _field(flow, req, name, value, direction):
    """One header field of the request being read: `name` one of FIELDS (no surrounding white space),
    `value` as it follows the colon; both lower-cased. False: stop inspecting."""
    if name == b"host":
        if _check_host(flow, value, direction):
            return False
    elif name == b"content-length":
        value = value.strip()
        if not value.isdigit():  # ASCII digits only: int() would also take "+5", "1_0", " 5"
            return _broken(flow, "Content-Length", direction)
        req.length = int(value)
    elif name == b"transfer-encoding":
        req.chunked = b"chunked" in value
    return True


def _whole_head(data, i):
    """Where the request head starting at `i` ends (its CRLF CRLF), if all of it is in `data` and every
    line of it ends in CRLF; else -1. Most requests arrive whole: `_head` then reads them in one go."""
    end = data.find(b"\r\n\r\n", i, i + MAX_LINE)
    if end <= i or data.startswith(b"\r\n", i):
        return -1  # not whole, or empty lines before the request: the line-by-line path
    if data.count(b"\n", i, end) != data.count(b"\r\n", i, end):
        return -1  # a bare line feed somewhere: the line-by-line path splits those
    return end


def _head(flow, req, head, direction, lenient):
    """A whole request head (`head`: up to, not including, the CRLF CRLF that ends it). The same steps as
    `_line` on each of its lines in turn, without the per-line bookkeeping of `_feed`: the request line as
    it is, then the header block lower-cased in one go (every field the parser acts on is read without
    regard to case)."""
    eol = head.find(b"\r\n")
    if not _request_line(flow, req, head if eol < 0 else head[:eol], direction, lenient):
        return False
    if eol >= 0:
        for line in head[eol + 2 :].lower().split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name not in FIELDS:  # the common spelling is looked up as it is, the others stripped
                name = name.strip()
                if name not in FIELDS:
                    continue
            if not _field(flow, req, name, value, direction):
                return False
    _end_of_head(req)
    return True


def _request_line(flow, req, line, direction, lenient):
    """A line where a request starts (not empty). False: stop inspecting."""
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        if lenient:
            return False  # not HTTP/1.x: stop inspecting this connection
        return _broken(flow, "not an HTTP/1.x request line", direction)
    target = parts[1]
    if b"://" in target:
        authority = target.split(b"://", 1)[1].split(b"/", 1)[0].rsplit(b"@", 1)[-1]
        if _check_host(flow, authority.lower(), direction):
            return False
    req.phase, req.length, req.chunked = HEADERS, 0, False
    return True


def _end_of_head(req):
    """The empty line that ends a request head: what comes next is its body, its chunks or a request.
    The head's framing fields are used up here and cleared, so that a parser between requests holds the
    same state as a new one, however the bytes were segmented."""
    if req.chunked:
        req.phase = CHUNK_SIZE
    elif req.length > 0:
        req.phase, req.remaining = BODY, req.length
    else:
        req.phase = REQUEST
    req.length, req.chunked = 0, False


def _line(flow, req, line, direction, lenient):
    """Take one line (with its line feed, or `MAX_LINE` bytes without one). False: stop inspecting.
    `lenient`: a request line that is not HTTP/1.x only stops inspection (the stream's first line)."""
    phase = req.phase
    if phase == REQUEST:
        if _too_long(flow, line, direction):
            return False
        if line in EMPTY_LINES:
            return True  # empty lines before a request are allowed (RFC 9112, section 2.2)
        return _request_line(flow, req, line, direction, lenient)
    elif phase == HEADERS:
        if _too_long(flow, line, direction):
            return False
        if line in EMPTY_LINES:
            _end_of_head(req)
            return True
        name, _, value = line.lower().partition(b":")
        name = name.strip()
        return name not in FIELDS or _field(flow, req, name, value, direction)
    elif phase == CHUNK_SIZE:
        digits = line.split(b";", 1)[0].strip()
        if not digits or digits.translate(None, HEX):  # plain hex only: int(, 16) takes "0x", "_"
            return _broken(flow, "chunk size", direction)
        size = int(digits, 16)
        if size == 0:
            req.phase = TRAILERS
        elif size > -2:
            req.phase, req.remaining = CHUNK_DATA, size + 2  # the data and its CRLF
    elif line in EMPTY_LINES:  # TRAILERS: the trailer section ends with an empty line
        req.phase = REQUEST
    return True


def _feed(flow, req, data, direction, base, i=0):
    """Parse `data[i:]`; `data` is the client's stream from offset `base` on. False: stop inspecting."""
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
                lenient = flow.midstream or base + i == 0  # the stream's first line
                if not _head(flow, req, data[i:end], direction, lenient):
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
        lenient = flow.midstream or base + i - len(req.line) == 0  # the stream's first line
        req.line = b""
        i = end
        if not _line(flow, req, line, direction, lenient):
            return False
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


def _simple_heads(flow, data, direction):
    """Read the simple request heads `data` starts with (SIMPLE_HEAD), as `_feed` would. Returns where
    they end (len(data) when that is all there is), or -1 if one names a blocked host."""
    if len(data) > MAX_LINE:
        return 0  # SIMPLE_HEAD does not bound a line's length: no line of a shorter run can be too long
    i, n = 0, len(data)
    while i < n:
        m = SIMPLE_HEAD.match(data, i)
        if m is None or b"://" in m[1]:
            return i
        if _check_host(flow, m[2], direction):
            return -1
        i = m.end()
    return i


# lookback=0: the parser keeps a split line itself and only ever reads the new bytes (`current.read()`),
# so the engine need not retain any of the client's acknowledged bytes for it.
# ports=: the engine calls the listener on connections to these ports only (the others cost nothing).
@rule(on=tcp_connection.events.receive_data, direction="up", lookback=0, ports=HTTP_PORTS)
def blocked_host(flow, stream, current, direction):
    store = flow.store
    req = store.get(STATE)
    if req is not None and req.phase == STOPPED:
        return
    base = current.pos  # the stream offset of the bytes read below
    data = current.read()
    i = 0
    if req is None:
        i = _simple_heads(flow, data, direction)
        if i == len(data):
            return  # whole simple requests only: nothing to keep
        req = Request()
        if i < 0:
            req.phase = STOPPED
            store[STATE] = req
            return
    if not _feed(flow, req, data, direction, base, i):
        req.phase = STOPPED
    if req.idle():
        store.pop(STATE, None)  # between requests: keep nothing
    else:
        store[STATE] = req
