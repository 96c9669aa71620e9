"""Drop scan probes and bad TCP flag combinations: Xmas, NULL and FIN scans, SYN with URG or PSH.

Event: `new_connection`, inspecting `tcp.flags` of the packet that opened the flow.

What: port scanners send segments no real TCP stack sends, to learn from the answer which ports are open
(a closed port answers RST, an open one stays silent). This rule drops them silently, so the scanner
learns nothing, and raises a medium-severity alert naming the probe:

* A segment without SYN and without ACK (Xmas: FIN+PSH+URG, NULL: no flag, FIN scan: FIN alone) belongs
  to no connection, so the engine picks it up as a mid-stream connection (`engine.policies.midstream:
  track`, the default) and calls `new_connection` with it; every segment of a real connection after its
  SYN carries ACK. (With `midstream: drop` the engine drops them itself, with `accept` they pass unseen.)
* A SYN with URG or PSH: no common stack sends one, nmap's OS detection does. SYN with ECE+CWR is ECN
  negotiation and is left alone.

Why only these: SYN+FIN and SYN+RST never reach a rule (the engine drops them), and a bad combination
inside a tracked connection is judged by the engine's state machine, not by rules, which only hear of a
connection's first packet. File names sort `badflags.py` before `firewall.py`, so a probe the firewall
would refuse is dropped here silently instead of being answered with a reset.

To adapt: add a combination of flags without SYN to `SCANS`, with the name its alert gives; the flag
constants come from the rule API (`from tcpguard import SYN, ACK, ...`).
"""

import ipaddress

from tcpguard import ACK, FIN, PSH, RST, SYN, URG, rule, tcp_connection

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
