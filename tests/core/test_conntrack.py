"""ConnTable's timing wheel against the single heap of (expiry, id, connection) tuples it replaced: the
same connections expire, in the same order, and eviction picks the same victim, whatever the sequence of
new connections, timeout changes (later: lazy; earlier: re-filed), removals, expiry runs and evictions."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from tcpguard.core.conntrack import Connection, ConnTable
from tcpguard.core.state import State
from tcpguard.core.stream import HalfStream


class HeapTable:
    """The previous implementation's timeout order (one lazy heap), kept as the reference."""

    def __init__(self) -> None:
        self.live: dict[int, Connection] = {}
        self.heap: list[tuple[float, int, Connection]] = []
        self.at: dict[int, float] = {}

    def push(self, conn: Connection) -> None:
        self.at[conn.id] = conn.expires
        heapq.heappush(self.heap, (conn.expires, conn.id, conn))

    def touch(self, conn: Connection) -> None:
        if conn.expires < self.at[conn.id]:
            self.push(conn)

    def expired(self, now: float) -> Iterator[Connection]:
        heap = self.heap
        while heap and heap[0][0] <= now:
            at, _cid, conn = heapq.heappop(heap)
            if conn.id not in self.live or at != self.at[conn.id]:
                continue
            if conn.expires > now:
                self.push(conn)
                continue
            yield conn

    def nearest_expiry(self) -> Connection | None:
        heap = self.heap
        while heap:
            at, _cid, conn = heap[0]
            if conn.id not in self.live or at != self.at[conn.id]:
                heapq.heappop(heap)
                continue
            if conn.expires > at:
                heapq.heappop(heap)
                self.push(conn)
                continue
            return conn
        return None


def make(cid: int, expires: float) -> Connection:
    client = bytes([10, 0, cid >> 8 & 0xFF, cid & 0xFF])
    server = b"\x0a\x02\x00\x01"
    up, down = HalfStream(1), HalfStream(2)
    conn = Connection(cid, client, 1000 + cid, server, 80, 0.0, up, down, State.ESTABLISHED)
    conn.expires = expires
    return conn


# (operation, connection index, time in quarter seconds): many ties, both within one second and exact.
OPS = st.lists(
    st.tuples(
        st.sampled_from(["new", "later", "earlier", "remove", "expire", "evict", "compact"]),
        st.integers(0, 40),
        st.integers(0, 200),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_wheel_expires_and_evicts_exactly_like_one_heap(ops: list[tuple[str, int, int]]) -> None:
    table, ref = ConnTable(), HeapTable()
    conns: list[Connection] = []
    now = 0.0
    for op, i, t in ops:
        when = t / 4
        if op == "new" or not conns:
            conn = make(len(conns) + 1, now + when)
            conns.append(conn)
            table.add(conn)
            ref.live[conn.id] = conn
            ref.push(conn)
            continue
        conn = conns[i % len(conns)]
        if op in ("later", "earlier"):
            conn.expires = conn.expires + when if op == "later" else max(now, conn.expires - when)
            table.touch(conn)
            ref.touch(conn)
        elif op == "remove":
            table.remove(conn)
            ref.live.pop(conn.id, None)
        elif op == "expire":
            now += when
            got = []
            for c in table.expired(now):
                got.append(c.id)
                table.remove(c)
            want = []
            for c in ref.expired(now):
                want.append(c.id)
                ref.live.pop(c.id)
            assert got == want
        elif op == "evict":
            victim, expected = table.nearest_expiry(), ref.nearest_expiry()
            assert (victim and victim.id) == (expected and expected.id)
            if victim is not None and expected is not None:
                table.remove(victim)
                ref.live.pop(expected.id)
        else:
            table.compact()
        assert sorted(c.id for c in table) == sorted(ref.live)


def test_compact_bounds_stale_entries() -> None:
    table = ConnTable()
    conns = [make(i + 1, 100.0 + i % 7) for i in range(3000)]
    for conn in conns:
        table.add(conn)
    for conn in conns[:2500]:
        table.remove(conn)
    table.compact()
    assert table._entries == 500
    assert [c.id for c in table.expired(1000.0)] == sorted(
        (c.id for c in conns[2500:]), key=lambda cid: (100.0 + (cid - 1) % 7, cid)
    )


def test_an_entry_left_behind_by_an_earlier_timeout_does_not_jump_the_queue() -> None:
    table = ConnTable()
    a, b = make(1, 10.0), make(2, 20.0)
    table.add(a)
    table.add(b)
    a.expires = 5.0  # earlier: re-filed at 5, its entry at 10 is stale
    table.touch(a)
    a.expires = 30.0  # later: lazy, caught up when the entry at 5 comes due
    assert list(table.expired(6.0)) == []
    assert table.nearest_expiry() is b
    assert [c.id for c in table.expired(25.0)] == [2]
