"""The engine's buffer bounds: how much a segment may still take, and who gives way when the total is
short (see Bounds in `tcpguard.core.stream`, and `engine.limits` in the operator's guide).

Three bounds, all checked before anything is taken: bytes per direction (`max_stream_buffer`), bytes of
all connections together (`max_total_buffer`) and packets held in the kernel's queue
(`max_held_packets`). The streams report what they hold to the `Ledger`; this module reads it. Applying
the limit policy to a connection (reset, drop, or let it pass uninspected) is the engine's, since it
ends the connection for the rules.
"""

from __future__ import annotations

import math
from typing import Final

from tcpguard.core.conntrack import Connection, ConnTable
from tcpguard.core.stream import Ledger

#: Seconds between two scans of the table for the connections holding the most buffered bytes, when the
#: total buffer bound is exceeded (`Limits.give_way`): a scan visits every connection.
LARGEST_SCAN_INTERVAL: Final = 0.1


class Limits:
    """The bounds of one engine, read against its ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.max_stream_buffer = 0
        self.max_total_buffer = 0
        self.max_held_packets = 0
        self._last_scan = -math.inf  # engine time of the last scan for the largest holders

    def configure(self, max_stream_buffer: int, max_total_buffer: int, max_held_packets: int) -> None:
        self.max_stream_buffer = max_stream_buffer
        self.max_total_buffer = max_total_buffer
        self.max_held_packets = max_held_packets

    def may_hold(self) -> bool:
        """Whether one more packet may be held in the kernel's queue."""
        return self.ledger.held < self.max_held_packets

    def fits(self, need: int) -> bool:
        return self.ledger.buffered <= self.max_total_buffer - need

    def give_way(self, table: ConnTable, conn: Connection, need: int, now: float) -> list[Connection]:
        """`conn` needs `need` bytes more than the total bound leaves: the connections that should meet
        the limit policy first, largest first, those holding more than `conn` would with the bytes. One
        that never sees its data acknowledged must not make every other connection meet the policy in
        turn.

        Finding them scans the table, so it is done at most every `LARGEST_SCAN_INTERVAL` seconds of
        engine time (a clock that stepped back, as a merged capture's can, allows a scan at once); in
        between the answer is empty, and `conn` meets the policy itself (as every connection did before
        this choice existed). A heuristic, not a guarantee: many connections each holding a little less
        than a real transfer get that transfer chosen first."""
        since = now - self._last_scan
        if 0 <= since < LARGEST_SCAN_INTERVAL:
            return []
        self._last_scan = now
        mine = conn.up.buffered() + conn.down.buffered() + need  # what it would hold with the bytes
        larger: list[tuple[int, int, Connection]] = []
        for c in table:
            held = c.up.buffered() + c.down.buffered()
            if held > mine:
                larger.append((held, c.id, c))
        larger.sort(reverse=True)
        return [c for _, _, c in larger]
