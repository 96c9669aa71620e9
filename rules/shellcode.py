"""Reset connections whose client sends a shell-code pattern, however the sender splits it.

Event: `receive_data`, plain (not streamed), client-to-server direction.

The listener is called once for each run of client bytes that became contiguous (segments that arrive
out of order are reassembled by the engine before any rule sees them) and searches it for all the
patterns at once with `current.find_any`, which also looks back into the bytes before the run: a
pattern spread over many tiny segments is found on the segment that completes it. Of two patterns in
one run, the one complete first is reported. On a match it raises a high-severity alert and calls
`flow.reset()`: the packet that completes the pattern is dropped and both ends get an RST, so the server
application never receives the whole pattern (it does receive the bytes before it, which were harmless
on their own).

Configure: `PATTERNS` (bytes). Keep them specific: every client byte of every connection is searched.

Cost: the search is linear in the bytes sent and keeps no state of its own: the look-back comes from the
bytes the engine retains, and the listener declares just what the longest pattern needs
(`lookback=len(longest) - 1`, not the default 256), so an idle connection keeps at most that many bytes
of the client's stream.
A plain listener costs nothing on an idle connection, where a streamed one (a suspended coroutine per
connection) would cost several kilobytes.
"""

from tcpguard import rule, tcp_connection

PATTERNS = (
    b"/bin/sh",
    b"/bin/bash",
    b"cmd.exe",
    b"\x31\xc0\x50\x68//sh",  # x86 execve("/bin//sh") prologue: xor eax,eax; push eax; push "//sh"
    b"\x90" * 32,  # a NOP sled
)


# A match ending in the new bytes starts at most len(pattern) - 1 bytes before them.
LOOKBACK = max(len(p) for p in PATTERNS) - 1


@rule(on=tcp_connection.events.receive_data, direction="up", lookback=LOOKBACK)
def no_shellcode(flow, stream, current, direction):
    # `find_any` only reports a match that ends in the new bytes: one wholly before them was already
    # seen (and reset the connection). Of several, the one complete first in the stream is reported.
    # One call for all the patterns: a `find` per pattern would cost an interpreted call each, on every
    # segment the client sends.
    m = current.find_any(PATTERNS)
    if m:
        flow.alert(f"shell-code pattern {m.pattern!r} from the client", severity="high", direction=direction)
        flow.reset()
