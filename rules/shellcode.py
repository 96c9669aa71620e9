"""Reset connections whose client sends a shell-code marker, however the sender splits it.

The listener is streamed: it reads the client's byte stream chunk by chunk as segments arrive and keeps
the last few bytes of each chunk, so a pattern spread over many tiny segments (or sent out of order, which
the engine reassembles first) is still found. The packet that completes the pattern is dropped and both
ends are reset, so the server application never receives the whole pattern.
"""

from tcpguard import rule, tcp_connection

PATTERNS = (b"/bin/sh", b"/bin/bash", b"cmd.exe")
KEEP = max(len(p) for p in PATTERNS) - 1


@rule(on=tcp_connection.events.receive_data, streamed=True)
def no_shellcode(flow, stream, current, direction):
    if direction != "up":
        return
    tail = b""
    for chunk in current:
        window = tail + chunk
        for pattern in PATTERNS:
            if pattern in window:
                flow.alert(f"shell-code pattern {pattern!r} from the client", severity="high",
                           direction=direction)
                flow.reset()
                return
        tail = window[-KEEP:]
