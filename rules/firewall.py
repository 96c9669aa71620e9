"""Allow-list firewall on new connections: only listed client networks may reach listed servers and ports.

Event: `new_connection` (the client's SYN, before it is forwarded).

What: a connection passes only if an entry of `ALLOW` matches it: the client's address in one of its
`clients` networks, the server's in one of its `servers` networks, the server port in its `ports`.
Anything else is refused with a low-severity alert and `flow.reset()`.

Why a reset: the client's connect() fails at once with "connection refused" instead of hanging until it
times out, and the server never sees the SYN. Connections already open when tcpguard starts are picked
up mid-stream (`flow.midstream`) and judged the same way, on their first packet. File names sort
`badflags.py` (probes are dropped silently, never answered) before this module, and `ratelimit.py` after
it, so it only counts the connections allowed here.

To adapt: edit `ALLOW`. Networks are CIDR strings, IPv4 and IPv6 mixed ("any": every address of both);
ports are numbers or "first-last" ranges. Entries are tried in order and the first match allows; there
is no deny entry. A typo is a load error that `tcpguard check` reports.
"""

import functools
import ipaddress

from tcpguard import rule, tcp_connection

PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]

ALLOW = [
    # Anyone may reach the private ranges on the usual service ports.
    {"clients": "any", "servers": PRIVATE, "ports": [22, 25, 53, 80, 443, 8080]},
    # Example: only the admin network may reach the management ports.
    # {"clients": ["10.1.0.0/16"], "servers": PRIVATE, "ports": ["8443", "9000-9099"]},
]


def _networks(spec):
    if spec == "any":
        spec = ["0.0.0.0/0", "::/0"]
    return tuple(ipaddress.ip_network(n) for n in spec)


def _ports(spec):
    out = []
    for p in spec:
        if isinstance(p, str) and "-" in p:
            lo, hi = (int(x) for x in p.split("-", 1))
        else:
            lo = hi = int(p)
        if not 0 < lo <= hi <= 65535:
            raise ValueError(f"bad port or range {p!r}")
        out.append((lo, hi))
    return tuple(out)


# Compiled once at load: a typo in ALLOW is a load error (`tcpguard check` reports it), not a runtime one.
_ENTRIES = [(_networks(e["clients"]), _networks(e["servers"]), _ports(e["ports"])) for e in ALLOW]


def _inside(addr, networks):
    return any(addr.version == n.version and addr in n for n in networks)


# Remembered per (client, server, port): the many connections a client opens to one service are decided
# once (bounded: the least recently used answers go first). A reload, which an edit of ALLOW needs anyway,
# starts with an empty cache.
@functools.lru_cache(maxsize=4096)
def allowed(client, server, port):
    """(allowed, reason): whether some ALLOW entry admits client -> server:port, and why not if not."""
    addresses_ok = False
    for clients, servers, ports in _ENTRIES:
        if _inside(client, clients) and _inside(server, servers):
            addresses_ok = True
            if any(lo <= port <= hi for lo, hi in ports):
                return True, ""
    if addresses_ok:
        return False, f"connection to port {port} not allowed"
    return False, f"connection from {client} to {server} not allowed"


@rule(on=tcp_connection.events.new_connection)
def allow_list(flow, tcp):
    ok, why = allowed(flow.srcip, flow.dstip, flow.dstport)
    if not ok:
        flow.alert(why, severity="low")
        flow.reset()
