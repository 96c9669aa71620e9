"""Reading TLS from the streams, for rules: the hellos, and whether a connection really is TLS.

A rule imports it beside the rule API (`from tcpguard.tls import TlsEvidence, ...`); it needs nothing
but the standard library. Two sample rules use it: `rules/tls_sni.py` reads the server name from the
ClientHello, and `rules/shellcode.py` stops scanning a connection once it is established as TLS.

The hellos. `parse_client_hello` and `parse_server_hello` take a handshake message body (after its
4-byte header) and check that every length-prefixed field fits exactly (version, random, session id,
cipher suites or the chosen suite, compression, extensions, no repeated extension, nothing after the
last). A hello that does not is a `MalformedHelloError`: a TLS server refuses it, so a rule that gave up
on it quietly could be evaded with a deliberately odd hello. `read_client_hello` reads the ClientHello
from a streamed listener's cursor, over as many records and segments as the client used.

Is it TLS? One side's word is not evidence: a client can send a ClientHello and then anything at all,
and if the server is a plaintext server it reads that "anything" as a request. `TlsEvidence` is fed each
direction's bytes as they arrive and decides from what both ends did:

1. the client opens with a well-formed ClientHello in handshake records;
2. the server opens with a well-formed ServerHello that answers it: a cipher suite, compression method
   and version the client offered, only extensions the client offered (RFC 8446 4.1.3, RFC 5246
   7.4.1.4), in TLS 1.3 the client's session id echoed. A plaintext server cannot produce that by
   accident, and an echo server sends back a ClientHello, not a ServerHello;
3. both sides then send well-framed records (type 20-23, version 3.x, at most 2^14 + 2048 bytes, the
   ChangeCipherSpec record one byte of value 1, no other record inside a handshake message) up to and
   including their first application_data record (type 23), which is encrypted.

Then `decision` is True. Any byte that breaks this before the decision makes it False for good ("not
TLS", with a `reason`); so does a side that has not finished within `EVIDENCE_LIMIT` bytes. The verdict
does not depend on how TCP cut the bytes (tests/test_tls.py checks it with hypothesis on real
exchanges). What it costs: the records are walked by their headers; only the two hellos are kept, each
at most `MAX_HELLO` bytes, and only until they are parsed; the rest is counted, not copied.

What it does not do (known limits, docs/adversarial.md): a HelloRetryRequest (TLS 1.3's second round
trip) is judged "not TLS", so such a connection stays inspected; SSLv2-style hellos are "not TLS"; and
once a connection is bypassed, a protocol that leaves TLS on the same connection (FTP's CCC command)
would speak in clear unseen. The rule that bypasses decides whether that matters on its ports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ALERT",
    "APPLICATION_DATA",
    "CHANGE_CIPHER_SPEC",
    "EVIDENCE_LIMIT",
    "HANDSHAKE",
    "MAX_HELLO",
    "MAX_RECORD",
    "ClientHello",
    "MalformedHelloError",
    "ServerHello",
    "TlsEvidence",
    "answer_problem",
    "parse_client_hello",
    "parse_server_hello",
    "read_client_hello",
    "server_name",
]

# Record content types (RFC 8446 5.1).
CHANGE_CIPHER_SPEC = 20
"""Record type of ChangeCipherSpec: one byte, 1; what follows it from that side is encrypted."""
ALERT = 21
"""Record type of an alert."""
HANDSHAKE = 22
"""Record type of handshake messages: a TLS client's first byte."""
APPLICATION_DATA = 23
"""Record type of application data, and in TLS 1.3 of every encrypted record."""
# Handshake message types.
CLIENT_HELLO, SERVER_HELLO = 1, 2
# What may follow a side's hello in clear (TLS 1.2 and before; in TLS 1.3 the rest is encrypted):
# the client's Certificate, ClientKeyExchange and CertificateVerify; the server's Certificate,
# ServerKeyExchange, CertificateRequest, ServerHelloDone, CertificateStatus and NewSessionTicket (sent
# in clear just before the server's ChangeCipherSpec, RFC 5077).
CLIENT_LATER = frozenset({11, 15, 16})
SERVER_LATER = frozenset({4, 11, 12, 13, 14, 22})

MAX_RECORD = 2**14 + 2048
"""The longest record payload any TLS version allows (TLS 1.2's TLSCiphertext bound)."""

MAX_HELLO = 65536
"""The longest hello message read. Real ones are under 2 KB (a post-quantum key share adds about 1.2 KB)."""

