"""Real TLS exchanges for the tests, made at test time by Python's ssl (OpenSSL) on both ends.

`exchange()` runs a client and a server through their handshake and one request/response, and returns
what each end wrote, in the order it wrote it: the transcript a gateway sees, as (direction, bytes)
flights. The two ends talk through memory buffers (ssl.MemoryBIO), so the bytes are exactly those
OpenSSL puts on a socket, without a socket's timing: the same test data on every run, except the random
and key shares. The certificate is a throwaway self-signed one made with the openssl command.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

Flight = tuple[str, bytes]


@functools.cache
def certificate() -> tuple[str, str]:
    """(cert file, key file) of a self-signed P-256 certificate for tls.test, made once per run."""
    folder = Path(tempfile.mkdtemp(prefix="tcpguard-tls-"))
    atexit.register(shutil.rmtree, folder, True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "2", "-subj", "/CN=tls.test", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def contexts(version: ssl.TLSVersion) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(client, server) contexts that speak exactly `version`."""
    cert, key = certificate()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    for ctx in (client, server):
        ctx.minimum_version = ctx.maximum_version = version
    return client, server


def exchange(
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    request: bytes = b"GET / HTTP/1.1\r\nHost: tls.test\r\n\r\n",
    response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    sni: str | None = "tls.test",
) -> list[Flight]:
    """The flights of one real TLS connection: handshake, the client's request, the server's response."""
    cctx, sctx = contexts(version)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(c_in, c_out, server_hostname=sni)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    flights: list[Flight] = []

    def pump() -> None:
        for out, into, d in ((c_out, s_in, "up"), (s_out, c_in, "down")):
            data = out.read()
            if data:
                flights.append((d, data))
                into.write(data)

    done = [False, False]
    for _ in range(10):
        for i, end in enumerate((client, server)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            pump()
        if all(done):
            break
    assert all(done), "the handshake did not finish"
    client.write(request)
    pump()
    assert _read_all(server, len(request)) == request
    server.write(response)
    pump()
    assert _read_all(client, len(response)) == response
    return flights


def _read_all(end: ssl.SSLObject, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = end.read(n - len(out))
        assert chunk, "the peer's bytes ended early"
        out += chunk
    return out


def stream(flights: list[Flight], direction: str) -> bytes:
    return b"".join(data for d, data in flights if d == direction)
