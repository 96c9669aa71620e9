"""What the engine answers for each packet: the contract between the core and every adapter.

An adapter (NFQUEUE, pcap replay) hands the engine a raw IP packet with an opaque `token` (the NFQUEUE
packet object, or a frame number) and gets back a `Decision`. It must:

1. apply `verdict` to the packet it just passed in: ACCEPT (with `packet` as the new bytes when not None),
   DROP, or HOLD (keep the token: the engine will release it in a later decision or timer output);
2. apply every `Release` in `releases`, in order (they are earlier held packets, by token);
3. transmit every packet in `send`, in order, after the verdicts (forged RSTs; raw IP packets).

One exception serves delivery. When the verdict is DROP and `in_place` is an index into `send`, that
packet (an RST) goes where the dropped packet was going: same addresses, same ports, same direction. An
adapter that can rewrite a queued packet may transmit it *as the dropped packet's verdict* (its bytes
replaced by the RST, accepted), at the point of step 3 where it would have been sent, instead of through
a socket of its own. Why: the packet is already routed and queued, so the RST needs no socket buffer and
cannot be refused with EAGAIN when the outgoing link is congested, which is exactly when a limit resets
connections (issue 18: 17-23% of raw sends failed so behind a 40 Mbit/s link). An adapter that cannot
(pcap replay) ignores `in_place` and sends `send` as usual; the outcome on the wire is the same.

A Decision with `bypass` set (only with ACCEPT) also asks the adapter to have the kernel stop queueing
the packet's connection: no listener wants more of it, and the engine has forgotten it. The NFQUEUE
adapter marks the packet and lets tcpguard's chain save the mark on the conntrack entry; an offline
adapter has nothing to do. Later packets of the connection that reach the engine anyway (already queued,
or the kernel's rule is missing) are accepted with `bypass` set again.

`Output` is the same minus the verdict, for timer ticks and shutdown.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class Verdict(enum.IntEnum):
    ACCEPT = 0
    DROP = 1
    HOLD = 2


# Plain classes with a written-out __init__, not dataclasses: compiled by mypyc, a dataclass keeps the
# __init__ that the dataclasses module generates at import, an interpreted function, and one Decision per
# packet then cost 0.2-0.3 us; a native __init__ costs a tenth of that.


class Release:
    """A previously held packet leaves the engine: ACCEPT (possibly rewritten) or DROP."""

    __slots__ = ("packet", "token", "verdict")

    def __init__(self, token: object, verdict: Verdict, packet: bytes | None = None) -> None:
        self.token = token
        self.verdict = verdict
        self.packet = packet

    def __repr__(self) -> str:
        return f"Release(token={self.token!r}, verdict={self.verdict!r}, packet={self.packet!r})"


class Output:
    __slots__ = ("releases", "send")

    def __init__(self, releases: list[Release] | None = None, send: list[bytes] | None = None) -> None:
        self.releases: list[Release] = [] if releases is None else releases
        self.send: list[bytes] = [] if send is None else send

    def __repr__(self) -> str:
        return f"Output(releases={self.releases!r}, send={self.send!r})"


class Decision:
    """The verdict on one packet. `releases` and `send` are empty (shared empty tuples) on almost every
    packet, which saves two list allocations per packet on the hot path."""

    __slots__ = ("bypass", "flow_id", "in_place", "packet", "reason", "releases", "send", "verdict")

    def __init__(
        self,
        verdict: Verdict,
        packet: bytes | None = None,
        releases: Sequence[Release] = (),
        send: Sequence[bytes] = (),
        flow_id: int | None = None,
        reason: str = "",
        in_place: int = -1,
        bypass: bool = False,
    ) -> None:
        self.verdict = verdict
        self.packet = packet
        self.releases = releases
        self.send = send
        self.flow_id = flow_id
        self.reason = reason
        self.in_place = in_place  # index in `send` of an RST that may ride this DROP's verdict; -1: none
        self.bypass = bypass  # ACCEPT only: the kernel should stop queueing this connection

    def __repr__(self) -> str:
        return (
            f"Decision(verdict={self.verdict!r}, packet={self.packet!r}, releases={self.releases!r}, "
            f"send={self.send!r}, flow_id={self.flow_id!r}, reason={self.reason!r}, "
            f"in_place={self.in_place!r}, bypass={self.bypass!r})"
        )
