"""Per-source rate limit on new connections: a token bucket per client address (IPv6: per /64).

Event: `new_connection`.

Each source may open `BURST` connections at once and then `RATE` per second on average; a connection
beyond that is dropped silently (`ACTION = "drop"`: the SYN goes unanswered and the client's retries are
dropped too while the gateway remembers the refused connection) or refused (`ACTION = "reset"`: the
client's connect() fails at once). The first refusal of a burst raises a medium-severity alert; the next
alert for that source comes only after it has been back under the limit, so a flood does not flood the
alert log too. Sources in `EXEMPT` are never limited. Connections picked up mid-stream (open before
tcpguard started) are not new and are not counted.

IPv6 sources are grouped by their /64 (`V6_PREFIX`): a host usually owns a whole /64 and could otherwise
step around the limit by changing addresses.

State and its bounds: the buckets live in this module (a dict at module level), so they last as long as
the loaded rule set: a reload (SIGHUP) starts every source afresh, and with several workers each worker
process counts the connections it sees (`--queue-balance` spreads connections by a hash of both
addresses, so one source's connections to different servers can land on different workers). At most
`MAX_SOURCES` buckets are kept; beyond that the least recently seen source is forgotten (it starts again
with a full bucket), so a flood from spoofed sources costs bounded memory.

Time: rules get no clock argument. `flow.started` is the engine's clock at the connection's first packet:
`time.monotonic()` in the daemon and the packet's timestamp in `tcpguard replay`, so the rule behaves the
same live and on a capture. (`time.time()` would break replays and jumps with the wall clock.)

Module order: file names sort `ratelimit.py` after `badflags.py` and `firewall.py`, and the first rule
that acts on a connection stops the others, so probes and refused connections do not count.
"""

import ipaddress
from collections import OrderedDict

from tcpguard import rule, tcp_connection

RATE = 2.0  # connections per second per source, sustained
BURST = 20  # connections a source may open at once
ACTION = "drop"  # or "reset"
V6_PREFIX = 64
EXEMPT = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128")]
MAX_SOURCES = 100_000

if ACTION not in ("drop", "reset"):
    raise ValueError(f"ACTION must be 'drop' or 'reset', not {ACTION!r}")

# source -> [tokens, time of the last update, alerted since it went over the limit]
_buckets = OrderedDict()


def source_key(addr):
    """What one bucket counts: the address itself (IPv4) or its /V6_PREFIX network (IPv6)."""
    if addr.version == 6:
        return ipaddress.ip_network(f"{addr}/{V6_PREFIX}", strict=False)
    return addr


def take(key, now):
    """Spend one token of `key`'s bucket at time `now`: (allowed, first refusal since under the limit)."""
    bucket = _buckets.get(key)
    if bucket is None:
        bucket = [float(BURST), now, False]
        _buckets[key] = bucket
        while len(_buckets) > MAX_SOURCES:
            _buckets.popitem(last=False)
    else:
        _buckets.move_to_end(key)
        bucket[0] = min(float(BURST), bucket[0] + max(now - bucket[1], 0.0) * RATE)
        bucket[1] = now
    if bucket[0] >= 1.0:
        bucket[0] -= 1.0
        bucket[2] = False
        return True, False
    first = not bucket[2]
    bucket[2] = True
    return False, first


@rule(on=tcp_connection.events.new_connection)
def rate_limit(flow, tcp):
    if flow.midstream:
        return
    client = flow.srcip
    if any(client.version == n.version and client in n for n in EXEMPT):
        return
    key = source_key(client)
    ok, first = take(key, flow.started)
    if ok:
        return
    if first:
        flow.alert(
            f"more than {BURST} new connections from {key} at once (limit {RATE:g} per second)",
            severity="medium",
        )
    if ACTION == "reset":
        flow.reset()
    else:
        flow.drop()
