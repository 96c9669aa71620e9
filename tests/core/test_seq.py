"""Sequence-number unwrapping, and the hot path's inlined copy of it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tcpguard.core.seq import HALF, MASK, MOD, unwrap
from tcpguard.core.stream import HalfStream

u32 = st.integers(0, MASK)


@given(isn=u32, near=st.integers(0, 1 << 40), delta=st.integers(-HALF + 1, HALF - 1))
def test_unwrap_finds_the_offset_nearest_to_near(isn: int, near: int, delta: int) -> None:
    target = near + delta
    seq = (isn + target) & MASK
    assert unwrap(seq, isn, near) == target


@given(isn=u32, near=st.integers(0, 1 << 40), seq=u32)
def test_stream_offset_is_unwrap_relative_to_the_first_data_byte(isn: int, near: int, seq: int) -> None:
    s = HalfStream(isn)
    s.next = near
    got = s.offset(seq)
    assert got == unwrap(seq, (isn + 1) & MASK, near)
    assert abs(got - near) <= HALF and (isn + 1 + got - seq) % MOD == 0
