"""Per-source rate limit on new connections: a token bucket per client address (IPv6: per /64).

Event: `new_connection`.

What: each source may open `BURST` connections at once and then `RATE` per second on average; a
connection beyond that is dropped (`ACTION = "drop"`: the SYN goes unanswered, and so do the client's
retries while the gateway remembers the connection) or refused (`ACTION = "reset"`: connect() fails at
once). The first refusal of a burst raises a medium-severity alert, the next one only after the source
was back under the limit, so a flood does not flood the alert log. Sources in `EXEMPT` are never limited;
connections picked up mid-stream are not new and not counted.

Why per /64 for IPv6: a host usually owns a whole /64 and could step around a per-address limit.

State and time: the buckets live in this module, so a reload starts every source afresh and each worker
process counts the connections it sees. At most `MAX_SOURCES` are kept (the least recently seen goes
first), so spoofed floods cost bounded memory. The clock is `flow.started` (the engine's: monotonic live,
the packet timestamps in `tcpguard replay`), never `time.time()`, so a replay behaves like the live run.

To adapt: set `RATE`, `BURST`, `ACTION`, `EXEMPT`. File names sort this module after `badflags.py` and
`firewall.py`, so probes and refused connections do not count.
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
