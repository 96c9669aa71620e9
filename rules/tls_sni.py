"""Reset TLS connections to blocked server names, read from the ClientHello's SNI extension.

Event: `receive_data`, streamed, client-to-server direction of connections to `TLS_PORTS`.

What: the listener reads the client's first handshake records, however TCP split them and over several
records if the hello is fragmented, parses the ClientHello and takes its `server_name` extension (SNI,
RFC 6066: the site the client wants, in clear text before Encrypted Client Hello). If the name or a
parent domain of it is in `BLOCKED_NAMES`, it raises a medium-severity alert and calls `flow.reset()`:
the packet completing the ClientHello is dropped and both ends get an RST, so no handshake takes place.
The name is kept in `flow.store["sni"]`. After the ClientHello the listener returns, and a streamed
listener that returns is done with its direction: it never holds the connection back from bypass (the
server's direction it never asked for). The parsing is `tcpguard.tls`'s, shared with the shell-code rule.

Why these choices:

* A stream whose first byte is not 0x16 (a handshake record), or whose short first header has a version
  byte other than 3, is not TLS and is left alone, decided at once rather than waiting for more bytes.
* A handshake that starts like TLS but is not a well-formed ClientHello (or is bigger than
  `tcpguard.tls.MAX_HELLO`) is reset with its own alert (`FAIL_CLOSED`): a server would refuse it
  anyway, and a parser that gave up there could be evaded with a deliberately odd hello.
* A ClientHello without SNI (a client connecting to an address) passes unless `BLOCK_WITHOUT_SNI`.
* Streamed, because the reader ends after one message: the coroutine it costs lasts only that long.

To adapt: edit `BLOCKED_NAMES` and `TLS_PORTS`; set `FAIL_CLOSED` or `BLOCK_WITHOUT_SNI`.
"""

from tcpguard import rule, tcp_connection
from tcpguard.tls import MalformedHelloError, read_client_hello, server_name

BLOCKED_NAMES = {"blocked.example", "tracker.example"}
TLS_PORTS = {443, 8443}  # None: inspect every connection whose client speaks first with a TLS record
FAIL_CLOSED = True
BLOCK_WITHOUT_SNI = False


def is_blocked(name):
    return any(name == b or name.endswith("." + b) for b in BLOCKED_NAMES)


# ports=: on connections to other ports the engine does not even start the listener's coroutine.
@rule(on=tcp_connection.events.receive_data, streamed=True, direction="up", ports=TLS_PORTS)
def blocked_sni(flow, stream, current, direction):
    try:
        hello = read_client_hello(current)
        if hello is None:
            return
        name = server_name(hello)
    except MalformedHelloError as e:
        if FAIL_CLOSED:
            flow.alert(f"malformed TLS ClientHello: {e}", severity="medium", direction=direction)
            flow.reset()
        return
    if name is None:
        if BLOCK_WITHOUT_SNI:
            flow.alert("TLS ClientHello without a server name", severity="low", direction=direction)
            flow.reset()
        return
    flow.store["sni"] = name
    if is_blocked(name):
        flow.alert(f"TLS connection to blocked server name {name}", severity="medium", direction=direction)
        flow.reset()
