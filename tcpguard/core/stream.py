"""Reassembly of one direction of a TCP connection, and the rules it enforces on the bytes.

Offsets count stream bytes from 0 (the byte after the SYN); `tcpguard.core.seq.unwrap` turns wrapping
sequence numbers into these 64-bit offsets, so nothing below compares sequence numbers.

The inline invariant is enforced here: a byte reaches the receiver only after the rules saw it, and the
bytes the rules see are the bytes the receiver gets. The rules that make that true:

* **In order** (the fast path): a segment that starts at or before `next` and ends after it appends its
  new bytes; the rules run on them before the packet is accepted.
* **Out of order**: a segment that starts beyond `next` is held (the adapter keeps the packet) until the
  gap before it fills; then its bytes go to the rules and the packet is released. Bounded by
  `max_ooo_bytes` / `max_ooo_segments`; past the bound the segment is dropped (the sender retransmits).
  With the `drop` out-of-order policy every such segment is dropped.
* **First copy wins**: a segment carrying bytes for offsets that already passed (or are held) is
  compared with the first copy; a conflicting one is rewritten to the first copy. Bytes below what
  is retained (all acknowledged: the receiver discards them anyway) are cut from a retransmission by the
  engine, never forwarded unchecked.
  A retransmission of bytes that are still held is dropped: the held first copy will be forwarded.
* **Window**: a segment starting at or beyond the receiver's advertised right window edge is dropped
  (the receiver would drop it too, and it must not fill our buffers).
* **After FIN**: bytes past the FIN offset are dropped; the receiver never delivers them.
* **Holding**: a rule may `mark()` a position; packets with bytes at or after it are held until the rule
  calls `unmark()` or `flow.send()`. Bounded by `max_stream_buffer`.
* **Retention**: bytes are kept from the lowest of the receiver's ACK, every streamed reader's position
  and the hold mark, plus a look-back tail so that plain rules can find a pattern split across packets:
  the largest `lookback` the direction's plain listeners declared (`LOOKBACK` unless they say less; none
  in a direction no plain rule reads: there a retransmission of acknowledged bytes is cut, see above).
* **Bounds, checked before the bytes are taken**: `receive` gets the `room` the engine can still give
  this direction (the least of what `max_stream_buffer` leaves of this direction and `max_total_buffer`
  leaves of all of them) and answers LIMIT, taking nothing, for a segment that would grow the buffers
  beyond it: `end - next` bytes for new in-order bytes (pulling held out-of-order segments in after them
  never grows the count: their bytes were counted when they were held), the payload's length for an
  out-of-order segment. So `buffered()`, in-order and out-of-order bytes together, never exceeds
  `max_stream_buffer`, and the engine's total never exceeds `max_total_buffer`. (A segment whose bytes
  partly repeat held out-of-order ones is counted whole, so one can be refused a little early; never late.)

Data on SYN, data on RST and the urgent pointer are normalised by the engine before bytes get here.
"""

from __future__ import annotations

from typing import Final, Protocol

from tcpguard.core.seq import HALF, MASK, MOD

LOOKBACK: Final = 256
# The buffer of a stream that retains nothing. Shared: an idle connection would otherwise carry two empty
# bytearrays (56 bytes each); a stream gets its own bytearray when bytes arrive and drops it when a trim
# leaves nothing to retain.
EMPTY: Final = b""


class Reader(Protocol):
    """A streamed reader (`tcpguard.core.cursor.Cursor`): its position pins the bytes it may still read.
    A protocol, so that the stream needs nothing of the cursor: the cursor uses the stream, not back."""

    pos: int


class Ledger:
    """What all the streams of one engine hold: bytes buffered and packets held. The streams report
    every change to it as they make it (the methods below that take a `ledger`), so the totals the bounds
    are checked against are right by construction; the engine only reads them."""

    __slots__ = ("buffered", "held")

    def __init__(self) -> None:
        self.buffered = 0  # bytes in stream buffers, in order and out of order
        self.held = 0  # packets held (out of order, or behind a mark), waiting in the kernel queue