EVIDENCE_LIMIT = 262144
"""Bytes of one direction within which it must reach its first application_data record. A TLS 1.2
server's first flight carries its certificate chain (a few KB, rarely tens); past this, "not TLS"."""

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_VERSIONS = 43
EXT_RENEGOTIATION_INFO = 0xFF01
SCSV_RENEGOTIATION = 0x00FF  # the client asks for renegotiation_info by this pseudo cipher suite
SCSV_FALLBACK = 0x5600
HOST_NAME = 0x00
TLS13 = 0x0304
# The random of a HelloRetryRequest: SHA-256 of "HelloRetryRequest" (RFC 8446 4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
FIRST_BYTE = bytes([HANDSHAKE])


class MalformedHelloError(ValueError):
    """A hello that is not well-formed; the message says where ("truncated at offset 40", ...)."""


class _NotTlsError(Exception):
    """Internal: the evidence has seen a byte no TLS end would send there."""


def _take(buf: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(buf):
        raise MalformedHelloError(f"truncated at offset {pos}")
    return buf[pos : pos + n], pos + n


def _vector(buf: bytes, pos: int, width: int) -> tuple[bytes, int]:
    """A length-prefixed TLS vector (width 1, 2 or 3 bytes of length)."""
    raw, pos = _take(buf, pos, width)
    return _take(buf, pos, int.from_bytes(raw, "big"))


def _extensions(buf: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    """The extensions block that ends the hello at `pos` (none if the hello ends there)."""
    if pos == len(buf):
        return ()  # no extensions at all (an SSLv3-style hello)
    block, pos = _vector(buf, pos, 2)
    if pos != len(buf):
        raise MalformedHelloError("bytes after the extensions")
    out = []
    seen = set()
    i = 0
    while i < len(block):
        kind, i = _take(block, i, 2)
        data, i = _vector(block, i, 2)
        k = int.from_bytes(kind, "big")
        if k in seen:
            raise MalformedHelloError(f"extension {k} twice")
        seen.add(k)
        out.append((k, data))
    return tuple(out)


def _version(raw: bytes) -> int:
    v = int.from_bytes(raw, "big")
    if raw[0] != 3:
        raise MalformedHelloError(f"version {raw[0]}.{raw[1]}")
    return v


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A parsed ClientHello (RFC 8446 4.1.2; the same fields since SSL 3)."""

    version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression: bytes
    extensions: tuple[tuple[int, bytes], ...]

    def extension(self, kind: int) -> bytes | None:
        """The body of extension `kind` (a number: 0 is server_name), or None if the client sent none."""
        for k, data in self.extensions:
            if k == kind:
                return data
        return None

    @property
    def server_name(self) -> str | None:
        """The SNI host name (RFC 6066), lower case without a trailing dot, or None."""
        data = self.extension(EXT_SERVER_NAME)
        if data is None:
            return None
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

    @property
    def supported_versions(self) -> tuple[int, ...]:
        """The versions of the supported_versions extension (TLS 1.3), or () without it."""
        data = self.extension(EXT_SUPPORTED_VERSIONS)
        if data is None:
            return ()
        body, end = _vector(data, 0, 1)
        if end != len(data) or len(body) % 2:
            raise MalformedHelloError("supported_versions is not a list of versions")
        return tuple(int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2))


@dataclass(frozen=True, slots=True)
class ServerHello:
    """A parsed ServerHello (RFC 8446 4.1.3), a HelloRetryRequest included."""

    version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression: int
    extensions: tuple[tuple[int, bytes], ...]

    @property
    def retry(self) -> bool:
        """A HelloRetryRequest: the server asks for a second ClientHello."""
        return self.random == HRR_RANDOM

    @property
    def selected_version(self) -> int:
        """The version the server chose: its supported_versions extension, else its version field."""
        for k, data in self.extensions:
            if k == EXT_SUPPORTED_VERSIONS:
                if len(data) != 2:
                    raise MalformedHelloError("supported_versions of the server is not one version")
                return int.from_bytes(data, "big")
        return self.version


def parse_client_hello(body: bytes) -> ClientHello:
    """The ClientHello in a handshake message body (after the 4-byte handshake header)."""
    version, pos = _take(body, 0, 2)
    random, pos = _take(body, pos, 32)
    session_id, pos = _vector(body, pos, 1)
    suites, pos = _vector(body, pos, 2)
    compression, pos = _vector(body, pos, 1)
    extensions = _extensions(body, pos)
    if len(session_id) > 32:
        raise MalformedHelloError(f"session id of {len(session_id)} bytes")
    if not suites or len(suites) % 2:
        raise MalformedHelloError(f"cipher suite list of {len(suites)} bytes")
    if 0 not in compression:
        raise MalformedHelloError("no null compression method")
    return ClientHello(
        _version(version),
        random,
        session_id,
        tuple(int.from_bytes(suites[i : i + 2], "big") for i in range(0, len(suites), 2)),
        compression,
        extensions,
    )


def parse_server_hello(body: bytes) -> ServerHello:
    """The ServerHello in a handshake message body (after the 4-byte handshake header)."""
    version, pos = _take(body, 0, 2)
    random, pos = _take(body, pos, 32)
    session_id, pos = _vector(body, pos, 1)
    suite, pos = _take(body, pos, 2)
    compression, pos = _take(body, pos, 1)
    extensions = _extensions(body, pos)
    if len(session_id) > 32:
        raise MalformedHelloError(f"session id of {len(session_id)} bytes")
    return ServerHello(
        _version(version), random, session_id, int.from_bytes(suite, "big"), compression[0], extensions
    )


def server_name(body: bytes) -> str | None:
    """The SNI host name in a ClientHello body, or None; `MalformedHelloError` if it is not one."""
    return parse_client_hello(body).server_name


def answer_problem(server: ServerHello, client: ClientHello) -> str | None:
    """Why `server` is no answer to `client` (None: it is one). What is checked is what the client's
    own TLS library checks before it goes on, so a real server always passes."""
    if server.cipher_suite not in client.cipher_suites or server.cipher_suite in (
        SCSV_RENEGOTIATION,
        SCSV_FALLBACK,
    ):
        return f"cipher suite {server.cipher_suite:#06x} the client did not offer"
    if server.compression not in client.compression:
        return f"compression method {server.compression} the client did not offer"
    offered = {k for k, _ in client.extensions}
    if SCSV_RENEGOTIATION in client.cipher_suites:
        offered.add(EXT_RENEGOTIATION_INFO)
    for k, _ in server.extensions:
        if k not in offered:
            return f"extension {k} the client did not offer"
    version = server.selected_version
    if any(k == EXT_SUPPORTED_VERSIONS for k, _ in server.extensions):
        if version not in client.supported_versions:
            return f"version {version:#06x} the client did not offer"
    elif version > client.version:
        return f"version {version:#06x} above the client's"
    if version == TLS13 and server.session_id != client.session_id:
        return "TLS 1.3 session id not echoed"
    if server.retry:
        return "HelloRetryRequest (not followed: see the module's known limits)"
    return None


class Cursor(Protocol):
    """What `read_client_hello` needs of a rule's `current` (tcpguard.Cursor)."""

    def peek(self, n: int) -> bytes: ...

    def read(self, n: int = -1) -> bytes: ...


def read_client_hello(current: Cursor) -> bytes | None:
    """The ClientHello body from a streamed listener's cursor: None if the stream does not start with a
    TLS handshake record. Reads records until the message is complete (a streamed cursor waits for
    them); a broken handshake raises `MalformedHelloError`."""
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


class _Side:
    """Where the walk of one direction's records is."""

    __slots__ = ("clear", "done", "head", "hellos", "left", "mbuf", "mhead", "mleft", "msg", "rtype", "seen")

    def __init__(self) -> None:
        self.seen = 0  # bytes walked
        self.head = b""  # a record header not yet whole
        self.rtype = 0  # the type of the record being walked
        self.left = 0  # its payload bytes still to come (0: a record header comes next)
        self.clear = True  # handshake records are still in clear (until ChangeCipherSpec or type 23)
        self.msg = False  # inside a handshake message
        self.mhead = b""  # a handshake message header not yet whole
        self.mleft = 0  # the message's bytes still to come
        self.mbuf: bytearray | None = None  # a hello's bytes, while it arrives
        self.hellos = 0  # hellos parsed
        self.done = False  # its first application_data record is complete


def _early(side: _Side, up: bool, head: bytes) -> None:
    """Check the first bytes of a record header as soon as they arrive, so that a stream which is not
    TLS is known on its first byte (and the reason does not depend on how TCP cut the header)."""
    t = head[0]
    if not CHANGE_CIPHER_SPEC <= t <= APPLICATION_DATA:
        raise _NotTlsError(f"record type {t}")
    if t != HANDSHAKE and not side.hellos:
        raise _NotTlsError(f"record type {t} before the {'Client' if up else 'Server'}Hello")
    if t != HANDSHAKE and (side.msg or side.mhead):
        raise _NotTlsError(f"record type {t} inside a handshake message")
    if (len(head) > 1 and head[1] != 3) or (len(head) > 2 and head[2] > 3):
        raise _NotTlsError(f"record version {'.'.join(str(b) for b in head[1:3])}")


class TlsEvidence:
    """Whether one connection is TLS, from what both of its ends sent (see the module's text).

    Feed it each direction's new bytes in the order the engine delivers them (`feed`); `decision` is
    None while undecided, then True (TLS) or False (not TLS, `reason` says why) for good. Keep one per
    connection in `flow.store` until it decides, then drop it.
    """

    __slots__ = ("client", "decision", "down", "reason", "up")

    def __init__(self) -> None:
        self.up = _Side()
        self.down = _Side()
        self.client: ClientHello | None = None
        self.decision: bool | None = None
        self.reason = ""

    def feed(self, direction: str, data: bytes) -> bool | None:
        """Walk `data`, the next bytes of `direction` ('up': from the client, 'down'); the decision."""
        if self.decision is not None:
            return self.decision
        side = self.up if direction == "up" else self.down
        if side.done or not data:
            return None
        room = EVIDENCE_LIMIT - side.seen
        part = data if len(data) <= room else data[:room]
        try:
            self._walk(side, side is self.up, part)
            side.seen += len(part)
            if self.up.done and self.down.done:
                self.decision = True
            elif len(part) < len(data) and not side.done:
                raise _NotTlsError(f"no application data within {EVIDENCE_LIMIT} bytes")
        except (_NotTlsError, MalformedHelloError) as e:
            self.decision = False
            self.reason = f"{direction}: {e}"
            self.up = self.down = _Side()  # keep nothing of a stream that is not TLS
            self.client = None
        return self.decision

    def _walk(self, side: _Side, up: bool, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and not side.done:
            if side.left == 0:  # a record header
                head = side.head + data[i : i + 5 - len(side.head)]
                i += len(head) - len(side.head)
                side.head = head
                if len(head) < 5:
                    _early(side, up, head)
                    return
                side.head = b""
                self._record(side, up, head[0], head[1], head[2], int.from_bytes(head[3:5], "big"))
                if side.left == 0:  # an empty application_data record
                    self._record_end(side)
                continue
            k = min(side.left, n - i)
            t = side.rtype
            if t == HANDSHAKE and side.clear:
                self._messages(side, up, data[i : i + k])
            elif t == CHANGE_CIPHER_SPEC and data[i] != 1:
                raise _NotTlsError(f"ChangeCipherSpec of value {data[i]}")
            i += k
            side.left -= k
            if side.left == 0:
                self._record_end(side)

    def _record(self, side: _Side, up: bool, t: int, major: int, minor: int, length: int) -> None:
        """Check a record header (type, version, length) against where the side is."""
        _early(side, up, bytes((t, major, minor)))
        if length > MAX_RECORD:
            raise _NotTlsError(f"record of {length} bytes")
        if length == 0 and t != APPLICATION_DATA:
            raise _NotTlsError(f"empty record of type {t}")
        if t == CHANGE_CIPHER_SPEC and length != 1:
            raise _NotTlsError(f"ChangeCipherSpec of {length} bytes")
        side.rtype = t
        side.left = length

    def _record_end(self, side: _Side) -> None:
        t = side.rtype
        if t in (CHANGE_CIPHER_SPEC, APPLICATION_DATA):
            side.clear = False  # what follows is encrypted
        if t == APPLICATION_DATA:
            side.done = True

    def _messages(self, side: _Side, up: bool, chunk: bytes) -> None:
        """Follow the handshake messages sent in clear; parse the hello."""
        j, n = 0, len(chunk)
        while j < n:
            if not side.msg:
                head = side.mhead + chunk[j : j + 4 - len(side.mhead)]
                j += len(head) - len(side.mhead)
                side.mhead = head
                if len(head) < 4:
                    return
                side.mhead = b""
                self._message(side, up, head[0], int.from_bytes(head[1:4], "big"))
                if side.mleft == 0:
                    self._message_end(side, up)
                continue
            k = min(side.mleft, n - j)
            if side.mbuf is not None:
                side.mbuf += chunk[j : j + k]
            j += k
            side.mleft -= k
            if side.mleft == 0:
                self._message_end(side, up)

    def _message(self, side: _Side, up: bool, t: int, length: int) -> None:
        hello = CLIENT_HELLO if up else SERVER_HELLO
        if not side.hellos:
            if t != hello:
                who = "Client" if up else "Server"
                raise _NotTlsError(f"handshake type {t} where the {who}Hello belongs")
            if length > MAX_HELLO:
                raise _NotTlsError(f"hello of {length} bytes")
            if not up and self.client is None:
                raise _NotTlsError("a ServerHello before the ClientHello it would answer")
            side.mbuf = bytearray()
        elif t not in (CLIENT_LATER if up else SERVER_LATER):
            raise _NotTlsError(f"handshake type {t} after the hello")
        side.msg = True
        side.mleft = length

    def _message_end(self, side: _Side, up: bool) -> None:
        side.msg = False
        body = side.mbuf
        if body is None:
            return
        side.mbuf = None
        side.hellos += 1
        if up:
            self.client = parse_client_hello(bytes(body))
            return
        assert self.client is not None  # checked at the message's header
        problem = answer_problem(parse_server_hello(bytes(body)), self.client)
        if problem is not None:
            raise _NotTlsError(f"the ServerHello is no answer to the ClientHello: {problem}")
