"""The NFQUEUE adapter: packets from one netfilter queue into the engine, the engine's decisions back out.

It only translates. For every queued packet it calls `handler.handle_packet(raw, now, token)` (the token
is the NetfilterQueue `Packet` object itself, which is what a later `Release` names) and applies the
`Decision` exactly as `tcpguard.core.decision` prescribes: the packet's own verdict (ACCEPT, rewritten
with `set_payload` when `packet` is set; DROP; HOLD, keeping the object), then every `Release` in order,
then every packet in `send` through the raw sender. A timer calls `handler.handle_timer(now)` every
`tick` seconds even when no traffic arrives, so idle timeouts fire. `now` is always `time.monotonic()`:
the engine needs a clock that never jumps backwards, not the wall time.

How the loop reads the queue. NetfilterQueue 1.1 offers `run()` (recv until EAGAIN) and `run_socket(s)`,
which calls `s.recv()` until it raises EAGAIN. We poll the netlink socket together with a wake-up pipe and,
when it is readable, call `run_socket` with a small wrapper that reads at most `batch` messages before
pretending EAGAIN. That bounds the time between timer checks under a flood (plain `run(block=False)` would
not return while packets keep arriving), lets `stop()` wake the loop at once, and lets us count ENOBUFS
(the kernel telling us it dropped queue messages because we were too slow).

Verdicts are batched. While a read batch runs, a plain accept (no rewrite, no release, no forged packet)
is not answered at once: it waits for the end of the batch, and then one NFQNL_MSG_VERDICT_BATCH message
answers all of them (`_flush`). Anything else first answers the accepts before it, so packets still leave
in the order the engine decided. The kernel's batch answers every queued packet up to an id, a held one
too, so while a packet is held the waiting accepts get one verdict each instead. With an idle queue a
batch is one packet and nothing waits; under load a packet waits at most for the rest of its batch
(`batch` packets). Measured on the bench's rr traffic: one system call per packet fewer, and the kernel
forwarding a batch in one go wakes each receiving process once per batch (tcpguard-1 went from 30 to 17
µs of gateway CPU per packet, docs/BENCHMARKS.md). Because a batch answers every older queued packet, the
adapter also follows the kernel's packet ids (1, 2, ... per binding): an id that never reached it (a
message the kernel lost, or one cut short by the receive buffer) is dropped explicitly before anything
later is answered, so no batch can accept a packet nobody inspected. The kernel answers only a refused
verdict message, with an error the adapter counts (`refused`).

Choices documented here:

* Nothing the handler does may escape into NetfilterQueue's C callback (an exception there is swallowed
  half-way and would leave the packet without a verdict). A handler exception is logged and counted and the
  packet gets `error_verdict`; a `KeyboardInterrupt`/`SystemExit` raised inside the callback is kept,
  the loop stops and drains, and it is re-raised from `run()`.
* Fail-open: NetfilterQueue does not expose `nfq_set_queue_flags`, so with `fail_open=True` we send the
  `NFQA_CFG_F_FAIL_OPEN` config message ourselves on the queue's own netlink socket (the kernel only takes
  queue config from the socket bound to the queue) and check the kernel's acknowledgement. With it, packets
  that find the queue full (`max_len` packets waiting or held) are accepted by the kernel instead of dropped.
  This complements iptables' `--queue-bypass`, which covers the time no process is bound at all.
* Copy range and large packets (issue 21). NetfilterQueue 1.1 caps the copy range it asks the kernel for
  at 4,016 bytes (`bind` clamps `range` to its 4,096-byte buffer less metadata) and `run_socket` asks our
  socket object for 4,096 bytes, but it hands `nfq_handle_packet` whatever `recv` returned, at the length
  returned. So the adapter's `_BatchReader.recv` reads up to `NFQ_RECV_SIZE` (64 KB plus 4 KB of netlink
  headers) whatever it is asked, and `open()` then sends its own NFQNL_MSG_CONFIG with NFQA_CFG_PARAMS
  (COPY_PACKET, the configured range, at most the kernel's NFQNL_MAX_COPY_RANGE of 65,531 bytes: an
  attribute's 16-bit length holds no more) and checks the kernel's ack. A packet longer than the range
  still arrives cut short: counted in `stats.truncated`, handed to the engine, whose decoder rejects it.
* GSO packets (NFQA_CFG_F_GSO, issue 21). Without the flag the kernel cuts every GSO/GRO aggregate back
  into wire-sized segments and completes partial checksums before queueing (nfqnl_enqueue_packet calls
  skb_gso_segment; nfqnl_build_packet_message calls nf_queue_checksum_help), so a 64 KB aggregate costs
  some 45 trips through the engine. With it, the kernel queues the aggregate whole and segments it only
  when it leaves. `open()` asks for it when `gso` is true and the copy range holds an aggregate; a kernel
  that refuses (EOPNOTSUPP/EINVAL, before 3.10) leaves the queue as it was, said in the log and in
  `stats.gso` (0), and everything works as before.
* Checksums with GSO on. The kernel then leaves CHECKSUM_PARTIAL packets as they are: their TCP checksum
  field holds only the pseudo-header sum, completed by the kernel or the NIC on the way out. Each queued
  packet's NFQA_SKB_INFO says which case it is (nfqnl_put_packet_info): NFQA_SKB_CSUMNOTREADY when
  `ip_summed == CHECKSUM_PARTIAL` (every GRO aggregate is: tcp_gro_complete sets it after GRO verified each
  segment's checksum; and packets of local senders with checksum offload), else NFQA_SKB_CSUM_NOTVERIFIED
  when the packet was queued from PRE_ROUTING, LOCAL_IN or FORWARD (or POST_ROUTING without a socket) and
  `skb_csum_unnecessary()` is false, i.e. nobody verified it; no flag: the driver (or GRO) verified it.
  NetfilterQueue does not expose the attribute, but `_BatchReader.recv` sees every raw datagram before
  NetfilterQueue parses it, so it keeps the datagram and `_process` finds the packet's NFQA_SKB_INFO
  there by id (`_info_of`). The engine skips its checksum check (`checksum_trusted=True`) for a
  CSUMNOTREADY packet, and for a packet without NOTVERIFIED queued from PRE_ROUTING, LOCAL_IN or FORWARD
  (where the kernel would have said NOTVERIFIED had nobody verified it); every other packet is checked
  as before. With GSO off, or on a kernel that refused it, nothing is trusted. Left: a local sender with
  CAP_NET_RAW (a packet socket with a virtio-net header) or a VM guest can queue a CHECKSUM_PARTIAL packet
  whose checksum offsets it chose; user space cannot see them (docs/adversarial.md, G3).
* Rewritten GSO packets. `set_payload` reaches nfqnl_mangle, which copies the new bytes in, keeps the
  GSO metadata (gso_size, gso_type) and sets `ip_summed = CHECKSUM_NONE`. On the way out such a packet
  always takes software segmentation (netif_needs_gso: GSO and neither CHECKSUM_PARTIAL nor UNNECESSARY),
  and tcp4/tcp6_gso_segment, seeing no CHECKSUM_PARTIAL, reset the checksum to the pseudo-header sum and
  mark it partial, so every segment gets a correct checksum and sequence number from the rewritten
  header; the engine's rewrites keep or shrink the length and recompute the full checksum, which a packet
  that is not GSO needs. So rewrites are applied to aggregates as to any packet:
  tests/adversarial/test_evasion_offloads.py has GRO merge a conflicting retransmission into one
  aggregate, which the engine rewrites to the first copy, and the server reads the first copy. Not
  tried live: a rewrite that shrinks an aggregate to one segment or less (a retransmission cut to what
  the receiver has not acknowledged yet); see the next point for what a 40-byte replacement did.
* No RST in place of an aggregate. A dropped packet normally carries the connection's RST as its own
  verdict (`Decision.in_place`: the RST leaves where the packet was going, without a raw socket). Put in
  place of a GSO packet, the 40-byte RST keeps the aggregate's GSO metadata, and the receiver did not
  take it in 3 of 4 runs of tests/adversarial/test_evasion_offloads.py (the adapter counted it
  `sent_in_place`; the server was never reset). So a GSO packet is dropped and its RST sent by the raw
  sender like the others.
* `stop()` only sets a flag and writes to a pipe (safe from a signal handler or another thread). The loop
  then drains: it asks `handler.shutdown(now)` for its final releases, gives `drain_verdict` to any packet
  still held (an engine that forgot one must not leak it in the kernel queue) and to packets already
  waiting in the socket, and unbinds. Packets still in flight at unbind are dropped by the kernel; TCP
  retransmits them (and with `--queue-bypass` they pass once nobody is bound).
* Connection bypass (issue 20): a `Decision` with `bypass` set is accepted as NF_REPEAT with the bit
  `bypass_mark` added to the packet mark (`repeat_mark | bypass_mark` in repeat mode), never batched,
  because the batch message carries one mark for all. tcpguard's chain saves that bit into the conntrack
  mark, and its connmark rule then lets the connection's later packets past the queue: the kernel stops
  queueing them. A packet that *arrives* carrying the bit went through a queue rule that does not exempt
  it (an operator's chain with `iptables.manage: false`): it is accepted with no second look and counted
  (`bypass_looped`), since judging and repeating it again would loop it for ever, as `_looped` says.
  Without a `bypass_mark` (0) the adapter accepts such a packet plainly and the engine's tombstone keeps
  answering the connection's packets, which then all still come through the queue.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import math
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from tcpguard.core.decision import Decision, Output, Verdict

__all__ = [
    "NFQ_COPY_LIMIT",
    "NFQ_MAX_COPY",
    "NFQ_RECV_SIZE",
    "NfqueueAdapter",
    "PacketHandler",
    "PacketSender",
    "QueueStats",
    "QueuedPacket",
    "set_fail_open",
]

log = logging.getLogger(__name__)

#: The most bytes of a packet NetfilterQueue 1.1 asks the kernel for by itself (its 4096-byte buffer minus
#: metadata); `open()` raises the range with a config message of its own.
NFQ_MAX_COPY = 4016
#: The kernel's largest copy range (NFQNL_MAX_COPY_RANGE: 0xFFFF less a netlink attribute header).
NFQ_COPY_LIMIT = 0xFFFF - 4
#: Bytes `_BatchReader.recv` reads per datagram: the largest packet plus its netlink headers and attributes.
NFQ_RECV_SIZE = 0x10000 + 4096

# Netlink / nfnetlink_queue constants (linux/netlink.h, linux/netfilter/nfnetlink*.h).
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_CONFIG = 2
_NFQNL_MSG_VERDICT = 1
_NFQNL_MSG_VERDICT_BATCH = 3
_NFQA_VERDICT_HDR = 2
_NFQA_MARK = 3
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
_NFQA_CFG_F_FAIL_OPEN = 0x1
_NFQA_CFG_F_GSO = 0x4
_NFQA_CFG_PARAMS = 2
_NFQNL_COPY_PACKET = 2
_NFQNL_MSG_PACKET = 0
_NFQA_PACKET_HDR = 1
_NFQA_PAYLOAD = 10
_NFQA_SKB_INFO = 14
NFQA_SKB_CSUMNOTREADY = 0x1
NFQA_SKB_GSO = 0x2
NFQA_SKB_CSUM_NOTVERIFIED = 0x4
_NLA_TYPE_MASK = 0x3FFF
_NLA = struct.Struct("=HH")
# Hooks whose packets the kernel flags NOTVERIFIED when nobody verified their checksum: PRE_ROUTING,
# LOCAL_IN, FORWARD (nfqnl_build_packet_message; POST_ROUTING only without a socket, which we cannot see).
_VERIFYING_HOOKS = (0, 1, 2)
_NLMSGHDR = struct.Struct("=IHHII")
_NF_DROP = 0
_NF_ACCEPT = 1
_NF_REPEAT = 4
# nlmsg_seq of the verdict messages we send ourselves: the kernel echoes it in the error it returns if it
# refuses one (it sends nothing when it takes one, since we do not ask for acknowledgements). Drops of
# unseen ids have their own: the kernel answers ENOENT when it never queued them (a message it lost for
# ENOBUFS), which is expected and not counted.
_OUR_SEQ = 0x74670001
_UNSEEN_SEQ = 0x74670002


class QueuedPacket(Protocol):
    """What the adapter uses of `netfilterqueue.Packet` (tests pass fakes)."""

    def get_payload(self) -> bytes: ...
    def set_payload(self, payload: bytes) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...
    def repeat(self) -> None: ...
    def set_mark(self, mark: int) -> None: ...
    @property
    def mark(self) -> int: ...

    @property
    def id(self) -> int: ...


class PacketHandler(Protocol):
    """The engine side. `tcpguard.core.engine.Engine` satisfies it as is."""

    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision: ...
    def handle_timer(self, now: float) -> Output: ...
    def shutdown(self, now: float) -> Output: ...


class PacketSender(Protocol):
    """Where forged packets go (`tcpguard.io.rawsend.RawSender`). Must not raise.

    `send` answers positive (the kernel took it), zero (it waits for a retry) or negative (lost); `retry`
    makes a round of retries and answers (sent, lost) in it. The adapter calls it after every read batch
    and timer tick while packets wait, so the sender owns the retry bounds.
    """

    def send(self, packet: bytes) -> int: ...
    def retry(self) -> tuple[int, int]: ...


@dataclass(slots=True)
class QueueStats:
    """Counters of one queue worker.

    packets: packets read from the queue; accepted/dropped/held: verdicts of `handle_packet` on them;
    rewritten: verdicts (direct or released) that replaced the payload; released/release_accepted/
    release_dropped: held packets verdicted by a `Release`; release_unknown: releases naming a token that
    is not held (an engine bug, ignored); holding: held right now; drained: packets verdicted by the
    drain at stop (held ones plus unread ones); sent: forged packets transmitted, of which sent_in_place
    as the verdict of the packet they replace (Decision.in_place) and send_retried on a later attempt;
    send_pending: forged packets waiting for a retry now; send_errors: forged packets lost for good (the
    sender's retry bounds reached, or an error no retry can mend); handler_errors: exceptions
    from the handler; verdict_errors: verdicts NetfilterQueue refused; timer_ticks/timer_errors: timer
    calls; truncated: packets longer than the copy range; largest: largest packet seen; nl_enobufs: times
    the kernel reported lost queue messages; batches/batched: batch verdict messages sent and the accepted
    packets they answered (the rest of the accepts went one message each); unseen: queue ids that never
    reached us (a message lost by the kernel or cut short by the receive buffer), dropped explicitly so
    that no later batch verdict can accept them uninspected; refused: verdict messages of our own the
    kernel answered with an error; gso: 1 while the kernel queues GSO packets whole (NFQA_CFG_F_GSO
    taken), else 0; gso_packets: packets the kernel flagged GSO (aggregates larger than one segment);
    csum_partial: packets whose checksum the kernel completes on the way out (NFQA_SKB_CSUMNOTREADY);
    csum_trusted: packets handed to the engine with `checksum_trusted=True` (partial, or verified by the
    driver); copy_range: the bytes of each packet the kernel copies to us; looped: packets that arrived
    carrying tcpguard's own mark, so already judged by us (an operator's NFQUEUE rule without the mark
    exemption sent them back: `_looped`);
    bypass_marked: accepts given with the bypass bit (the engine's `Decision.bypass`: the kernel should
    stop queueing the connection); bypass_looped: packets that arrived already carrying the bypass bit,
    accepted with no second look (a queue rule that does not exempt the bit: `_bypass_looped`).
    """

    packets: int = 0
    accepted: int = 0
    dropped: int = 0
    held: int = 0
    rewritten: int = 0
    released: int = 0
    release_accepted: int = 0
    release_dropped: int = 0
    release_unknown: int = 0
    holding: int = 0
    drained: int = 0
    sent: int = 0
    sent_in_place: int = 0
    send_retried: int = 0
    send_pending: int = 0
    send_errors: int = 0
    handler_errors: int = 0
    verdict_errors: int = 0
    timer_ticks: int = 0
    timer_errors: int = 0
    truncated: int = 0
    largest: int = 0
    nl_enobufs: int = 0
    batches: int = 0
    batched: int = 0
    unseen: int = 0
    refused: int = 0
    looped: int = 0
    gso: int = 0
    gso_packets: int = 0
    csum_partial: int = 0
    csum_trusted: int = 0
    copy_range: int = 0
    bypass_marked: int = 0
    bypass_looped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _BatchReader:
    """Socket stand-in for `NetfilterQueue.run_socket`: at most `limit` datagrams per call, then EAGAIN.

    It reads up to NFQ_RECV_SIZE bytes whatever NetfilterQueue asks for (4,096), since NetfilterQueue
    parses what `recv` returns at its own length: that is how packets longer than 4,016 bytes get through.
    With `info` on it keeps each queued packet's datagram in `data`, where `_process` (which NetfilterQueue
    calls for this datagram before it reads the next) finds its NFQA_SKB_INFO (`_info_of`).
    """

    def __init__(self, sock: socket.socket, stats: QueueStats, info: bool = False) -> None:
        self.sock = sock
        self.stats = stats
        self.left = 0
        self.info = info
        self.data = b""

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        try:
            data = self.sock.recv(NFQ_RECV_SIZE)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.stats.nl_enobufs += 1
            raise
        head = data[4:6]
        if head == _NLMSG_ERROR_TYPE:  # queued packets are type 0x0300: one slice and compare
            _note_error(data, self.stats)
        elif self.info:
            self.data = data
        return data


def _skb_info(data: bytes) -> tuple[int, int, int]:
    """(packet id, NFQA_SKB_INFO flags, hook) of one queued-packet message; id -1 if it has no packet
    header. The kernel writes the attributes in a fixed order, the payload last (nfqnl_build_packet_message),
    so the walk stops there: a dozen attributes at most, each checked against the message's length."""
    end = min(len(data), int.from_bytes(data[0:4], "little" if _LITTLE else "big"))
    pos = _NLMSGHDR.size + 4  # nlmsghdr, nfgenmsg
    pid, flags, hook = -1, 0, -1
    while pos + 4 <= end:
        alen, atype = _NLA.unpack_from(data, pos)
        if alen < 4:
            break
        atype &= _NLA_TYPE_MASK
        if atype == _NFQA_PAYLOAD:
            break
        if atype == _NFQA_PACKET_HDR and alen >= 11 and pos + 11 <= end:
            pid = int.from_bytes(data[pos + 4 : pos + 8], "big")
            hook = data[pos + 10]
        elif atype == _NFQA_SKB_INFO and alen >= 8 and pos + 8 <= end:
            flags = int.from_bytes(data[pos + 4 : pos + 8], "big")
        pos += (alen + 3) & ~3
    return pid, flags, hook