class Held:
    """A packet held by this stream: out of order, or behind a rule's mark."""

    __slots__ = ("data", "end", "fin", "packet", "start", "token")

    def __init__(
        self, start: int, end: int, token: object, packet: bytes | None, fin: bool, data: bytes = b""
    ) -> None:
        self.start = start
        self.end = end
        self.token = token
        self.packet = packet  # rewritten packet bytes, or None to release as received
        self.fin = fin
        self.data = data  # an out-of-order segment's (first-copy) payload; empty for in-order holds


# What `HalfStream.receive` decided: (status, fix, new_start, reason, held).
#   status     OK, DROP, HOLD or LIMIT (the segment needs more room than it was given: nothing was taken,
#              and new_start says how many bytes it needs)
#   fix        the payload to forward instead (first copy restored where the segment conflicted), or None
#   new_start  offset where bytes new to the rules start (the stream's end before the segment), or -1
#   reason     why it was dropped or held
#   held       HOLD: the record of the held out-of-order segment; OK: the first record of the held segments
#              that became contiguous (appended to `HalfStream.held`), or None
# A plain tuple: one is made per data segment, and a tuple costs far less than an object.
OK: Final = 0
DROP: Final = 1
HOLD: Final = 2
LIMIT: Final = 3
SegmentResult = tuple[int, "bytes | None", int, str, "Held | None"]


