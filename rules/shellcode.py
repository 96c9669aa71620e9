"""Reset connections whose client sends a shell-code pattern, however the sender splits it.

Event: `receive_data`, plain (not streamed), client-to-server direction.

What: each run of client bytes that became contiguous (the engine reassembles out-of-order segments
first) is searched for all of `PATTERNS` at once with `current.find_any`, which also looks back into the
bytes before the run, so a pattern spread over many tiny segments is found on the segment completing it.
On a match the rule raises a high-severity alert and calls `flow.reset()`: that segment is dropped and
both ends get an RST, so the server application never receives the whole pattern.

Why this shape: the search is linear and keeps no state of its own; the listener declares the look-back
its longest pattern needs (`lookback=len(longest) - 1`, not the default 256), so an idle connection keeps
at most that many client bytes, and a plain listener costs nothing on an idle connection where a
streamed one would keep a coroutine of several kilobytes.

To adapt: edit `PATTERNS` (bytes); keep them specific, since every client byte of every connection is
searched. The look-back follows by itself.
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
