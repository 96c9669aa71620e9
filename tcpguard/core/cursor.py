"""Reading a reassembled stream from a rule: the `current` argument of `receive_data`.

One class serves both kinds of listener:

* a plain listener gets a non-blocking cursor at the first new byte: reads return what is there now;
* a streamed listener (`streamed=True`) runs in its own greenlet and gets a blocking cursor: a read that
  needs bytes not yet received suspends the listener until the next segment of its direction arrives
  (or the stream ends), so the rule reads the stream as if it were a blocking socket.

Greenlets rather than generators keep rule code free of `yield`: a helper function deep in a rule module
can block, which generator-based coroutines cannot do without every caller cooperating.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import greenlet

if TYPE_CHECKING:
    from tcpguard.core.stream import HalfStream


class Match:
    """Where `Cursor.find` or `Cursor.find_any` found a pattern. Always true, so `if current.find(p):`
    reads naturally."""

    __slots__ = ("end", "pattern", "start")

    def __init__(self, start: int, end: int, pattern: bytes) -> None:
        self.start = start
        self.end = end
        self.pattern = pattern

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<Match {self.pattern!r} at {self.start}..{self.end}>"


def _before(i: int, pattern: bytes, best: int, found: bytes) -> bool:
    """A match of `pattern` at `i` is complete before the one of `found` at `best` (-1: none yet), or
    ends at the same byte and is longer."""
    if best < 0:
        return True
    end, best_end = i + len(pattern), best + len(found)
    return end < best_end or (end == best_end and i < best)


class Cursor:
    """A read position in one direction's stream. Offsets count stream bytes from 0."""

    __slots__ = ("blocking", "pos", "stream")

    def __init__(self, stream: HalfStream, pos: int, blocking: bool) -> None:
        self.stream = stream
        self.pos = pos
        self.blocking = blocking

    # -- waiting ---------------------------------------------------------------------------------------
    def _fill(self, n: int) -> bool:
        """Make `n` bytes from `pos` available, suspending if blocking. False if the stream ended first."""
        s = self.stream
        while s.next - self.pos < n:
            if s.eof or not self.blocking:
                return False
            parent = greenlet.getcurrent().parent
            if parent is None:  # not inside a streamed listener: behave as non-blocking
                return False
            parent.switch()
        return True

    def wait(self, n: int = 1) -> bool:
        """Wait until `n` bytes are available after the cursor; False if the stream ends first."""
        return self._fill(n)

    # -- reading ---------------------------------------------------------------------------------------
    def available(self) -> int:
        return max(self.stream.next - self.pos, 0)

    @property
    def eof(self) -> bool:
        """True when the stream has ended and every byte has been read."""
        return self.stream.eof and self.pos >= self.stream.next

    def read(self, n: int = -1) -> bytes:
        """`n` bytes (fewer only at the end of the stream), or with no `n` the next chunk available.

        A streamed listener waits for the bytes; a plain one gets what has arrived. `b""` means the
        stream ended (streamed) or nothing is available (plain).
        """
        if n < 0:
            self._fill(1)
            end = self.stream.next
        else:
            self._fill(n)
            end = min(self.pos + n, self.stream.next)
        out = self.stream.data(self.pos, end)
        self.pos += len(out)
        return out

    def peek(self, n: int) -> bytes:
        """Like `read(n)` without moving the cursor."""
        self._fill(n)
        return self.stream.data(self.pos, min(self.pos + n, self.stream.next))

    def skip(self, n: int) -> int:
        """Move forward `n` bytes (fewer at the end of the stream); returns how many were skipped."""
        self._fill(n)
        k = min(n, self.stream.next - self.pos)
        self.pos += k
        return k

    def readline(self, delim: bytes = b"\n", limit: int = 65536) -> bytes:
        """Bytes up to and including `delim`; at most `limit` bytes; the rest of the stream at its end."""
        s = self.stream
        scan = self.pos
        while True:
            end = min(s.next, self.pos + limit)
            i = s.find(delim, scan, end)
            if i >= 0:
                return self.read(i + len(delim) - self.pos)
            if end - self.pos >= limit:
                return self.read(limit)
            scan = max(self.pos, end - len(delim) + 1)
            if not self._fill(end - self.pos + 1):
                return self.read(s.next - self.pos)

    def find(self, pattern: bytes) -> Match | None:
        """Find `pattern` at or after the cursor, also when it spans segments.

        Streamed: waits until the pattern appears (the cursor moves to its start) or the stream ends
        (None, cursor at the end). Plain: searches what has arrived, including a short look-back before
        the cursor so that a pattern that started in an earlier segment is found; the cursor does not
        move.
        """
        return self.find_any((pattern,))

    def find_any(self, patterns: Iterable[bytes]) -> Match | None:
        """Like `find`, for several patterns at once: the match that is complete first in the stream (of
        two ending at the same byte, the longer one; of equal ones, the one listed first), which is what
        a streaming matcher can report without waiting for more bytes. `Match.pattern` says which it is.

        One call instead of a `find` per pattern: in a rule that scans every segment for a list of
        patterns, the per-call cost of interpreted Python is most of the price of the scan. With no
        patterns it returns None at once (the cursor does not move). Streamed, the cursor moves to the
        start of the match, so a longer pattern that began before it and completes later is not found by
        the next call: list patterns that contain one another only if the first found is enough.
        """
        patterns = tuple(patterns)  # any iterable (a generator is read once, here), as a rule may pass
        s = self.stream
        if not self.blocking:
            best, found = self._first_complete(patterns, True)
            if best < 0:
                return None
            return Match(best, best + len(found), found)
        longest = max((len(p) for p in patterns), default=0)
        while True:
            best, found = self._first_complete(patterns, False)
            if best >= 0:
                self.pos = best
                return Match(best, best + len(found), found)
            if not patterns:
                return None
            # No match can start before the last `longest - 1` bytes: the bytes before them are consumed,
            # so they need not be retained.
            self.pos = max(self.pos, s.next - longest + 1)
            if not self._fill(s.next - self.pos + 1):
                self.pos = s.next
                return None

    def _first_complete(self, patterns: tuple[bytes, ...], lookback: bool) -> tuple[int, bytes]:
        """(stream offset, pattern) of the match among what has arrived that is complete first (see
        `find_any`), or (-1, b""). From the cursor on, or with `lookback` from where a match could start
        that ends in the bytes after the cursor (a plain listener: only a match that ends in the new bytes
        counts, one wholly before them was seen by the previous call)."""
        s = self.stream
        best = -1
        found = b""
        for pattern in patterns:
            i = s.find(pattern, self.pos - len(pattern) + 1 if lookback else self.pos)
            if i >= 0 and _before(i, pattern, best, found):
                best, found = i, pattern
        return (best, found) if best >= 0 else (-1, b"")

    def __iter__(self) -> Iterator[bytes]:
        """The stream in chunks as they arrive, until it ends."""
        while True:
            chunk = self.read()
            if not chunk:
                return
            yield chunk

    # -- holding ---------------------------------------------------------------------------------------
    def mark(self) -> None:
        """Hold every packet carrying bytes from here on until `unmark()` or `flow.send()`."""
        self.stream.mark(self.pos)

    def unmark(self) -> None:
        """Release the hold set by `mark()`; the held packets are forwarded after this rule returns."""
        self.stream.unmark()