_LITTLE = struct.pack("=H", 1) == b"\x01\x00"
_ORDER = "little" if _LITTLE else "big"
# nlmsg_len; after the nlmsghdr's other fields and the nfgenmsg, the first attribute's length and type and
# the packet header's id (big-endian) and hook (struct nfqnl_msg_packet_hdr: 7 bytes, packed).
_HEAD = struct.Struct("=I16xHH4s2xB")
# The 8 bytes before the payload attribute (an NFQA_SKB_INFO when there is one) and that attribute's header.
_TAIL = struct.Struct("=HH4sHH")


def _info_of(data: bytes, pid: int, size: int) -> tuple[int, int]:
    """(NFQA_SKB_INFO flags, hook) of queued packet `pid`, whose payload is `size` bytes, from its
    datagram; hook -1 if the datagram is not that packet's.

    The walk of `_skb_info` costs some 5 us a packet in Python. This takes the kernel's layout instead
    (nfqnl_build_packet_message): the packet header is the first attribute, the payload the last, with
    no padding after it, and NFQA_SKB_INFO, when there is one, comes right before the payload. A datagram
    that does not look exactly so gets the walk. When there is no NFQA_SKB_INFO the 8 bytes before the
    payload belong to another attribute; should they read like an NFQA_SKB_INFO header, the value after
    it has bytes 2 and 3 zero or comes from the kernel's own fields (every attribute that can precede is
    an ifindex, mark, priority, timestamp, uid/gid, the 8-byte hardware address field whose last two
    bytes are zero for Ethernet, or a conntrack/secctx blob), and a value with bit 0 and bit 2 clear means
    what no NFQA_SKB_INFO means (no flag), so a misread can only lose the GSO count."""
    try:
        end, alen, atype, id_bytes, hook = _HEAD.unpack_from(data)
        ilen, itype, flags_bytes, plen, ptype = _TAIL.unpack_from(data, end - 12 - size)
    except struct.error:
        ilen = -1
        alen = 0
    if alen != 11 or atype != _NFQA_PACKET_HDR or id_bytes != pid.to_bytes(4, "big"):
        ipid, flags, hook = _skb_info(data)
        return (flags, hook) if ipid == pid else (0, -1)
    if plen != 4 + size or ptype != _NFQA_PAYLOAD or end - 4 - size < 32:
        _, flags, hook = _skb_info(data)
        return flags, hook
    if ilen == 8 and itype == _NFQA_SKB_INFO:
        return int.from_bytes(flags_bytes, "big"), hook
    return 0, hook


