"""The integration tests' namespace network: a re-export of `tcpguard.devtools.labnet`, which `tcpguard lab`
uses too (see that module for how the network is built and torn down)."""

from __future__ import annotations

from tcpguard.devtools.labnet import (
    CLIENT_V4,
    CLIENT_V6,
    GW_CLIENT_V4,
    GW_CLIENT_V6,
    GW_SERVER_V4,
    GW_SERVER_V6,
    ROLES,
    SERVER_V4,
    SERVER_V6,
    Lab,
)

__all__ = [
    "CLIENT_V4",
    "CLIENT_V6",
    "GW_CLIENT_V4",
    "GW_CLIENT_V6",
    "GW_SERVER_V4",
    "GW_SERVER_V6",
    "ROLES",
    "SERVER_V4",
    "SERVER_V6",
    "Lab",
]
