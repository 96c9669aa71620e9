"""Reset connections whose client sends a shell-code pattern, however the sender splits it; let TLS go.

Event: `receive_data`, plain (not streamed): every client byte, and the server's bytes of connections
that open like TLS, until they are established as TLS.

What: each run of client bytes that became contiguous (the engine reassembles out-of-order segments
first) is searched for all of `PATTERNS` at once with `current.find_any`, which also looks back into the
bytes before the run, so a pattern spread over many tiny segments is found on the segment completing it.
On a match the rule raises a high-severity alert and calls `flow.reset()`: that segment is dropped and
both ends get an RST, so the server application never receives the whole pattern.

TLS: a connection encrypted end to end carries no pattern the scanner could read, so once it is
established as TLS the rule says `flow.done()`, and with `engine.inspection.bypass` on the kernel
forwards the rest without tcpguard. "Established" is decided by `tcpguard.tls.TlsEvidence` from both
ends, never from the client's claim: a real ClientHello answered by a real ServerHello, then records up
to each side's first application data. Until then every client byte is scanned as before, so a fake
ClientHello followed by plaintext is scanned (and is "not TLS" on its first plaintext byte).

Why two listeners:

* `no_shellcode` (client bytes, look-back 31) scans plain connections, as it always did, and costs
  them nothing more than one comparison on the first run; on a connection whose client opens with a
  TLS handshake record it hands over at once (`flow.done("up")`).
* `tls_or_not` (both directions, look-back 0) runs only on those: on any other connection it says
  `flow.done()` on its first call and is never called again, and keeps nothing (no `flow.store`).
  On a TLS candidate it scans the client's bytes itself and feeds both directions to the evidence; on
  "TLS" it is done with both directions, on "not TLS" with the server's and it scans on. One listener
  for both directions, because the side whose bytes decide may be either (TLS 1.2: the server's first
  application data; TLS 1.3: the client's Finished), and a listener can only stop itself: a listener
  per direction would leave the other one waiting for bytes that, on a download, never come.
* Look-back 0 on the second listener, because the server's direction then keeps no tail on any
  connection; its client-side search finds patterns split across segments through the look-back the
  first listener declares for the client's direction (the engine keeps the largest one of a direction).

To adapt: edit `PATTERNS` (bytes); keep them specific, since every client byte of every connection is
searched. The look-back follows by itself. `BYPASS_TLS = False` scans TLS connections to the end too.
"""

from tcpguard import rule, tcp_connection
from tcpguard.tls import HANDSHAKE, TlsEvidence

PATTERNS = (
    b"/bin/sh",
    b"/bin/bash",
    b"cmd.exe",
    b"\x31\xc0\x50\x68//sh",  # x86 execve("/bin//sh") prologue: xor eax,eax; push eax; push "//sh"
    b"\x90" * 32,  # a NOP sled
)
BYPASS_TLS = True

# A match ending in the new bytes starts at most len(pattern) - 1 bytes before them.
LOOKBACK = max(len(p) for p in PATTERNS) - 1
TLS = "shellcode.tls"  # flow.store key of the evidence, on TLS candidates until it decides
FIRST = bytes([HANDSHAKE])


def tls_candidate(flow, current):
    """At the client's first bytes: they open a TLS handshake record, on a connection seen from its
    start whose server has not spoken first (a TLS server never does). Both listeners ask this at the
    same moment, so they agree on it."""
    return BYPASS_TLS and not flow.midstream and flow.down.next == 0 and current.peek(1) == FIRST


def scan(flow, current, direction):
    # `find_any` only reports a match that ends in the new bytes: one wholly before them was already
    # seen (and reset the connection). Of several, the one complete first in the stream is reported.
    # One call for all the patterns: a `find` per pattern would cost an interpreted call each, on every
    # segment the client sends.
    m = current.find_any(PATTERNS)
    if m:
        flow.alert(f"shell-code pattern {m.pattern!r} from the client", severity="high", direction=direction)
        flow.reset()
    return bool(m)


@rule(on=tcp_connection.events.receive_data, direction="up", lookback=LOOKBACK)
def no_shellcode(flow, stream, current, direction):
    if current.pos == 0 and tls_candidate(flow, current):
        flow.done("up")  # tls_or_not scans this connection's client bytes from here
        return
    scan(flow, current, direction)


@rule(on=tcp_connection.events.receive_data, lookback=0)
def tls_or_not(flow, stream, current, direction):
    if direction == "up" and current.pos == 0:
        if not tls_candidate(flow, current):
            flow.done()  # no_shellcode scans this one
            return
        evidence = flow.store[TLS] = TlsEvidence()
    elif flow.up.next == 0:
        flow.done()  # the server spoke first: not TLS
        return
    else:
        # Only candidates get here (the others said done above), and they have a store: reading it
        # allocates nothing. False: decided "not TLS"; None: a connection that was open before a reload.
        evidence = flow.store.get(TLS)
        if evidence is None:
            flow.done()
            return
    if direction == "up" and scan(flow, current, direction):
        return
    if evidence is False:
        return
    decision = evidence.feed(direction, current.read())
    if decision is None:
        return
    if decision:
        del flow.store[TLS]
        flow.done()  # established as TLS by both ends: nothing more to read
    else:
        flow.store[TLS] = False
        flow.done("down")  # not TLS after all: keep scanning the client's bytes
