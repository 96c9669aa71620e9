"""Half-reset HTTP requests to a blocked Host.

Event: `receive_data`, plain (not streamed), client-to-server direction of connections to `HTTP_PORTS`.

What: every HTTP/1.x request the client sends, keep-alive ones included, is read with
`tcpguard.http` (its reader skips bodies, so a body that contains "Host: ..." is never taken for a
header), and the host it names is checked: each `Host` field, and the authority of an absolute-form
target (`GET http://host/ HTTP/1.1`, as sent to proxies). If the host or a parent domain of it is in
`BLOCKED_HOSTS`, the rule raises a medium-severity alert and calls `flow.halfreset()` on the segment
that completes the host's line. The host is kept in `flow.store["host"]` for other rules.

Why a half-reset: the server gets an RST and frees the connection at once, and the packet carrying the
host is dropped, so the server never receives a complete request; the client gets nothing, sees a
stalled request and eventually times out, which slows down naive retry loops.

Fail closed: framing the reader cannot follow (a line longer than `tcpguard.http.MAX_LINE`, a bad
`Content-Length` or chunk size, a line that is not a request line where a later request should start)
is half-reset too, with its own alert: a rule that stopped reading there could be evaded. A stream whose
first line is not HTTP/1.x (TLS, HTTP/2, anything else) is left alone, as is a connection picked up
mid-stream (`flow.midstream`) from its first line that does not parse.

Cost: a plain listener keeps nothing between requests but the host (a streamed one would keep a
coroutine per connection); the answer for each Host value seen before is kept in `KNOWN` (bounded by
`MAX_KNOWN` entries and `MAX_KNOWN_VALUE` bytes a value), so a keep-alive client repeating its Host
costs one dictionary lookup per request. Figures: docs/BENCHMARKS.md, round 7.

To adapt: edit `BLOCKED_HOSTS` and `HTTP_PORTS`; call `flow.reset()` instead of `flow.halfreset()` to
refuse the client at once too; for another policy on hosts (an allow-list, a per-host alert), change
`check_host`, which the reader calls with every host it meets. The listener itself needs no change.
"""

import sys

from tcpguard import rule, tcp_connection
from tcpguard.http import RequestError, RequestReader, host_of, read_simple_heads, under_domains

BLOCKED_HOSTS = {"blocked.example", "ads.example"}
HTTP_PORTS = {80, 8080}

STATE = "_http_host"  # flow.store key of the reader, while a request is in progress

MAX_KNOWN = 4096  # entries of KNOWN; it is emptied when full
MAX_KNOWN_VALUE = 300  # longer values are looked up every time, never kept in KNOWN
# Host values seen before -> (host name, blocked). The reader gives lower-cased values, the one-expression
# path values as they appear after "Host:"; both get the same answer, so a value may be there twice.
# A reload (an edit of BLOCKED_HOSTS) starts anew.
KNOWN = {}


def is_blocked(name):
    """`name` or a parent domain of it is in BLOCKED_HOSTS."""
    return under_domains(name, BLOCKED_HOSTS)


def answer(value):
    """(host name, blocked) for a Host value or authority, from KNOWN when it was seen before."""
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


def check_host(flow, value):
    """The reader's `on_host`: remember the host; half-reset and return True (stop) if it is blocked."""
    name, blocked = answer(value)
    flow.store["host"] = name
    if not blocked:
        return False
    flow.alert(f"HTTP request to blocked host {name}", severity="medium", direction="up")
    flow.halfreset()
    return True


# lookback=0: the reader keeps a split line itself and only ever reads the new bytes (`current.read()`),
# so the engine need not retain any of the client's acknowledged bytes for it.
# ports=: the engine calls the listener on connections to these ports only (the others cost nothing).
@rule(on=tcp_connection.events.receive_data, direction="up", lookback=0, ports=HTTP_PORTS)
def blocked_host(flow, stream, current, direction):
    store = flow.store
    reader = store.get(STATE)
    if reader is not None and reader.stopped():
        return  # not HTTP, or already decided
    offset = current.pos
    data = current.read()
    start = 0
    if reader is None:
        # Between requests: whole, plain requests are read without making a reader (most of them).
        start = read_simple_heads(data, check_host, flow)
        if start == len(data):
            return
        reader = RequestReader()
        if start < 0:  # a blocked host: check_host has half-reset the connection
            reader.stop()
            store[STATE] = reader
            return
    try:
        reader.feed(data, offset, flow.midstream, check_host, flow, start)
    except RequestError as e:
        flow.alert(str(e), severity="medium", direction=direction)
        flow.halfreset()
    if reader.idle():
        store.pop(STATE, None)  # between requests: keep nothing
    else:
        store[STATE] = reader
