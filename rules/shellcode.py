"""Reset connections whose client sends a shell-code pattern, however the sender splits it.

Event: `receive_data`, streamed (one coroutine per connection reads the client's byte stream).

The listener reads the client-to-server stream chunk by chunk as segments arrive and keeps the last
`KEEP` bytes of each chunk in front of the next one, so a pattern spread over many tiny segments is still
found; segments that arrive out of order are reassembled by the engine before any rule sees them. On a
match it raises a high-severity alert and calls `flow.reset()`: the packet that completes the pattern is
dropped and both ends get an RST, so the server application never receives the whole pattern (it does
receive the bytes before it, which were harmless on their own).

Configure: `PATTERNS` (bytes). Keep them specific: every client byte of every connection is searched.

Cost: the search is linear in the bytes sent; `KEEP` bytes per connection are kept between segments. The
reader's position pins the engine's retained bytes only until the chunk is read, so long uploads do not
fill the stream buffer.
"""

from tcpguard import rule, tcp_connection

PATTERNS = (
    b"/bin/sh",
    b"/bin/bash",
    b"cmd.exe",
    b"\x31\xc0\x50\x68//sh",  # x86 execve("/bin//sh") prologue: xor eax,eax; push eax; push "//sh"
    b"\x90" * 32,  # a NOP sled
)
KEEP = max(len(p) for p in PATTERNS) - 1


def first_pattern(data):
    """The first of PATTERNS found in `data`, or None."""
    for pattern in PATTERNS:
        if pattern in data:
            return pattern
    return None


@rule(on=tcp_connection.events.receive_data, streamed=True, direction="up")
def no_shellcode(flow, stream, current, direction):
    tail = b""
    for chunk in current:
        window = tail + chunk
        pattern = first_pattern(window)
        if pattern is not None:
            flow.alert(
                f"shell-code pattern {pattern!r} from the client", severity="high", direction=direction
            )
            flow.reset()
            return
        tail = window[-KEEP:]
