"""Drop scan probes and bad TCP flag combinations: Xmas, NULL and FIN scans, SYN with URG or PSH.

Event: `new_connection`, inspecting `tcp.flags` of the packet that opened the flow.

Port scanners send segments no real TCP stack sends to learn which ports are open from how the target
answers (RFC 793 makes a closed port answer RST and an open one stay silent). This rule drops them
silently, so the scanner learns nothing, and raises a medium-severity alert naming the probe.

What a rule can see, and so what this one covers:

* A segment without SYN and without ACK (Xmas: FIN+PSH+URG, NULL: no flag, FIN scan: FIN alone) belongs
  to no connection tcpguard knows, so the engine picks it up as a mid-stream connection
  (`engine.policies.midstream: track`, the default) and calls `new_connection` with it. Every segment of a
  real connection after the SYN carries ACK, so such a "connection" is always a probe: dropped.
  With `midstream: drop` the engine drops these itself; with `midstream: accept` they pass uninspected and
  this rule never sees them.
* A SYN with URG or PSH is the start of a new connection, so `new_connection` sees it too. No common
  stack sets either on a bare SYN; nmap's OS-detection probes do. Dropped. (SYN with ECE+CWR is ECN
  negotiation and is left alone.)
* SYN+FIN and SYN+RST never reach a rule: the engine drops them itself ("invalid flag combination").
* A bad combination inside a connection that is already tracked is not an event: rules only hear about
  a connection's first packet and its reassembled bytes, and the engine's state machine judges the rest
  (an RST outside the window, a SYN in ESTABLISHED, data before the handshake are dropped there).

Module order: file names sort `badflags.py` before `firewall.py`, so a probe to a port the firewall would
refuse is dropped here silently instead of being answered with a reset.
"""

import ipaddress

from tcpguard import rule, tcp_connection

# TCP flag bits (RFC 9293); the rule API does not export them.
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

SCANS = {
    FIN | PSH | URG: "Xmas scan",
    0: "NULL scan",
    FIN: "FIN scan",
}
BAD_ON_SYN = URG | PSH


def probe_name(flags):
    """The kind of probe a connection's first segment is, or None if its flags are legitimate."""
    if flags & SYN:
        if flags & BAD_ON_SYN:
            return "SYN with " + "+".join(n for bit, n in ((URG, "URG"), (PSH, "PSH")) if flags & bit)
        return None
    if flags & (ACK | RST):
        return None  # a real connection picked up mid-stream (the engine never opens on RST)
    return SCANS.get(flags & (FIN | PSH | URG), "segment without ACK")


@rule(on=tcp_connection.events.new_connection)
def bad_flags(flow, tcp):
    what = probe_name(tcp.flags)
    if what is None:
        return
    sender = ipaddress.ip_address(tcp.src)
    flow.alert(
        f"{what} from {sender} (flags {tcp.flag_names()}) to port {tcp.dstport}",
        severity="medium",
        flags=tcp.flags,
    )
    flow.drop()
