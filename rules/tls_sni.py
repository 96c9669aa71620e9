"""Reset TLS connections to blocked server names, read from the ClientHello's SNI extension.

Event: `receive_data`, streamed, client-to-server direction of connections to `TLS_PORTS`.

What: the listener reads the client's first handshake records, however TCP split them and over several
records if the hello is fragmented, parses the ClientHello and takes its `server_name` extension (SNI,
RFC 6066: the site the client wants, in clear text before Encrypted Client Hello). If the name or a
parent domain of it is in `BLOCKED_NAMES`, it raises a medium-severity alert and calls `flow.reset()`:
the packet completing the ClientHello is dropped and both ends get an RST, so no handshake takes place.
The name is kept in `flow.store["sni"]`. After the ClientHello the listener returns: the rest is
encrypted.

Why these choices:

* A stream whose first byte is not 0x16 (a handshake record), or whose short first header has a version
  byte other than 3, is not TLS and is left alone, decided at once rather than waiting for more bytes.
* A handshake that starts like TLS but is not a well-formed ClientHello (or is bigger than `MAX_HELLO`)
  is reset with its own alert (`FAIL_CLOSED`): a server would refuse it anyway, and a parser that gave
  up there could be evaded with a deliberately odd hello.
* A ClientHello without SNI (a client connecting to an address) passes unless `BLOCK_WITHOUT_SNI`.
* Streamed, because the reader ends after one message: the coroutine it costs lasts only that long.

To adapt: edit `BLOCKED_NAMES` and `TLS_PORTS`; set `FAIL_CLOSED` or `BLOCK_WITHOUT_SNI`.
"""

from tcpguard import rule, tcp_connection

BLOCKED_NAMES = {"blocked.example", "tracker.example"}
TLS_PORTS = {443, 8443}  # None: inspect every connection whose client speaks first with a TLS record
FAIL_CLOSED = True
BLOCK_WITHOUT_SNI = False
MAX_HELLO = 65536

HANDSHAKE = 0x16
FIRST_BYTE = bytes([HANDSHAKE])  # a TLS client's first byte: the type of its first record
CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
HOST_NAME = 0x00


class MalformedHelloError(ValueError):
    """The client started a TLS handshake that is not a well-formed ClientHello."""


def _take(buf, pos, n):
    if pos + n > len(buf):
        raise MalformedHelloError(f"truncated at offset {pos}")
    return buf[pos : pos + n], pos + n


def _vector(buf, pos, width):
    """A length-prefixed TLS vector (width 1, 2 or 3 bytes of length)."""
    raw, pos = _take(buf, pos, width)
    return _take(buf, pos, int.from_bytes(raw, "big"))


def server_name(hello):
    """The SNI host name in a ClientHello handshake body (after the 4-byte handshake header), or None.

    Raises `MalformedHelloError` if the body is not a well-formed ClientHello.
    """
    pos = 34  # legacy_version (2) + random (32)
    _take(hello, 0, pos)
    _session_id, pos = _vector(hello, pos, 1)
    _suites, pos = _vector(hello, pos, 2)
    _compression, pos = _vector(hello, pos, 1)
    if pos == len(hello):
        return None  # no extensions at all (SSLv3-style hello)
    extensions, pos = _vector(hello, pos, 2)
    if pos != len(hello):
        raise MalformedHelloError("bytes after the extensions")
    i = 0
    while i < len(extensions):
        kind, i = _take(extensions, i, 2)
        data, i = _vector(extensions, i, 2)
        if int.from_bytes(kind, "big") != EXT_SERVER_NAME:
            continue
        names, end = _vector(data, 0, 2)
        if end != len(data):
            raise MalformedHelloError("bytes after the server name list")
        j = 0
        while j < len(names):
            name_type, j = _take(names, j, 1)
            name, j = _vector(names, j, 2)
            if name_type[0] == HOST_NAME:
                try:
                    return name.decode("ascii").lower().rstrip(".")
                except UnicodeDecodeError:
                    raise MalformedHelloError("server name is not ASCII") from None
        return None
    return None


def read_client_hello(current):
    """The ClientHello body from the stream: None if the stream does not start with a TLS handshake.

    Reads records until the handshake message is complete; a broken handshake raises `MalformedHelloError`.
    """
    if current.peek(1) != FIRST_BYTE:
        return None  # decided on the first byte: a client that sends less than a record header and
        # waits (or closes) is not TLS, and its reader does not stay suspended for four more bytes
    message = b""
    need = None  # handshake message length, once its 4-byte header is in
    while need is None or len(message) < need:
        header = current.read(5)
        tls = header[:1] == FIRST_BYTE and header[1:2] in (b"\x03", b"")
        if not message and not tls:
            return None  # the first record is not a TLS handshake: not TLS
        if len(header) < 5:
            raise MalformedHelloError("stream ended inside the ClientHello")
        if header[0] != HANDSHAKE:
            raise MalformedHelloError(f"record type {header[0]} inside the ClientHello")
        if not tls:
            raise MalformedHelloError(f"record version {header[1]}.{header[2]} inside the ClientHello")
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or len(message) + length > MAX_HELLO + 4:
            raise MalformedHelloError(f"record of {length} bytes")
        fragment = current.read(length)
        if len(fragment) < length:
            raise MalformedHelloError("stream ended inside a record")
        message += fragment
        if need is None and len(message) >= 4:
            if message[0] != CLIENT_HELLO:
                raise MalformedHelloError(f"handshake type {message[0]} where a ClientHello belongs")
            need = 4 + int.from_bytes(message[1:4], "big")
            if need > MAX_HELLO + 4:
                raise MalformedHelloError(f"ClientHello of {need - 4} bytes")
    if len(message) != need:
        raise MalformedHelloError("more than one handshake message in the first records")
    return message[4:]


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
