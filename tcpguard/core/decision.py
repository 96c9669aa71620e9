"""What the engine answers for each packet: the contract between the core and every adapter.

An adapter (NFQUEUE, pcap replay) hands the engine a raw IP packet with an opaque `token` (the NFQUEUE
packet object, or a frame number) and gets back a `Decision`. It must:

1. apply `verdict` to the packet it just passed in: ACCEPT (with `packet` as the new bytes when not None),
   DROP, or HOLD (keep the token: the engine will release it in a later decision or timer output);
2. apply every `Release` in `releases`, in order (they are earlier held packets, by token);
3. transmit every packet in `send`, in order, after the verdicts (forged RSTs; raw IP packets).

`Output` is the same minus the verdict, for timer ticks and shutdown.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class Verdict(enum.IntEnum):
    ACCEPT = 0
    DROP = 1
    HOLD = 2


@dataclass(slots=True)
class Release:
    """A previously held packet leaves the engine: ACCEPT (possibly rewritten) or DROP."""

    token: Any  # any token; not `object`: mypyc fails at import on a dataclass field typed `object`
    verdict: Verdict
    packet: bytes | None = None


@dataclass(slots=True)
class Output:
    releases: list[Release] = field(default_factory=list)
    send: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Decision:
    """The verdict on one packet. `releases` and `send` are empty (shared empty tuples) on almost every
    packet, which saves two list allocations per packet on the hot path."""

    verdict: Verdict
    packet: bytes | None = None
    releases: Sequence[Release] = ()
    send: Sequence[bytes] = ()
    flow_id: int | None = None
    reason: str = ""
