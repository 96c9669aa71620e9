"""TCP sequence arithmetic modulo 2**32 (RFC 1982 serial number arithmetic).

The reassembler works on 64-bit stream offsets so that the hot path compares plain integers; `unwrap`
is the reference for turning 32-bit wrapping sequence numbers into such offsets (the per-packet copy of it in
`HalfStream.offset` is inlined for speed and tested against it).
"""

from __future__ import annotations

from typing import Final

MOD: Final = 1 << 32
HALF: Final = 1 << 31
MASK: Final = MOD - 1


def unwrap(seq: int, isn: int, near: int) -> int:
    """Absolute stream offset of `seq`, relative to `isn`, chosen nearest to the offset `near`.

    Offsets count from `isn` (offset 0 is the ISN itself, so the first data byte has offset 1). Picking
    the candidate nearest to `near` (normally the next expected offset) is what makes wrap-around work:
    a sequence number just past 2**32 maps to an offset just past `near`, not 4 GiB back.
    """
    rel = (seq - isn) & MASK
    base = near - (near & MASK)
    cand = base + rel
    if cand - near > HALF:
        cand -= MOD
    elif near - cand > HALF:
        cand += MOD
    return cand
