"""Half-reset HTTP requests to a blocked Host.

Reads each request's header block as a stream (streamed listener, line by line) and, if the Host header
names a blocked site, half-resets: the server gets an RST and frees its resources, while the client's
further packets are silently dropped (it sees a stalled request, which defeats naive retry loops).
Only port 80 and 8080 connections are inspected.
"""

from tcpguard import rule, tcp_connection

BLOCKED_HOSTS = {b"blocked.example", b"www.blocked.example"}
HTTP_PORTS = {80, 8080}


@rule(on=tcp_connection.events.receive_data, streamed=True)
def blocked_host(flow, stream, current, direction):
    if direction != "up" or flow.dstport not in HTTP_PORTS:
        return
    while True:
        request_line = current.readline(limit=8192)
        if not request_line:
            return
        while True:
            line = current.readline(limit=8192)
            if not line or line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"host":
                host = value.strip().split(b":")[0].lower()
                flow.store["host"] = host.decode("ascii", "replace")
                if host in BLOCKED_HOSTS:
                    flow.alert(f"HTTP request to blocked host {host.decode('ascii', 'replace')}",
                               severity="medium", direction=direction)
                    flow.halfreset()
                    return
        if not line:
            return
