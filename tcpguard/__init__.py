"""tcpguard: an inline TCP filtering daemon with Haka-style rule modules.

The names exported here are the rule API that operators' rule modules import::

    from tcpguard import rule, tcp_connection

    @rule(on=tcp_connection.events.new_connection)
    def web_only(flow, tcp):
        if flow.dstport not in (80, 443):
            flow.reset()

See `docs/rules.md` for the full reference.
"""

from tcpguard.core.conntrack import Connection as Flow
from tcpguard.core.cursor import Cursor, Match
from tcpguard.core.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG
from tcpguard.core.rules import Rule, RuleSet, rule, tcp_connection
from tcpguard.core.stream import HalfStream as Stream

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "Cursor",
    "Flow",
    "Match",
    "Rule",
    "RuleSet",
    "Stream",
    "rule",
    "tcp_connection",
]
__version__ = "0.1.0"