_NLMSG_ERROR_TYPE = struct.pack("=H", _NLMSG_ERROR)


def _note_error(data: bytes, stats: QueueStats) -> None:
    """A netlink error message read from the queue's socket: count and log it if it refuses our own
    verdict message (NetfilterQueue, which reads the same socket, ignores it)."""
    if len(data) < _NLMSGHDR.size + 4 + _NLMSGHDR.size:
        return
    (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
    _, mtype, _, seq, _ = _NLMSGHDR.unpack_from(data, _NLMSGHDR.size + 4)  # the refused message's header
    if code != 0 and seq == _OUR_SEQ:
        stats.refused += 1
        log.warning(
            "the kernel refused a verdict message (type %#x): %s",
            mtype,
            os.strerror(-code) if code < 0 else code,
        )


class _Replay:
    """Socket stand-in that hands `run_socket` datagrams we already read, then EAGAIN (and, like
    `_BatchReader`, keeps each datagram in `reader.data`)."""

    def __init__(self, datagrams: list[bytes], reader: _BatchReader | None = None) -> None:
        self.datagrams = datagrams
        self.reader = reader

    def recv(self, size: int) -> bytes:
        if not self.datagrams:
            raise BlockingIOError(errno.EAGAIN, "replayed")
        data = self.datagrams.pop(0)
        reader = self.reader
        if reader is not None and reader.info:
            reader.data = data
        return data


def _config_message(queue_num: int, seq: int, attrs: bytes) -> bytes:
    """An NFQNL_MSG_CONFIG for `queue_num` carrying `attrs`, asking for an acknowledgement."""
    nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue_num)
    body = nfgen + attrs
    msg_type = (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_CONFIG
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


def _flag_attrs(flag: int) -> bytes:
    """NFQA_CFG_MASK and NFQA_CFG_FLAGS setting one queue flag (the mask leaves the others as they are)."""
    value = struct.pack("!I", flag)
    return struct.pack("=HH", 8, _NFQA_CFG_MASK) + value + struct.pack("=HH", 8, _NFQA_CFG_FLAGS) + value


def _fail_open_message(queue_num: int, seq: int) -> bytes:
    return _config_message(queue_num, seq, _flag_attrs(_NFQA_CFG_F_FAIL_OPEN))


def _gso_message(queue_num: int, seq: int) -> bytes:
    return _config_message(queue_num, seq, _flag_attrs(_NFQA_CFG_F_GSO))


def _copy_range_message(queue_num: int, seq: int, copy_range: int) -> bytes:
    """NFQA_CFG_PARAMS: struct nfqnl_msg_config_params, a big-endian copy range and the copy mode, packed
    (5 bytes; the attribute is padded to 8)."""
    params = struct.pack("!IB", copy_range, _NFQNL_COPY_PACKET)
    return _config_message(
        queue_num, seq, struct.pack("=HH", 4 + len(params), _NFQA_CFG_PARAMS) + params + b"\0" * 3
    )


def _verdict_message_parts(
    queue_num: int, verdict: int, mark: int | None, msg: int = _NFQNL_MSG_VERDICT_BATCH, seq: int = _OUR_SEQ
) -> tuple[bytes, bytes]:
    """The constant parts of a verdict message (a batch one by default): everything before the packet id,
    and after it.

    NFQNL_MSG_VERDICT_BATCH: the kernel answers every queued packet of this queue whose id is not after
    the given one with the verdict (and the mark, if present), in queue order (nfqnl_recv_verdict_batch).
    NFQNL_MSG_VERDICT: the one packet with that id.
    """
    mark_attr = b"" if mark is None else struct.pack("=HH", 8, _NFQA_MARK) + struct.pack("!I", mark)
    size = _NLMSGHDR.size + 4 + 12 + len(mark_attr)
    head = (
        _NLMSGHDR.pack(size, (_NFNL_SUBSYS_QUEUE << 8) | msg, _NLM_F_REQUEST, seq, 0)
        + struct.pack("=BB", socket.AF_UNSPEC, 0)
        + struct.pack("!H", queue_num)
        + struct.pack("=HH", 12, _NFQA_VERDICT_HDR)
        + struct.pack("!I", verdict)
    )
    return head, mark_attr


def _configure(
    sock: socket.socket, queue_num: int, make: Callable[[int], bytes], what: str, timeout: float
) -> list[bytes]:
    """Send the config message `make(seq)` on the queue's own socket (the kernel only takes a queue's
    config from the socket bound to it) and wait for its ack. Returns the other datagrams read while
    waiting (queued packets), which the caller must still process. Raises OSError with the kernel's errno
    if the kernel refuses, TimeoutError if no ack comes."""
    seq = int(time.monotonic() * 1000) & 0x7FFFFFFF or 1
    sock.sendto(make(seq), (0, 0))
    others: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no netlink ack for the {what}")
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            continue
        data = sock.recv(NFQ_RECV_SIZE)
        if len(data) >= _NLMSGHDR.size + 4:
            _, mtype, _, mseq, _ = _NLMSGHDR.unpack_from(data)
            if mtype == _NLMSG_ERROR and mseq == seq:
                (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
                if code != 0:
                    raise OSError(-code, f"{what} refused: {os.strerror(-code)}")
                return others
        others.append(data)


def set_fail_open(sock: socket.socket, queue_num: int, timeout: float = 2.0) -> list[bytes]:
    """Set NFQA_CFG_F_FAIL_OPEN on a bound queue and wait for the ack (see `_configure`)."""
    return _configure(
        sock, queue_num, lambda seq: _fail_open_message(queue_num, seq), "fail-open queue flag", timeout
    )


def set_gso(sock: socket.socket, queue_num: int, timeout: float = 2.0) -> list[bytes]:
    """Set NFQA_CFG_F_GSO on a bound queue and wait for the ack (see `_configure`): the kernel then queues
    GSO/GRO packets whole, with partial checksums left as they are (NFQA_SKB_INFO says which)."""
    return _configure(sock, queue_num, lambda seq: _gso_message(queue_num, seq), "GSO queue flag", timeout)


def set_copy_range(sock: socket.socket, queue_num: int, copy_range: int, timeout: float = 2.0) -> list[bytes]:
    """Set the queue's copy mode to COPY_PACKET with `copy_range` bytes and wait for the ack."""
    return _configure(
        sock, queue_num, lambda seq: _copy_range_message(queue_num, seq, copy_range), "copy range", timeout
    )


_ACCEPT = Verdict.ACCEPT
_HOLD = Verdict.HOLD


CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


def has_capabilities(*caps: int) -> bool:
    """Whether this process holds every capability in `caps` (effective set), root or not: the systemd
    service runs as an unprivileged user with just CAP_NET_ADMIN and CAP_NET_RAW."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return all(eff >> cap & 1 for cap in caps)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def queue_owner(queue_num: int, table: str = "/proc/net/netfilter/nfnetlink_queue") -> int | None:
    """The netlink port id bound to `queue_num` (the kernel's queue table), which for the first netlink
    socket of a process is its pid; None if the queue is free or the table cannot be read."""
    try:
        with open(table, encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == str(queue_num):
                    return int(fields[1])
    except (OSError, ValueError):
        return None
    return None


def bind_problem(queue_num: int) -> str:
    """What to tell the operator when NFQUEUE `queue_num` cannot be bound."""
    if not has_capabilities(CAP_NET_ADMIN):
        return (
            f"cannot bind NFQUEUE {queue_num}: tcpguard needs CAP_NET_ADMIN (and CAP_NET_RAW for resets); "
            "run it as root or as the systemd service"
        )
    owner = queue_owner(queue_num)
    if owner is not None:
        try:
            with open(f"/proc/{owner}/cmdline", "rb") as f:
                cmd = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())[:200]
        except OSError:
            cmd = ""
        who = f"process {owner} ({cmd})" if cmd else f"netlink port {owner}"
        return (
            f"cannot bind NFQUEUE {queue_num}: {who} is bound to it (another tcpguard?); stop it, or give "
            "this one another queue.num"
        )
    return f"cannot bind NFQUEUE {queue_num}: the kernel refused it (is the nfnetlink_queue module loaded?)"


def _takes_trust(handler: object) -> bool:
    """Whether `handler.handle_packet` takes `checksum_trusted`, without which GSO packets, whose
    checksums are partial, cannot pass. A compiled (mypyc) method may have no signature to read: the
    engine, the only compiled handler, takes it."""
    try:
        params = inspect.signature(handler.handle_packet).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return True
    return "checksum_trusted" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _ip_length(raw: bytes) -> int | None:
    """The packet's length according to its IP header, to detect copy-range truncation."""
    if len(raw) >= 20 and raw[0] >> 4 == 4:
        return int.from_bytes(raw[2:4], "big")
    if len(raw) >= 40 and raw[0] >> 4 == 6:
        return 40 + int.from_bytes(raw[4:6], "big")
    return None


class NfqueueAdapter:
    """Reads one NFQUEUE, feeds the handler, applies its decisions. One instance per queue and process.

    Construction does no I/O (tests drive `process`/`apply_output`/`drain` with fake packets); `open()`
    binds the queue (root or CAP_NET_ADMIN), `run()` loops until `stop()` and then drains and closes.
    """

    def __init__(
        self,
        handler: PacketHandler,
        *,
        queue_num: int = 0,
        max_len: int = 4096,
        copy_range: int = 65535,
        fail_open: bool = False,
        tick: float = 0.5,
        batch: int = 64,
        sender: PacketSender | None = None,
        error_verdict: Verdict = Verdict.DROP,
        drain_verdict: Verdict = Verdict.DROP,
        clock: Callable[[], float] = time.monotonic,
        repeat_mark: int | None = None,
        bypass_mark: int = 0,
        gso: bool = True,
    ) -> None:
        if Verdict.HOLD in (error_verdict, drain_verdict):
            raise ValueError("error_verdict and drain_verdict must be ACCEPT or DROP")
        if tick <= 0 or batch < 1:
            raise ValueError("tick must be positive and batch at least 1")
        if not 0 <= bypass_mark <= 0xFFFFFFFF or bypass_mark & (bypass_mark - 1):
            raise ValueError("bypass_mark must be 0 or a single bit of the 32-bit mark")
        if repeat_mark is not None and repeat_mark & bypass_mark:
            raise ValueError("bypass_mark must not be a bit of repeat_mark")
        self.handler = handler
        self.queue_num = queue_num
        self.max_len = max_len
        self.copy_range = min(copy_range, NFQ_COPY_LIMIT)
        # Ask for GSO packets whole (NFQA_CFG_F_GSO); `gso_on` says whether the kernel took the flag.
        self.gso = gso and _takes_trust(handler)
        if gso and not self.gso:
            log.warning(
                "GSO packets off: the handler's handle_packet takes no checksum_trusted, so aggregates with "
                "partial checksums would be dropped as bad"
            )
        self.gso_on = False
        self.fail_open = fail_open
        self.tick = tick
        self.batch = batch
        self.sender = sender
        self.error_verdict = error_verdict
        self.drain_verdict = drain_verdict
        self.clock = clock
        self.repeat_mark = repeat_mark
        self.bypass_mark = bypass_mark
        self.stats = QueueStats()
        self._held: dict[int, QueuedPacket] = {}
        self._draining = False
        self._stopping = False
        self._fatal: BaseException | None = None
        self._nfq: Any = None
        self._sock: socket.socket | None = None
        self._reader: _BatchReader | None = None
        self._wake_r, self._wake_w = -1, -1
        # The packet inside `process` and whether it got its verdict, for the last-resort error path.
        self._current: QueuedPacket | None = None
        self._current_done = False
        # Accepts deferred to the end of the read batch (see _flush); only while `_batching`.
        self._pending: list[QueuedPacket] = []
        self._batching = False
        self._batch_head, self._batch_tail = _verdict_message_parts(
            queue_num, _NF_ACCEPT if repeat_mark is None else _NF_REPEAT, repeat_mark
        )
        self._drop_upto = _verdict_message_parts(queue_num, _NF_DROP, None, seq=_UNSEEN_SEQ)[0]
        self._drop_one = _verdict_message_parts(queue_num, _NF_DROP, None, _NFQNL_MSG_VERDICT, _UNSEEN_SEQ)[0]
        # The id the next queued packet must have (the kernel numbers a queue's packets 1, 2, ...; -1:
        # not known yet). A packet with a later id means the ones between never reached us.
        self._next_id = -1
        self._unseen_logged = -math.inf
        # Whether the packet in `_process` is a GSO packet (NFQA_SKB_GSO): no RST rides its verdict.
        self._gso_packet = False

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Bind the queue. Raises OSError when it cannot (not root, queue taken by another process)."""
        from netfilterqueue import COPY_PACKET, NetfilterQueue  # optional dependency: import on use

        nfq = NetfilterQueue()
        try:
            nfq.bind(
                self.queue_num, self.process, max_len=self.max_len, mode=COPY_PACKET, range=self.copy_range
            )
        except OSError as exc:  # NetfilterQueue says only "Failed to create queue N."
            raise OSError(bind_problem(self.queue_num)) from exc
        self._nfq = nfq
        self._next_id = 1  # a new binding is a new kernel queue instance, whose first packet is id 1
        try:
            sock = self._sock = socket.socket(fileno=os.dup(nfq.get_fd()))
            early = self._configure_queue(sock)
            # O_NONBLOCK is shared with NetfilterQueue's own descriptor; we never call its blocking run().
            sock.setblocking(False)
            self._reader = _BatchReader(sock, self.stats, info=self.gso_on)
            if early:
                # Packets queued while we waited for the acks. _Replay only has recv(), which is all
                # run_socket uses.
                self._nfq.run_socket(_Replay(early, self._reader))
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise
        log.info(
            "bound NFQUEUE %d (max_len %d, copy %d, fail-open %s, GSO packets %s)",
            self.queue_num,
            self.max_len,
            self.copy_range,
            self.fail_open,
            "on" if self.gso_on else "off",
        )

    def _configure_queue(self, sock: socket.socket) -> list[bytes]:
        """The queue settings NetfilterQueue does not offer, each acknowledged by the kernel: the copy
        range past NetfilterQueue's 4,016 bytes, fail-open, GSO packets whole. A refused copy range or GSO
        flag falls back to what NetfilterQueue set up (said in the log); a refused fail-open flag is an
        error, as it always was. Returns the datagrams read while waiting, for the caller to process."""
        early: list[bytes] = []
        try:
            early += set_copy_range(sock, self.queue_num, self.copy_range)
        except OSError as exc:
            log.warning(
                "queue %d: the kernel refused copy range %d (%s): packets are copied up to %d bytes",
                self.queue_num,
                self.copy_range,
                exc,
                NFQ_MAX_COPY,
            )
            self.copy_range = min(self.copy_range, NFQ_MAX_COPY)
        self.stats.copy_range = self.copy_range
        if self.fail_open:
            early += set_fail_open(sock, self.queue_num)
        self.gso_on = False
        if self.gso and self.copy_range < NFQ_COPY_LIMIT:
            log.warning(
                "queue %d: GSO packets off: copy range %d cannot hold a 64 KB aggregate (set %d or more); "
                "the kernel segments aggregates before queueing",
                self.queue_num,
                self.copy_range,
                NFQ_COPY_LIMIT,
            )
        elif self.gso:
            try:
                early += set_gso(sock, self.queue_num)
            except OSError as exc:  # EOPNOTSUPP or EINVAL: a kernel before 3.10
                log.warning(
                    "queue %d: the kernel does not queue GSO packets whole (%s): it segments them before "
                    "queueing, as without the flag",
                    self.queue_num,
                    exc,
                )
            else:
                self.gso_on = True
        self.stats.gso = int(self.gso_on)
        return early

    def close(self) -> None:
        """Unbind and release descriptors. Call `drain()` first (run() does) or held packets are lost."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r, self._wake_w = -1, -1

    def __enter__(self) -> NfqueueAdapter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._nfq is not None:
            self.drain()
        self.close()

    def stop(self) -> None:
        """Ask `run()` to finish: it drains, closes and returns. Safe from signal handlers and threads."""
        self._stopping = True
        if self._wake_w >= 0:
            # A full pipe means the loop is being woken anyway.
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def run(self) -> None:
        """Process packets and timer ticks until `stop()`, then drain and close. Opens if needed."""
        if self._nfq is None:
            self.open()
        assert self._sock is not None and self._reader is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        next_tick = self.clock() + self.tick
        try:
            while not self._stopping:
                timeout_ms = max(0, int((next_tick - self.clock()) * 1000) + 1)
                for fd, _ in poller.poll(timeout_ms):
                    if fd == self._wake_r:
                        self._drain_pipe()
                    else:
                        self._read_batch()
                if self._fatal is not None:
                    break
                now = self.clock()
                if now >= next_tick:
                    self.timer(now)
                    next_tick = now + self.tick
        finally:
            try:
                self.drain()
            finally:
                self.close()
        if self._fatal is not None:
            raise self._fatal

    # ------------------------------------------------------------------ the translation
    def process(self, pkt: QueuedPacket) -> None:
        """NetfilterQueue callback: one packet in, its decision applied. Never raises."""
        self._current = pkt
        self._current_done = False
        try:
            self._process(pkt)
        except BaseException as exc:  # nothing may reach NetfilterQueue's C code
            if isinstance(exc, Exception):
                self.stats.handler_errors += 1
                log.exception("NFQUEUE packet processing failed")
            else:
                self._fatal = exc
                self._stopping = True
            if not self._current_done and id(pkt) not in self._held:
                self._error_verdict(pkt)
        finally:
            self._current = None

    def _process(self, pkt: QueuedPacket) -> None:
        # The per-packet path: written for speed (one stats lookup, no call for what the common packet
        # does not need), measured with tools/profile_engine.py --path adapter.
        st = self.stats
        st.packets += 1
        pid = pkt.id
        if pid != self._next_id and self._next_id >= 0:
            self._unseen(self._next_id, pid)
        self._next_id = (pid + 1) & 0xFFFFFFFF
        raw = pkt.get_payload()
        size = len(raw)
        if size > st.largest:  # noqa: PLR1730 (no call on the per-packet path)
            st.largest = size
        if size >= self.copy_range:
            # Only a packet that filled the copy range can have been cut short (the kernel has already
            # checked the IP length against the packet before netfilter sees it).
            ip_len = _ip_length(raw)
            if ip_len is not None and ip_len > size:
                st.truncated += 1
        if self._draining:
            # Read during the drain: the engine has shut down, so it only gets the drain verdict.
            self.stats.drained += 1
            self._verdict(pkt, self.drain_verdict, None)
            return
        trusted = False
        if self.gso_on:
            self._gso_packet = False
            trusted = self._checksum_trusted(pid, size)
        rmark = self.repeat_mark
        bmark = self.bypass_mark
        if rmark is not None or bmark:
            mark = pkt.mark
            if mark & bmark:
                self._bypass_looped(pkt)
                return
            if mark == rmark:
                self._looped(pkt)
                return
        try:
            if trusted:
                dec = self.handler.handle_packet(raw, self.clock(), pkt, checksum_trusted=True)
            else:
                dec = self.handler.handle_packet(raw, self.clock(), pkt)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler failed on a packet; verdict %s", self.error_verdict.name)
            self._error_verdict(pkt)
            return
        verdict = dec.verdict
        bypass = dec.bypass
        if (
            verdict is _ACCEPT
            and self._batching
            and dec.packet is None
            and not dec.releases
            and not dec.send
            and not bypass
        ):
            # The common packet: its accept waits for the end of the read batch (_flush).
            st.accepted += 1
            self._pending.append(pkt)
            self._current_done = True
            return
        if self._pending and (verdict is not Verdict.DROP or dec.releases or dec.send):
            # Keep the order in which the engine decided: what was accepted before this goes first (a
            # forged RST must not overtake the packets accepted before it). Only a plain drop, which
            # sends nothing, needs no flush.
            self._flush()
        if verdict is _HOLD:
            st.held += 1
            self._held[id(pkt)] = pkt
            st.holding = len(self._held)
        else:
            if verdict is _ACCEPT:
                st.accepted += 1
                if bypass:
                    self._bypass(pkt, dec.packet)
                    if dec.releases or dec.send:
                        self._apply(dec.releases, dec.send)
                    return
            else:
                st.dropped += 1
                if 0 <= dec.in_place < len(dec.send) and not self._gso_packet:
                    # An RST goes where this packet was going: it leaves as this packet's verdict, at
                    # its place among the sends (tcpguard.core.decision).
                    self._apply(dec.releases, dec.send, pkt, dec.in_place)
                    return
            self._verdict(pkt, verdict, dec.packet)
        if dec.releases or dec.send:
            self._apply(dec.releases, dec.send)

    def _checksum_trusted(self, pid: int, size: int) -> bool:
        """Whether the kernel vouches for packet `pid`'s checksum, from the NFQA_SKB_INFO the reader saw
        in its datagram (see the module's notes): partial (to be completed on the way out), or verified
        on a hook where the kernel would have said NOTVERIFIED otherwise. Counts GSO packets."""
        reader = self._reader
        if reader is None:
            return False
        flags, hook = _info_of(reader.data, pid, size)
        if hook < 0:
            return False  # not the datagram we parsed (cannot happen with one packet per datagram)
        st = self.stats
        if flags & NFQA_SKB_GSO:
            st.gso_packets += 1
            self._gso_packet = True
        if flags & NFQA_SKB_CSUMNOTREADY:
            st.csum_partial += 1
        elif flags & NFQA_SKB_CSUM_NOTVERIFIED or hook not in _VERIFYING_HOOKS:
            return False
        st.csum_trusted += 1
        return True

    def _looped(self, pkt: QueuedPacket) -> None:
        """A packet carrying our mark is one we accepted already (or forged): with `queue.repeat` it went
        back through the hook and was queued again, because the NFQUEUE rule that sent it here does not
        exempt the mark (tcpguard's own chain does; an operator's rule with `iptables.manage: false` may
        not). Judging it again would repeat it for ever, 100,000s of verdicts a second for one SYN and no
        packet ever leaving. It gets a plain accept, which ends its trip through this hook: the rules after
        ours do not see it, the packet is not lost, and the log says once what to fix."""
        st = self.stats
        st.looped += 1
        st.accepted += 1
        if st.looped == 1:
            log.error(
                "a packet came back to queue %d carrying tcpguard's mark %#x: the NFQUEUE rule that feeds "
                "the queue must not match it (add `-m mark ! --mark %#x` to it, or a `-m mark --mark %#x "
                "-j RETURN` rule before it). Such packets are accepted without a second look, and skip the "
                "rules after the queue rule; counted as 'looped'",
                self.queue_num,
                self.repeat_mark,
                self.repeat_mark,
                self.repeat_mark,
            )
        self._accept_unjudged(pkt)

    def _bypass(self, pkt: QueuedPacket, payload: bytes | None) -> None:
        """Accept the packet with the bypass bit added to its mark, as NF_REPEAT: the packet runs the hook
        again, tcpguard's chain copies the bit into the connection's conntrack mark (CONNMARK) and the
        connmark rule lets it, and every later packet of the connection, past the queue. Without a
        bypass mark the packet is simply accepted (the kernel keeps queueing the connection)."""
        bmark = self.bypass_mark
        if not bmark:
            self._verdict(pkt, Verdict.ACCEPT, payload)
            return
        try:
            if payload is not None:
                self.stats.rewritten += 1
                pkt.set_payload(bytes(payload))
            rmark = self.repeat_mark
            pkt.set_mark((pkt.mark if rmark is None else rmark) | bmark)
            pkt.repeat()
            self.stats.bypass_marked += 1
        except (RuntimeError, TypeError, OSError) as exc:
            self.stats.verdict_errors += 1
            log.warning("bypass verdict failed: %s", exc)
        if pkt is self._current:
            self._current_done = True

    def _bypass_looped(self, pkt: QueuedPacket) -> None:
        """A packet carrying the bypass bit was answered by us already with a bypass verdict and has been
        queued again: the chain that feeds the queue neither saved the bit nor exempted it. Judging it again
        would bypass-repeat it for ever. A plain accept ends its trip through this hook (rules after the
        queue rule do not see it); the connection's next packets, whose conntrack mark never got the bit,
        keep coming to the engine, whose tombstone answers them and reports the leak (BypassLeak)."""
        st = self.stats
        st.bypass_looped += 1
        st.accepted += 1
        if st.bypass_looped == 1:
            b = f"{self.bypass_mark:#x}"
            log.error(
                "a packet came back to queue %d carrying tcpguard's bypass bit %s: the chain that feeds the "
                "queue must save the bit and exempt it before its NFQUEUE rule (`-m mark --mark %s/%s -j "
                "CONNMARK --set-xmark %s/%s`, then `-m connmark --mark %s/%s -j ACCEPT`). Such packets "
                "are accepted without a second look; counted as 'bypass_looped'",
                self.queue_num,
                *([b] * 7),
            )
        self._accept_unjudged(pkt)

    def _accept_unjudged(self, pkt: QueuedPacket) -> None:
        """Accept a packet the engine never saw (one that came back to the queue), after the accepts that
        wait in the batch before it, so packets still leave in the order they were decided."""
        if self._pending:
            self._flush()
        try:
            pkt.accept()
        except (RuntimeError, TypeError, OSError) as exc:
            self.stats.verdict_errors += 1
            log.warning("verdict ACCEPT failed: %s", exc)
        if pkt is self._current:
            self._current_done = True

    def apply_output(self, out: Output) -> None:
        """Apply a timer or shutdown output: releases in order, then sends."""
        self._apply(out.releases, out.send)

    def timer(self, now: float) -> None:
        """One timer tick: the handler's idle work, applied. Never raises."""
        self.stats.timer_ticks += 1
        if self.stats.send_pending:
            self._retry_sends()
        try:
            out = self.handler.handle_timer(now)
        except Exception:
            self.stats.timer_errors += 1
            log.exception("handler timer failed")
            return
        self.apply_output(out)

    def drain(self) -> None:
        """Give every packet we hold or have queued a verdict: the shutdown releases, then the fallback."""
        if self._draining:
            return
        self._draining = True
        if self._pending:
            self._flush()  # accepted by the engine already (left over only by an interrupted flush)
        try:
            out = self.handler.shutdown(self.clock())
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler shutdown failed")
        else:
            self.apply_output(out)
        for pkt in list(self._held.values()):
            self.stats.drained += 1
            self._verdict(pkt, self.drain_verdict, None)
        self._held.clear()
        self.stats.holding = 0
        # Packets already queued to us: read what is there now (bounded) and verdict them.
        if self._reader is not None and self._nfq is not None:
            for _ in range(max(1, self.max_len // self.batch + 1)):
                before = self.stats.packets
                self._read_batch()
                if self.stats.packets == before:
                    break

    # ------------------------------------------------------------------ helpers
    def _apply(
        self,
        releases: Sequence[Any],
        send: Sequence[bytes],
        carrier: QueuedPacket | None = None,
        in_place: int = -1,
    ) -> None:
        """Releases in order, then the forged packets; `send[in_place]` rides `carrier`'s verdict (a
        dropped packet going where it goes), or is sent like the rest if that verdict fails."""
        for rel in releases:
            pkt = self._held.pop(id(rel.token), None)
            if pkt is None or pkt is not rel.token:
                if pkt is not None:  # an id collision with a different object: put it back
                    self._held[id(pkt)] = pkt
                self.stats.release_unknown += 1
                log.warning("release of a packet that is not held: %r", rel.token)
                continue
            self.stats.released += 1
            if rel.verdict == Verdict.ACCEPT:
                self.stats.release_accepted += 1
                self._verdict(pkt, Verdict.ACCEPT, rel.packet)
            else:
                self.stats.release_dropped += 1
                self._verdict(pkt, Verdict.DROP, None)
        st = self.stats
        st.holding = len(self._held)
        for i, raw in enumerate(send):
            if i == in_place and carrier is not None:
                ok = self._verdict_in_place(carrier, raw)
                carrier = None
                if ok:
                    st.sent += 1
                    st.sent_in_place += 1
                    continue
            result = self.sender.send(raw) if self.sender is not None else -1
            if result > 0:
                st.sent += 1
            elif result == 0:
                st.send_pending += 1
            else:
                st.send_errors += 1
        if carrier is not None:
            self._verdict(carrier, Verdict.DROP, None)  # in_place pointed past `send`: a plain drop

    def _verdict_in_place(self, pkt: QueuedPacket, rst: bytes) -> bool:
        """Give a dropped packet the RST as its new bytes and accept it. False (the packet then dropped)
        if NetfilterQueue refuses the new payload: the caller sends the RST by itself instead."""
        try:
            pkt.set_payload(rst)
        except (RuntimeError, TypeError, OSError, ValueError) as exc:
            log.warning("an RST could not replace a dropped packet (%s): sent separately", exc)
            self._verdict(pkt, Verdict.DROP, None)
            return False
        self._verdict(pkt, Verdict.ACCEPT, None)
        return True

    def _retry_sends(self) -> None:
        """A round of the sender's retries (it owns their bounds); counted here with the rest."""
        if self.sender is None:
            return
        try:
            sent, lost = self.sender.retry()
        except Exception:  # a sender must not raise; if one does, the packet loop must not stop for it
            log.exception("forged packet retry failed")
            return
        st = self.stats
        st.sent += sent
        st.send_retried += sent
        st.send_errors += lost
        st.send_pending = max(0, st.send_pending - sent - lost)

    def _verdict(self, pkt: QueuedPacket, verdict: Verdict, payload: bytes | None) -> None:
        try:
            if verdict == Verdict.ACCEPT:
                if payload is not None:
                    self.stats.rewritten += 1
                    pkt.set_payload(bytes(payload))
                if self.repeat_mark is not None:
                    # NF_ACCEPT would skip the rest of the hook, operator rules after our jump included;
                    # NF_REPEAT with our mark runs the hook again and the chain's mark rule returns the
                    # packet to the rule after the jump.
                    pkt.set_mark(self.repeat_mark)
                    pkt.repeat()
                else:
                    pkt.accept()
            else:
                pkt.drop()
        except (RuntimeError, TypeError, OSError) as exc:
            self.stats.verdict_errors += 1
            log.warning("verdict %s failed: %s", verdict.name, exc)
        if pkt is self._current:
            self._current_done = True

    def _read_batch(self) -> None:
        if self._reader is None or self._nfq is None:
            return
        self._reader.left = self.batch
        self._batching = not self._draining
        try:
            self._nfq.run_socket(self._reader)
        finally:
            self._batching = False
            if self._pending:
                self._flush()
            if self.stats.send_pending:
                self._retry_sends()

    def _flush(self) -> None:
        """Accept the deferred packets: one batch verdict message for all of them when that is exact.

        The kernel's batch verdict answers every packet of the queue up to an id, so it is only sent when
        no packet is held (a held packet is older than the deferred ones; see _process); otherwise, and
        for a single packet, each gets its own verdict. One message instead of one per packet saves the
        system calls, and the kernel then forwards the batch in one go, which also wakes each receiving
        process once per batch instead of once per packet.
        """
        pending = self._pending
        self._pending = []
        if len(pending) > 1 and not self._held and self._sock is not None:
            msg = self._batch_head + pending[-1].id.to_bytes(4, "big") + self._batch_tail
            try:
                self._sock.sendto(msg, (0, 0))
            except OSError as exc:
                log.warning("batch verdict failed (%s): answering %d packets one by one", exc, len(pending))
            else:
                self.stats.batches += 1
                self.stats.batched += len(pending)
                return
        done = 0
        try:
            for pkt in pending:
                self._verdict(pkt, _ACCEPT, None)
                done += 1
        finally:
            if done < len(pending):
                # Interrupted (an exception a verdict does not catch): the rest waits for the next flush
                # or the drain instead of staying in the kernel's queue unanswered.
                self._pending[:0] = pending[done:]

    def _unseen(self, first: int, upto: int) -> None:
        """Queue ids `first`..`upto - 1` never reached us: the kernel lost their messages (ENOBUFS: then
        it did not queue them either) or the receive buffer cut them short (then it holds them). Either
        way nobody inspected them, so they are dropped now, as they always were in effect (left unanswered
        until the unbind): a later batch verdict, which answers every older queued packet, must not
        accept them."""
        n = (upto - first) & 0xFFFFFFFF
        self.stats.unseen += n
        now = self.clock()
        if now - self._unseen_logged >= 1.0:  # an overloaded queue loses messages often: one line a second
            self._unseen_logged = now
            log.warning(
                "queued packets never reached tcpguard (ids %d-%d; %d in all so far): dropped",
                first,
                upto - 1,
                self.stats.unseen,
            )
        if self._pending:
            self._flush()  # their ids are all before `first`
        sock = self._sock
        if sock is None:
            return
        try:
            if not self._held:
                # Every packet before `upto` that is still queued is one of them: one message.
                sock.sendto(self._drop_upto + ((upto - 1) & 0xFFFFFFFF).to_bytes(4, "big"), (0, 0))
            else:
                # A held packet is older than them: one message each. At most max_len of them can be
                # queued (the queue's length bound), and the kernel queued them in id order.
                for k in range(max(0, n - self.max_len), n):
                    pid = (first + k) & 0xFFFFFFFF
                    sock.sendto(self._drop_one + pid.to_bytes(4, "big"), (0, 0))
        except OSError as exc:
            log.warning("dropping unseen packets failed: %s", exc)

    def _error_verdict(self, pkt: QueuedPacket) -> None:
        """The verdict of a packet whose handling failed; an ACCEPT goes after the accepts before it."""
        if self._pending and self.error_verdict is _ACCEPT:
            self._flush()
        self._verdict(pkt, self.error_verdict, None)

    def _drain_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
