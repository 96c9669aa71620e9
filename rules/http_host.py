"""Half-reset HTTP requests to a blocked Host.

Event: `receive_data`, streamed, client-to-server direction of connections to `HTTP_PORTS`.

The listener parses the client's HTTP/1.x requests as a stream: the request line, the header block line
by line, then the body is skipped (by `Content-Length`, or chunk by chunk for `Transfer-Encoding:
chunked`) so that the next request of a keep-alive connection is parsed as a request again and a body
that happens to contain "Host: ..." is never mistaken for a header. The host of a request is its `Host`
header, or the authority of an absolute-form target (`GET http://host/ HTTP/1.1`, as sent to proxies);
every `Host` header is checked when a request has several.

If a host is blocked (`BLOCKED_HOSTS`, which also blocks every subdomain of each entry), the rule raises
a medium-severity alert and calls `flow.halfreset()` as soon as it reads that host: the server gets an RST
and frees the connection at once, and the packet carrying the host is dropped, so the server never
receives a complete request; the client gets nothing (no RST), sees a stalled request and eventually
times out, which slows down naive retry loops. The host is kept in `flow.store["host"]`.

Fail closed: a request line or header line longer than `MAX_LINE` (servers refuse those anyway, and a
rule that stopped reading there could be evaded) is half-reset too, with its own alert. A stream that does
not look like HTTP/1.x (TLS, HTTP/2 prior knowledge, anything else) is left alone from its first line on.
"""

from tcpguard import rule, tcp_connection

BLOCKED_HOSTS = {"blocked.example", "ads.example"}
HTTP_PORTS = {80, 8080}
MAX_LINE = 16384
SKIP_STEP = 65536  # skip bodies in steps, so a large upload never has to be buffered whole


def host_of(value):
    """The host name in a Host header value or URL authority: lower case, no port, no trailing dot."""
    host = value.strip().lower()
    if host.startswith(b"["):  # an IPv6 literal
        return host.split(b"]", 1)[0] + b"]"
    return host.split(b":", 1)[0].rstrip(b".")


def is_blocked(host):
    name = host.decode("ascii", "replace")
    return any(name == b or name.endswith("." + b) for b in BLOCKED_HOSTS)


def _skip(current, n):
    """Skip `n` body bytes; False if the stream ended first."""
    while n > 0:
        k = current.skip(min(n, SKIP_STEP))
        if k == 0:
            return False
        n -= k
    return True


def _skip_chunked(current):
    """Skip a chunked body and its trailers; False if the stream ended or the framing is broken."""
    while True:
        size_line = current.readline(limit=MAX_LINE)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            return False
        if size == 0:
            break
        if not _skip(current, size + 2):  # the data and its CRLF
            return False
    while True:  # trailer section, up to an empty line
        line = current.readline(limit=MAX_LINE)
        if not line:
            return False
        if line in (b"\r\n", b"\n"):
            return True


def _too_long(flow, line, direction):
    if line and not line.endswith(b"\n") and len(line) >= MAX_LINE:
        flow.alert(f"HTTP line longer than {MAX_LINE} bytes", severity="medium", direction=direction)
        flow.halfreset()
        return True
    return False


def _check_host(flow, host, direction):
    """Remember the host; half-reset and return True if it is blocked."""
    name = host.decode("ascii", "replace")
    flow.store["host"] = name
    if not is_blocked(host):
        return False
    flow.alert(f"HTTP request to blocked host {name}", severity="medium", direction=direction)
    flow.halfreset()
    return True


@rule(on=tcp_connection.events.receive_data, streamed=True, direction="up")
def blocked_host(flow, stream, current, direction):
    if flow.dstport not in HTTP_PORTS:
        return
    while True:
        request_line = current.readline(limit=MAX_LINE)
        if not request_line or _too_long(flow, request_line, direction):
            return
        if request_line in (b"\r\n", b"\n"):
            continue  # empty lines before a request are allowed (RFC 9112, section 2.2)
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return  # not HTTP/1.x: stop inspecting this connection
        target = parts[1]
        if b"://" in target:
            authority = target.split(b"://", 1)[1].split(b"/", 1)[0].rsplit(b"@", 1)[-1]
            if _check_host(flow, host_of(authority), direction):
                return
        length = 0
        chunked = False
        while True:
            line = current.readline(limit=MAX_LINE)
            if not line or _too_long(flow, line, direction):
                return
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"host":
                if _check_host(flow, host_of(value), direction):
                    return
            elif name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return  # the server will refuse it; nothing more to parse reliably
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if chunked:
            if not _skip_chunked(current):
                return
        elif not _skip(current, length):
            return