class HalfStream:
    """One direction's byte stream, as forwarded to its receiver."""

    __slots__ = (
        "acked",
        "buf",
        "buf_start",
        "eof",
        "fin_off",
        "held",
        "hold_from",
        "isn",
        "next",
        "ooo",
        "owed_rst",
        "readers",
        "sent",
        "wnd_end",
        "wscale",
    )

    def __init__(self, isn: int) -> None:
        self.isn = isn  # sequence number of the SYN (offset -1)
        self.next = 0  # first offset the rules have not seen
        self.sent = 0  # first offset not forwarded yet (a forwarded FIN counts as one)
        self.buf: bytearray | bytes = EMPTY  # bytes [buf_start, next); EMPTY while there are none
        self.buf_start = 0
        self.acked = 0  # highest offset acknowledged by the receiver
        self.wnd_end = -1  # receiver's right window edge as an offset; -1 while unknown
        self.wscale = -1  # receiver's window scale; -1 while unknown (no window check then)
        # The three collections below are rarely non-empty; they start as the shared empty tuple and become
        # lists on first use, which saves three list objects per direction on every idle connection.
        # (Their byte count, `ooo_bytes`, and the segments that became contiguous are not kept in slots of
        # their own: two slots fewer make each HalfStream 16 bytes smaller, and both are rarely needed.)
        self.ooo: list[Held] | tuple[()] = ()  # out-of-order segments, sorted by start
        self.held: list[Held] | tuple[()] = ()  # packets held behind a mark (in arrival order), or waiting
        self.hold_from = -1  # offset of a rule's mark, -1 if none
        self.fin_off = -1  # offset of the FIN, -1 until seen in order
        self.eof = False  # all bytes up to the FIN were delivered
        self.readers: list[Reader] | tuple[()] = ()  # streamed readers; their positions pin retained bytes
        # The client's stream while its SYN waits: the sequence number of the RST the client owes a server
        # ACK of an older connection on these ports (tracker.older_connection_ack); -1: none. Here rather
        # than on the Connection, where one slot more costs 16 bytes per connection; this object's size
        # class has room for it.
        self.owed_rst = -1

    # -- sequence numbers ------------------------------------------------------------------------------
    def offset(self, seq: int) -> int:
        """`seq` as a stream offset, the candidate nearest to `next` (`seq.unwrap`, inlined: hot path)."""
        near = self.next
        off = near - (near & MASK) + ((seq - self.isn - 1) & MASK)
        if off - near > HALF:
            return off - MOD
        if near - off > HALF:
            return off + MOD
        return off

    def seq_at(self, off: int) -> int:
        return (self.isn + 1 + off) & MASK

    @property
    def next_seq(self) -> int:
        """The sequence number the receiver expects next: the end of what was forwarded to it."""
        return self.seq_at(self.sent)

    def forwarded(self, end: int, fin: bool) -> None:
        """A packet carrying bytes up to `end` (and a FIN at `end` if `fin`) was forwarded."""
        e = end + 1 if fin else end
        self.sent = max(self.sent, e)

    # -- reading, for cursors and rules ----------------------------------------------------------------
    def data(self, start: int, end: int) -> bytes:
        """Bytes [start, end) as far as they are retained."""
        s = max(start, self.buf_start) - self.buf_start
        e = min(end, self.next) - self.buf_start
        return bytes(self.buf[s:e]) if e > s else b""

    def find(self, pattern: bytes, lo: int, hi: int = -1) -> int:
        """The offset of the first `pattern` starting at or after `lo` and ending by `hi` (default: the
        end of what arrived), among the retained bytes; -1 if none."""
        start = self.buf_start
        i = self.buf.find(pattern, max(lo, start) - start, (self.next if hi < 0 else hi) - start)
        return i + start if i >= 0 else -1

    # -- holding, for rules (through their cursor) and the engine ---------------------------------------
    def mark(self, pos: int) -> None:
        """Hold every packet carrying bytes from `pos` on, until `unmark()` (or `flow.send()`)."""
        self.hold_from = pos

    def unmark(self) -> None:
        """Lift the mark: the held packets leave once the rules of this event have run."""
        self.hold_from = -1

    def hold(self, record: Held, ledger: Ledger, before_last: int = 0) -> None:
        """Hold an in-order packet (behind a mark, or an RST after held data), in arrival order: before
        the last `before_last` records, which are out-of-order packets that this one's bytes made
        contiguous and that must leave after it."""
        held = list(self.held)
        held.insert(len(held) - before_last, record)
        self.held = held
        ledger.held += 1

    def release(self, accept: bool, ledger: Ledger) -> list[Held]:
        """Give up every held in-order packet (the rules saw their bytes), in arrival order: forwarded if
        `accept`, else to be dropped. The caller verdicts the returned records."""
        out = list(self.held)
        if accept:
            for h in out:
                self.forwarded(h.end, h.fin)
        ledger.held -= len(out)
        self.held = ()
        return out

    def drop_ooo(self, ledger: Ledger) -> list[Held]:
        """Give up the out-of-order packets: the rules never saw their bytes, so they must be dropped."""
        out = list(self.ooo)
        ledger.held -= len(out)
        ledger.buffered -= sum(h.end - h.start for h in out)
        self.ooo = ()
        return out

    def clear(self, ledger: Ledger) -> None:
        """Forget every retained byte (the connection ended for the rules)."""
        ledger.buffered -= len(self.buf)
        self.buf = EMPTY
        self.buf_start = self.next

    # -- receiving -------------------------------------------------------------------------------------
    def receive(
        self,
        off: int,
        payload: bytes,
        fin: bool,
        token: object,
        hold_ooo: bool,
        max_ooo_bytes: int,
        max_ooo_segments: int,
        room: int,
        ledger: Ledger,
        may_hold: bool = True,
    ) -> SegmentResult:
        """Take one segment's payload at offset `off`. See the module docstring for the rules; `room` is
        how many bytes the buffers may still grow by (see Bounds there); `may_hold` false refuses an
        out-of-order segment that would be held (the engine's held-packet bound). What the stream takes
        is reported to `ledger`."""
        before = len(self.buf)
        had_ooo = bool(self.ooo)
        if had_ooo:
            before += self.ooo_bytes
        res = self._receive(
            off, payload, fin, token, hold_ooo, max_ooo_bytes, max_ooo_segments, room, may_hold
        )
        status = res[0]
        if status in (OK, HOLD):
            ledger.buffered += (len(self.buf) + self.ooo_bytes if self.ooo else len(self.buf)) - before
            if status == HOLD:
                ledger.held += 1
        return res

    def _receive(
        self,
        off: int,
        payload: bytes,
        fin: bool,
        token: object,
        hold_ooo: bool,
        max_ooo_bytes: int,
        max_ooo_segments: int,
        room: int,
        may_hold: bool,
    ) -> SegmentResult:
        n = len(payload)
        end = off + n
        nxt = self.next
        if self.fin_off >= 0 and end > self.fin_off:
            return DROP, None, -1, "data after FIN", None
        if self.wscale >= 0 and n and off >= self.wnd_end >= 0 and end > nxt:
            return DROP, None, -1, "outside receive window", None
        if off <= nxt:
            if end <= nxt:
                # Nothing new: a retransmission (or a pure ACK / FIN when n == 0).
                fix = None
                if n:
                    if self.hold_from >= 0 and end > self.hold_from:
                        return DROP, None, -1, "retransmission of held data", None
                    fix = self._first_copy(off, payload)
                if fin and self.fin_off < 0 and end == nxt and not self.ooo:
                    self.fin_off = end
                    self.eof = True
                return OK, fix, -1, "", None
            # New bytes at the end of the stream.
            if end - nxt > room:
                return LIMIT, None, end - nxt, "buffer limit", None
            head = nxt - off
            fixed = self._first_copy(off, payload[:head]) if head else None
            new = payload[head:] if head else payload
            if self.ooo:
                restored = self._restore_from_ooo(nxt, new)
                if restored != new:
                    fixed = fixed if fixed is not None else payload[:head]
                    new = restored
            self._append(new)
            self.next = end
            if fin:
                self.fin_off = end
            pulled = self._pull_ooo() if self.ooo else None
            if self.fin_off >= 0 and self.next == self.fin_off:
                self.eof = True
            return OK, (fixed + new if fixed is not None else None), nxt, "", pulled
        # Out of order: a gap before this segment.
        if not hold_ooo:
            return DROP, None, -1, "out of order", None
        covered, fixed_payload = self._check_ooo(off, payload)
        if covered:
            return DROP, None, -1, "duplicate of held data", None
        if len(self.ooo) >= max_ooo_segments or self.ooo_bytes + n > max_ooo_bytes:
            return DROP, None, -1, "out-of-order buffer full", None
        if n > room:
            return LIMIT, None, n, "buffer limit", None
        if not may_hold:
            # The sender retransmits once the gap fills.
            return DROP, None, -1, "held packet limit", None
        held = Held(off, end, token, None, fin, fixed_payload)
        self._insert_ooo(held)
        return HOLD, (fixed_payload if fixed_payload is not payload else None), -1, "out of order", held

    def _first_copy(self, off: int, payload: bytes) -> bytes | None:
        """None if `payload` at `off` agrees with the retained first copy, else the corrected payload."""
        lo = max(off, self.buf_start)
        hi = min(off + len(payload), self.next)
        if hi <= lo:
            return None
        first = self.buf[lo - self.buf_start : hi - self.buf_start]
        if payload[lo - off : hi - off] == first:
            return None
        return payload[: lo - off] + bytes(first) + payload[hi - off :]

    def _check_ooo(self, off: int, payload: bytes) -> tuple[bool, bytes]:
        """(fully covered by held segments, payload with held first copies restored)."""
        end = off + len(payload)
        out = payload
        covered_to = off
        for h in self.ooo:
            if h.end <= off or h.start >= end:
                continue
            data = h.data
            lo, hi = max(off, h.start), min(end, h.end)
            if out[lo - off : hi - off] != data[lo - h.start : hi - h.start]:
                out = out[: lo - off] + data[lo - h.start : hi - h.start] + out[hi - off :]
            if h.start <= covered_to:
                covered_to = max(covered_to, h.end)
        return covered_to >= end and len(payload) > 0, out

    def _restore_from_ooo(self, start: int, new: bytes) -> bytes:
        _covered, out = self._check_ooo(start, new)
        return out

    def _insert_ooo(self, held: Held) -> None:
        ooo = self.ooo if isinstance(self.ooo, list) else []
        self.ooo = ooo
        i = len(ooo)
        while i and ooo[i - 1].start > held.start:
            i -= 1
        ooo.insert(i, held)

    @property
    def ooo_bytes(self) -> int:
        """Payload bytes of the held out-of-order segments (computed: rarely asked, and a slot costs)."""
        return sum(h.end - h.start for h in self.ooo)

    def _pull_ooo(self) -> Held | None:
        """Move held segments that became contiguous into the stream. Their records join the end of
        `held` (they leave with the packet that filled the gap, after the rules ran); returns the first of
        them, or None if none became contiguous."""
        ooo = self.ooo
        if not isinstance(ooo, list):
            return None
        pulled: list[Held] = []
        while ooo and ooo[0].start <= self.next:
            h = ooo.pop(0)
            if h.end > self.next:
                self._append(h.data[self.next - h.start :])
                self.next = h.end
            # A held FIN counts only if the stream ends exactly there; when data already went past it, the
            # receiver finds the FIN segment old and drops it, and so the stream goes on.
            if h.fin and self.fin_off < 0 and h.end == self.next:
                self.fin_off = h.end
            h.data = b""
            pulled.append(h)
        if not pulled:
            return None
        self.held = [*self.held, *pulled]
        return pulled[0]

    def _append(self, data: bytes) -> None:
        buf = self.buf
        if isinstance(buf, bytearray):
            buf += data
        elif buf:
            grown = bytearray(buf)  # an idle stream's look-back tail (see trim)
            grown += data
            self.buf = grown
        else:
            self.buf = bytearray(data)

    # -- acknowledgements and retention ----------------------------------------------------------------
    def ack(self, off: int, window: int) -> None:
        """The receiver acknowledged up to `off` and advertised `window` (already scaled)."""
        if off > self.acked:
            # Never past what was forwarded: an ACK of bytes the receiver cannot have is forged or
            # broken, and must not free bytes that first-copy checks still need.
            self.acked = min(off, self.sent)
        edge = off + window
        self.wnd_end = max(self.wnd_end, edge)

    def trim(self, ledger: Ledger, lookback: int = LOOKBACK) -> None:
        """Forget bytes nobody can need any more (see Retention in the module docstring). The engine
        passes the largest look-back the direction's plain listeners declared, 0 if none reads it
        (`dispatch.lookbacks`)."""
        before = len(self.buf)
        self._trim(lookback)
        ledger.buffered -= before - len(self.buf)

    def _trim(self, lookback: int) -> None:
        keep = min(self.acked, self.next)
        for r in self.readers:
            keep = min(keep, r.pos)
        if 0 <= self.hold_from < keep:
            keep = self.hold_from
        keep -= lookback
        if keep > self.buf_start:
            buf = self.buf
            cut = keep - self.buf_start
            if cut >= len(buf):
                self.buf = EMPTY
            elif len(buf) - cut <= lookback or not isinstance(buf, bytearray):
                # Only the look-back tail is left (everything else is acknowledged): an idle connection
                # keeps it as an exact-size `bytes` (33 bytes of overhead) rather than the bytearray
                # (56 bytes plus its old allocation); `_append` makes a bytearray again when bytes arrive.
                self.buf = bytes(buf[cut:])
            else:
                del buf[:cut]
            self.buf_start = keep

    def buffered(self) -> int:
        return len(self.buf) + self.ooo_bytes if self.ooo else len(self.buf)

    def skip_to(self, off: int, ledger: Ledger) -> None:
        """Continue the stream at `off`, beyond `next`: the receiver already has the bytes in between.

        Only for a connection picked up mid-stream (see `Engine._skip_unseen`). Retained bytes go (they
        are all below `off`), readers move to `off`; out-of-order segments must have been dropped first.
        """
        ledger.buffered -= len(self.buf)
        self.next = self.sent = self.buf_start = self.acked = off
        self.buf = EMPTY
        for r in self.readers:
            r.pos = max(r.pos, off)
