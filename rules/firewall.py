"""Allow-list firewall on new connections.

A connection is let through only if its server address is in one of ALLOWED_NETWORKS and its server
port is in ALLOWED_PORTS; any other connection attempt is refused with a reset (the client's connect()
fails at once with "connection refused" instead of timing out). Edit the two lists for your network.
"""

import ipaddress

from tcpguard import rule, tcp_connection

ALLOWED_NETWORKS = [ipaddress.ip_network(n) for n in ("0.0.0.0/0", "::/0")]
ALLOWED_PORTS = {22, 25, 53, 80, 443, 8080}


@rule(on=tcp_connection.events.new_connection)
def allow_list(flow, tcp):
    if flow.dstport not in ALLOWED_PORTS or not any(flow.dstip in n for n in ALLOWED_NETWORKS):
        flow.alert(f"connection to port {flow.dstport} not allowed", severity="low")
        flow.reset()
